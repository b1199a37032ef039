"""Redis storage URIs: ``redis://``, ``rediss://``, ``redis+cluster://``, ``redis+sentinel://``.

plangate reads the hosts and its own options; every other query option goes to redis-py's
``parse_url``, which knows every connection option (see docs/storage.md, "Why not limits").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from ._registry import schemes_for

SCHEMES = schemes_for("redis")
#: plangate's own URI options; every other query option goes to redis-py
OPTIONS = {
    "customer_cache_ttl": float,
    "breaker_failures": int,
    "breaker_reset": float,
    "refusal_ttl": float,
}
#: what plangate sets where the URI says nothing (redis-py's defaults wait forever)
# Every call is bounded: an unreachable Redis costs a request one timeout at most, and none
# once the circuit breaker is open (storage/_breaker.py).
DEFAULTS: dict[str, Any] = {"socket_timeout": 0.05, "socket_connect_timeout": 0.05}
MAX_CONNECTIONS = 100  # per process, and per cluster node


@dataclass(frozen=True)
class RedisTarget:
    """Where a URI points and how to connect: the parsed form of a ``storage:`` URI."""

    kind: str  # "single", "cluster" or "sentinel"
    nodes: tuple[tuple[str, int], ...]
    connection: dict[str, Any] = field(default_factory=dict)  # redis-py keyword arguments
    service: str = ""  # sentinel: the monitored master's name
    customer_cache_ttl: float = 5.0
    breaker_failures: int = 3  # consecutive failures that open the circuit breaker
    breaker_reset: float = 1.0  # seconds the breaker stays open before a probe
    refusal_ttl: float = 1.0  # seconds a refusal is answered without asking Redis again

    @property
    def max_connections(self) -> int:
        return int(self.connection.get("max_connections", MAX_CONNECTIONS))


def parse_redis_uri(uri: str) -> RedisTarget:
    """Parse a Redis storage URI; ``ValueError`` says what is wrong with it."""
    from redis.connection import parse_url

    parts = urlsplit(uri)
    scheme = parts.scheme
    if scheme not in SCHEMES:
        raise ValueError(f"unknown storage scheme {scheme!r}: use {', '.join(SCHEMES)}")
    ours: dict[str, Any] = {}
    theirs: list[tuple[str, str]] = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in OPTIONS:
            try:
                ours[name] = OPTIONS[name](value)
            except ValueError:
                raise ValueError(f"invalid value for {name!r}: {value!r}") from None
        else:
            theirs.append((name, value))
    auth, _, hosts = parts.netloc.rpartition("@")
    nodes = []
    for host in hosts.split(","):
        location = urlsplit(f"//{host.strip()}")
        try:
            port = location.port or 6379
        except ValueError:
            raise ValueError(f"invalid port in {host!r}") from None
        if not location.hostname:
            raise ValueError(f"missing host in {uri!r}")
        nodes.append((location.hostname, port))
    if not nodes:
        raise ValueError(f"missing host in {uri!r}")

    path = parts.path.strip("/")
    service = ""
    if scheme == "redis+sentinel":
        service, _, path = path.partition("/")
        if not service:
            raise ValueError("name the master: redis+sentinel://host:port/SERVICE")
    if scheme in ("redis", "rediss") and len(nodes) > 1:
        raise ValueError(f"{scheme}:// names one server; use redis+cluster:// for several")
    # Let redis-py read everything it knows (credentials, db, timeouts, pool size, TLS).
    base = "rediss" if scheme == "rediss" or ("ssl", "true") in theirs else "redis"
    credentials = f"{auth}@" if auth else ""
    host, port = nodes[0]
    rebuilt = f"{base}://{credentials}{host}:{port}/{path}"
    if theirs:
        rebuilt += "?" + urlencode(theirs)
    connection = {**DEFAULTS, **parse_url(rebuilt)}
    for key in ("host", "port"):
        connection.pop(key, None)
    if connection.pop("connection_class", None) is not None or scheme == "rediss":
        connection["ssl"] = True  # the client picks its own TLS connection class
    kind = {"redis+cluster": "cluster", "redis+sentinel": "sentinel"}.get(scheme, "single")
    if kind == "cluster" and connection.pop("db", 0):
        raise ValueError("a Redis Cluster has only database 0")
    return RedisTarget(kind, tuple(nodes), connection, service, **ours)
