"""The storage interface: counters reserved, settled and read, all keyed by customer, and
customer records read and written.

The operations themselves (``Reserve``, ``Settle``, ``Peek``, ``Record``, ``LoadCustomer``)
and their answers belong to the engine (``plangate.engine``), which yields them; a backend
implements each once for sync callers and once for async ones, and the gate's drivers
(``plangate._drivers``) run them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from ..engine import (
    EXACT_WINDOW_LIMIT,
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
    customer_key,
    customer_prefix,
)

__all__ = [
    "EXACT_WINDOW_LIMIT",
    "SLIDING_BUCKETS",
    "Counter",
    "CounterState",
    "CustomerRecord",
    "Flow",
    "LoadCustomer",
    "Op",
    "Peek",
    "Record",
    "Reserve",
    "ReserveResult",
    "Settle",
    "Storage",
    "customer_key",
    "customer_prefix",
]


class Storage(ABC):
    """A counter store, and where customer records are kept. Sync methods serve WSGI, async
    ones ASGI. Customer records are raw reads and writes here: the cache in front of them is
    ``plangate.customers``."""

    #: seconds a customer record read from this store may be reused without reading it again
    customer_cache_ttl: float = 0.0
    #: in this process and never failing (memory): a read costs what a cache hit would
    in_process: bool = False

    @abstractmethod
    def reserve(self, op: Reserve) -> ReserveResult: ...

    @abstractmethod
    def settle(self, op: Settle) -> bool: ...

    @abstractmethod
    def peek(self, op: Peek) -> tuple[CounterState, ...]: ...

    @abstractmethod
    def record(self, op: Record) -> tuple[int, ...] | None: ...

    @abstractmethod
    def get_customer(self, customer: str) -> CustomerRecord | None: ...

    @abstractmethod
    def put_customer(self, record: CustomerRecord) -> None: ...

    @abstractmethod
    def delete_customer(self, customer: str) -> None: ...

    async def areserve(self, op: Reserve) -> ReserveResult:
        return self.reserve(op)

    async def asettle(self, op: Settle) -> bool:
        return self.settle(op)

    async def apeek(self, op: Peek) -> tuple[CounterState, ...]:
        return self.peek(op)

    async def arecord(self, op: Record) -> tuple[int, ...] | None:
        return self.record(op)

    async def aget_customer(self, customer: str) -> CustomerRecord | None:
        return self.get_customer(customer)

    async def aput_customer(self, record: CustomerRecord) -> None:
        self.put_customer(record)

    async def adelete_customer(self, customer: str) -> None:
        self.delete_customer(customer)

    def check_connection(self) -> str | None:
        """Connect now and say what answered (``"redis://cache:6379/0 (redis 7.0.15)"``);
        ``StorageError`` naming the cause. None: there is nothing to connect to."""
        return None

    async def acheck_connection(self) -> str | None:
        """``check_connection`` without blocking the event loop."""
        return self.check_connection()

    def close(self) -> None:  # noqa: B027 - optional for backends without connections
        """Release connections."""

    async def aclose(self) -> None:
        """Release connections, the asyncio ones of the running event loop too."""
        self.close()
