"""Counter stores, chosen by URI: ``memory://`` built in, Redis with the ``redis`` extra."""

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
    Record,
    Reserve,
    ReserveResult,
    Settle,
    Storage,
    adrive,
    customer_prefix,
    drive,
)
from ._memory import MemoryStorage
from ._resilient import CircuitBreaker, ResilientStorage, StorageUnavailable

__all__ = [
    "SLIDING_BUCKETS",
    "CircuitBreaker",
    "Counter",
    "CounterState",
    "CustomerRecord",
    "Flow",
    "LoadCustomer",
    "MemoryStorage",
    "Op",
    "Peek",
    "Record",
    "Reserve",
    "ReserveResult",
    "ResilientStorage",
    "Settle",
    "Storage",
    "StorageUnavailable",
    "adrive",
    "customer_prefix",
    "drive",
    "open_storage",
]


def open_storage(uri: str) -> Storage:
    """The store a URI names: ``memory://``, or Redis (``redis://``, ``rediss://``,
    ``redis+cluster://``, ``redis+sentinel://``; needs the ``redis`` extra)."""
    if uri.startswith("memory://"):
        return MemoryStorage()
    scheme = uri.partition("://")[0]
    if scheme in ("redis", "rediss", "redis+cluster", "redis+sentinel"):
        try:
            from ._redis import RedisStorage
        except ImportError:  # pragma: no cover - the redis extra is part of the test install
            message = f"{uri!r} needs redis-py: pip install 'plangate[redis]'"
            raise ConfigError([ConfigIssue("storage", message)]) from None
        redis = RedisStorage(uri)
        breaker = CircuitBreaker(redis.target.breaker_failures, redis.target.breaker_reset)
        return ResilientStorage(redis, breaker=breaker, refusal_ttl=redis.target.refusal_ttl)
    message = f"unknown storage {uri!r}: use memory://, redis://, rediss://, redis+cluster:// or redis+sentinel://"
    raise ConfigError([ConfigIssue("storage", message)])
