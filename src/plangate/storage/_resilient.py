"""A store that survives its backend: a circuit breaker, in-process fallback, replay.

``ResilientStorage`` wraps a remote store (Redis). Each call goes to the backend unless the
breaker is open. When the backend fails or the breaker is open, each counter follows its
``on_error`` policy: ``local`` counts and enforces in this process, ``allow`` counts without
refusing, ``deny`` refuses (``StorageUnavailable``, a 503 to the client). Usage admitted during
an outage, and settles that could not reach the backend, wait in a bounded outbox and are
replayed — idempotently — once the backend answers again: before any reservation on the same
counters, then in small batches.

The logic is written once, as flows of ``Op``s against the backend, run by ``drive`` for the
blocking methods and by ``adrive`` for the asyncio ones.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import TypeVar

from ..errors import StorageError
from ._base import (
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
    adrive,
    drive,
)
from ._memory import MemoryStorage

logger = logging.getLogger("plangate.storage")

T = TypeVar("T")

OUTBOX_LIMIT = 100_000  # buffered usage records; past it, records are dropped and counted
REPLAY_BATCH = 50  # outbox records replayed after each successful backend call


class StorageUnavailable(StorageError):
    """The backend cannot be reached and a counter's policy is ``deny`` (→ 503)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class CircuitBreaker:
    """Closed: calls go through. After ``failures`` consecutive failures: open, no calls for
    ``reset_after`` seconds. Then half-open: one probe call; its success closes the breaker,
    its failure opens it again."""

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
        self._opened_at = 0.0
        self._lock = threading.Lock()

    def allow(self) -> bool:
        """Whether a call may go to the backend now (in half-open state: only the probe)."""
        if self.state == "closed":
            return True
        with self._lock:
            if self.state == "open" and self.clock() - self._opened_at >= self.reset_after:
                self.state = "half-open"
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

    def failed(self) -> None:
        with self._lock:
            self._failures += 1
            if self.state == "half-open" or self._failures >= self.threshold:
                if self.state != "open":
                    logger.warning(
                        "storage circuit breaker open for %.1f s after %d failure(s)",
                        self.reset_after,
                        self._failures,
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
    """A counter Redis refused: it cannot take ``cost`` (or more) before ``until``."""

    until: float
    cost: int
    limit: int
    used: int


REFUSALS = 100_000  # counters remembered as refusing; the oldest are forgotten first


@dataclass
class _Entry:
    """Usage or a settle waiting for the backend."""

    op: Record | Settle
    keys: tuple[str, ...]
    replaying: bool = False
    done: bool = False
    slots: tuple[int, ...] | None = None  # where the backend put a replayed Record


class ResilientStorage(Storage):
    """``inner`` behind a circuit breaker, with the fallback and replay described above."""

    def __init__(
        self,
        inner: Storage,
        *,
        breaker: CircuitBreaker | None = None,
        outbox_limit: int = OUTBOX_LIMIT,
        replay_batch: int = REPLAY_BATCH,
    ) -> None:
        self.inner = inner
        self.breaker = breaker or CircuitBreaker()
        self.local = MemoryStorage()
        self.outbox_limit = outbox_limit
        self.replay_batch = replay_batch
        self.dropped = 0  # usage records lost because the outbox was full
        self.backend_calls = 0  # calls the breaker let through to the backend
        self._outbox: OrderedDict[str, _Entry] = OrderedDict()
        self._by_key: dict[str, list[str]] = {}
        self._local_reservations: dict[str, str] = {}  # reservation id → outbox entry id
        self._customers: OrderedDict[str, CustomerRecord | None] = OrderedDict()
        self._refusals: OrderedDict[str, _Refusal] = OrderedDict()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ResilientStorage({self.inner!r}, breaker={self.breaker.state})"

    @property
    def pending(self) -> int:
        """Records waiting in the outbox for the backend."""
        return len(self._outbox)

    # the backend, behind the breaker -------------------------------------------------------

    def _call(self, op: Op[T], keys: Iterable[str] = ()) -> Flow[T]:
        """Run ``op`` on the backend after replaying what waits for ``keys``.

        Raises ``StorageError`` when the breaker is open or the backend fails (recorded).
        """
        if not self.breaker.allow():
            raise StorageError("the storage circuit breaker is open")
        self.backend_calls += 1
        try:
            for entry in self._waiting_for(keys):
                yield from self._replay(entry)
            result: T = yield op
        except StorageError:
            self.breaker.failed()
            raise
        self.breaker.succeeded()
        if self._outbox:
            yield from self._replay_some()
        return result

    def _replay_some(self) -> Flow[None]:
        """Replay up to ``replay_batch`` waiting records; stop quietly at the first failure."""
        with self._lock:
            batch = [e for e in self._outbox.values() if not e.replaying][: self.replay_batch]
        try:
            for entry in batch:
                yield from self._replay(entry)
        except StorageError:
            self.breaker.failed()

    def _replay(self, entry: _Entry) -> Flow[None]:
        with self._lock:
            if entry.replaying or entry.done:
                return
            entry.replaying = True
        try:
            result = yield entry.op
        except BaseException:
            entry.replaying = False
            raise
        with self._lock:
            entry.done = True
            if isinstance(entry.op, Record):
                entry.slots = result if result is not None else entry.slots
            entry_id = self._entry_id(entry)
            self._outbox.pop(entry_id, None)
            for key in entry.keys:
                waiting = self._by_key.get(key)
                if waiting is not None and entry_id in waiting:
                    waiting.remove(entry_id)
                    if not waiting:
                        del self._by_key[key]
        if isinstance(entry.op, Record) and not self._outbox:
            logger.info("storage is back: usage buffered during the outage is replayed")

    def _entry_id(self, entry: _Entry) -> str:
        op = entry.op
        return op.record_id if isinstance(op, Record) else f"settle:{op.reservation_id}"

    def _waiting_for(self, keys: Iterable[str]) -> list[_Entry]:
        if not self._outbox:
            return []
        with self._lock:
            found: list[_Entry] = []
            for key in keys:
                for entry_id in self._by_key.get(key, ()):
                    entry = self._outbox.get(entry_id)
                    if entry is not None and entry not in found:
                        found.append(entry)
            return found

    def _buffer(self, entry_id: str, op: Record | Settle) -> bool:
        keys = tuple(c.key for c in op.counters)
        with self._lock:
            if len(self._outbox) >= self.outbox_limit:
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 1000 == 0:
                    logger.error(
                        "storage outbox full (%d records): %d usage records dropped so far",
                        self.outbox_limit,
                        self.dropped,
                    )
                return False
            entry = _Entry(op, keys)
            self._outbox[entry_id] = entry
            for key in keys:
                self._by_key.setdefault(key, []).append(entry_id)
            return True

    # operations ----------------------------------------------------------------------------

    def _reserve(self, op: Reserve) -> Flow[ReserveResult]:
        refused = self._still_refused(op)
        if refused is not None:
            return refused
        try:
            result = yield from self._call(op, (c.key for c in op.counters))
        except StorageError as exc:
            return self._reserve_locally(op, exc)
        if not result.admitted and op.enforce and result.waits:
            self._remember_refusal(op, result)
        return result

    # A customer refused for a window stays refused until the window can admit again: that
    # much is known from the refusal, and asking Redis again before then would only cost a
    # round trip to hear the same answer (Envoy's rate-limit service keeps the same cache).
    # Usage elsewhere can only make the wait longer; a refund elsewhere is noticed at the end.

    def _still_refused(self, op: Reserve) -> ReserveResult | None:
        if not self._refusals or not op.enforce:
            return None
        now = op.now
        waits = [0.0] * len(op.counters)
        states = []
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
                states.append(CounterState(refusal.used, refusal.until - now))
            else:
                states.append(CounterState(0, 0.0))
        violated = tuple(i for i, wait in enumerate(waits) if wait > 0)
        if not violated:
            return None
        return ReserveResult(False, tuple(states), (), violated, max(waits), tuple(waits))

    def _remember_refusal(self, op: Reserve, result: ReserveResult) -> None:
        with self._lock:
            for i in result.violated:
                counter = op.counters[i]
                if counter.limit is None or result.waits[i] <= 0:
                    continue
                refusal = _Refusal(
                    op.now + result.waits[i], counter.cost, counter.limit, result.states[i].used
                )
                self._refusals[counter.key] = refusal
                self._refusals.move_to_end(counter.key)
            while len(self._refusals) > REFUSALS:
                self._refusals.popitem(last=False)

    def _reserve_locally(self, op: Reserve, cause: StorageError) -> ReserveResult:
        if any(c.on_error == "deny" for c in op.counters):
            raise StorageUnavailable(
                f"usage cannot be counted: {cause}", max(1.0, self.breaker.retry_after)
            ) from cause
        counters = tuple(
            replace(c, limit=None) if c.on_error == "allow" else c for c in op.counters
        )
        result = self.local.reserve(replace(op, counters=counters))
        if result.slots:  # admitted, or counted in shadow mode: the usage is real
            entry_id = f"outage:{op.reservation_id or secrets.token_hex(16)}"
            record = Record(entry_id, op.counters, tuple(c.cost for c in op.counters), op.now)
            if self._buffer(entry_id, record) and op.reservation_id:
                with self._lock:
                    self._local_reservations[op.reservation_id] = entry_id
        return result

    def _settle(self, op: Settle) -> Flow[bool]:
        entry_id = self._local_reservations.pop(op.reservation_id, None)
        if entry_id is not None:  # reserved during an outage, in this process
            self.local.settle(op)
            with self._lock:
                entry = self._outbox.get(entry_id)
                if entry is not None and not entry.replaying:
                    record = entry.op
                    assert isinstance(record, Record)
                    costs = tuple(
                        max(0, cost + delta)
                        for cost, delta in zip(record.costs, op.deltas, strict=True)
                    )
                    entry.op = replace(record, costs=costs)
                    return True
                slots = entry.slots if entry is not None else None
            if slots is None:
                return True  # replayed with the estimate; its slots are unknown: leave it
            op = replace(op, slots=slots)
        try:
            return (yield from self._call(op))
        except StorageError:
            self._buffer(f"settle:{op.reservation_id}", op)
            return True

    def _peek(self, op: Peek) -> Flow[tuple[CounterState, ...]]:
        try:
            return (yield from self._call(op, (c.key for c in op.counters)))
        except StorageError:
            return self.local.peek(op)

    def _load_customer(self, customer: str) -> Flow[CustomerRecord | None]:
        try:
            record = yield from self._call(LoadCustomer(customer))
        except StorageError:
            # Plans keep deciding from the last record seen, else from the token's claims.
            return self._customers.get(customer)
        with self._lock:
            self._customers[customer] = record
            if len(self._customers) > 100_000:
                self._customers.popitem(last=False)
        return record

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
        return self.inner.record(op)

    async def arecord(self, op: Record) -> tuple[int, ...] | None:
        return await self.inner.arecord(op)

    def load_customer(self, customer: str) -> CustomerRecord | None:
        found, record = self._cached(customer)
        if found:
            return record
        return drive(self._load_customer(customer), self.inner)

    async def aload_customer(self, customer: str) -> CustomerRecord | None:
        found, record = self._cached(customer)
        if found:
            return record
        return await adrive(self._load_customer(customer), self.inner)

    def _cached(self, customer: str) -> tuple[bool, CustomerRecord | None]:
        """The backend's in-process copy, when it has a fresh one: no call to make."""
        cached = getattr(self.inner, "cached_customer", None)
        return cached(customer) if cached is not None else (False, None)

    def save_customer(self, record: CustomerRecord) -> None:
        self.inner.save_customer(record)
        with self._lock:
            self._customers.pop(record.customer, None)

    def close(self) -> None:
        self.inner.close()

    async def aclose(self) -> None:
        await self.inner.aclose()
