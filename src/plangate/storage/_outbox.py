"""Usage that waits for the backend: admitted during an outage, or settles that missed it.

Records are replayed — idempotently, each carries an id the backend remembers — once the
backend answers again (``ResilientStorage`` drives the replay). Usage of the same counters in
the same sliding-window bucket is merged into one record while it waits: an outage costs one
record per customer, route and bucket, not one per request. Bounded: past ``limit`` records,
usage is dropped and counted.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from itertools import islice

from ._base import MADE_THERE, SLIDING_BUCKETS, Counter, CreditCharge, Record, Reserve, Settle

logger = logging.getLogger("plangate.storage")

OUTBOX_LIMIT = 100_000  # records waiting for the backend; past it, usage is dropped and counted
OUTAGE_TTL = 600.0  # seconds a reservation made during an outage waits for its settle


@dataclass(eq=False)
class Usage:
    """Usage admitted during an outage, of one set of counters in one bucket, merged."""

    record_id: str
    counters: tuple[Counter, ...]
    costs: list[int]
    now: float
    replaying: bool = False
    slots: tuple[int, ...] | None = None  # where the backend put it, once replayed
    reservations: list[str] = field(default_factory=list)  # the reservations merged in
    #: credits spent meanwhile (``allow``/``local`` balances), taken whole on replay; such
    #: usage is one reservation's, never merged (``reservation``: its id)
    credits: tuple[CreditCharge, ...] = ()
    credit_costs: list[int] = field(default_factory=list)
    reservation: str = ""
    spent: tuple[int, ...] = ()  # what the reservation took of each balance, here

    def op(self) -> Record:
        return Record(
            self.record_id,
            self.counters,
            tuple(self.costs),
            self.now,
            self.credits,
            tuple(self.credit_costs),
            self.reservation,
        )


@dataclass(eq=False)
class Buffered:
    """A settle that could not reach the backend."""

    record_id: str
    settle: Settle
    replaying: bool = False


Entry = Usage | Buffered


@dataclass(eq=False)
class _OutageReservation:
    usage: Usage
    expires: float  # monotonic: after it, a settle is not expected any more
    settled: bool = False
    deltas: list[int] = field(default_factory=list)  # settled after the usage was replayed
    credit_deltas: tuple[int, ...] = ()


def _bucket_key(counters: tuple[Counter, ...], now: float) -> tuple[object, ...]:
    """Usage that may be merged: the same counters, and the same bucket of every window."""
    buckets = tuple(
        math.floor(now / (c.window / SLIDING_BUCKETS)) if c.window > 0 else 0 for c in counters
    )
    return (tuple(c.key for c in counters), buckets)


def _keys_of(entry: Entry) -> Iterator[str]:
    if isinstance(entry, Usage):
        counters, credits = entry.counters, entry.credits
    else:
        counters, credits = entry.settle.counters, entry.settle.credits
    return itertools.chain((c.key for c in counters), (c.key for c in credits))


class Outbox:
    """The records waiting for the backend, by id, and by counter key."""

    def __init__(self, limit: int = OUTBOX_LIMIT) -> None:
        self.limit = limit
        self.dropped = 0  # usage records lost because the outbox was full
        self.discarded = 0  # records the backend refused on replay (see ``discard``)
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._by_key: dict[str, dict[str, None]] = {}  # counter key → outbox ids (ordered)
        self._merging: dict[tuple[object, ...], Usage] = {}  # bucket key → usage not replayed
        self._outage: OrderedDict[str, _OutageReservation] = OrderedDict()  # by reservation id
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    # waiting -------------------------------------------------------------------------------

    def count(self, op: Reserve, spent: tuple[int, ...] = (), *, sent: bool = False) -> None:
        """Keep ``op``'s usage for the backend, merged with more in the same buckets;
        ``spent``: the sub-units taken from each of ``op.credits`` meanwhile. ``sent``: the
        reservation reached the backend, whose answer was lost (a timeout): it may have been
        made there."""
        credits = op.credits
        # Money is not merged: each reservation with credits replays on its own, so that one
        # made in Redis despite a timeout here is not charged twice, and a settle that charges
        # more than it reserved is charged on replay. Nor is one that may have been made there
        # (its replay asks): its usage is billed.
        alone = bool(credits) or (sent and bool(op.reservation_id))
        key = _bucket_key(op.counters, op.now) if not alone else None
        with self._lock:
            usage = self._merging.get(key) if key is not None else None
            if usage is None:
                usage = Usage(
                    f"outage:{os.urandom(16).hex()}",
                    op.counters,
                    [0] * len(op.counters),
                    op.now,
                    credits=credits,
                    credit_costs=[0] * len(credits),
                    reservation=op.reservation_id if alone else "",
                    spent=spent if credits else (),
                )
                if not self._add(usage):
                    return
                if key is not None:
                    self._merging[key] = usage
            for i, counter in enumerate(op.counters):
                usage.costs[i] += counter.cost
            for j in range(len(credits)):
                usage.credit_costs[j] += spent[j]
            if op.reservation_id:
                expires = time.monotonic() + OUTAGE_TTL
                self._outage[op.reservation_id] = _OutageReservation(usage, expires)
                usage.reservations.append(op.reservation_id)
            while self._outage:  # reservations whose settle never came (it was not needed)
                oldest = next(iter(self._outage.values()))
                if oldest.expires > time.monotonic() and len(self._outage) <= self.limit:
                    break
                self._outage.popitem(last=False)

    def keep_settle(self, op: Settle) -> None:
        """Keep a settle that could not reach the backend."""
        with self._lock:
            self._add(Buffered(f"settle:{op.reservation_id}", op))

    def settle(self, op: Settle) -> tuple[bool, Settle | None] | None:
        """Settle a reservation made during the outage: None if ``op`` is not one; else
        whether this settled it (False: already settled), and the settle the backend still
        needs (its usage was replayed already)."""
        reservation = self._outage.get(op.reservation_id)
        if reservation is None:
            return None
        with self._lock:
            if reservation.settled:
                return False, None
            reservation.settled = True
            usage = reservation.usage
            # Kept, settled, until it expires: a repeated settle must find it.
            if usage.slots is None and not usage.replaying:
                # not replayed yet: the record will carry the actual usage
                for i, delta in enumerate(op.deltas):
                    usage.costs[i] = max(0, usage.costs[i] + delta)
                for j, delta in enumerate(op.credit_deltas[: len(usage.credits)]):
                    usage.credit_costs[j] = max(0, usage.credit_costs[j] + delta)
                return True, None
            credit_deltas = tuple(op.credit_deltas[: len(usage.credits)])
            if usage.slots is None:  # on its way: settled once it lands
                reservation.deltas = list(op.deltas)
                reservation.credit_deltas = credit_deltas
                return True, None
            return True, _after_replay(op, usage, credit_deltas)

    def _add(self, entry: Entry) -> bool:
        """Put ``entry`` in the outbox (caller holds the lock); False if it is full."""
        if entry.record_id in self._entries:
            return True
        if len(self._entries) >= self.limit:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                logger.error(
                    "storage outbox full (%d records): %d usage records dropped so far",
                    self.limit,
                    self.dropped,
                )
            return False
        self._entries[entry.record_id] = entry
        for key in _keys_of(entry):
            self._by_key.setdefault(key, {})[entry.record_id] = None
        return True

    # replaying -----------------------------------------------------------------------------

    def waiting_for(self, keys: Iterable[str]) -> list[Entry]:
        """The records of these counters, oldest first."""
        if not self._entries:
            return []
        with self._lock:
            found: dict[str, Entry] = {}
            for key in keys:
                for record_id in self._by_key.get(key, ()):
                    entry = self._entries.get(record_id)
                    if entry is not None:
                        found[record_id] = entry
            return list(found.values())

    def batch(self, size: int) -> list[Entry]:
        """Up to ``size`` records not on their way already, oldest first."""
        with self._lock:
            waiting = (e for e in self._entries.values() if not e.replaying)
            return list(islice(waiting, size))

    def take(self, entry: Entry) -> Record | Settle | None:
        """The op that replays ``entry``, which is now on its way; None if it is already on
        its way or gone."""
        with self._lock:
            if entry.replaying or entry.record_id not in self._entries:
                return None
            entry.replaying = True
            if isinstance(entry, Usage):
                if not entry.credits:
                    self._merging.pop(_bucket_key(entry.counters, entry.now), None)
                return entry.op()
            return entry.settle

    def put_back(self, entry: Entry) -> None:
        """The replay of ``entry`` failed: it waits again."""
        with self._lock:
            entry.replaying = False
            if isinstance(entry, Usage) and not entry.credits:  # more usage may join it
                self._merging.setdefault(_bucket_key(entry.counters, entry.now), entry)

    def discard(self, entry: Entry) -> None:
        """The backend refused ``entry`` (its data, not an outage): it would be refused
        again, so it leaves the outbox; the settles of its reservations go with it."""
        with self._lock:
            self._forget(entry)
            self.discarded += 1

    def replayed(self, entry: Entry, result: object) -> list[Settle]:
        """The backend took ``entry``; the settles of its reservations that arrived while
        it was on its way follow it."""
        with self._lock:
            self._forget(entry)
            if not isinstance(entry, Usage):
                return []
            made_there = result == MADE_THERE
            entry.slots = result if isinstance(result, tuple) and not made_there else None
            if made_there and entry.reservation:
                # Made in the store after all (its reserve timed out here, not there): what
                # was settled here since is settled there, against what it took there.
                deltas = [
                    now - before
                    for now, before in zip(entry.credit_costs, entry.spent, strict=True)
                ]
                reservation = self._outage.get(entry.reservation)
                # and what was used here past what it reserved there (a response reporting
                # more or less): its calendar periods and usage for billing are adjusted (a
                # window's slot there is not known: it keeps what was reserved)
                used = [
                    c - counter.cost for c, counter in zip(entry.costs, entry.counters, strict=True)
                ]
                if reservation is not None:  # settled while the record was on its way
                    for j, delta in enumerate(reservation.credit_deltas[: len(deltas)]):
                        deltas[j] += delta
                    for i, delta in enumerate(reservation.deltas[: len(used)]):
                        used[i] += delta
                    reservation.credit_deltas, reservation.deltas = (), []
                if not any(deltas) and not any(used):
                    return []
                return [
                    Settle(
                        entry.reservation,
                        entry.counters,
                        (0,) * len(used),
                        tuple(used),
                        entry.now,
                        credits=entry.credits,
                        credit_deltas=tuple(deltas),
                        burns=((),) * len(deltas),
                    )
                ]
            return self._followups(entry)

    def _forget(self, entry: Entry) -> None:
        self._entries.pop(entry.record_id, None)
        for key in _keys_of(entry):
            waiting = self._by_key.get(key)
            if waiting is not None:
                waiting.pop(entry.record_id, None)
                if not waiting:
                    del self._by_key[key]

    def _followups(self, usage: Usage) -> list[Settle]:
        """Settles of reservations merged into ``usage`` that were settled meanwhile."""
        settles = []
        for reservation_id in usage.reservations:
            reservation = self._outage.get(reservation_id)
            if reservation is None or reservation.usage is not usage:
                continue
            if reservation.settled:
                deltas, reservation.deltas = reservation.deltas, []
                credit_deltas, reservation.credit_deltas = reservation.credit_deltas, ()
                if (any(deltas) or any(credit_deltas)) and usage.slots is not None:
                    settle = Settle(reservation_id, (), (), (), usage.now)
                    settles.append(
                        _after_replay(replace(settle, deltas=tuple(deltas)), usage, credit_deltas)
                    )
        return settles


def _after_replay(op: Settle, usage: Usage, credit_deltas: tuple[int, ...]) -> Settle:
    """``op`` for the backend, once ``usage`` was replayed there: its counters and slots,
    and its credits. What the grants took on replay is not known here, so credits given
    back go to none of them (logged): a charge past the reservation is still made."""
    if any(d < 0 for d in credit_deltas):
        logger.warning(
            "credits given back after the outage's usage was replayed are not returned: %s",
            ", ".join(c.key for c in usage.credits),
        )
    return replace(
        op,
        counters=usage.counters,
        slots=usage.slots or (),
        deltas=op.deltas or (0,) * len(usage.counters),
        credits=usage.credits if any(credit_deltas) else (),
        credit_deltas=tuple(max(0, d) for d in credit_deltas) if any(credit_deltas) else (),
        burns=((),) * len(usage.credits) if any(credit_deltas) else (),
    )
