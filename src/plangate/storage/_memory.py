"""``memory://``: counters in this process. Exact, thread-safe, nothing shared."""

from __future__ import annotations

import math
import threading
import time
from array import array
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

from ..engine._credits import MAX_UNITS, CreditAccount, Grant, micros, required_of
from ..errors import StorageError, VersionConflict
from ._base import (
    SLIDING_BUCKETS,
    USAGE_HOUR,
    Counter,
    CounterState,
    CreditCharge,
    CreditState,
    CreditView,
    CustomerListener,
    CustomerPage,
    CustomerRecord,
    ExportLock,
    GrantCredits,
    GrantResult,
    Listeners,
    Peek,
    PublishedConfig,
    ReadCredits,
    Record,
    Reserve,
    ReserveResult,
    RevokeCredits,
    Settle,
    Storage,
    customer_of_prefix,
    customer_prefix,
    decode_cursor,
    encode_cursor,
    idempotency_key_of,
    prefix_of_key,
    usage_hour,
    usage_key,
)

_SWEEP_EVERY = 60.0  # seconds between sweeps of expired counters
_SETTLED_TTL = 600.0  # how long a settled reservation id is remembered
_SETTLED_MAX = 100_000


@dataclass(slots=True)
class _Sliding:
    width: float  # bucket width, seconds
    window: float
    buckets: dict[int, int] = field(default_factory=dict)  # bucket index → units, oldest first
    total: int = 0

    def evict(self, now: float) -> None:
        # A bucket counts while any part of it lies inside (now - window, now].
        horizon = now - self.window
        buckets = self.buckets
        while buckets:
            index = next(iter(buckets))
            if (index + 1) * self.width > horizon:
                break
            self.total -= buckets.pop(index)

    def expires_in(self, index: int, now: float) -> float:
        return (index + 1) * self.width + self.window - now

    def reset_after(self, now: float) -> float:
        if not self.buckets:
            return 0.0
        return self.expires_in(next(iter(self.buckets)), now)

    def wait_for(self, excess: int, now: float) -> float:
        """Seconds until at least ``excess`` units have left the window."""
        freed = 0
        for index, units in self.buckets.items():
            freed += units
            if freed >= excess:
                return self.expires_in(index, now)
        return self.window

    def add(self, now: float, units: int) -> int:
        """Count ``units`` used at ``now``; the index of the bucket that holds them.

        ``now`` never goes back (``MemoryStorage._clock``), so buckets stay in time order.
        """
        index = math.floor(now / self.width)  # as the Redis scripts compute it
        buckets = self.buckets
        buckets[index] = buckets.get(index, 0) + units
        self.total += units
        return index

    def adjust(self, index: int, units: int) -> None:
        """Add ``units`` (may be negative) to a bucket still in the window; never below 0."""
        held = self.buckets.get(index)
        if held is not None:
            units = max(units, -held)
            self.buckets[index] = held + units
            self.total += units

    @property
    def expires_at(self) -> float:
        last = next(reversed(self.buckets), None) if self.buckets else None
        return -math.inf if last is None else (last + 1) * self.width + self.window


def _int64s() -> array[int]:
    return array("q")


def _doubles() -> array[float]:
    return array("d")


@dataclass(slots=True)
class _Log:
    """A sliding window kept exactly: each reservation's sequence number (its time in µs,
    made unique), time and units, oldest first, in three arrays (24 bytes an entry). A unit
    used at ``t`` counts while ``now < t + window``.

    At most ``bound`` (the limit, at least 1) entries: reservations at the same time share
    one; at the bound, entries left with no units (refunded, free calls) are dropped, and if
    that is not enough, new units join the newest entry, at the later time. A settle of a
    dropped entry goes to the next newer one: a unit never counts shorter than it should."""

    window: float
    seqs: array[int] = field(default_factory=_int64s)
    times: array[float] = field(default_factory=_doubles)
    units: array[int] = field(default_factory=_int64s)
    total: int = 0
    next_seq: int = 0
    evicted: int = -1  # the newest seq that left the window

    def evict(self, now: float) -> None:
        times = self.times
        window = self.window
        if not times or times[0] + window > now:
            return
        gone = bisect_right(times, now, key=lambda t: t + window)
        self.total -= sum(self.units[:gone])
        self.evicted = self.seqs[gone - 1]
        del self.seqs[:gone], times[:gone], self.units[:gone]

    def reset_after(self, now: float) -> float:
        for i, units in enumerate(self.units):
            if units:
                return self.times[i] + self.window - now
        return 0.0

    def wait_for(self, excess: int, now: float) -> float:
        """Seconds until at least ``excess`` units have left the window."""
        freed = 0
        for i, units in enumerate(self.units):
            freed += units
            if freed >= excess:
                return self.times[i] + self.window - now
        return self.window

    def add(self, now: float, units: int, bound: int) -> int:
        """Count ``units`` used at ``now`` (never before the newest entry); their entry's
        sequence number, the slot a settle names."""
        self.total += units
        if self.times and self.times[-1] != now and len(self.times) >= bound:
            self._drop_empty()
        times = self.times
        if times and (times[-1] == now or len(times) >= bound):
            times[-1] = now  # later, never earlier: the units count no shorter than they should
            self.units[-1] += units
            return self.seqs[-1]
        # at least the time in µs: a counter that expired and starts again never reuses one
        seq = max(self.next_seq, math.floor(now * 1e6))
        self.next_seq = seq + 1
        self.seqs.append(seq)
        times.append(now)
        self.units.append(units)
        return seq

    def _drop_empty(self) -> None:
        keep = [i for i, units in enumerate(self.units) if units]
        self.seqs = array("q", (self.seqs[i] for i in keep))
        self.times = array("d", (self.times[i] for i in keep))
        self.units = array("q", (self.units[i] for i in keep))

    def adjust(self, seq: int, units: int, now: float, bound: int) -> None:
        """Add ``units`` (may be negative, never below 0) to the entry ``seq``, unless it has
        left the window; a dropped entry's units go to the next newer one."""
        if seq <= self.evicted:
            return
        i = bisect_left(self.seqs, seq)
        if i == len(self.seqs):
            if units > 0:
                self.add(now, units, bound)
            return
        held = self.units[i]
        units = max(units, -held)
        self.total += units
        self.units[i] = held + units

    @property
    def expires_at(self) -> float:
        return self.times[-1] + self.window if self.times else -math.inf


@dataclass(slots=True)
class _Hour:
    """One customer's usage in one hour: meter → units, and what was exported of it."""

    expires_at: float
    fields: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class _Fixed:
    resets_at: float
    total: int = 0

    @property
    def expires_at(self) -> float:
        return self.resets_at


class MemoryStorage(Storage):
    """Counters in a dict behind one lock. For one process: tests, demos, single workers."""

    in_process = True

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, _Log | _Sliding | _Fixed] = {}
        self._customers: dict[str, CustomerRecord] = {}
        #: the version each deleted record took: a record made again continues from it
        self._gone: dict[str, int] = {}
        self.listeners = Listeners()
        self._published: PublishedConfig | None = None
        self._settled: OrderedDict[str, float] = OrderedDict()
        self._next_sweep = 0.0
        self._now = 0.0
        #: credit balances by key, and each customer's idempotency keys of grants:
        #: key → (balance key, grant id, fingerprint)
        self._credits: dict[str, CreditAccount] = {}
        self._unmapped: dict[str, dict[str, int]] = {}
        #: usage_key → the hour's aggregates
        self._usage: dict[str, _Hour] = {}
        #: usage exports: name → (recorded batch, identifiers confirmed), and who holds each
        self._exports: dict[str, tuple[str, set[str]]] = {}
        self._export_locks: dict[str, _MemoryLock] = {}
        self._idempotency: dict[str, dict[str, tuple[str, str, str]]] = {}

    def _counter(
        self, counter: Counter, now: float, create: bool
    ) -> _Log | _Sliding | _Fixed | None:
        """The counter's state, current at ``now``. ``create``: made if missing, and kept as
        ``counter`` says (its limit crossed ``EXACT_WINDOW_LIMIT``: a plan changed)."""
        state = self._counters.get(counter.key)
        if state is None:
            if not create:
                return None
            if counter.exact:
                # a slot of an earlier life of this counter is older: it has left the window
                state = _Log(counter.window, evicted=math.floor(now * 1e6) - 1)
            elif counter.window > 0:
                state = _Sliding(counter.window / SLIDING_BUCKETS, counter.window)
            else:
                state = _Fixed(counter.resets_at)
            self._counters[counter.key] = state
        elif not isinstance(state, _Fixed):
            state.evict(now)
            if create and (type(state) is _Log) != counter.exact:
                state = self._counters[counter.key] = _convert(state, counter, now)
        return state

    def _clock(self, now: float) -> float:
        """The store's time: the latest ``now`` it was given.

        Requests read the clock before they take the lock, so their times can arrive a little
        out of order. Counting each at the latest time seen keeps the buckets in time order and
        never lets a late arrival see a window that a newer one has already moved past.
        """
        if now > self._now:
            self._now = now
            return now
        return self._now

    def reserve(self, op: Reserve) -> ReserveResult:
        counters = op.counters
        with self._lock:
            now = self._clock(op.now)
            if now >= self._next_sweep:
                self._sweep(now)
            states = [self._counter(c, now, create=True) for c in counters]
            violated = tuple(
                i
                for i, c in enumerate(counters)
                if c.limit is not None and states[i].total + c.cost > c.limit  # type: ignore[union-attr]
            )
            if violated and op.credits:
                # a counter whose excess is charged as overage never refuses by itself
                soft = {i for charge in op.credits for i, _, _ in charge.overage}
                violated = tuple(i for i in violated if i not in soft)
            credits: tuple[CreditState, ...] = ()
            short: tuple[int, ...] = ()
            if op.credits:
                credits, short = self._charge_credits(op, states, bool(violated), now)  # type: ignore[arg-type]
            if (violated or short) and op.enforce:
                waits = [0.0] * len(counters)
                for i in violated:
                    waits[i] = self._wait(counters[i], states[i], now)  # type: ignore[arg-type]
                reported = tuple(self._state(s, now) for s in states)  # type: ignore[arg-type]
                return ReserveResult(
                    False, reported, (), violated, max(waits, default=0.0), tuple(waits),
                    credits, short,
                )  # fmt: skip
            slots: list[int] = []
            after: list[CounterState] = []
            for c, s in zip(counters, states, strict=True):
                if type(s) is _Log:
                    slots.append(s.add(now, c.cost, max(c.limit or 0, 1)))
                    after.append(CounterState(s.total, s.reset_after(now)))
                elif type(s) is _Sliding:
                    slots.append(s.add(now, c.cost))
                    after.append(CounterState(s.total, s.reset_after(now)))
                else:
                    assert type(s) is _Fixed
                    s.total += c.cost
                    slots.append(0)
                    after.append(CounterState(s.total, s.resets_at - now))
            self._count_usage(counters, None, now)
            # positional: a named tuple built with keywords costs twice as much
            return ReserveResult(
                not violated and not short, tuple(after), tuple(slots), violated, 0.0, (),
                credits, short,
            )  # fmt: skip

    def _look(
        self,
        charge: CreditCharge,
        counters: tuple[Counter, ...],
        states: list[_Log | _Sliding | _Fixed],
        now: int,
    ) -> tuple[CreditAccount, list[Grant], int, int]:
        """A balance (``now`` in µs), its usable grants, what a reservation needs of it and
        what it holds (the caller holds the lock)."""
        account = self._credits.get(charge.key)
        if (
            account is None
            or now >= account.due
            or (charge.period_end and account.plan_at < charge.period_start)
        ):  # something to tidy or issue first; else it is as it was
            account = self._account(charge, now)
        need = charge.cost
        if len(charge.overage) == 1:  # one meter with one limit: required_of, inlined
            index, rate, _ = charge.overage[0]
            counter = counters[index]
            if counter.limit is not None:
                over = states[index].total + counter.cost - counter.limit
                need += (counter.cost if over > counter.cost else over) * rate if over > 0 else 0
        elif charge.overage:
            need = required_of(charge, counters, [s.total for s in states])
        usable, total = account.held(now)
        return account, usable, need, total - account.debt

    def _charge_credits(
        self, op: Reserve, states: list[_Log | _Sliding | _Fixed], violated: bool, now: float
    ) -> tuple[tuple[CreditState, ...], tuple[int, ...]]:
        """Each balance's part of a reservation: what it must cover and, when the whole
        reservation is admitted, what it gave (the caller holds the lock)."""
        now_us = micros(now)
        ref = op.reservation_id
        if len(op.credits) == 1 and op.enforce and not violated:  # the usual case, shorter
            charge = op.credits[0]
            account, usable, need, balance = self._look(charge, op.counters, states, now_us)
            if ref and account.last[0] == ref:  # made before: what it took stands
                made = account.last[1]
                spent = sum(units for _, units in made)
                return (CreditState(balance, spent, made, spent),), ()
            if need > balance and (charge.direct or need > 0):
                return (CreditState(balance, 0, (), need),), (0,)
            if not need:
                return (CreditState(balance, 0, (), 0),), ()
            burns = account.burn(usable, need, now_us, ref)
            account.last = (ref, burns)
            return (CreditState(balance - need, need, burns, need),), ()
        looked: list[tuple[CreditAccount, list[Grant], int, int]] = []
        short: list[int] = []
        for j, charge in enumerate(op.credits):
            account, usable, need, balance = self._look(charge, op.counters, states, now_us)
            if ref and account.last[0] == ref:  # made before: what it took stands
                need = -1
            elif need > balance and (charge.direct or need > 0):  # a balance in debt refuses it
                short.append(j)
            looked.append((account, usable, need, balance))
        states_: list[CreditState] = []
        if violated or short or not op.enforce:
            for _, _, need, balance in looked:
                states_.append(CreditState(balance, 0, (), max(need, 0)))
            return tuple(states_), tuple(short)
        for account, usable, need, balance in looked:
            if need < 0:
                burns = account.last[1]
                taken = sum(units for _, units in burns)
                states_.append(CreditState(balance, taken, burns, taken))
                continue
            burns = account.burn(usable, need, now_us, ref) if need else ()
            if need:
                account.last = (ref, burns)
            states_.append(CreditState(balance - need, need, burns, need))
        return tuple(states_), ()

    @staticmethod
    def _wait(counter: Counter, state: _Log | _Sliding | _Fixed, now: float) -> float:
        if isinstance(state, _Fixed):
            return state.resets_at - now
        assert counter.limit is not None
        if counter.cost > counter.limit:
            return state.window  # can never fit; say when the window is clear again
        return state.wait_for(state.total + counter.cost - counter.limit, now)

    @staticmethod
    def _state(state: _Log | _Sliding | _Fixed, now: float) -> CounterState:
        if isinstance(state, _Fixed):
            return CounterState(state.total, state.resets_at - now)
        return CounterState(state.total, state.reset_after(now))

    def settle(self, op: Settle) -> bool:
        with self._lock:
            now = self._clock(op.now)
            if op.reservation_id in self._settled:
                return False
            self._settled[op.reservation_id] = now + _SETTLED_TTL
            while self._settled and (
                len(self._settled) > _SETTLED_MAX or next(iter(self._settled.values())) < now
            ):
                self._settled.popitem(last=False)
            for counter, slot, delta in zip(op.counters, op.slots, op.deltas, strict=True):
                if delta == 0:
                    continue
                state = self._counter(counter, now, create=delta > 0 and counter.window == 0)
                if isinstance(state, _Fixed):
                    state.total = max(0, state.total + delta)
                elif isinstance(state, _Log) and counter.exact:
                    state.adjust(slot, delta, now, max(counter.limit or 0, 1))
                elif isinstance(state, _Sliding) and not counter.exact:
                    state.adjust(slot, delta)  # a bucket already out of the window stays out
            self._count_usage(op.counters, op.deltas, op.usage_at or now)
            now_us = micros(now)
            for charge, change, burns in zip(op.credits, op.credit_deltas, op.burns, strict=True):
                if change > 0:
                    self._account(charge, now_us).take_excess(change, now_us, op.reservation_id)
                elif change < 0:
                    self._account(charge, now_us).refund(burns, -change, now_us, op.reservation_id)
            return True

    def record(self, op: Record) -> tuple[int, ...] | None:
        with self._lock:
            now = self._clock(op.now)
            if op.record_id in self._settled:
                return None
            self._settled[op.record_id] = now + _SETTLED_TTL
            slots = []
            for counter, cost in zip(op.counters, op.costs, strict=True):
                state = self._counter(counter, now, create=True)
                if isinstance(state, _Log):
                    slots.append(state.add(now, cost, max(counter.limit or 0, 1)))
                elif isinstance(state, _Sliding):
                    slots.append(state.add(now, cost))
                else:
                    assert state is not None
                    state.total += cost
                    slots.append(0)
            self._count_usage(op.counters, op.costs, now)
            now_us = micros(now)
            for charge, units in zip(op.credits, op.credit_costs, strict=True):
                if units:
                    self._account(charge, now_us).take_excess(units, now_us, op.record_id)
            return tuple(slots)

    def peek(self, op: Peek) -> tuple[CounterState, ...]:
        with self._lock:
            now = self._clock(op.now)
            result = []
            for counter in op.counters:
                state = self._counter(counter, now, create=False)
                if state is None:
                    reset = counter.resets_at - now if counter.window == 0 else 0.0
                    result.append(CounterState(0, reset))
                else:
                    result.append(self._state(state, now))
            return tuple(result)

    # hourly usage aggregates ------------------------------------------------------------

    def _count_usage(
        self, counters: Sequence[Counter], units: Sequence[int] | None, now: float
    ) -> None:
        """Add each counter's ``units`` (None: its cost, a reservation's) to its meter's
        usage in the hour of ``now``, as the Redis scripts do (the caller holds the lock)."""
        hour = 0
        for i, counter in enumerate(counters):
            if not counter.usage:
                continue
            n = counter.cost if units is None else units[i]
            if n:
                hour = hour or usage_hour(now)
                key = usage_key(prefix_of_key(counter.key), hour)
                held = self._usage.get(key)
                if held is None:
                    held = self._usage[key] = _Hour(hour + USAGE_HOUR + counter.usage_ttl)
                held.fields[counter.usage] = held.fields.get(counter.usage, 0) + n

    def usage_hours(self, customer: str, since: int, until: int) -> dict[int, dict[str, int]]:
        prefix = customer_prefix(customer)
        with self._lock:
            now = self._now
            return {
                hour: dict(held.fields)
                for hour in range(usage_hour(since), until, USAGE_HOUR)
                if hour >= since
                and (held := self._usage.get(usage_key(prefix, hour))) is not None
                and held.expires_at > now
                and held.fields
            }

    def usage_customers(self, since: int, until: int) -> Iterator[str]:
        with self._lock:
            keys = list(self._usage)
        seen: set[str] = set()
        for key in keys:
            prefix, _, hour = key.rpartition("usage:")
            customer = customer_of_prefix(prefix)
            if customer is not None and customer not in seen and since <= int(hour) < until:
                seen.add(customer)
                yield customer

    def mark_usage(self, customer: str, marks: Mapping[int, Mapping[str, int]]) -> None:
        prefix = customer_prefix(customer)
        with self._lock:
            for hour, fields in marks.items():
                held = self._usage.get(usage_key(prefix, hour))
                if held is not None:
                    held.fields.update(fields)

    def export_lock(self, name: str, ttl: float, *, force: bool = False) -> ExportLock | None:
        with self._lock:
            now = time.monotonic()
            held = self._export_locks.get(name)
            if held is not None and held.until > now and not force:
                return None
            lock = self._export_locks[name] = _MemoryLock(self, name, ttl, now + ttl)
            return lock

    def pending_export(self, name: str) -> tuple[str, frozenset[str]] | None:
        with self._lock:
            batch = self._exports.get(name)
            return None if batch is None else (batch[0], frozenset(batch[1]))

    def begin_export(self, name: str, batch: str) -> None:
        with self._lock:
            self._exports[name] = (batch, set())

    def confirm_export(self, name: str, identifiers: Sequence[str]) -> None:
        with self._lock:
            if name in self._exports:
                self._exports[name][1].update(identifiers)

    def end_export(self, name: str) -> None:
        with self._lock:
            self._exports.pop(name, None)

    # credits -------------------------------------------------------------------------------

    def _account(self, charge: CreditCharge, now: int) -> CreditAccount:
        """The balance ``charge`` names as of ``now`` (µs): expired grants written off, the
        period's plan grant issued if it was not (the caller holds the lock)."""
        account = self._credits.get(charge.key)
        if account is None:
            account = self._credits[charge.key] = CreditAccount()
        account.tidy(now)
        if charge.period_end and account.plan_at < charge.period_start:
            account.issue_plan(charge.grant, charge.period_start, charge.period_end, now)
        return account

    def seed_credits(self, key: str, balance: int | None) -> None:
        """Start the balance at ``key`` afresh from ``balance`` (None: without a bound), for
        a store that answers for another during an outage (``ResilientStorage``)."""
        with self._lock:
            if balance is None and key in self._credits:
                return  # unbounded already
            account = self._credits[key] = CreditAccount()
            units = MAX_UNITS if balance is None else balance
            if units > 0:
                account.add(Grant("seen", units, units, source="admin"), 0)
            account.debt = max(0, -units)

    def has_credits(self, key: str) -> bool:
        with self._lock:
            return key in self._credits

    def count_unmapped(self, provider: str, names: Sequence[str]) -> None:
        with self._lock:
            counts = self._unmapped.setdefault(provider, {})
            for name in names:
                counts[name] = counts.get(name, 0) + 1

    def unmapped(self, providers: Sequence[str]) -> dict[str, dict[str, int]]:
        with self._lock:
            return {p: dict(self._unmapped.get(p, {})) for p in providers}

    def grant_credits(self, op: GrantCredits) -> GrantResult:
        grant = op.grant
        with self._lock:
            keys = self._idempotency.setdefault(idempotency_key_of(op.charge.key), {})
            if grant.idempotency_key is not None and grant.idempotency_key in keys:
                where, grant_id, fingerprint = keys[grant.idempotency_key]
                if (where, fingerprint) != (op.charge.key, op.fingerprint):
                    return GrantResult(False, None, True)
                found = self._credits[where].grants.get(grant_id)
                if found is not None:
                    return GrantResult(False, replace(found))
                return GrantResult(False, replace(grant, id=grant_id, remaining=0))
            stored = self._account(op.charge, op.now).add(grant, op.now)
            if grant.idempotency_key is not None:
                keys[grant.idempotency_key] = (op.charge.key, grant.id, op.fingerprint)
            return GrantResult(True, replace(stored))

    def revoke_credits(self, op: RevokeCredits) -> int | None:
        with self._lock:
            account = self._account(op.charge, op.now)
            if op.grant_id not in account.grants:
                return None
            return account.revoke(op.grant_id, op.now)

    def read_credits(self, op: ReadCredits) -> CreditView:
        with self._lock:
            account = self._account(op.charge, op.now)
            entries = [e for e in reversed(account.ledger) if op.before is None or e.id < op.before]
            page = tuple(entries[: max(0, op.limit)])
            cursor = page[-1].id if page and len(entries) > len(page) else None
            return CreditView(
                account.balance(op.now),
                account.debt,
                tuple(replace(g) for g in account.grants.values()),
                page,
                cursor,
                account.ledger_sum() if op.limit > 0 else None,
            )

    def get_customer(self, customer: str) -> CustomerRecord | None:
        return self._customers.get(customer)

    def put_customer(self, record: CustomerRecord, *, expected_version: int | None = None) -> int:
        customer = record.customer
        with self._lock:
            stored = self._customers.get(customer)
            current = 0 if stored is None else stored.version
            if expected_version is not None and expected_version != current:
                raise VersionConflict(customer, expected_version, current)
            version = (current or self._gone.pop(customer, 0)) + 1
            self._customers[customer] = replace(record, version=version)
        self.listeners.heard(customer, version)
        return version

    def delete_customer(self, customer: str, *, expected_version: int | None = None) -> int:
        with self._lock:
            stored = self._customers.get(customer)
            current = 0 if stored is None else stored.version
            if expected_version is not None and expected_version != current:
                raise VersionConflict(customer, expected_version, current)
            if stored is None:
                return 0
            del self._customers[customer]
            version = self._gone[customer] = current + 1
        self.listeners.heard(customer, version)
        return version

    def list_customers(
        self, *, plan: str | None = None, limit: int = 100, cursor: str | None = None
    ) -> CustomerPage:
        """In order of customer id; the cursor is the last id of the page."""
        after = None if cursor is None else decode_cursor(cursor)
        if after is not None and not isinstance(after, str):
            raise ValueError("not a cursor this store made")
        with self._lock:
            ids = sorted(c for c in self._customers if after is None or c > after)
            records = [self._customers[c] for c in ids]
        if plan is not None:
            records = [r for r in records if r.plan == plan]
        page = tuple(records[: max(limit, 1)])
        more = len(records) > len(page)
        return CustomerPage(page, encode_cursor(page[-1].customer) if more else None)

    def watch_customers(self, listener: CustomerListener) -> None:
        self.listeners.add(listener)

    def publish_config(self, data: bytes, version: str, mac: str = "") -> None:
        self._published = PublishedConfig(bytes(data), version, mac)
        self.listeners.heard_config(version)

    def published_config(self) -> PublishedConfig | None:
        return self._published

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + _SWEEP_EVERY
        expired = [key for key, state in self._counters.items() if state.expires_at <= now]
        for key in expired:
            del self._counters[key]
        for key in [key for key, hour in self._usage.items() if hour.expires_at <= now]:
            del self._usage[key]


class _MemoryLock:
    def __init__(self, store: MemoryStorage, name: str, ttl: float, until: float) -> None:
        self.store, self.name, self.ttl, self.until = store, name, ttl, until

    def renew(self) -> None:
        with self.store._lock:
            if self.store._export_locks.get(self.name) is not self:
                raise StorageError(f"the usage export {self.name!r} was taken over")
            self.until = time.monotonic() + self.ttl

    def release(self) -> None:
        with self.store._lock:
            if self.store._export_locks.get(self.name) is self:
                del self.store._export_locks[self.name]


def _convert(state: _Log | _Sliding, counter: Counter, now: float) -> _Log | _Sliding:
    """``state`` kept the other way, each unit counting no shorter than it did: a log's
    entries go to the buckets of their times; a bucket becomes an entry at its end (or now,
    if that is sooner: its units were all used by now)."""
    if isinstance(state, _Log):
        buckets = _Sliding(counter.window / SLIDING_BUCKETS, counter.window)
        for time, units in zip(state.times, state.units, strict=True):
            buckets.add(time, units)
        return buckets
    log = _Log(counter.window)
    for index, units in state.buckets.items():
        if units:
            log.add(min((index + 1) * state.width, now), units, max(counter.limit or 0, 1))
    return log
