"""Counter stores, chosen by URI. ``memory://`` is built in; Redis arrives in the next release."""

from __future__ import annotations

from ..errors import ConfigError, ConfigIssue
from ._base import (
    SLIDING_BUCKETS,
    Counter,
    CounterState,
    CustomerRecord,
    Flow,
    LoadCustomer,
    Op,
    Peek,
    Reserve,
    ReserveResult,
    Settle,
    Storage,
    adrive,
    drive,
)
from ._memory import MemoryStorage

__all__ = [
    "SLIDING_BUCKETS",
    "Counter",
    "CounterState",
    "CustomerRecord",
    "Flow",
    "LoadCustomer",
    "MemoryStorage",
    "Op",
    "Peek",
    "Reserve",
    "ReserveResult",
    "Settle",
    "Storage",
    "adrive",
    "drive",
    "open_storage",
]


def open_storage(uri: str) -> Storage:
    """The store a URI names: ``memory://`` (Redis URIs arrive in the next release)."""
    if uri.startswith("memory://"):
        return MemoryStorage()
    message = f"storage {uri!r} is not available in this release: use memory://"
    raise ConfigError([ConfigIssue("storage", message)])
