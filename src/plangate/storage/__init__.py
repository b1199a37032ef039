"""Counter stores, chosen by URI (``memory://``, ``redis://`` and its variants).

The operations and their answers are the engine's (``plangate.engine``); they are also
importable from here, where backends are written.
"""

from __future__ import annotations

from ..errors import ConfigError, ConfigIssue
from ._base import (
    EXACT_WINDOW_LIMIT,
    SLIDING_BUCKETS,
    Counter,
    CounterState,
    CustomerRecord,
    ExportLock,
    Flow,
    LoadCustomer,
    Op,
    Peek,
    PublishedConfig,
    Record,
    Reserve,
    ReserveResult,
    Settle,
    Storage,
    customer_key,
    customer_prefix,
)
from ._breaker import CircuitBreaker, StorageRejected, StorageUnavailable
from ._memory import MemoryStorage
from ._registry import SCHEMES, Scheme, check_storage_uri, scheme_of
from ._resilient import ResilientStorage

__all__ = [
    "EXACT_WINDOW_LIMIT",
    "SCHEMES",
    "SLIDING_BUCKETS",
    "CircuitBreaker",
    "Counter",
    "CounterState",
    "CustomerRecord",
    "ExportLock",
    "Flow",
    "LoadCustomer",
    "MemoryStorage",
    "Op",
    "Peek",
    "PublishedConfig",
    "Record",
    "Reserve",
    "ReserveResult",
    "ResilientStorage",
    "Scheme",
    "Settle",
    "Storage",
    "StorageRejected",
    "StorageUnavailable",
    "check_storage_uri",
    "customer_key",
    "customer_prefix",
    "open_storage",
]


def open_storage(uri: str) -> Storage:
    """The store a URI names: ``memory://``, or Redis (``redis://``, ``rediss://``,
    ``redis+cluster://``, ``redis+sentinel://``) behind a circuit breaker."""
    try:
        scheme = scheme_of(uri)
    except ValueError as exc:
        raise ConfigError([ConfigIssue("storage", str(exc))]) from None
    return scheme.open(uri)
