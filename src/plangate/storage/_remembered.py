"""What this process remembers of the backend's answers: the refusals it gave, and the usage
it last reported for each counter. Both are bounded; the oldest are forgotten first."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

from ._base import Counter, CounterState, Peek, Record, Reserve, ReserveResult
from ._memory import MemoryStorage

REFUSAL_TTL = 1.0  # seconds a refusal is trusted without asking the backend again
REFUSALS = 100_000  # counters remembered as refusing; the oldest are forgotten first
REPORTED = 100_000  # counters whose last usage from the backend is kept; the oldest forgotten


@dataclass(frozen=True, slots=True)
class _Refusal:
    """A counter the backend refused: it cannot take ``cost`` (or more) before ``until``."""

    until: float
    cost: int
    limit: int
    used: int


class Refusals:
    """A refused customer is answered from memory for up to ``ttl`` (and never past the
    moment its window can admit again): asking the backend sooner would only cost a round
    trip to hear the same answer (Envoy's rate-limit service keeps the same cache). Usage
    elsewhere can only lengthen the wait; a refund in this process forgets the refusal at
    once, a refund elsewhere is noticed within ``ttl``."""

    def __init__(self, ttl: float = REFUSAL_TTL) -> None:
        self.ttl = ttl
        self._refusals: OrderedDict[str, _Refusal] = OrderedDict()
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self._refusals)

    def answer(self, op: Reserve) -> ReserveResult | None:
        """The refusal of ``op`` from memory, or None: ask the backend."""
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

    def remember(self, op: Reserve, result: ReserveResult) -> None:
        """The backend refused ``op``."""
        with self._lock:
            for i in result.violated:
                counter = op.counters[i]
                wait = min(result.waits[i], self.ttl)
                if counter.limit is None or wait <= 0:
                    continue
                used = result.states[i].used
                self._refusals[counter.key] = _Refusal(
                    op.now + wait, counter.cost, counter.limit, used
                )
                self._refusals.move_to_end(counter.key)
            while len(self._refusals) > REFUSALS:
                self._refusals.popitem(last=False)

    def forget(self, counters: tuple[Counter, ...]) -> None:
        """Units were given back to these counters: what was refused may fit now."""
        with self._lock:
            for counter in counters:
                self._refusals.pop(counter.key, None)

    def clear(self) -> None:
        with self._lock:
            self._refusals.clear()


class ReportedUsage:
    """The usage the backend last reported for each counter, newest last.

    Local counting starts where the backend left off: each counter from the usage the
    backend last reported for it, so a customer at 48 of 50 gets at most 2 more per process
    during an outage, not 50. A counter never reported here starts from 0.
    """

    def __init__(self) -> None:
        #: counter key → (used, now): what the backend last answered for it, newest last
        self._reported: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self._reported)

    def note(
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

    def catch_up(self, local: MemoryStorage, counters: tuple[Counter, ...], now: float) -> None:
        """Bring each of ``local``'s counters up to the usage last reported for it (once per
        report).

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
                held = local.peek(Peek((counter,), now))[0].used
                if used > held:
                    local.record(
                        Record(f"seed:{os.urandom(8).hex()}", (counter,), (used - held,), at)
                    )
