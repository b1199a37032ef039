"""A store that survives its backend: a circuit breaker, in-process fallback, replay.

``ResilientStorage`` wraps a remote store (Redis). Each call goes to the backend unless the
breaker is open. When the backend fails or the breaker is open, each counter follows its
``on_error`` policy: ``local`` counts and enforces in this process, ``allow`` counts without
refusing, ``deny`` refuses (``StorageUnavailable``, a 503 to the client). Usage admitted during
an outage, and settles that could not reach the backend, wait in a bounded outbox and are
replayed — idempotently — once the backend answers again: before any reservation on the same
counters, then in small batches.

Usage of the same counters in the same sliding-window bucket is merged into one record while
it waits: an outage costs one record per customer, route and bucket, not one per request.

The logic is written once, as flows of ``Op``s against the backend, run by ``drive`` for the
blocking methods and by ``adrive`` for the asyncio ones.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from itertools import islice
from typing import TypeVar

from .._drivers import adrive, drive
from ..errors import StorageError
from ._base import (
    SLIDING_BUCKETS,
    Counter,
    CounterState,
    CustomerRecord,
    Flow,
    LoadCustomer,
    Op,
    Peek,
    Record,
    Reserve,
    ReserveResult,
    Settle,
    Storage,
)
from ._memory import MemoryStorage

logger = logging.getLogger("plangate.storage")

T = TypeVar("T")

OUTBOX_LIMIT = 100_000  # records waiting for the backend; past it, usage is dropped and counted
REPLAY_BATCH = 50  # records replayed after each successful backend call
REFUSAL_TTL = 1.0  # seconds a refusal is trusted without asking the backend again
REFUSALS = 100_000  # counters remembered as refusing; the oldest are forgotten first
REPORTED = 100_000  # counters whose last usage from the backend is kept; the oldest forgotten
OUTAGE_TTL = 600.0  # seconds a reservation made during an outage waits for its settle


class StorageUnavailable(StorageError):
    """The backend cannot be reached and a counter's policy is ``deny`` (→ 503)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class CircuitBreaker:
    """Closed: calls go through. After ``failures`` consecutive failures: open, no calls for
    ``reset_after`` seconds. Then half-open: one probe call; its success closes the breaker,
    its failure opens it again. A probe that never reports (cancelled) is replaced after
    ``reset_after``."""

    def __init__(
        self,
        failures: int = 3,
        reset_after: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = failures
        self.reset_after = reset_after
        self.clock = clock
        self.state = "closed"
        self._failures = 0
        self._opened_at = 0.0  # when it opened, or when the current probe went out
        self._lock = threading.Lock()

    def allow(self) -> bool:
        """Whether a call may go to the backend now (in half-open state: only the probe)."""
        if self.state == "closed":
            return True
        with self._lock:
            if self.clock() - self._opened_at >= self.reset_after:
                self.state = "half-open"
                self._opened_at = self.clock()
                return True  # the probe
            return False

    def succeeded(self) -> bool:
        """Record a success; True if it closed an open breaker (the backend is back)."""
        if self.state == "closed" and not self._failures:
            return False
        with self._lock:
            recovered = self.state != "closed"
            self.state = "closed"
            self._failures = 0
            return recovered

    def failed(self, error: BaseException | None = None) -> None:
        with self._lock:
            self._failures += 1
            if self.state == "half-open" or self._failures >= self.threshold:
                if self.state != "open":
                    logger.warning(
                        "storage circuit breaker open for %.1f s after %d failure(s): %r",
                        self.reset_after,
                        self._failures,
                        error,
                    )
                self.state = "open"
                self._opened_at = self.clock()

    @property
    def retry_after(self) -> float:
        """Seconds until the next probe (0 when closed)."""
        if self.state == "closed":
            return 0.0
        return max(0.0, self.reset_after - (self.clock() - self._opened_at))


@dataclass(frozen=True, slots=True)
class _Refusal:
    """A counter the backend refused: it cannot take ``cost`` (or more) before ``until``."""

    until: float
    cost: int
    limit: int
    used: int


@dataclass(eq=False)
class _Usage:
    """Usage admitted during an outage, of one set of counters in one bucket, merged."""

    record_id: str
    counters: tuple[Counter, ...]
    costs: list[int]
    now: float
    replaying: bool = False
    slots: tuple[int, ...] | None = None  # where the backend put it, once replayed
    reservations: list[str] = field(default_factory=list)  # the reservations merged in

    def op(self) -> Record:
        return Record(self.record_id, self.counters, tuple(self.costs), self.now)


@dataclass(eq=False)
class _Buffered:
    """A settle that could not reach the backend."""

    record_id: str
    settle: Settle
    replaying: bool = False


@dataclass(eq=False)
class _OutageReservation:
    usage: _Usage
    expires: float  # monotonic: after it, a settle is not expected any more
    settled: bool = False
    deltas: list[int] = field(default_factory=list)  # settled after the usage was replayed


def _bucket_key(counters: tuple[Counter, ...], now: float) -> tuple[object, ...]:
    """Usage that may be merged: the same counters, and the same bucket of every window."""
    buckets = tuple(
        math.floor(now / (c.window / SLIDING_BUCKETS)) if c.window > 0 else 0 for c in counters
    )
    return (tuple(c.key for c in counters), buckets)


class ResilientStorage(Storage):
    """``inner`` behind a circuit breaker, with the fallback and replay described above."""

    def __init__(
        self,
        inner: Storage,
        *,
        breaker: CircuitBreaker | None = None,
        outbox_limit: int = OUTBOX_LIMIT,
        replay_batch: int = REPLAY_BATCH,
        refusal_ttl: float = REFUSAL_TTL,
    ) -> None:
        self.inner = inner
        self.customer_cache_ttl = inner.customer_cache_ttl
        self.breaker = breaker or CircuitBreaker()
        self.local = MemoryStorage()
        self.outbox_limit = outbox_limit
        self.replay_batch = replay_batch
        self.refusal_ttl = refusal_ttl
        self.dropped = 0  # usage records lost because the outbox was full
        self.backend_calls = 0  # calls the breaker let through to the backend
        self._outbox: OrderedDict[str, _Usage | _Buffered] = OrderedDict()
        self._by_key: dict[str, dict[str, None]] = {}  # counter key → outbox ids (ordered)
        self._merging: dict[tuple[object, ...], _Usage] = {}  # bucket key → usage not replayed
        self._outage: OrderedDict[str, _OutageReservation] = OrderedDict()  # by reservation id
        self._refusals: OrderedDict[str, _Refusal] = OrderedDict()
        #: counter key → (used, now): what the backend last answered for it, newest last
        self._reported: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ResilientStorage({self.inner!r}, breaker={self.breaker.state})"

    @property
    def pending(self) -> int:
        """Records waiting in the outbox for the backend."""
        return len(self._outbox)

    # the backend, behind the breaker -------------------------------------------------------

    def _call(self, op: Op[T], counters: Iterable[Counter] = ()) -> Flow[T]:
        """Run ``op`` on the backend after replaying what waits for ``counters``.

        Raises ``StorageError`` when the breaker is open or the backend fails (recorded).
        """
        if not self.breaker.allow():
            raise StorageError("the storage circuit breaker is open")
        self.backend_calls += 1
        try:
            if self._outbox:
                for entry in self._waiting_for(c.key for c in counters):
                    yield from self._replay(entry)
            result: T = yield op
        except BaseException as exc:  # a cancelled call says nothing good about the backend
            self.breaker.failed(exc)
            raise
        self.breaker.succeeded()
        if self._outbox:
            yield from self._replay_some()
        return result

    def _replay_some(self) -> Flow[None]:
        """Replay up to ``replay_batch`` waiting records; stop quietly at the first failure."""
        with self._lock:
            waiting = (e for e in self._outbox.values() if not e.replaying)
            batch = list(islice(waiting, self.replay_batch))
        try:
            for entry in batch:
                yield from self._replay(entry)
        except StorageError as exc:
            self.breaker.failed(exc)

    def _replay(self, entry: _Usage | _Buffered) -> Flow[None]:
        with self._lock:
            if entry.replaying or entry.record_id not in self._outbox:
                return
            entry.replaying = True
            if isinstance(entry, _Usage):
                self._merging.pop(_bucket_key(entry.counters, entry.now), None)
                op: Record | Settle = entry.op()
            else:
                op = entry.settle
        try:
            result = yield op
        except BaseException:
            with self._lock:
                entry.replaying = False
                if isinstance(entry, _Usage):  # still waiting: more usage may join it
                    self._merging.setdefault(_bucket_key(entry.counters, entry.now), entry)
            raise
        with self._lock:
            self._forget(entry)
            followups = []
            if isinstance(entry, _Usage):
                entry.slots = result if isinstance(result, tuple) else None
                followups = self._replayed(entry)
        for settle in followups:  # settles that arrived while the usage was on its way
            yield from self._settle_on_backend(settle)
        if isinstance(entry, _Usage) and not self._outbox:
            logger.info("storage is back: usage buffered during the outage is replayed")

    def _forget(self, entry: _Usage | _Buffered) -> None:
        self._outbox.pop(entry.record_id, None)
        for key in self._keys_of(entry):
            waiting = self._by_key.get(key)
            if waiting is not None:
                waiting.pop(entry.record_id, None)
                if not waiting:
                    del self._by_key[key]

    @staticmethod
    def _keys_of(entry: _Usage | _Buffered) -> Iterator[str]:
        counters = entry.counters if isinstance(entry, _Usage) else entry.settle.counters
        return (c.key for c in counters)

    def _replayed(self, usage: _Usage) -> list[Settle]:
        """Settles of reservations merged into ``usage`` that were settled meanwhile."""
        settles = []
        for reservation_id in usage.reservations:
            reservation = self._outage.get(reservation_id)
            if reservation is None or reservation.usage is not usage:
                continue
            if reservation.settled:
                deltas, reservation.deltas = reservation.deltas, []
                if any(deltas) and usage.slots is not None:
                    settles.append(
                        Settle(
                            reservation_id,
                            usage.counters,
                            usage.slots,
                            tuple(deltas),
                            usage.now,
                        )
                    )
        return settles

    def _waiting_for(self, keys: Iterable[str]) -> list[_Usage | _Buffered]:
        if not self._outbox:
            return []
        with self._lock:
            found: dict[str, _Usage | _Buffered] = {}
            for key in keys:
                for record_id in self._by_key.get(key, ()):
                    entry = self._outbox.get(record_id)
                    if entry is not None:
                        found[record_id] = entry
            return list(found.values())

    def _buffer(self, entry: _Usage | _Buffered) -> bool:
        """Put ``entry`` in the outbox (caller holds the lock); False if it is full."""
        if entry.record_id in self._outbox:
            return True
        if len(self._outbox) >= self.outbox_limit:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                logger.error(
                    "storage outbox full (%d records): %d usage records dropped so far",
                    self.outbox_limit,
                    self.dropped,
                )
            return False
        self._outbox[entry.record_id] = entry
        for key in self._keys_of(entry):
            self._by_key.setdefault(key, {})[entry.record_id] = None
        return True

    # operations ----------------------------------------------------------------------------

    def _reserve(self, op: Reserve) -> Flow[ReserveResult]:
        refused = self._still_refused(op)
        if refused is not None:
            return refused
        try:
            result = yield from self._call(op, op.counters)
        except StorageError as exc:
            return self._reserve_locally(op, exc)
        self._note(op.counters, result.states, op.now)
        if not result.admitted and op.enforce and result.waits:
            self._remember_refusal(op, result)
        return result

    # Local counting starts where the backend left off: each counter from the usage the
    # backend last reported for it, so a customer at 48 of 50 gets at most 2 more per process
    # during an outage, not 50. A counter never reported here starts from 0.

    def _note(
        self, counters: tuple[Counter, ...], states: tuple[CounterState, ...], now: float
    ) -> None:
        reported = self._reported
        for counter, state in zip(counters, states, strict=True):
            reported.pop(counter.key, None)
            reported[counter.key] = (state.used, now)
        if len(reported) > REPORTED:
            with self._lock:
                while len(reported) > REPORTED:
                    reported.pop(next(iter(reported)), None)

    def _catch_up(self, counters: tuple[Counter, ...], now: float) -> None:
        """Bring each local counter up to the usage last reported for it (once per report).

        The reported usage is counted as of the report, in one bucket: it leaves a sliding
        window no earlier than it does in the backend.
        """
        with self._lock:
            for counter in counters:
                report = self._reported.pop(counter.key, None)
                if report is None:
                    continue
                used, at = report
                if counter.window > 0 and now - at >= counter.window:
                    continue  # all of it has left the window since
                held = self.local.peek(Peek((counter,), now))[0].used
                if used > held:
                    self.local.record(
                        Record(f"seed:{os.urandom(8).hex()}", (counter,), (used - held,), at)
                    )

    # A refused customer is answered from memory for up to ``refusal_ttl`` (and never past the
    # moment its window can admit again): asking the backend sooner would only cost a round
    # trip to hear the same answer (Envoy's rate-limit service keeps the same cache). Usage
    # elsewhere can only lengthen the wait; a refund in this process forgets the refusal at
    # once, a refund elsewhere is noticed within ``refusal_ttl``.

    def _still_refused(self, op: Reserve) -> ReserveResult | None:
        if not self._refusals or not op.enforce:
            return None
        now = op.now
        waits = [0.0] * len(op.counters)
        for i, counter in enumerate(op.counters):
            refusal = self._refusals.get(counter.key)
            if (
                refusal is not None
                and counter.limit is not None
                and now < refusal.until
                and counter.cost >= refusal.cost
                and counter.limit <= refusal.limit
            ):
                waits[i] = refusal.until - now
        if not any(waits):
            return None
        states = []
        for i, counter in enumerate(op.counters):
            refusal = self._refusals.get(counter.key)
            if waits[i]:
                assert refusal is not None
                states.append(CounterState(refusal.used, waits[i]))
            else:  # not known here: say nothing is left, rather than that everything is
                states.append(CounterState(counter.limit or 0, 0.0))
        violated = tuple(i for i, wait in enumerate(waits) if wait)
        return ReserveResult(False, tuple(states), (), violated, max(waits), tuple(waits))

    def _remember_refusal(self, op: Reserve, result: ReserveResult) -> None:
        with self._lock:
            for i in result.violated:
                counter = op.counters[i]
                wait = min(result.waits[i], self.refusal_ttl)
                if counter.limit is None or wait <= 0:
                    continue
                used = result.states[i].used
                self._refusals[counter.key] = _Refusal(
                    op.now + wait, counter.cost, counter.limit, used
                )
                self._refusals.move_to_end(counter.key)
            while len(self._refusals) > REFUSALS:
                self._refusals.popitem(last=False)

    def _reserve_locally(self, op: Reserve, cause: StorageError) -> ReserveResult:
        if any(c.on_error == "deny" for c in op.counters):
            raise StorageUnavailable(
                f"usage cannot be counted: {cause}", max(1.0, self.breaker.retry_after)
            ) from cause
        if self._reported:
            self._catch_up(op.counters, op.now)
        counters = tuple(
            replace(c, limit=None) if c.on_error == "allow" else c for c in op.counters
        )
        result = self.local.reserve(replace(op, counters=counters))
        if result.slots:  # admitted, or counted in shadow mode: the usage is real
            self._count_for_later(op)
        return result

    def _count_for_later(self, op: Reserve) -> None:
        """Keep ``op``'s usage for the backend, merged with more in the same buckets."""
        key = _bucket_key(op.counters, op.now)
        with self._lock:
            usage = self._merging.get(key)
            if usage is None:
                usage = _Usage(
                    f"outage:{os.urandom(16).hex()}", op.counters, [0] * len(op.counters), op.now
                )
                if not self._buffer(usage):
                    return
                self._merging[key] = usage
            for i, counter in enumerate(op.counters):
                usage.costs[i] += counter.cost
            if op.reservation_id:
                expires = time.monotonic() + OUTAGE_TTL
                self._outage[op.reservation_id] = _OutageReservation(usage, expires)
                usage.reservations.append(op.reservation_id)
            while self._outage:  # reservations whose settle never came (it was not needed)
                oldest = next(iter(self._outage.values()))
                if oldest.expires > time.monotonic() and len(self._outage) <= self.outbox_limit:
                    break
                self._outage.popitem(last=False)

    def _settle(self, op: Settle) -> Flow[bool]:
        if self._refusals and any(d < 0 for d in op.deltas):
            with self._lock:  # units given back: what was refused may fit now
                for counter in op.counters:
                    self._refusals.pop(counter.key, None)
        reservation = self._outage.get(op.reservation_id)
        if reservation is None:
            return (yield from self._settle_on_backend(op))
        with self._lock:
            if reservation.settled:
                return False
            reservation.settled = True
            usage = reservation.usage
            # Kept, settled, until it expires: a repeated settle must find it.
            if usage.slots is None and not usage.replaying:
                # not replayed yet: the record will carry the actual usage
                for i, delta in enumerate(op.deltas):
                    usage.costs[i] = max(0, usage.costs[i] + delta)
                replayed = None
            elif usage.slots is None:
                reservation.deltas = list(op.deltas)  # on its way: settled once it lands
                replayed = None
            else:
                replayed = replace(op, counters=usage.counters, slots=usage.slots)
        self.local.settle(op)
        if replayed is not None:
            yield from self._settle_on_backend(replayed)
        return True

    def _settle_on_backend(self, op: Settle) -> Flow[bool]:
        try:
            return (yield from self._call(op))
        except StorageError:
            with self._lock:
                self._buffer(_Buffered(f"settle:{op.reservation_id}", op))
            return True

    def _peek(self, op: Peek) -> Flow[tuple[CounterState, ...]]:
        try:
            states = yield from self._call(op, op.counters)
        except StorageError:
            if self._reported:
                self._catch_up(op.counters, op.now)
            return self.local.peek(op)
        self._note(op.counters, states, op.now)
        return states

    def reserve(self, op: Reserve) -> ReserveResult:
        return drive(self._reserve(op), self.inner)

    async def areserve(self, op: Reserve) -> ReserveResult:
        return await adrive(self._reserve(op), self.inner)

    def settle(self, op: Settle) -> bool:
        return drive(self._settle(op), self.inner)

    async def asettle(self, op: Settle) -> bool:
        return await adrive(self._settle(op), self.inner)

    def peek(self, op: Peek) -> tuple[CounterState, ...]:
        return drive(self._peek(op), self.inner)

    async def apeek(self, op: Peek) -> tuple[CounterState, ...]:
        return await adrive(self._peek(op), self.inner)

    def record(self, op: Record) -> tuple[int, ...] | None:
        return drive(self._call(op, op.counters), self.inner)

    async def arecord(self, op: Record) -> tuple[int, ...] | None:
        return await adrive(self._call(op, op.counters), self.inner)

    # Customer records: reads go through the breaker (plangate.customers answers from the
    # record seen last when they fail); writes go straight to the backend.

    def get_customer(self, customer: str) -> CustomerRecord | None:
        return drive(self._call(LoadCustomer(customer)), self.inner)

    async def aget_customer(self, customer: str) -> CustomerRecord | None:
        return await adrive(self._call(LoadCustomer(customer)), self.inner)

    def put_customer(self, record: CustomerRecord) -> None:
        self.inner.put_customer(record)
        self._changed()

    async def aput_customer(self, record: CustomerRecord) -> None:
        await self.inner.aput_customer(record)
        self._changed()

    def delete_customer(self, customer: str) -> None:
        self.inner.delete_customer(customer)
        self._changed()

    async def adelete_customer(self, customer: str) -> None:
        await self.inner.adelete_customer(customer)
        self._changed()

    def _changed(self) -> None:
        with self._lock:
            self._refusals.clear()  # a new plan may have new limits

    def close(self) -> None:
        self.inner.close()

    async def aclose(self) -> None:
        await self.inner.aclose()
