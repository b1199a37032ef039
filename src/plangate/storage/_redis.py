"""The Redis client: connections, the timed asyncio path, ``RedisStorage``.

Each operation is one Lua script (``lua/*.lua``), run by EVALSHA; after a ``SCRIPT FLUSH`` or
a restart it is loaded again. Arguments are built and replies read by ``_redis_codec``, the
URI is read by ``_redis_uri``; only the line that calls Redis differs between the blocking
client (WSGI) and the asyncio one (ASGI).
"""

from __future__ import annotations

import asyncio
import queue
import socket
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from redis.exceptions import (
    AskError,
    AuthenticationError,
    AuthorizationError,
    ClusterDownError,
    InvalidResponse,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..errors import ConfigError, ConfigIssue, StorageError, VersionConflict
from ._base import (
    USAGE_HOUR,
    CounterState,
    CreditView,
    CustomerListener,
    CustomerPage,
    CustomerRecord,
    ExportLock,
    GrantCredits,
    GrantResult,
    Peek,
    PublishedConfig,
    ReadCredits,
    Record,
    Reserve,
    ReserveResult,
    RevokeCredits,
    Settle,
    Storage,
    customer_key,
    customer_of_key,
    customer_of_prefix,
    customer_prefix,
    decode_cursor,
    encode_cursor,
    usage_hour,
    usage_key,
)
from ._breaker import StorageRejected
from ._redis_changes import ChangeFeed, config_message
from ._redis_codec import (
    SCRIPTS,
    TOMBSTONE_TTL,
    customer_delete_result,
    customer_fields,
    customer_put_result,
    customer_record,
    export_key,
    grant_call,
    grant_result,
    hash_text,
    mark_call,
    peek_call,
    peek_result,
    read_call,
    read_result,
    record_call,
    record_result,
    reserve_call,
    reserve_result,
    reserve_script,
    revoke_call,
    script_source,
    settle_call,
    unmapped_counts,
    unmapped_key,
    usage_fields,
)
from ._redis_uri import DEFAULTS, MAX_CONNECTIONS, RedisTarget, parse_redis_uri
from ._registry import masked

#: seconds a bulk admin call (a listing page, a migration's page of writes) may wait for Redis:
#: it is nobody's request, and a page of 500 writes is not a 50 ms affair on a loaded server
BULK_TIMEOUT = 5.0
#: SCAN calls one page of a listing makes at the most (so a filter that matches few
#: customers answers in bounded time, with a cursor to go on)
SCAN_CALLS = 16

#: TCP keepalive of the subscription's connection: probed after 15 s idle, every 5 s, three
#: unanswered probes and it is dead (Linux names; elsewhere the system's defaults)
_KEEPALIVE = {
    getattr(socket, name): value
    for name, value in (("TCP_KEEPIDLE", 15), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3))
    if hasattr(socket, name)
}

T = TypeVar("T")

#: a deadline the event loop reaches this late was missed by the loop, not by Redis
_LATE = 0.005
#: turns of the event loop a missed reply may still need to reach its task (a new
#: connection's transport takes three)
_TURNS = 4
#: timeouts a call may wait in all while Redis answers other calls meanwhile
_PATIENCE = 20

#: error replies that say Redis cannot serve anyone now (an outage, for the breaker)
_UNAVAILABLE = (
    AskError,  # and MOVED: the cluster is moving slots
    ClusterDownError,  # and MASTERDOWN
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    TryAgainError,
)
_UNAVAILABLE_CODES = ("BUSY ", "MISCONF ", "NOREPLICAS ")


#: the config published for every process following the store: a hash (data, version, mac,
#: at)
CONFIG_KEY = "plangate:config"
#: a signed-out dashboard session: ``<prefix><session id>``, expiring with the session
SESSIONS_PREFIX = "plangate:dashboard:signed-out:"


def _failure(what: str, exc: Exception) -> StorageError:
    """The ``StorageError`` for ``exc``: ``StorageRejected`` when Redis answered with an error
    about this request's data (a key of the wrong type, a script's error, keys in two cluster
    slots), which is that request's problem and not an outage."""
    if isinstance(exc, ResponseError):
        data = not isinstance(exc, _UNAVAILABLE) and not str(exc).startswith(_UNAVAILABLE_CODES)
    else:  # redis-py's cluster client refuses keys of several slots before sending them
        data = isinstance(exc, RedisClusterException) and "same key slot" in str(exc)
    error = (StorageRejected if data else StorageError)(f"redis {what} failed: {exc}")
    if isinstance(exc, (RedisTimeoutError, RedisConnectionError)):
        # not while connecting (refused, unreachable): then nothing was sent
        text = str(exc).lower()
        error.maybe_applied = "connecting" not in text and "not connected" not in text
    return error


class _Deadline:
    """Cancels the task that sets it when Redis stays silent for ``timeout`` seconds.

    asyncio's timeouts (redis-py's) measure the event loop as much as Redis: on a loop busy
    with a burst, a reply that came back in a millisecond waits behind other tasks, and the
    timeout fires first. This one is postponed when the loop reaches it late, and when it is
    reached in time it still lets the loop run what it holds (a reply read in this turn
    reaches its task in the next ones) before it cancels. So a hung Redis costs one timeout
    on an idle loop; a busy loop cannot make a healthy Redis look hung.

    ``answered`` counts what Redis answered on other calls: when it moved since this call
    started (or since its last extension), Redis is answering and this call is slow on our
    side (a loop that needs more turns than the heuristic allows, a burst of connects), so
    the deadline is extended — up to ``_PATIENCE`` timeouts in all. A hung Redis answers
    nobody: one timeout.
    """

    __slots__ = (
        "_answered",
        "_cancelling",
        "_extensions",
        "_handle",
        "_loop",
        "_seen",
        "_task",
        "_timeout",
        "expired",
    )

    def __init__(self, timeout: float | None, answered: Callable[[], int] | None = None) -> None:
        self.expired = False
        self._handle: asyncio.Handle | None = None
        if timeout is None:
            return
        self._answered = answered
        self._seen = answered() if answered is not None else 0
        self._extensions = 0
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._timeout = timeout
        self._cancelling = getattr(self._task, "cancelling", lambda: 0)()  # 3.11+
        self._handle = self._loop.call_at(self._loop.time() + timeout, self._due)

    def _due(self) -> None:
        now = self._loop.time()
        assert isinstance(self._handle, asyncio.TimerHandle)
        if now - self._handle.when() > _LATE:
            self._handle = self._loop.call_at(now + self._timeout, self._due)
        else:
            self._handle = self._loop.call_soon(self._turn, _TURNS)

    def _turn(self, left: int) -> None:
        if left:
            self._handle = self._loop.call_soon(self._turn, left - 1)
            return
        answered = self._answered() if self._answered is not None else self._seen
        if answered != self._seen and self._extensions < _PATIENCE - 1:
            self._seen = answered
            self._extensions += 1
            self._handle = self._loop.call_at(self._loop.time() + self._timeout, self._due)
        elif self._task is not None:
            self.expired = True
            self._task.cancel()

    def clear(self) -> bool:
        """Disarm (again: no harm). The first time after it cancelled the task: True, and
        that ``CancelledError`` is to be read as a timeout."""
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.cancel()
        if not self.expired:
            return False
        self.expired = False
        uncancel = getattr(self._task, "uncancel", None)  # 3.11+: cancellations are counted
        return uncancel is None or bool(uncancel() <= self._cancelling)


class _Connections:
    """A single node's connections, used directly: one packed ``EVALSHA`` and one reply.

    A reservation is one command; the client's per-command machinery (retry wrappers,
    response callbacks, the pool's bookkeeping) costs about as much as the round trip itself.
    Connections come from the client's own pool and wait, idle, in a LIFO list between
    commands; a connection that fails is disconnected and handed back to the pool. A
    connection found broken (Redis restarted) says the same of every idle one: they are all
    dropped at once, and the retry connects afresh. (Dropping only the broken one cost each
    probe of the circuit breaker two dead connections: 11-13 s to get through a warm pool.)

    Under asyncio, ``timeout`` and ``connect_timeout`` are kept here (a ``_Deadline`` each),
    not by redis-py: the timeout starts when the command is written and ends when Redis's
    reply is read, whatever else the event loop is doing.
    """

    def __init__(
        self, pool: Any, timeout: float | None = None, connect_timeout: float | None = None
    ) -> None:
        self.pool = pool
        self.idle: list[Any] = []
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        #: replies and connects Redis gave under asyncio (see ``_Deadline``)
        self.answered = 0

    def _answered(self) -> int:
        return self.answered

    def call(self, *args: Any) -> Any:
        for attempt in (1, 2):
            try:
                conn = self.idle.pop()  # atomic: threads share the list
            except IndexError:
                conn = self.pool.get_connection()
            try:
                conn.send_packed_command(conn.pack_command(*args), check_health=False)
                reply = conn.read_response()
            except ResponseError:  # an error reply: the connection is fine
                self.idle.append(conn)
                raise
            except RedisConnectionError:  # a connection broken while idle (a restart)
                conn.disconnect()
                self.pool.release(conn)
                self._drop_idle()
                if attempt == 2:
                    raise
                continue
            except BaseException:
                conn.disconnect()
                self.pool.release(conn)
                raise
            self.idle.append(conn)
            return reply
        raise AssertionError("unreachable")  # pragma: no cover

    async def acall(self, *args: Any) -> Any:
        for attempt in (1, 2):
            conn = self.idle.pop() if self.idle else await self._open()
            deadline = _Deadline(self.timeout, self._answered)
            try:
                await conn.send_packed_command(conn.pack_command(*args), check_health=False)
                reply = await conn.read_response()
            except BaseException as exc:
                ours = deadline.clear()
                if isinstance(exc, ResponseError):  # an error reply: the connection is fine
                    self.answered += 1
                    self.idle.append(conn)
                    raise
                await conn.disconnect()
                await self.pool.release(conn)
                if ours:
                    raise RedisTimeoutError(f"no reply within {self.timeout} s") from None
                if isinstance(exc, RedisConnectionError):  # broken while idle (a restart)
                    await self._adrop_idle()
                    if attempt == 1:
                        continue
                raise
            deadline.clear()
            self.answered += 1
            self.idle.append(conn)
            return reply
        raise AssertionError("unreachable")  # pragma: no cover

    async def _open(self) -> Any:
        # The pool would connect under its lock, and a burst's connections queue for it:
        # waiting for the lock is not Redis's time, so only the connect is timed.
        take = getattr(self.pool, "get_available_connection", None)
        if take is None:  # pragma: no cover - an older redis-py
            return await self.pool.get_connection()
        conn = take()
        deadline = _Deadline(self.connect_timeout, self._answered)
        try:
            await conn.connect()
        except BaseException:
            ours = deadline.clear()
            await self.pool.release(conn)
            if ours:
                raise RedisTimeoutError(f"not connected within {self.connect_timeout} s") from None
            raise
        deadline.clear()
        self.answered += 1
        return conn

    def _drop_idle(self) -> None:
        while True:
            try:
                conn = self.idle.pop()  # one at a time: other threads may push and pop
            except IndexError:
                return
            conn.disconnect()
            self.pool.release(conn)

    async def _adrop_idle(self) -> None:
        while self.idle:
            conn = self.idle.pop()
            await conn.disconnect()
            await self.pool.release(conn)

    def give_back(self) -> list[Any]:
        idle, self.idle = self.idle, []
        return idle


class _RedisLock:
    def __init__(self, lock: Any) -> None:
        self.lock = lock

    def renew(self) -> None:
        try:
            self.lock.reacquire()
        except Exception as exc:
            raise _failure("export lock", exc) from exc

    def release(self) -> None:
        try:
            self.lock.release()
        except Exception as exc:
            raise _failure("export lock", exc) from exc


@dataclass
class _AsyncClient:
    client: Any
    scripts: dict[str, Any]
    slots: asyncio.Semaphore  # at most max_connections commands in flight
    #: one node or the master behind Sentinel: commands go straight to a connection
    direct: _Connections | None = None
    #: a cluster: each command, redirections and reconnects included, is timed as a whole
    timeout: float | None = None
    ready: bool = False  # connected and scripts loaded
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    answered: int = 0  # commands Redis answered (see _Deadline)

    async def prepare(self) -> None:
        # Connect and load the scripts once, before the first burst: the asyncio cluster
        # client is not safe while many commands race to set up its first connections.
        async with self.lock:
            if self.ready:
                return
            if self.direct is not None:  # bounded by its own timeouts
                for script in self.scripts.values():
                    await self.direct.acall("SCRIPT", "LOAD", script.script)
            else:
                await self.timed(self.client.initialize())
                for script in self.scripts.values():
                    await self.timed(self.client.script_load(script.script))
            self.ready = True

    async def timed(self, command: Awaitable[T]) -> T:
        """``command``, cancelled when Redis stays silent for ``timeout`` (see _Deadline):
        the cluster client's own timeouts are off, a lagging event loop would fool them."""
        deadline = _Deadline(self.timeout, lambda: self.answered)
        try:
            result = await command
        except BaseException as exc:
            if deadline.clear():
                raise RedisTimeoutError(f"no reply within {self.timeout} s") from None
            if isinstance(exc, ResponseError):
                self.answered += 1
            raise
        deadline.clear()
        self.answered += 1
        return result


class RedisStorage(Storage):
    """Counters and customer records in Redis: one server, a Cluster, or behind Sentinel.

    The blocking client serves ``reserve``/``settle``/``peek`` (WSGI, CLI); an asyncio client
    per event loop serves ``areserve``/``asettle``/``apeek`` (ASGI). Both connect lazily.
    """

    def __init__(self, uri: str) -> None:
        try:
            self.target = parse_redis_uri(uri)
        except ValueError as exc:
            raise ConfigError([ConfigIssue("storage", f"{masked(uri)!r}: {exc}")]) from None
        self.uri = uri
        self._texts = {name: script_source(name) for name in SCRIPTS}
        self._client: Any = None
        self._sync_lock = threading.Lock()
        self._direct: _Connections | None = None
        self._scripts: dict[str, Any] = {}
        self._aclients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _AsyncClient]
        self._aclients = weakref.WeakKeyDictionary()
        #: the event loop (weakly) and client of the last asyncio call
        self._last: tuple[weakref.ref[asyncio.AbstractEventLoop], _AsyncClient] | None = None
        self.customer_cache_ttl = self.target.customer_cache_ttl
        #: blocking calls take a token for as long as they use Redis: at most max_connections
        #: in flight, and the pool always has a connection for them. Waiting for a token is
        #: not Redis's time (each call ahead is bounded by its timeouts): it is not timed.
        self._tokens: queue.SimpleQueue[None] = queue.SimpleQueue()
        for _ in range(self.target.max_connections):
            self._tokens.put(None)
        self._bulk: Any = None
        self._bulk_loaded: set[str] = set()
        #: changes to customer records: published on every write, heard on a thread
        self.changes = ChangeFeed(self._subscriber_client, cluster=self.target.kind == "cluster")

    def _subscriber_client(self) -> Any:
        """A blocking client of its own for the subscription, which waits on its socket for
        as long as it likes (the store's socket timeout is for commands)."""
        options = {
            **self.target.connection,
            "socket_timeout": None,
            "max_connections": 2,
            # A connection that a load balancer or NAT dropped without a word still fails,
            # within about half a minute: TCP keepalive probes it while it is idle.
            "socket_keepalive": True,
            "socket_keepalive_options": _KEEPALIVE,
        }
        return _connect(replace(self.target, connection=options), asynchronous=False)

    def __repr__(self) -> str:
        return f"RedisStorage({self.target.kind}, nodes={list(self.target.nodes)})"

    # clients ---------------------------------------------------------------------------

    def _sync(self) -> dict[str, Any]:
        if self._client is None:
            # Threads making their first calls at once (a threaded WSGI server starting up)
            # build one client; each reads it only once it is whole.
            with self._sync_lock:
                if self._client is None:
                    self.changes.resume()  # a store closed and used again listens again
                    client = _connect(self.target, asynchronous=False)
                    self._scripts = {n: client.register_script(t) for n, t in self._texts.items()}
                    if self.target.kind == "single":
                        self._direct = _Connections(client.connection_pool)
                    self._client = client
        return self._scripts

    def _async(self) -> _AsyncClient:
        loop = asyncio.get_running_loop()
        last = self._last
        if last is not None and last[0]() is loop:  # the usual case: one event loop
            return last[1]
        entry = self._aclients.get(loop)
        if entry is not None:
            self._last = (weakref.ref(loop), entry)
        if entry is None:
            self.changes.resume()  # a store closed and used again listens again
            client = _connect(self.target, asynchronous=True)
            scripts = {n: client.register_script(t) for n, t in self._texts.items()}
            entry = _AsyncClient(client, scripts, asyncio.Semaphore(self.target.max_connections))
            # The clients' own timeouts are off under asyncio (see _connect): plangate's are
            # kept here, measuring Redis's answer and not the event loop's lag (_Deadline).
            timeout = self.target.connection.get("socket_timeout")
            connect_timeout = self.target.connection.get("socket_connect_timeout", timeout)
            if self.target.kind == "cluster":
                timeouts = [t for t in (timeout, connect_timeout) if t is not None]
                entry.timeout = max(timeouts) if timeouts else None
            else:
                entry.direct = _Connections(client.connection_pool, timeout, connect_timeout)
            self._aclients[loop] = entry
            self._last = (weakref.ref(loop), entry)
        return entry

    @property
    def client(self) -> Any:
        """The blocking redis-py client (``redis.Redis`` or ``redis.cluster.RedisCluster``)."""
        self._sync()
        return self._client

    # EVALSHA by hand, not through redis-py's Script (which the style guide prefers): on a
    # single node, one reservation measured 72 µs asyncio / 29 µs blocking this way against
    # 92 / 57 µs through Script.__call__ (benchmarks/evalsha.py, median of 21 batches of
    # 2 000, redis-py 8.1); and under asyncio, Script would run on redis-py's own timeouts,
    # which a lagging event loop fools (see _Deadline). Script.__call__ handed a client whose
    # evalsha is this path costs 3-4 µs more and buys nothing but the NOSCRIPT fallback below.
    def _run(self, name: str, keys: list[str], args: list[Any]) -> Any:
        self._tokens.get()
        try:
            script = self._sync()[name]
            try:  # what redis-py's Script does, without its per-call bookkeeping
                if self._direct is not None:
                    return self._direct.call("EVALSHA", script.sha, len(keys), *keys, *args)
                return self._client.evalsha(script.sha, len(keys), *keys, *args)
            except NoScriptError:  # a SCRIPT FLUSH or a restart: load it again
                return script(keys=keys, args=args)
        except Exception as exc:
            raise _failure(name, exc) from exc
        finally:
            self._tokens.put(None)

    async def _arun(self, name: str, keys: list[str], args: list[Any]) -> Any:
        entry = self._async()
        try:
            if not entry.ready:
                await entry.prepare()
            # The asyncio cluster and sentinel clients fail a command at once when every
            # connection is busy; under a burst, wait for one instead.
            script = entry.scripts[name]
            async with entry.slots:
                try:  # what redis-py's Script does, without its per-call bookkeeping
                    if entry.direct is not None:
                        return await entry.direct.acall(
                            "EVALSHA", script.sha, len(keys), *keys, *args
                        )
                    return await entry.timed(
                        entry.client.evalsha(script.sha, len(keys), *keys, *args)
                    )
                except NoScriptError:  # a SCRIPT FLUSH or a restart: load it again
                    if entry.direct is not None:  # EVAL loads it
                        return await entry.direct.acall(
                            "EVAL", script.script, len(keys), *keys, *args
                        )
                    return await entry.timed(script(keys=keys, args=args))
        except Exception as exc:
            raise _failure(name, exc) from exc

    # start-up check ---------------------------------------------------------------------

    def check_connection(self) -> str:
        """Connect, authenticate and ask Redis its version, on a client of its own (nothing
        stays open: the store's own connections are made where they are used, after a fork).
        ``StorageError`` names the URI, password masked, and the cause."""
        client: Any = None
        try:
            client = _connect(self.target, asynchronous=False)
            info: dict[str, Any] = client.info("server")
        except Exception as exc:
            raise StorageError(f"cannot use {masked(self.uri)}: {_cause(exc)}") from exc
        finally:
            if client is not None:
                for sentinel in getattr(client, "plangate_sentinels", ()):
                    sentinel.close()
                client.close()
        return f"{masked(self.uri)} (redis {info.get('redis_version', '?')})"

    async def acheck_connection(self) -> str:
        # The blocking client in a thread: its socket timeouts bound the check, and a
        # lagging event loop cannot fool them.
        return await asyncio.to_thread(self.check_connection)

    # operations ------------------------------------------------------------------------

    def reserve(self, op: Reserve) -> ReserveResult:
        return reserve_result(self._run(reserve_script(op), *reserve_call(op)), op)

    async def areserve(self, op: Reserve) -> ReserveResult:
        return reserve_result(await self._arun(reserve_script(op), *reserve_call(op)), op)

    def settle(self, op: Settle) -> bool:
        return bool(self._run("settle", *settle_call(op)))

    async def asettle(self, op: Settle) -> bool:
        return bool(await self._arun("settle", *settle_call(op)))

    def record(self, op: Record) -> tuple[int, ...] | None:
        return record_result(self._run("record", *record_call(op)))

    async def arecord(self, op: Record) -> tuple[int, ...] | None:
        return record_result(await self._arun("record", *record_call(op)))

    def peek(self, op: Peek) -> tuple[CounterState, ...]:
        return peek_result(self._run("peek", *peek_call(op)))

    async def apeek(self, op: Peek) -> tuple[CounterState, ...]:
        return peek_result(await self._arun("peek", *peek_call(op)))

    # credit balances: the admin side -------------------------------------------------

    def grant_credits(self, op: GrantCredits) -> GrantResult:
        return grant_result(self._run("credit_grant", *grant_call(op)), op)

    async def agrant_credits(self, op: GrantCredits) -> GrantResult:
        return grant_result(await self._arun("credit_grant", *grant_call(op)), op)

    def revoke_credits(self, op: RevokeCredits) -> int | None:
        units = int(self._run("credit_revoke", *revoke_call(op)))
        return None if units < 0 else units

    async def arevoke_credits(self, op: RevokeCredits) -> int | None:
        units = int(await self._arun("credit_revoke", *revoke_call(op)))
        return None if units < 0 else units

    def read_credits(self, op: ReadCredits) -> CreditView:
        return read_result(self._run("credit_read", *read_call(op)))

    async def aread_credits(self, op: ReadCredits) -> CreditView:
        return read_result(await self._arun("credit_read", *read_call(op)))

    # customers: raw reads and writes (the cache is plangate.customers) ----------------

    def _command(self, what: str, *args: Any) -> Any:
        self._tokens.get()
        try:
            self._sync()
            if self._direct is not None:
                return self._direct.call(*args)
            return self._client.execute_command(*args)
        except Exception as exc:
            raise _failure(f"customer {what}", exc) from exc
        finally:
            self._tokens.put(None)

    async def _acommand(self, what: str, *args: Any) -> Any:
        entry = self._async()
        try:
            if not entry.ready:
                await entry.prepare()
            async with entry.slots:
                if entry.direct is not None:
                    return await entry.direct.acall(*args)
                return await entry.timed(entry.client.execute_command(*args))
        except Exception as exc:
            raise _failure(f"customer {what}", exc) from exc

    def get_customer(self, customer: str) -> CustomerRecord | None:
        fields = self._command("read", "HGETALL", customer_key(customer))
        return customer_record(customer, fields)

    async def aget_customer(self, customer: str) -> CustomerRecord | None:
        fields = await self._acommand("read", "HGETALL", customer_key(customer))
        return customer_record(customer, fields)

    # billing's counts of unmapped prices: a hash per provider

    def count_unmapped(self, provider: str, names: Sequence[str]) -> None:
        for name in names:
            self._command("count", "HINCRBY", unmapped_key(provider), name, 1)

    async def acount_unmapped(self, provider: str, names: Sequence[str]) -> None:
        for name in names:
            await self._acommand("count", "HINCRBY", unmapped_key(provider), name, 1)

    def unmapped(self, providers: Sequence[str]) -> dict[str, dict[str, int]]:
        return {
            p: unmapped_counts(self._command("read", "HGETALL", unmapped_key(p))) for p in providers
        }

    async def aunmapped(self, providers: Sequence[str]) -> dict[str, dict[str, int]]:
        counts = {}
        for p in providers:
            counts[p] = unmapped_counts(await self._acommand("read", "HGETALL", unmapped_key(p)))
        return counts

    # hourly usage aggregates and their export: the exporter's, on the bulk client

    def usage_hours(self, customer: str, since: int, until: int) -> dict[int, dict[str, int]]:
        prefix = customer_prefix(customer)
        hours = [h for h in range(usage_hour(since), until, USAGE_HOUR) if h >= since]
        try:
            pipe = self._bulk_client().pipeline(transaction=False)
            for hour in hours:
                pipe.hgetall(usage_key(prefix, hour))
            replies = pipe.execute() if hours else []
        except Exception as exc:
            raise _failure("usage read", exc) from exc
        found = {hour: usage_fields(reply) for hour, reply in zip(hours, replies, strict=True)}
        return {hour: fields for hour, fields in found.items() if fields}

    def usage_customers(self, since: int, until: int) -> Iterator[str]:
        """SCAN over the aggregates' keys (never KEYS), node by node on a cluster."""
        match = usage_key(customer_prefix("*"), "*")  # type: ignore[arg-type]
        seen: set[str] = set()
        try:
            client = self._bulk_client()
            for node in self._scan_nodes(client):
                position = None
                while position != 0:
                    if node is None:
                        position, keys = client.scan(position or 0, match=match, count=1000)
                    else:
                        cursors, keys = client.scan(
                            position or 0, match=match, count=1000, target_nodes=node
                        )
                        position = cursors[node.name]
                    position = int(position)
                    for key in keys:
                        prefix, _, hour = _text(key).rpartition("usage:")
                        customer = customer_of_prefix(prefix)
                        if (
                            customer is not None
                            and customer not in seen
                            and hour.isdigit()
                            and since <= int(hour) < until
                        ):
                            seen.add(customer)
                            yield customer
        except Exception as exc:
            raise _failure("usage listing", exc) from exc

    def mark_usage(self, customer: str, marks: Mapping[int, Mapping[str, int]]) -> None:
        if marks:
            keys, args = mark_call(customer, marks)
            try:  # the bulk client's Script loads it where it is missing
                self._bulk_client().register_script(self._texts["usage_mark"])(keys, args)
            except Exception as exc:
                raise _failure("usage mark", exc) from exc

    def _bulk_command(self, what: str, *args: Any) -> Any:
        """One command of the exporter's, on the bulk client (its patient timeout)."""
        try:
            return self._bulk_client().execute_command(*args)
        except Exception as exc:
            raise _failure(what, exc) from exc

    def export_lock(self, name: str, ttl: float, *, force: bool = False) -> ExportLock | None:
        """redis-py's ``Lock`` (a token, released and extended only by its holder)."""
        try:
            if force:
                self._bulk_client().delete(f"{export_key(name)}:lock")
            lock = self._bulk_client().lock(f"{export_key(name)}:lock", timeout=ttl)
            if not lock.acquire(blocking=False):
                return None
        except Exception as exc:
            raise _failure("export lock", exc) from exc
        return _RedisLock(lock)

    def pending_export(self, name: str) -> tuple[str, frozenset[str]] | None:
        fields = self._bulk_command("export read", "HGETALL", export_key(name))
        text = hash_text(fields)
        batch = text.pop("batch", None)
        if batch is None:
            return None
        return batch, frozenset(k[len("sent:") :] for k in text if k.startswith("sent:"))

    def begin_export(self, name: str, batch: str) -> None:
        # two commands: the export's hold makes this process the one writer, and a crash
        # between them leaves no batch, when nothing of it was sent
        self._bulk_command("export write", "DEL", export_key(name))
        self._bulk_command("export write", "HSET", export_key(name), "batch", batch)

    def confirm_export(self, name: str, identifiers: Sequence[str]) -> None:
        if identifiers:
            fields = [part for i in identifiers for part in (f"sent:{i}", "1")]
            self._bulk_command("export write", "HSET", export_key(name), *fields)

    def end_export(self, name: str) -> None:
        self._bulk_command("export write", "DEL", export_key(name))

    def put_customer(self, record: CustomerRecord, *, expected_version: int | None = None) -> int:
        expected = "" if expected_version is None else str(expected_version)
        keys = [customer_key(record.customer)]
        reply = self._run("customer_put", keys, [expected, *customer_fields(record)])
        version = customer_put_result(record.customer, expected_version, reply)
        self._publish(record.customer, version)
        return version

    async def aput_customer(
        self, record: CustomerRecord, *, expected_version: int | None = None
    ) -> int:
        expected = "" if expected_version is None else str(expected_version)
        keys = [customer_key(record.customer)]
        reply = await self._arun("customer_put", keys, [expected, *customer_fields(record)])
        version = customer_put_result(record.customer, expected_version, reply)
        await asyncio.to_thread(self._publish, record.customer, version)
        return version

    def put_customers(
        self, writes: Sequence[tuple[CustomerRecord, int | None]]
    ) -> list[int | VersionConflict]:
        """One pipeline of ``customer_put`` scripts, then one of their publications, on the
        bulk client (a cluster pipeline splits itself by node)."""
        if len(writes) < 2:
            return super().put_customers(writes)
        sha = self._scripts_sha("customer_put")
        try:
            bulk = self._bulk_client()
            pipe = bulk.pipeline(transaction=False)
            for record, expected in writes:
                mark = "" if expected is None else str(expected)
                key = customer_key(record.customer)
                pipe.execute_command("EVALSHA", sha, 1, key, mark, *customer_fields(record))
            replies = pipe.execute(raise_on_error=False)
        except Exception as exc:
            raise _failure("customer write", exc) from exc
        results: list[int | VersionConflict] = []
        failed: StorageError | None = None
        for (record, expected), reply in zip(writes, replies, strict=True):
            if isinstance(reply, NoScriptError):  # flushed or restarted meanwhile
                results += super().put_customers([(record, expected)])
                continue
            if isinstance(reply, Exception):  # not written: the others are, tell of them
                failed = failed or _failure("customer write", reply)
                results.append(VersionConflict(record.customer, -1, -1))
                continue
            try:
                version = customer_put_result(record.customer, expected, reply)
            except VersionConflict as conflict:
                results.append(conflict)
                continue
            results.append(version)
        published = [
            (record.customer, version)
            for (record, _), version in zip(writes, results, strict=True)
            if isinstance(version, int)
        ]
        self.changes.publish_many(self._bulk_client(), published)
        if failed is not None:
            raise failed
        return results

    def _scripts_sha(self, name: str) -> str:
        """The script's SHA, loaded on every node the bulk client writes to (a pipelined
        EVALSHA cannot load it; a node that lost it meanwhile answers NOSCRIPT, handled)."""
        self._sync()
        if name not in self._bulk_loaded:
            try:
                self._bulk_client().script_load(self._texts[name])
            except Exception as exc:
                raise _failure("script load", exc) from exc
            self._bulk_loaded.add(name)
        return str(self._scripts[name].sha)

    def _bulk_client(self) -> Any:
        """A blocking client of its own for bulk admin work (listings, migrations): its
        socket timeout is ``BULK_TIMEOUT``, not the request path's tight one, and its
        connections never take one from the requests."""
        if self._bulk is None:
            options = dict(self.target.connection)
            timeout = max(options.get("socket_timeout") or 0, BULK_TIMEOUT)
            options.update(socket_timeout=timeout, max_connections=4)
            self._bulk = _connect(replace(self.target, connection=options), asynchronous=False)
        return self._bulk

    async def aput_customers(
        self, writes: Sequence[tuple[CustomerRecord, int | None]]
    ) -> list[int | VersionConflict]:
        # An admin call, not a request's: the blocking client, on a thread.
        return await asyncio.to_thread(self.put_customers, writes)

    def delete_customer(self, customer: str, *, expected_version: int | None = None) -> int:
        expected = "" if expected_version is None else str(expected_version)
        keys, args = [customer_key(customer)], [expected, TOMBSTONE_TTL]
        reply = self._run("customer_delete", keys, args)
        version = customer_delete_result(customer, expected_version, reply)
        if version:
            self._publish(customer, version)
        return version

    async def adelete_customer(self, customer: str, *, expected_version: int | None = None) -> int:
        expected = "" if expected_version is None else str(expected_version)
        keys, args = [customer_key(customer)], [expected, TOMBSTONE_TTL]
        reply = await self._arun("customer_delete", keys, args)
        version = customer_delete_result(customer, expected_version, reply)
        if version:
            await asyncio.to_thread(self._publish, customer, version)
        return version

    def _publish(self, customer: str, version: int) -> None:
        self._tokens.get()
        try:
            self._sync()
            execute = (
                self._direct.call if self._direct is not None else self._client.execute_command
            )
            self.changes.publish(execute, customer, version)
        finally:
            self._tokens.put(None)

    def watch_customers(self, listener: CustomerListener) -> None:
        self.changes.watch(listener)

    # signed-out dashboard sessions, for every gateway replica

    def revoke_session(self, session: str, ttl: float) -> None:
        try:
            self._bulk_client().set(f"{SESSIONS_PREFIX}{session}", b"1", px=max(1, int(ttl * 1000)))
        except Exception as exc:
            raise _failure("session sign-out", exc) from exc

    def session_revoked(self, session: str) -> bool:
        try:
            return bool(self._bulk_client().exists(f"{SESSIONS_PREFIX}{session}"))
        except Exception as exc:
            raise _failure("session read", exc) from exc

    # the config every process following the store loads (``plangate reload FILE``)

    def publish_config(self, data: bytes, version: str, mac: str = "") -> None:
        client = self._bulk_client()
        fields = {"data": data, "version": version, "mac": mac, "at": repr(time.time())}
        try:
            client.hset(CONFIG_KEY, mapping=fields)
            self.changes.announce(client.execute_command, config_message(version))
        except Exception as exc:
            raise _failure("config publish", exc) from exc

    def published_config(self) -> PublishedConfig | None:
        try:
            data, version, mac = self._bulk_client().hmget(CONFIG_KEY, ["data", "version", "mac"])
        except Exception as exc:
            raise _failure("config read", exc) from exc
        if data is None or version is None:
            return None
        return PublishedConfig(bytes(data), _text(version), _text(mac or b""))

    def list_customers(
        self, *, plan: str | None = None, limit: int = 100, cursor: str | None = None
    ) -> CustomerPage:
        """SCAN over the records' keys (never KEYS), node by node on a cluster; the cursor
        holds the node (by name: a failover that renames nodes restarts the walk, which may
        repeat records but skips none) and SCAN's own cursor. A page holds about ``limit``
        records, fewer when a filter matches few (a page never examines more than
        ``SCAN_CALLS`` batches of keys): follow the cursor until it is None."""
        try:
            name, position = ("", 0) if cursor is None else decode_cursor(cursor)
            if not isinstance(name, str) or not 0 <= int(position) < 2**64:
                raise ValueError
            position = int(position)
        except (TypeError, ValueError):
            raise ValueError("not a cursor this store made") from None
        limit = max(1, limit)
        try:
            client = self._bulk_client()
            records: list[CustomerRecord] = []
            nodes = self._scan_nodes(client)
            names = [_node_name(n) for n in nodes]
            node = names.index(name) if name in names else 0
            if name not in names:
                position = 0
            for _ in range(SCAN_CALLS):
                position, keys = self._scan(client, nodes[node], position, limit)
                records += self._records(client, keys, plan)
                if position == 0:
                    node += 1
                if node == len(nodes) or len(records) >= limit:
                    break
        except Exception as exc:
            raise _failure("customer listing", exc) from exc
        more = node < len(nodes)
        return CustomerPage(
            tuple(records), encode_cursor([names[node], position]) if more else None
        )

    async def alist_customers(
        self, *, plan: str | None = None, limit: int = 100, cursor: str | None = None
    ) -> CustomerPage:
        # An admin call, not a request's: the blocking client, on a thread.
        return await asyncio.to_thread(
            lambda: self.list_customers(plan=plan, limit=limit, cursor=cursor)
        )

    def _scan_nodes(self, client: Any) -> list[Any]:
        if self.target.kind != "cluster":
            return [None]
        return sorted(client.get_primaries(), key=lambda n: n.name)

    def _scan(self, client: Any, node: Any, position: int, count: int) -> tuple[int, list[Any]]:
        match = customer_key("*")  # '*' is kept as it is: the pattern of every record
        if node is None:
            cursor, keys = client.scan(position, match=match, count=count)
            return int(cursor), keys
        cursors, keys = client.scan(position, match=match, count=count, target_nodes=node)
        return int(cursors[node.name]), keys

    def _records(self, client: Any, keys: list[Any], plan: str | None) -> list[CustomerRecord]:
        """The records under ``keys``, read in one pipeline, on ``plan`` if given."""
        named = [(key, customer_of_key(_text(key))) for key in keys]
        named = [(key, customer) for key, customer in named if customer is not None]
        if not named:
            return []
        pipe = client.pipeline(transaction=False)
        for key, _ in named:
            pipe.hgetall(key)
        found = []
        for (_, customer), fields in zip(named, pipe.execute(), strict=True):
            assert customer is not None
            record = customer_record(customer, fields)
            if record is not None and (plan is None or record.plan == plan):
                found.append(record)
        return found

    def close(self) -> None:
        self.changes.close()
        self._close_clients()

    def _close_clients(self) -> None:
        """The blocking and bulk clients closed (they reconnect if used again)."""
        if self._bulk is not None:
            for sentinel in getattr(self._bulk, "plangate_sentinels", ()):
                sentinel.close()
            self._bulk.close()
            self._bulk = None
            self._bulk_loaded.clear()
        if self._client is not None:
            if self._direct is not None:
                for conn in self._direct.give_back():
                    self._client.connection_pool.release(conn)
            for sentinel in getattr(self._client, "plangate_sentinels", ()):
                sentinel.close()
            self._client.close()
            self._client = None

    async def aclose(self) -> None:
        self._last = None
        entry = self._aclients.pop(asyncio.get_running_loop(), None)
        if entry is not None:
            if entry.direct is not None:
                for conn in entry.direct.give_back():
                    await entry.client.connection_pool.release(conn)
            for sentinel in getattr(entry.client, "plangate_sentinels", ()):
                await sentinel.aclose()
            await entry.client.aclose()
        if self._aclients:  # other event loops are still served: they keep listening
            self._close_clients()
        else:
            self.close()


def _node_name(node: Any) -> str:
    return "" if node is None else str(node.name)


def _text(value: Any) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)


def _cause(exc: BaseException) -> str:
    """What went wrong connecting, in words an operator acts on."""
    text = str(exc) or type(exc).__name__
    context = exc.__context__
    if isinstance(exc, (AuthenticationError, AuthorizationError, NoPermissionError)):
        return f"authentication failed (a wrong or missing password?): {text}"
    if isinstance(exc, RedisTimeoutError):
        return f"timed out: {text}"
    if isinstance(context, ConnectionRefusedError) or "Connection refused" in text:
        return f"connection refused: {text}"
    if isinstance(context, socket.gaierror):
        return f"unknown host: {text}"
    if isinstance(exc, InvalidResponse):
        return f"not a Redis server: {text}"
    return text


def _retry(asynchronous: bool) -> Any:
    """One immediate retry on a broken connection (a restarted server), none on a timeout:
    a slow Redis costs one timeout, then the circuit breaker takes over."""
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError

    if asynchronous:
        from redis.asyncio.retry import Retry as AsyncRetry

        return AsyncRetry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
    from redis.retry import Retry

    return Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))


def _no_client_info() -> dict[str, Any]:
    try:
        from redis.driver_info import DriverInfo
    except ImportError:  # redis-py before 7.1
        return {"lib_name": None, "lib_version": None}
    return {"driver_info": DriverInfo(name=None, lib_version=None)}


def _connect(target: RedisTarget, *, asynchronous: bool) -> Any:
    options = dict(target.connection)
    tls = options.pop("ssl", False)
    if target.kind != "cluster":
        options.setdefault("retry", _retry(asynchronous))
    if target.kind == "single":
        host, port = target.nodes[0]
        pool_options = {
            # Commands in flight never exceed max_connections (RedisStorage's tokens and
            # semaphore: a burst waits there, untimed); the connections that wait idle
            # between them (see _Connections) need as many again. So the pool always has a
            # connection, and waiting for one is never taken for Redis failing.
            "max_connections": 2 * options.pop("max_connections", MAX_CONNECTIONS),
            "timeout": options.pop("timeout", DEFAULTS["socket_timeout"]),
        }
        if asynchronous:
            from redis.asyncio import ConnectionPool as AsyncPool
            from redis.asyncio import Redis as AsyncRedis
            from redis.asyncio.connection import SSLConnection as AsyncSSL

            if tls:
                options["connection_class"] = AsyncSSL
            # No blocking pool under asyncio: RedisStorage's semaphore never lets more than
            # max_connections commands in flight, and a blocking pool costs ~20 µs a command.
            pool_options.pop("timeout")
            # Timeouts are _Connections' (see _Deadline), and a new connection is ready after
            # its TCP handshake: no CLIENT SETINFO round trips.
            options["socket_timeout"] = options["socket_connect_timeout"] = None
            options.update(_no_client_info())
            pool = AsyncPool(host=host, port=port, **pool_options, **options)
            return AsyncRedis.from_pool(pool)  # the client owns the pool: closing closes both
        from redis import BlockingConnectionPool, Redis
        from redis.connection import SSLConnection

        if tls:
            options["connection_class"] = SSLConnection
        return Redis.from_pool(
            BlockingConnectionPool(host=host, port=port, **pool_options, **options)
        )
    if tls:
        options["ssl"] = True
    if asynchronous:
        # Timed by RedisStorage instead (see _Deadline): the whole command on a cluster, the
        # connect (Sentinel's answer included) and the reply behind Sentinel.
        options["socket_timeout"] = options["socket_connect_timeout"] = None
    if target.kind == "cluster":
        if asynchronous:
            from redis.asyncio.cluster import ClusterNode as AsyncNode
            from redis.asyncio.cluster import RedisCluster as AsyncCluster

            nodes = [AsyncNode(h, p) for h, p in target.nodes]
            return AsyncCluster(startup_nodes=nodes, **options)
        from redis.cluster import ClusterNode, RedisCluster

        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in target.nodes], **options)
    # As on one node: commands in flight never exceed max_connections, and the connections
    # idle between them (asyncio, see _Connections) need as many again.
    options["max_connections"] = 2 * options.get("max_connections", MAX_CONNECTIONS)
    sentinel_options = {
        k: v for k, v in options.items() if k in ("socket_timeout", "socket_connect_timeout")
    }
    if asynchronous:
        from redis.asyncio.sentinel import Sentinel as AsyncSentinel

        options.update(_no_client_info())
        sentinels = AsyncSentinel(list(target.nodes), sentinel_kwargs=sentinel_options, **options)
        master = sentinels.master_for(target.service)
        master.plangate_sentinels = sentinels.sentinels  # closed with the master
        return master
    from redis.sentinel import Sentinel

    sentinel = Sentinel(list(target.nodes), sentinel_kwargs=sentinel_options, **options)
    master = sentinel.master_for(target.service)
    master.plangate_sentinels = sentinel.sentinels
    return master
