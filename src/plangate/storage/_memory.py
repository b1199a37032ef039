"""``memory://``: counters in this process. Exact, thread-safe, nothing shared."""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from ._base import (
    SLIDING_BUCKETS,
    Counter,
    CounterState,
    CustomerRecord,
    Peek,
    Record,
    Reserve,
    ReserveResult,
    Settle,
    Storage,
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


@dataclass(slots=True)
class _Fixed:
    resets_at: float
    total: int = 0

    @property
    def expires_at(self) -> float:
        return self.resets_at


class MemoryStorage(Storage):
    """Counters in a dict behind one lock. For one process: tests, demos, single workers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, _Sliding | _Fixed] = {}
        self._customers: dict[str, CustomerRecord] = {}
        self._settled: OrderedDict[str, float] = OrderedDict()
        self._next_sweep = 0.0
        self._now = 0.0

    def _counter(self, counter: Counter, now: float, create: bool) -> _Sliding | _Fixed | None:
        state = self._counters.get(counter.key)
        if state is None:
            if not create:
                return None
            if counter.window > 0:
                state = _Sliding(counter.window / SLIDING_BUCKETS, counter.window)
            else:
                state = _Fixed(counter.resets_at)
            self._counters[counter.key] = state
        elif isinstance(state, _Sliding):
            state.evict(now)
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
            over = []
            for i, c in enumerate(counters):
                if c.limit is not None and states[i].total + c.cost > c.limit:  # type: ignore[union-attr]
                    over.append(i)
            violated = tuple(over)
            if violated and op.enforce:
                waits = [0.0] * len(counters)
                for i in violated:
                    waits[i] = self._wait(counters[i], states[i], now)  # type: ignore[arg-type]
                reported = tuple(self._state(s, now) for s in states)  # type: ignore[arg-type]
                return ReserveResult(False, reported, (), violated, max(waits), tuple(waits))
            slots: list[int] = []
            after: list[CounterState] = []
            for c, s in zip(counters, states, strict=True):
                if type(s) is _Sliding:
                    slots.append(s.add(now, c.cost))
                    after.append(CounterState(s.total, s.reset_after(now)))
                else:
                    assert type(s) is _Fixed
                    s.total += c.cost
                    slots.append(0)
                    after.append(CounterState(s.total, s.resets_at - now))
            return ReserveResult(not violated, tuple(after), tuple(slots), violated)

    @staticmethod
    def _wait(counter: Counter, state: _Sliding | _Fixed, now: float) -> float:
        if isinstance(state, _Fixed):
            return state.resets_at - now
        assert counter.limit is not None
        if counter.cost > counter.limit:
            return state.window  # can never fit; say when the window is clear again
        return state.wait_for(state.total + counter.cost - counter.limit, now)

    @staticmethod
    def _state(state: _Sliding | _Fixed, now: float) -> CounterState:
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
                state = self._counter(counter, now, create=delta > 0)
                if isinstance(state, _Sliding):
                    state.adjust(slot, delta)  # a bucket already out of the window stays out
                elif state is not None:
                    state.total = max(0, state.total + delta)
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
                if isinstance(state, _Sliding):
                    slots.append(state.add(now, cost))
                else:
                    assert state is not None
                    state.total += cost
                    slots.append(0)
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

    def get_customer(self, customer: str) -> CustomerRecord | None:
        return self._customers.get(customer)

    def put_customer(self, record: CustomerRecord) -> None:
        self._customers[record.customer] = record

    def delete_customer(self, customer: str) -> None:
        self._customers.pop(customer, None)

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + _SWEEP_EVERY
        expired = [key for key, state in self._counters.items() if state.expires_at <= now]
        for key in expired:
            del self._counters[key]
