"""Local quota leases: a process far from a customer's limit admits from memory.

A request that finds no units held here goes to the store as today, and asks in the same
call for a lease: up to ``want`` more of its costs, counted in the store with it (reserve.lua).
``want`` follows this process's recent rate for the request's counters (an exponentially
decaying count, ``RATE_MEMORY`` seconds) times ``horizon``; the store grants at most
``fraction`` of what each limit has left, and nothing once a counter is at ``near`` of its
limit, where every request goes to the store as before. The next requests of the same
counters are admitted from the units held, without a round trip.

Exact by construction: a leased unit is counted in the store from the moment it is leased,
so the units held by every process and the usage counted never exceed a limit. A sliding
window's units are counted in the bucket of the lease's start and used before that bucket
ends (the lease ends with it), so each counts at least as long as its use would; an exact
log is never leased, nor is any limit that small (at most ``EXACT_WINDOW_LIMIT``): there
one unit held elsewhere would be a refusal too many. A period's units are used before it
ends. A lease lives ``ttl`` seconds at most; what it did not use goes back with the next
call for its counters, or a background flush, or ``close``; a process that dies holding
units leaves them counted until their bucket or period ends, having admitted nothing past a
limit. A request the store refuses while this process holds units it can take (leased to a
request of its own meanwhile) is admitted from them.
"""

from __future__ import annotations

import heapq
import math
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from ._base import (
    EXACT_WINDOW_LIMIT,
    SLIDING_BUCKETS,
    USAGE_HOUR,
    Counter,
    CounterState,
    Lease,
    Reserve,
    ReserveResult,
    Settle,
    prefix_of_key,
)

LEASE_TTL = 0.5  # seconds a lease is used at most
LEASE_HORIZON = 0.25  # seconds of this process's recent rate a lease covers
LEASE_FRACTION = 0.10  # the largest share of a limit's headroom one lease may take
NEAR_LIMIT = 0.95  # from this share of a limit used on, no leases: every request asks
RATE_MEMORY = 1.0  # seconds: how long a request weighs in the rate estimate
KEPT = 100_000  # counters whose rate is kept; the oldest are forgotten first
LEASE = "lease:"  # the id of a lease's call, and of the settle giving back what it could not
RETURN = "return:"  # the id of a settle giving back what a lease did not use
#: seconds within which a settle with a lease call's id is sent, or never: the store keeps the
#: call's marker for SETTLED_TTL (600 s), and a settle after it would give the units back again
GIVE_BACK_WITHIN = 300.0


def too_late(settle: Settle, now: float) -> bool:
    """Whether ``settle`` gives back what a lease's call may have given back already, and
    the store may have forgotten that call: its units stay counted until their window ends."""
    return settle.reservation_id.startswith(LEASE) and now - settle.now >= GIVE_BACK_WITHIN


@dataclass(slots=True)
class _Held:
    """Units this process holds on one counter, counted in the store."""

    counter: Counter  # as leased: its limit must not have changed since
    slot: int  # where the store counted them (a bucket; 0 for a period)
    left: int  # units not used yet
    until: float  # admit from them only before this (epoch seconds)
    used: int  # the counter's usage as of the store's answer, what is held unused left out
    reset_at: float  # when capacity next returns, as of that answer
    at: float  # when they were leased: the hour of usage aggregates they count in


class Leases:
    """The leases of one process on one store. Thread-safe; a forked child starts with none
    (its parent holds them)."""

    def __init__(
        self,
        *,
        ttl: float = LEASE_TTL,
        horizon: float = LEASE_HORIZON,
        fraction: float = LEASE_FRACTION,
        near: float = NEAR_LIMIT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ttl = ttl
        #: the time the background flush and ``close`` give back by (requests carry theirs)
        self.clock = clock
        self.horizon = horizon
        self.fraction = fraction
        self.near = near
        self._held: dict[str, _Held] = {}
        self._ends: list[tuple[float, int, str]] = []  # (until, id of the _Held, key): a heap
        self._rates: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key → (count, at)
        self._eligible: dict[int, tuple[tuple[Counter, ...], bool]] = {}
        self._spare: list[_Held] = []  # held no longer (a newer lease took their place)
        #: units a call meant to give back that may not have reached the store: given back
        #: by a settle with that call's id, which changes nothing if the call was made
        self._unsent: list[Settle] = []
        self._lock = threading.Lock()
        self.granted_units = 0  # units leased (for the benchmarks' counts)
        _ALL.add(self)

    @property
    def holding(self) -> bool:
        """Whether this process holds any units (or has some to give back)."""
        return bool(self._held) or bool(self._spare) or bool(self._unsent)

    def after_fork(self) -> None:
        """In a forked child: the parent holds these units, not the child."""
        self._lock = threading.Lock()
        self._held.clear()
        self._ends.clear()
        self._spare.clear()
        self._unsent.clear()
        self._rates.clear()

    def eligible(self, op: Reserve) -> bool:
        """Whether ``op`` may be admitted from, or ask for, a lease: enforced, no credit
        balances (money is counted per request), sliding windows in buckets or periods,
        each counter once."""
        if not op.enforce or op.credits:
            return False
        counters = op.counters
        known = self._eligible.get(id(counters))
        if known is not None and known[0] is counters:
            return known[1]
        ok = bool(counters) and len({c.key for c in counters}) == len(counters)
        ok = ok and not any(
            c.cost < 0 or (c.limit is not None and c.limit <= EXACT_WINDOW_LIMIT) for c in counters
        )
        if len(self._eligible) >= KEPT:
            self._eligible.clear()
        self._eligible[id(counters)] = (counters, ok)
        return ok

    def _rate(self, key: str, now: float) -> float:
        """This process's requests per second on ``key``, this one counted."""
        count, at = self._rates.pop(key, (0.0, now))
        if now > at:
            count *= math.exp((at - now) / RATE_MEMORY)
        count += 1.0
        self._rates[key] = (count, max(at, now))
        if len(self._rates) > KEPT:
            self._rates.popitem(last=False)
        return count / RATE_MEMORY

    def admit(self, op: Reserve) -> ReserveResult | None:
        """``op`` admitted from the units held for every counter of it; None: ask the store."""
        held = self._held
        if not held:
            return None
        now = op.now
        with self._lock:
            leases = []
            for c in op.counters:
                h = held.get(c.key)
                if h is None or now >= h.until or h.left < c.cost or h.counter.limit != c.limit:
                    return None
                leases.append(h)
            states = []
            for c, h in zip(op.counters, leases, strict=True):
                h.left -= c.cost
                h.used += c.cost
                self._rate(c.key, now)
                states.append(CounterState(h.used, max(0.0, h.reset_at - now)))
        return ReserveResult(True, tuple(states), tuple(h.slot for h in leases))

    def ask(self, op: Reserve) -> Reserve:
        """``op`` as it goes to the store: with what this process holds on its counters given
        back, and a lease asked for as its rate warrants (``op`` itself if neither)."""
        now = op.now
        hour = now // USAGE_HOUR
        with self._lock:
            rate = min(self._rate(c.key, now) for c in op.counters)
            want = max(0, round(rate * self.horizon) - 1)
            back = []
            for c in op.counters:
                h = self._held.pop(c.key, None)
                if h is None or not h.left:
                    back.append((0, 0))
                elif c.usage and h.at // USAGE_HOUR != hour:
                    self._spare.append(h)  # its hour's usage is another key: a settle's
                    back.append((0, 0))
                else:
                    back.append((h.left, h.slot))
        if not want and not any(units for units, _ in back):
            return op
        lease = Lease(want, self.fraction, self.near, tuple(back), f"{LEASE}{os.urandom(8).hex()}")
        return replace(op, lease=lease)

    def failed(self, ask: Reserve) -> None:
        """``ask`` failed: what it gave back may still be held in the store. A settle with its
        id gives it back later; if the call was made after all, that settle changes nothing."""
        lease = ask.lease
        assert lease is not None
        if any(units for units, _ in lease.held):
            slots = tuple(slot for _, slot in lease.held)
            deltas = tuple(-units for units, _ in lease.held)
            with self._lock:
                self._unsent.append(Settle(lease.id, ask.counters, slots, deltas, ask.now))

    def requeue(self, settles: list[Settle]) -> None:
        """Settles from ``ended`` that were not sent (the flush was interrupted): sent by the
        next flush (each once: its id makes a second one change nothing)."""
        with self._lock:
            self._unsent.extend(settles)

    def granted(self, ask: Reserve, result: ReserveResult) -> ReserveResult:
        """Hold what the store leased with ``ask``; ``result`` as the request sees it (the
        units held unused are no usage of the customer's)."""
        leased = result.leased
        if not result.admitted or not leased:
            return result
        now = ask.now
        ends = now + self.ttl
        if any(c.usage for c in ask.counters):  # an hour's usage is that hour's
            ends = min(ends, (now // USAGE_HOUR + 1) * USAGE_HOUR)
        states = []
        with self._lock:
            for c, state, slot in zip(ask.counters, result.states, result.slots, strict=True):
                if c.window > 0:
                    until = min(ends, (slot + 1) * (c.window / SLIDING_BUCKETS))
                else:
                    until = min(ends, c.resets_at)
                units = leased * c.cost
                used = state.used - units
                self._hold(_Held(c, slot, units, until, used, now + state.reset_after, now))
                states.append(CounterState(used, state.reset_after))
            self.granted_units += leased
        return result._replace(states=tuple(states))

    def _hold(self, lease: _Held) -> None:
        before = self._held.get(lease.counter.key)
        if before is not None and before.left:  # two requests asked at once: both count
            if (
                before.slot == lease.slot
                and before.counter.limit == lease.counter.limit
                and before.until > lease.at
                and before.at // USAGE_HOUR == lease.at // USAGE_HOUR
            ):
                lease.left += before.left  # counted where the new ones are: one lease
                lease.used -= before.left
                lease.until = min(lease.until, before.until)
            else:
                self._spare.append(before)
        self._held[lease.counter.key] = lease
        heapq.heappush(self._ends, (lease.until, id(lease), lease.counter.key))

    def absorb(self, op: Settle) -> Settle | None:
        """``op`` with what the units held take over left out: a refund joins them, an
        excess comes out of them (they are counted in the same bucket or period); None if
        nothing is left for the store."""
        held = self._held
        if not held:
            return op
        now = op.now
        deltas = list(op.deltas)
        with self._lock:
            for i, (c, slot, delta) in enumerate(zip(op.counters, op.slots, deltas, strict=True)):
                h = held.get(c.key)
                if not delta or h is None or h.slot != slot or now >= h.until:
                    continue
                if h.counter.limit != c.limit or (delta > 0 and h.left < delta):
                    continue
                h.left -= delta
                h.used += delta
                deltas[i] = 0
        if deltas == list(op.deltas):
            return op
        if not any(deltas):
            return None
        return replace(op, deltas=tuple(deltas))

    def ended(self, now: float, *, everything: bool = False) -> Iterator[Settle]:
        """Settles giving back what leases ended by ``now`` left unused (``everything``:
        every lease, ended or not), one per customer; they are held no longer."""
        # per customer and hour of usage: one settle each
        returned: dict[tuple[str, float], list[_Held]] = {}
        with self._lock:
            unsent, self._unsent = self._unsent, []
            ended, self._spare = self._spare, []
            ends = self._ends
            while ends and (everything or ends[0][0] <= now):
                _, ident, key = heapq.heappop(ends)
                h = self._held.get(key)
                if h is None or id(h) != ident or (not everything and h.until > now):
                    continue
                del self._held[key]
                ended.append(h)
        for h in ended:
            if h.left:
                group = (prefix_of_key(h.counter.key), h.at // USAGE_HOUR)
                returned.setdefault(group, []).append(h)
        yield from unsent
        for leases in returned.values():
            yield Settle(
                f"{RETURN}{os.urandom(8).hex()}",
                tuple(h.counter for h in leases),
                tuple(h.slot for h in leases),
                tuple(-h.left for h in leases),
                now,
                usage_at=leases[0].at,
            )


_ALL: weakref.WeakSet[Leases] = weakref.WeakSet()


def _forget_in_child() -> None:
    for leases in list(_ALL):
        leases.after_fork()


os.register_at_fork(after_in_child=_forget_in_child)
