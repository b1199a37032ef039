"""Redis storage URIs: ``redis://``, ``rediss://``, ``redis+cluster://``, ``redis+sentinel://``.

plangate reads the hosts and its own options; every other query option goes to redis-py's
``parse_url``, which knows every connection option (see docs/storage.md, "Why not limits").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from ._leases import LEASE_FRACTION, LEASE_HORIZON, LEASE_TTL
from ._registry import schemes_for

SCHEMES = schemes_for("redis")
#: plangate's own URI options; every other query option goes to redis-py
OPTIONS = {
    "customer_cache_ttl": float,
    "breaker_failures": int,
    "breaker_reset": float,
    "refusal_ttl": float,
    "lease_ttl": float,
    "lease_horizon": float,
    "lease_fraction": float,
}
#: what plangate sets where the URI says nothing (redis-py's defaults wait forever)
# Every call is bounded: an unreachable Redis costs a request one timeout at most, and none
# once the circuit breaker is open (storage/_breaker.py).
DEFAULTS: dict[str, Any] = {"socket_timeout": 0.05, "socket_connect_timeout": 0.05}
MAX_CONNECTIONS = 100  # per process, and per cluster node

#: numeric options, plangate's and redis-py's: (type, least value, whether it is allowed)
_NUMBERS: dict[str, tuple[type[int] | type[float], int, bool]] = {
    "customer_cache_ttl": (float, 0, True),
    "breaker_failures": (int, 1, True),
    "breaker_reset": (float, 0, False),
    "refusal_ttl": (float, 0, True),
    "lease_ttl": (float, 0, False),
    "lease_horizon": (float, 0, False),
    "lease_fraction": (float, 0, False),
    "db": (int, 0, True),
    "socket_timeout": (float, 0, False),
    "socket_connect_timeout": (float, 0, False),
    "timeout": (float, 0, False),
    "max_connections": (int, 1, True),
    "health_check_interval": (int, 0, True),
    "socket_read_size": (int, 1, True),
    "ssl_min_version": (int, 0, True),
}
_RATIOS = ("db", "lease_fraction")
_BOOLEANS = ("socket_keepalive", "retry_on_timeout", "legacy_responses", "ssl_check_hostname")
_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")
#: redis-py's options that take text; every other name is refused (redis-py would hand it to
#: the connection, which fails on the first request)
_TEXTS = ("client_name", "protocol", "ssl_include_verify_flags", "ssl_exclude_verify_flags")
_TLS_TEXTS = (
    "ssl_keyfile",
    "ssl_certfile",
    "ssl_cert_reqs",
    "ssl_ca_certs",
    "ssl_ca_data",
    "ssl_ca_path",
    "ssl_ciphers",
    "ssl_password",
)
_CERT_REQS = ("none", "optional", "required")


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
    leases: bool = True  # local quota leases (storage/_leases.py)
    lease_ttl: float = LEASE_TTL  # seconds a lease is used at most
    lease_horizon: float = LEASE_HORIZON  # seconds of this process's rate a lease covers
    lease_fraction: float = LEASE_FRACTION  # the largest share of a headroom one lease takes

    @property
    def max_connections(self) -> int:
        return int(self.connection.get("max_connections", MAX_CONNECTIONS))


def _number(name: str, value: str) -> int | float:
    kind, least, inclusive = _NUMBERS[name]
    what = "a whole number" if kind is int else "a number" if name in _RATIOS else "seconds"
    bound = f"at least {least}" if inclusive else f"more than {least}"
    try:
        number = kind(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number < least or (number == least and not inclusive):
        raise ValueError(f"invalid value for {name!r}: {value!r} ({what}, {bound})")
    return number


def _check_option(name: str, value: str, tls: bool) -> None:
    """Refuse a redis-py option that redis-py would take and fail on later, or ignore."""
    if name in _NUMBERS:
        _number(name, value)
    elif name in _BOOLEANS:
        if value.lower() not in _TRUE + _FALSE:
            raise ValueError(f"invalid value for {name!r}: {value!r} (true or false)")
    elif name == "protocol":
        if value not in ("2", "3"):
            raise ValueError(f"invalid value for 'protocol': {value!r} (2 or 3)")
    elif name in _TLS_TEXTS or name.startswith("ssl_"):
        if name not in _TLS_TEXTS + _TEXTS + _BOOLEANS:
            raise ValueError(f"unknown option {name!r}")
        if not tls:
            raise ValueError(f"{name!r} is a TLS option: use rediss:// (or ssl=true)")
        if name == "ssl_cert_reqs" and value.lower() not in _CERT_REQS:
            raise ValueError(
                f"invalid value for 'ssl_cert_reqs': {value!r} (none, optional, required)"
            )
    elif name not in _TEXTS:
        raise ValueError(f"unknown option {name!r}")


def parse_redis_uri(uri: str) -> RedisTarget:
    """Parse a Redis storage URI; ``ValueError`` says what is wrong with it."""
    from redis.connection import parse_url

    parts = urlsplit(uri)
    scheme = parts.scheme
    if scheme not in SCHEMES:
        raise ValueError(f"unknown storage scheme {scheme!r}: use {', '.join(SCHEMES)}")
    ours: dict[str, Any] = {}
    theirs: list[tuple[str, str]] = []
    tls = scheme == "rediss"
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name == "ssl":
            if value.lower() not in _TRUE + _FALSE:
                raise ValueError(f"invalid value for 'ssl': {value!r} (true or false)")
            tls = tls or value.lower() in _TRUE
        elif name == "leases":
            if value.lower() not in (*_TRUE, *_FALSE, "on", "off"):
                raise ValueError(f"invalid value for 'leases': {value!r} (on or off)")
            ours[name] = value.lower() in (*_TRUE, "on")
        elif name in OPTIONS:
            ours[name] = OPTIONS[name](_number(name, value))
            if name == "lease_fraction" and ours[name] > 1:
                raise ValueError(f"invalid value for 'lease_fraction': {value!r} (at most 1)")
        else:
            theirs.append((name, value))
    for name, value in theirs:
        _check_option(name, value, tls)
    auth, _, hosts = parts.netloc.rpartition("@")
    nodes = []
    for host in hosts.split(","):
        location = urlsplit(f"//{host.strip()}")
        try:
            port = location.port
        except ValueError:
            port = 0
        if port == 0:
            raise ValueError(f"invalid port in {host!r}")
        if not location.hostname:
            raise ValueError(f"missing host in {uri!r}")
        nodes.append((location.hostname, port or 6379))
    if not nodes:
        raise ValueError(f"missing host in {uri!r}")

    path = parts.path.strip("/")
    service = ""
    if scheme == "redis+sentinel":
        service, _, path = path.partition("/")
        if not service:
            raise ValueError("name the master: redis+sentinel://host:port/SERVICE")
    if path:
        try:
            _number("db", unquote(path))
        except ValueError:
            raise ValueError(f"invalid database {path!r} (a whole number, at least 0)") from None
    if scheme in ("redis", "rediss") and len(nodes) > 1:
        raise ValueError(f"{scheme}:// names one server; use redis+cluster:// for several")
    # Let redis-py read everything it knows (credentials, db, timeouts, pool size, TLS).
    base = "rediss" if tls else "redis"
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
