"""The storage interface: counters reserved, settled and read, all keyed by customer, and
customer records read and written.

The operations themselves (``Reserve``, ``Settle``, ``Peek``, ``Record``, ``LoadCustomer``)
and their answers belong to the engine (``plangate.engine``), which yields them; a backend
implements each once for sync callers and once for async ones, and the gate's drivers
(``plangate._drivers``) run them.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..engine import (
    EXACT_WINDOW_LIMIT,
    MADE_THERE,
    SLIDING_BUCKETS,
    USAGE_HOUR,
    Counter,
    CounterState,
    CreditCharge,
    CreditState,
    CreditView,
    CustomerPage,
    CustomerRecord,
    Flow,
    GrantCredits,
    GrantResult,
    Lease,
    LoadCustomer,
    Op,
    Peek,
    ReadCredits,
    Record,
    Reserve,
    ReserveResult,
    RevokeCredits,
    Settle,
    credits_key,
    customer_key,
    customer_of_key,
    customer_of_prefix,
    customer_prefix,
    idempotency_key_of,
    prefix_of_key,
    usage_hour,
    usage_key,
)
from ..errors import StorageError, VersionConflict

__all__ = [
    "EXACT_WINDOW_LIMIT",
    "MADE_THERE",
    "SLIDING_BUCKETS",
    "USAGE_HOUR",
    "ConfigListener",
    "Counter",
    "CounterState",
    "CreditCharge",
    "CreditState",
    "CreditView",
    "CustomerListener",
    "CustomerPage",
    "CustomerRecord",
    "ExportLock",
    "Flow",
    "GrantCredits",
    "GrantResult",
    "Lease",
    "Listeners",
    "LoadCustomer",
    "Op",
    "Peek",
    "PublishedConfig",
    "ReadCredits",
    "Record",
    "Reserve",
    "ReserveResult",
    "RevokeCredits",
    "Settle",
    "Storage",
    "credits_key",
    "customer_key",
    "customer_of_key",
    "customer_of_prefix",
    "customer_prefix",
    "idempotency_key_of",
    "prefix_of_key",
    "usage_hour",
    "usage_key",
]


class CustomerListener(Protocol):
    """Told of changes to customer records, made in this process or any other."""

    def heard(self, customer: str, version: int, sent_at: float | None = None) -> None:
        """``customer`` changed: its record is at ``version`` now (0: deleted); ``sent_at``:
        when the change was published (epoch seconds), if it came from another process."""

    def heard_nothing_for_a_while(self) -> None:
        """Changes may have been missed (the subscription was down): forget them all."""


@dataclass(frozen=True, slots=True)
class PublishedConfig:
    """A config published on the store: its bytes, its version, and its signature (the
    HMAC-SHA256 with ``PLANGATE_RELOAD_SECRET``, hex; "" unsigned)."""

    data: bytes
    version: str
    mac: str = ""


class ConfigListener(Protocol):
    """Told of configs published on the store (``plangate reload FILE``)."""

    def heard_config(self, version: str) -> None:
        """A config was published: ``Storage.published_config()`` has it, at ``version``."""

    def subscribed(self) -> None:
        """The subscription is in place (again): what was published before was not heard."""


class Listeners:
    """The listeners a store tells of changes, held weakly: a gate that is gone stops
    listening. One failing listener does not keep the others from hearing."""

    def __init__(self) -> None:
        self._listeners: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()

    def add(self, listener: CustomerListener) -> bool:
        """Add ``listener``; True if it is the first."""
        with self._lock:
            first = not self._listeners
            self._listeners.add(listener)
            return first

    def after_fork(self) -> None:
        """In a forked child: a lock held by a thread of the parent would stay held."""
        self._lock = threading.Lock()

    def any(self) -> bool:
        with self._lock:
            return bool(self._listeners)

    def _each(self) -> list[CustomerListener]:
        with self._lock:
            return list(self._listeners)

    def heard(self, customer: str, version: int, sent_at: float | None = None) -> None:
        for listener in self._each():
            try:
                if sent_at is None:
                    listener.heard(customer, version)
                else:
                    listener.heard(customer, version, sent_at)
            except Exception:
                logging.getLogger("plangate.storage").exception("a customer listener failed")

    def heard_config(self, version: str) -> None:
        self._tell_config("heard_config", version)

    def subscribed(self) -> None:
        self._tell_config("subscribed")

    def _tell_config(self, what: str, *args: Any) -> None:
        for listener in self._each():
            tell = getattr(listener, what, None)
            if tell is None:
                continue  # a customer cache: configs are not its business
            try:
                tell(*args)
            except Exception:
                logging.getLogger("plangate.storage").exception("a config listener failed")

    def heard_nothing_for_a_while(self) -> None:
        for listener in self._each():
            try:
                listener.heard_nothing_for_a_while()
            except Exception:
                logging.getLogger("plangate.storage").exception("a customer listener failed")


class ExportLock(Protocol):
    """An export held by this process until ``release`` or its time runs out."""

    def renew(self) -> None:
        """Hold it for another full time; ``StorageError`` if it was lost meanwhile."""

    def release(self) -> None: ...


def encode_cursor(value: Any) -> str:
    """An opaque listing cursor: a JSON value, URL-safe base64."""
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> Any:
    """The value ``encode_cursor`` was given; ``ValueError`` for anything else."""
    try:
        return json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, TypeError, RecursionError):  # RecursionError: [[[[...
        raise ValueError(f"not a cursor this store made: {cursor[:40]!r}") from None


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
    def put_customer(self, record: CustomerRecord, *, expected_version: int | None = None) -> int:
        """Replace the customer's record with ``record`` (its ``version`` is ignored) and
        tell every process; the new version. ``expected_version``: write only if the stored
        record is at that version (0: there is none), else ``VersionConflict``."""

    def put_customers(
        self, writes: Sequence[tuple[CustomerRecord, int | None]]
    ) -> list[int | VersionConflict]:
        """Many ``put_customer``s, each ``(record, expected_version)``: per write, the new
        version or the ``VersionConflict`` that refused it. A backend may send them together
        (Redis: one pipeline), so a bulk change costs a few round trips, not one each."""
        results: list[int | VersionConflict] = []
        for record, expected in writes:
            try:
                results.append(self.put_customer(record, expected_version=expected))
            except VersionConflict as conflict:
                results.append(conflict)
        return results

    @abstractmethod
    def delete_customer(self, customer: str, *, expected_version: int | None = None) -> int:
        """Remove the customer's record and tell every process; the version its removal
        took (versions never repeat: a record made again continues from it), or 0 if there
        was no record. ``expected_version``: only if the record is at that version, else
        ``VersionConflict``."""

    @abstractmethod
    def list_customers(
        self, *, plan: str | None = None, limit: int = 100, cursor: str | None = None
    ) -> CustomerPage:
        """A page of customer records, on ``plan`` if given. A listing walks the store once
        (a record changed meanwhile may be seen twice or not at all); about ``limit``
        records a page."""

    def grant_credits(self, op: GrantCredits) -> GrantResult:
        """Add a grant to a balance, once per idempotency key (see ``GrantCredits``)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no credit balances")

    def revoke_credits(self, op: RevokeCredits) -> int | None:
        """Take away what a grant still holds; the sub-units revoked (None: no such grant)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no credit balances")

    def read_credits(self, op: ReadCredits) -> CreditView:
        """A balance, its grants and a page of its ledger, newest first."""
        raise NotImplementedError(f"{type(self).__name__} keeps no credit balances")

    # hourly usage aggregates and their export (plangate.billing) -------------------------

    def usage_hours(self, customer: str, since: int, until: int) -> dict[int, dict[str, int]]:
        """The customer's hourly aggregates of the hours that start in ``[since, until)``
        (epoch seconds): hour start → meter → units used, and ``exported:<destination>:
        <meter>`` → the units of it exported there. Hours with nothing are left out."""
        raise NotImplementedError(f"{type(self).__name__} keeps no usage aggregates")

    def usage_customers(self, since: int, until: int) -> Iterator[str]:
        """The customers with aggregates of an hour that starts in ``[since, until)``; a
        customer may come more than once."""
        raise NotImplementedError(f"{type(self).__name__} keeps no usage aggregates")

    def mark_usage(self, customer: str, marks: Mapping[int, Mapping[str, int]]) -> None:
        """Set fields of the customer's hourly aggregates (hour start → field → value), as
        one change; an hour no longer kept is not made again."""
        raise NotImplementedError(f"{type(self).__name__} keeps no usage aggregates")

    def export_lock(self, name: str, ttl: float, *, force: bool = False) -> ExportLock | None:
        """Hold the export ``name`` for ``ttl`` seconds (renewable); None if another holds it
        (``force``: take it from whoever holds it)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no usage exports")

    def pending_export(self, name: str) -> tuple[str, frozenset[str]] | None:
        """The batch export ``name`` recorded and has not ended, with the identifiers of its
        entries confirmed sent; None if there is none."""
        raise NotImplementedError(f"{type(self).__name__} keeps no usage exports")

    def begin_export(self, name: str, batch: str) -> None:
        """Record ``batch`` as export ``name``'s, before any of it is sent."""
        raise NotImplementedError(f"{type(self).__name__} keeps no usage exports")

    def confirm_export(self, name: str, identifiers: Sequence[str]) -> None:
        """These entries of the recorded batch were sent."""
        raise NotImplementedError(f"{type(self).__name__} keeps no usage exports")

    def end_export(self, name: str) -> None:
        """The recorded batch is done with: forget it."""
        raise NotImplementedError(f"{type(self).__name__} keeps no usage exports")

    def count_unmapped(self, provider: str, names: Sequence[str]) -> None:
        """Count, once each, prices (rate plans) a billing provider sent that the config maps
        to nothing (plangate.billing); the admin API shows the counts."""
        raise NotImplementedError(f"{type(self).__name__} keeps no billing counts")

    def unmapped(self, providers: Sequence[str]) -> dict[str, dict[str, int]]:
        """Per provider, how many times each unmapped price was sent."""
        raise NotImplementedError(f"{type(self).__name__} keeps no billing counts")

    async def acount_unmapped(self, provider: str, names: Sequence[str]) -> None:
        self.count_unmapped(provider, names)

    async def aunmapped(self, providers: Sequence[str]) -> dict[str, dict[str, int]]:
        return self.unmapped(providers)

    async def agrant_credits(self, op: GrantCredits) -> GrantResult:
        return self.grant_credits(op)

    async def arevoke_credits(self, op: RevokeCredits) -> int | None:
        return self.revoke_credits(op)

    async def aread_credits(self, op: ReadCredits) -> CreditView:
        return self.read_credits(op)

    # signed-out dashboard sessions: kept until they would have expired anyway

    def revoke_session(self, session: str, ttl: float) -> None:
        """Remember that ``session`` (a dashboard session id) signed out, for ``ttl``
        seconds; this base keeps it in the process (a store shared by several processes
        keeps it for all)."""
        revoked = self.__dict__.setdefault("_revoked_sessions", {})
        now = time.monotonic()
        for old in [k for k, until in revoked.items() if until <= now]:
            del revoked[old]
        revoked[session] = now + ttl

    def session_revoked(self, session: str) -> bool:
        revoked = self.__dict__.get("_revoked_sessions", {})
        until = revoked.get(session)
        return until is not None and until > time.monotonic()

    def publish_config(self, data: bytes, version: str, mac: str = "") -> None:
        """Keep ``data`` (a checked config; ``mac`` its signature) as the config every
        process following the store loads, and announce ``version`` to them
        (``plangate reload FILE``)."""
        raise StorageError(f"{type(self).__name__} cannot publish a config")

    def published_config(self) -> PublishedConfig | None:
        """The config last published, and its version; None if none was."""
        return None

    def watch_config(self, listener: ConfigListener) -> None:
        """Tell ``listener`` of every config published, by any process (held weakly)."""
        self.watch_customers(listener)  # type: ignore[arg-type]  # the same announcements

    def watch_customers(self, listener: CustomerListener) -> None:  # noqa: B027
        """Tell ``listener`` (held weakly) of every change to a customer record, made in
        this process or another. Nothing to do for a store only this process uses."""

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

    async def aput_customer(
        self, record: CustomerRecord, *, expected_version: int | None = None
    ) -> int:
        return self.put_customer(record, expected_version=expected_version)

    async def aput_customers(
        self, writes: Sequence[tuple[CustomerRecord, int | None]]
    ) -> list[int | VersionConflict]:
        return self.put_customers(writes)

    async def adelete_customer(self, customer: str, *, expected_version: int | None = None) -> int:
        return self.delete_customer(customer, expected_version=expected_version)

    async def alist_customers(
        self, *, plan: str | None = None, limit: int = 100, cursor: str | None = None
    ) -> CustomerPage:
        return self.list_customers(plan=plan, limit=limit, cursor=cursor)

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
