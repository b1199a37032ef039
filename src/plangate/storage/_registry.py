"""Storage backends by URI scheme: the one list that ``open_storage`` and the config read.

A backend's module is imported when a URI first names it (redis-py only for Redis).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ._base import Storage
from ._breaker import CircuitBreaker
from ._leases import Leases
from ._memory import MemoryStorage
from ._resilient import ResilientStorage


@dataclass(frozen=True)
class Scheme:
    """How to open the store a URI names, and how to check the URI without connecting."""

    backend: str  # which backend answers it
    form: str  # what a URI looks like, for messages
    open: Callable[[str], Storage]
    check: Callable[[str], None]  # raises ValueError saying what is wrong


def _open_memory(uri: str) -> Storage:
    return MemoryStorage()


def _check_memory(uri: str) -> None:
    return None


def _open_redis(uri: str) -> Storage:
    from ._redis import RedisStorage

    redis = RedisStorage(uri)
    breaker = CircuitBreaker(redis.target.breaker_failures, redis.target.breaker_reset)
    target = redis.target
    leases = None
    if target.leases:
        leases = Leases(
            ttl=target.lease_ttl, horizon=target.lease_horizon, fraction=target.lease_fraction
        )
    return ResilientStorage(redis, breaker=breaker, refusal_ttl=target.refusal_ttl, leases=leases)


def _check_redis(uri: str) -> None:
    from ._redis_uri import parse_redis_uri

    parse_redis_uri(uri)


SCHEMES: dict[str, Scheme] = {
    "memory": Scheme("memory", "memory://", _open_memory, _check_memory),
    "redis": Scheme("redis", "redis://host:port/db", _open_redis, _check_redis),
    "rediss": Scheme("redis", "rediss://…", _open_redis, _check_redis),
    "redis+cluster": Scheme(
        "redis", "redis+cluster://host:port[,host:port]", _open_redis, _check_redis
    ),
    "redis+sentinel": Scheme(
        "redis", "redis+sentinel://host:port/service", _open_redis, _check_redis
    ),
}


def schemes_for(backend: str) -> tuple[str, ...]:
    """The schemes ``backend`` answers to."""
    return tuple(name for name, scheme in SCHEMES.items() if scheme.backend == backend)


def masked(uri: str) -> str:
    """``uri`` as messages and logs show it: with its password as ``***``."""
    scheme, sep, rest = uri.partition("://")
    end = rest.rfind("@", 0, len(rest.split("?", 1)[0]))  # a password may hold a '/'
    user, colon, password = rest[: max(end, 0)].partition(":")
    if not (sep and colon and password):
        return uri
    return f"{scheme}://{user}:***{rest[end:]}"


def scheme_of(uri: str) -> Scheme:
    """The registered scheme of ``uri``; ``ValueError`` when there is none."""
    name = uri.split("://", 1)[0] if "://" in uri else ""
    scheme = SCHEMES.get(name)
    if scheme is None:
        forms = [s.form for s in SCHEMES.values()]
        use = f"{', '.join(forms[:-1])} or {forms[-1]}"
        raise ValueError(f"unknown storage {masked(uri)!r}; use {use}")
    return scheme


def check_storage_uri(uri: str) -> None:
    """Whether ``uri`` names a usable store, without connecting; ``ValueError`` says why not."""
    scheme = scheme_of(uri)
    try:
        scheme.check(uri)
    except ValueError as exc:
        raise ValueError(f"{masked(uri)!r} is not usable: {exc}") from None
