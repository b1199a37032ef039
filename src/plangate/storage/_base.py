"""The storage interface: counters reserved, settled and read, all keyed by customer.

A backend implements each operation once for sync callers and once for async ones; the
operations themselves are data (``Reserve``, ``Settle``, ``Peek``, ``LoadCustomer``), so the
enforcer's flow is written once and driven by a sync or an async driver.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Generator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, NamedTuple, TypeVar

T = TypeVar("T")
R = TypeVar("R")

Flow = Generator["Op[Any]", Any, R]

#: A sliding window is kept as this many buckets. A unit consumed at ``t`` stops counting
#: between ``t + window`` and ``t + window * (1 + 1/SLIDING_BUCKETS)``: never early, so no
#: trailing window ever holds more than the limit.
SLIDING_BUCKETS = 20


def customer_prefix(customer: str) -> str:
    """What every key of one customer starts with. The braces are a Redis Cluster hash tag:
    all of a customer's keys live in one slot, so one script can change them together."""
    return f"plangate:{{{customer}}}:"


@dataclass(frozen=True, slots=True)
class Counter:
    """One limit of one meter of one customer, and what this request costs it.

    ``window > 0``: a sliding window of that many seconds. Otherwise a calendar period whose
    ``key`` names the period and which ends at ``resets_at`` (epoch seconds).
    ``limit=None``: counted, never refused.
    """

    key: str
    limit: int | None
    cost: int
    window: float = 0.0
    resets_at: float = 0.0
    #: what to do when the store cannot be reached: "local" (count in this process),
    #: "allow" (count, never refuse) or "deny" (503)
    on_error: str = "local"


# Results are named tuples, not dataclasses: one is built per counter per request, and a
# tuple is built several times faster than a frozen dataclass.


class CounterState(NamedTuple):
    used: int  # units counted now (after the reservation, for ``Reserve``)
    reset_after: float  # seconds until capacity next returns


class ReserveResult(NamedTuple):
    admitted: bool
    states: tuple[CounterState, ...]
    slots: tuple[int, ...] = ()  # where each cost was placed; handed back to ``Settle``
    violated: tuple[int, ...] = ()  # indices of the counters that refused
    retry_after: float = 0.0  # seconds until every violated counter could take its cost
    waits: tuple[float, ...] = ()  # refused: seconds until each counter could take its cost


@dataclass(frozen=True, slots=True)
class CustomerRecord:
    """What the store knows of a customer. Provisioning (admin API, webhooks) comes later."""

    customer: str
    plan: str | None = None
    billing_anchor: datetime | None = None


class Op(ABC, Generic[T]):
    """One storage operation, run by a sync or an async driver."""

    @abstractmethod
    def run(self, storage: Storage) -> T: ...

    @abstractmethod
    async def arun(self, storage: Storage) -> T: ...


@dataclass(frozen=True, slots=True)
class Reserve(Op[ReserveResult]):
    """All counters take their cost, or none does. ``enforce=False`` takes it regardless."""

    counters: tuple[Counter, ...]
    now: float
    enforce: bool = True
    #: names the reservation; the ``Settle`` that commits or refunds it carries the same id
    reservation_id: str = ""

    def run(self, storage: Storage) -> ReserveResult:
        return storage.reserve(self)

    async def arun(self, storage: Storage) -> ReserveResult:
        return await storage.areserve(self)


@dataclass(frozen=True, slots=True)
class Settle(Op[bool]):
    """Adjust a reservation by ``deltas`` (actual - reserved, per counter); once per id."""

    reservation_id: str
    counters: tuple[Counter, ...]
    slots: tuple[int, ...]
    deltas: tuple[int, ...]
    now: float

    def run(self, storage: Storage) -> bool:
        return storage.settle(self)

    async def arun(self, storage: Storage) -> bool:
        return await storage.asettle(self)


@dataclass(frozen=True, slots=True)
class Record(Op["tuple[int, ...] | None"]):
    """Add usage admitted elsewhere (replayed after an outage), no limit checked; once per id.

    Answers where each cost was placed (slots, as ``Reserve`` does), or None if this id was
    recorded before.
    """

    record_id: str
    counters: tuple[Counter, ...]
    costs: tuple[int, ...]
    now: float

    def run(self, storage: Storage) -> tuple[int, ...] | None:
        return storage.record(self)

    async def arun(self, storage: Storage) -> tuple[int, ...] | None:
        return await storage.arecord(self)


@dataclass(frozen=True, slots=True)
class Peek(Op[tuple[CounterState, ...]]):
    counters: tuple[Counter, ...]
    now: float

    def run(self, storage: Storage) -> tuple[CounterState, ...]:
        return storage.peek(self)

    async def arun(self, storage: Storage) -> tuple[CounterState, ...]:
        return await storage.apeek(self)


@dataclass(frozen=True, slots=True)
class LoadCustomer(Op["CustomerRecord | None"]):
    customer: str

    def run(self, storage: Storage) -> CustomerRecord | None:
        return storage.load_customer(self.customer)

    async def arun(self, storage: Storage) -> CustomerRecord | None:
        return await storage.aload_customer(self.customer)


class Storage(ABC):
    """A counter store. Sync methods serve WSGI, async ones ASGI."""

    @abstractmethod
    def reserve(self, op: Reserve) -> ReserveResult: ...

    @abstractmethod
    def settle(self, op: Settle) -> bool: ...

    @abstractmethod
    def peek(self, op: Peek) -> tuple[CounterState, ...]: ...

    @abstractmethod
    def record(self, op: Record) -> tuple[int, ...] | None: ...

    @abstractmethod
    def load_customer(self, customer: str) -> CustomerRecord | None: ...

    @abstractmethod
    def save_customer(self, record: CustomerRecord) -> None: ...

    async def areserve(self, op: Reserve) -> ReserveResult:
        return self.reserve(op)

    async def asettle(self, op: Settle) -> bool:
        return self.settle(op)

    async def apeek(self, op: Peek) -> tuple[CounterState, ...]:
        return self.peek(op)

    async def arecord(self, op: Record) -> tuple[int, ...] | None:
        return self.record(op)

    async def aload_customer(self, customer: str) -> CustomerRecord | None:
        return self.load_customer(customer)

    def close(self) -> None:  # noqa: B027 - optional for backends without connections
        """Release connections."""

    async def aclose(self) -> None:
        """Release connections, the asyncio ones of the running event loop too."""
        self.close()


def drive(flow: Flow[R], storage: Storage) -> R:
    """Run a flow (a generator yielding ``Op``s) with blocking storage calls.

    A storage failure is thrown into the flow at the point that asked, so the flow's own
    failure policy decides what it means.
    """
    try:
        op = next(flow)
        while True:
            try:
                result = op.run(storage)
            except Exception as exc:
                op = flow.throw(exc)
            else:
                op = flow.send(result)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


async def adrive(flow: Flow[R], storage: Storage) -> R:
    """Run the same flow with awaited storage calls."""
    try:
        op = next(flow)
        while True:
            try:
                result = await op.arun(storage)
            except Exception as exc:
                op = flow.throw(exc)
            else:
                op = flow.send(result)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
