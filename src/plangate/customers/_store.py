"""One cache of customer records, in front of a store's raw reads and writes.

A record read from the store is reused for ``ttl`` seconds. It is also the last record seen:
when the store fails, plans keep deciding from it, however old (and, for a customer never
seen, from the token's claims: the engine's part).

Each customer has a version in this process, raised by every change the process makes or
hears of (``save``, ``delete``, ``invalidate``). A read that started before a change does not
put its older answer back in the cache afterwards. The store tells the cache of changes made
by any process (``heard``: Redis pub/sub; memory: at once): the entry is dropped unless it
already holds that version; when the store says changes may have been missed (the
subscription was down), every entry is read again.

The stores also provision (``show``, ``assign``, ``put``, ``patch``, ``remove``, ``list``,
``migrate``): the flows of ``_provisioning``, checked against the gate's config.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from ..engine import CustomerRecord, Engine, Flow, Op
from ..errors import StorageError
from ._credits import Credits
from ._provisioning import UNSET, Provisioning, RemoveCustomer, WriteCustomer, WriteCustomers

if TYPE_CHECKING:
    from ..storage import Storage

R = TypeVar("R")

CACHE_SIZE = 100_000  # customers remembered; the oldest are forgotten first


class _Entry:
    __slots__ = ("expires", "heard", "record", "seen", "version")

    def __init__(self, record: CustomerRecord | None, expires: float, version: int) -> None:
        self.record = record
        self.expires = expires  # monotonic; -inf: read the store again
        self.version = version
        self.seen = True  # False: no record is known (only a version)
        self.heard = 0  # the newest version of the record the store told of


class _Cache:
    def __init__(
        self,
        storage: Storage,
        *,
        ttl: float | None = None,
        size: int = CACHE_SIZE,
        clock: Callable[[], float] = time.monotonic,
        engine: Engine | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.storage = storage
        #: seconds a record read from the store is reused; the store's ``customer_cache_ttl``
        self.ttl = storage.customer_cache_ttl if ttl is None else ttl
        #: read the store every time, no cache: it is in this process and never fails
        self.direct = storage.in_process and self.ttl <= 0
        self.size = size
        self.clock = clock
        self._entries: dict[str, _Entry] = {}
        #: guards the entries; notified whenever a customer's version moves
        self._lock = threading.Condition(threading.Lock())
        #: the flows of provisioning; None without a config (a bare cache)
        self.provisioning = None if engine is None else Provisioning(engine, now)
        #: the flows of credit balances; None without a config
        self.credit_flows = None if engine is None else Credits(engine, now)
        #: told of changes by the store: from the first record cached (a command-line
        #: process that only writes never subscribes)
        self._watching = False
        #: the newest version heard of customers not cached (a read may be on its way)
        self._heard: dict[str, int] = {}
        #: told of each read answered from the cache (``hit``) or from the store (``miss``):
        #: plangate.metrics counts them
        self.on_hit: Callable[[], None] | None = None
        self.on_miss: Callable[[], None] | None = None
        #: told how late (seconds) each change published by another process was heard
        self.on_lag: Callable[[float], None] | None = None
        self._now = now

    def use_engine(self, engine: Engine) -> None:
        """Provision and grant with ``engine`` from now on (the gate's config reloaded); the
        records cached stay: they are the store's, not the config's."""
        self.provisioning = Provisioning(engine, self._now)
        self.credit_flows = Credits(engine, self._now)

    def _watch(self) -> None:
        self._watching = True
        self.storage.watch_customers(self)

    def _flows(self) -> Provisioning:
        if self.provisioning is None:
            raise TypeError("this customer store has no config: build it with engine=")
        return self.provisioning

    def _credits(self) -> Credits:
        if self.credit_flows is None:
            raise TypeError("this customer store has no config: build it with engine=")
        return self.credit_flows

    # what the store tells --------------------------------------------------------------

    def heard(self, customer: str, version: int, sent_at: float | None = None) -> None:
        """``customer`` changed (in any process): its record is at ``version`` now (a
        deletion too: versions never repeat); ``sent_at``: when another process published
        the change (epoch seconds)."""
        if sent_at is not None and self.on_lag is not None:
            self.on_lag(max(0.0, time.time() - sent_at))
        with self._lock:
            entry = self._entries.get(customer)
            if entry is None:
                # Nothing cached, but a read may be on its way: what it brings back is kept
                # only if it is this version or newer (see _remember).
                if len(self._heard) >= self.size:
                    self._heard.clear()
                self._heard[customer] = max(version, self._heard.get(customer, 0))
                return
            held = 0 if entry.record is None else entry.record.version
            if entry.seen and held >= version and self.clock() < entry.expires:
                return  # this process made the change, or has read it already
            entry.heard = max(entry.heard, version)
            entry.expires = -float("inf")
            entry.version += 1
            self._lock.notify_all()

    def heard_nothing_for_a_while(self) -> None:
        """Changes may have been missed: read every customer from the store again."""
        with self._lock:
            for entry in self._entries.values():
                entry.expires = -float("inf")
                entry.version += 1
            self._lock.notify_all()

    def _written(self, op: Op[Any], result: Any) -> None:
        """A provisioning write went through: this process sees it at once."""
        if type(op) is WriteCustomer:
            record = replace(op.record, version=result)
            self._remember(record.customer, record, None, create=False, written=result)
        elif type(op) is WriteCustomers:
            for (record, _), version in zip(op.writes, result, strict=True):
                if isinstance(version, int):
                    written = replace(record, version=version)
                    self._remember(record.customer, written, None, create=False, written=version)
        elif type(op) is RemoveCustomer:
            self._remember(op.customer, None, None, create=False, written=result)

    def version(self, customer: str) -> int:
        """How many changes to ``customer`` this process has made or heard of."""
        entry = self._entries.get(customer)
        return 0 if entry is None else entry.version

    def invalidate(self, customer: str) -> None:
        """Read ``customer`` from the store next time: it changed elsewhere. The record seen
        last stays the answer while the store cannot be reached."""
        with self._lock:
            entry = self._entries.get(customer)
            if entry is None:
                if len(self._entries) >= self.size:
                    del self._entries[next(iter(self._entries))]
                entry = self._entries[customer] = _Entry(None, -float("inf"), 0)
                entry.seen = False
            entry.expires = -float("inf")
            entry.version += 1
            self._lock.notify_all()

    def wait_version(self, customer: str, version: int, timeout: float) -> bool:
        """Wait until ``version(customer)`` reaches ``version`` (a change made or heard);
        False if ``timeout`` seconds pass first. For tests and benchmarks, which await a
        change rather than sleep."""
        with self._lock:
            return self._lock.wait_for(lambda: self.version(customer) >= version, timeout)

    def _fresh(self, customer: str) -> tuple[_Entry | None, bool]:
        entry = self._entries.get(customer)
        return entry, entry is not None and self.clock() < entry.expires

    def _remember(
        self,
        customer: str,
        record: CustomerRecord | None,
        read_at: int | None,
        *,
        create: bool = True,
        written: int = 0,
    ) -> None:
        """Keep what the store answered.

        ``read_at``: the version when the read started (a read older than a change made or
        heard since is dropped, unless it brings that change). None for a change made here,
        ``written`` being the store's version of it (a write older than what is held or
        heard is dropped: two writes may finish in either order). ``create=False``: only
        update a customer already cached (provisioning's writes: a process that only
        writes caches nothing, and so never subscribes)."""
        expires = self.clock() + self.ttl
        if not self._watching and create and not self.direct:
            self._watch()  # the first record cached: hear of changes from now on
        newest = 0 if record is None else record.version
        with self._lock:
            entry = self._entries.get(customer)
            if entry is None:
                heard = self._heard.pop(customer, 0) if self._heard else 0
                if not create or (read_at is not None and heard and newest < heard):
                    return  # a change was heard while this was read: it is older
                if len(self._entries) >= self.size:
                    del self._entries[next(iter(self._entries))]
                entry = _Entry(record, expires, 1 if read_at is None else read_at)
                self._entries[customer] = entry
                return
            if read_at is None:
                held = 0 if entry.record is None else entry.record.version
                if written < max(held, entry.heard):
                    return  # a newer write finished first
                entry.version += 1
                self._lock.notify_all()
            elif read_at != entry.version and not (entry.heard and newest >= entry.heard):
                return  # a change came while reading, and this answer does not have it
            entry.record = record
            entry.expires = expires
            entry.seen = True


class CustomerStore(_Cache):
    """Customer records for blocking callers (WSGI, the CLI)."""

    def load(self, customer: str) -> CustomerRecord | None:
        """The customer's record, or None if the store has none."""
        if self.direct:
            return self.storage.get_customer(customer)
        entry, fresh = self._fresh(customer)
        if fresh:
            assert entry is not None
            if self.on_hit is not None:
                self.on_hit()
            return entry.record
        if self.on_miss is not None:
            self.on_miss()
        version = 0 if entry is None else entry.version
        try:
            record = self.storage.get_customer(customer)
        except StorageError:  # plans keep deciding from the record seen last, if any
            if entry is None or not entry.seen:
                raise
            return entry.record
        self._remember(customer, record, version)
        return record

    def save(self, record: CustomerRecord, *, expected_version: int | None = None) -> int:
        """Write ``record`` to the store as it is (replacing the customer's previous one,
        unchecked: ``assign`` and ``put`` check it against the config); its new version."""
        version = self.storage.put_customer(record, expected_version=expected_version)
        self._remember(record.customer, replace(record, version=version), None, written=version)
        return version

    def delete(self, customer: str) -> None:
        """Remove the customer's record from the store."""
        version = self.storage.delete_customer(customer)
        self._remember(customer, None, None, written=version)

    # provisioning ------------------------------------------------------------------------

    def _run(self, flow: Flow[R]) -> R:
        from .._drivers import drive

        return drive(flow, self.storage, done=self._written)

    def show(self, customer: str) -> dict[str, Any]:
        """The customer's record, version and resolved entitlements, as the admin API's
        ``GET /admin/customers/{id}`` answers; ``CustomerNotFound``."""
        return self._run(self._flows().show(customer))

    def assign(
        self,
        customer: str,
        *,
        plan: str | None = UNSET,
        trial: bool = False,
        addons: Mapping[str, int] | None = None,
        overrides: Mapping[str, Any] | None = None,
        billing_anchor: datetime | None = UNSET,
        allow_legacy: bool = False,
    ) -> dict[str, Any]:
        """Change what is given, keep the rest (``Provisioning.assign``); what ``show``
        answers after. ``InvalidRecord``, ``LegacyPlanRefused``."""
        flow = self._flows().assign(
            customer,
            plan=plan,
            trial=trial,
            addons=addons,
            overrides=overrides,
            billing_anchor=billing_anchor,
            allow_legacy=allow_legacy,
        )
        return self._run(flow)

    def put(
        self,
        customer: str,
        body: Mapping[str, Any],
        *,
        if_version: int | None = None,
        allow_legacy: bool = False,
    ) -> dict[str, Any]:
        """Replace the record with ``body`` (JSON members, as ``show`` answers them)."""
        flow = self._flows().put(customer, body, if_version=if_version, allow_legacy=allow_legacy)
        return self._run(flow)

    def patch(
        self,
        customer: str,
        patch: Mapping[str, Any],
        *,
        if_version: int | None = None,
        allow_legacy: bool = False,
    ) -> dict[str, Any]:
        """Apply a JSON merge patch (RFC 7396) to the record."""
        flow = self._flows().patch(
            customer, patch, if_version=if_version, allow_legacy=allow_legacy
        )
        return self._run(flow)

    def remove(self, customer: str, *, if_version: int | None = None) -> None:
        """Delete the record; ``CustomerNotFound`` if there is none."""
        self._run(self._flows().delete(customer, if_version=if_version))

    def list(
        self, *, plan: str | None = None, limit: int = 100, cursor: str | None = None
    ) -> dict[str, Any]:
        """A page of records: ``{"customers": [...], "next_cursor": ...}``."""
        return self._run(self._flows().listing(plan=plan, limit=limit, cursor=cursor))

    def migrate(
        self, from_plan: str, to_plan: str, *, dry_run: bool = False, allow_legacy: bool = False
    ) -> dict[str, Any]:
        """Move every customer on ``from_plan`` to ``to_plan``: ``{"matched", "migrated"}``."""
        flow = self._flows().migrate(from_plan, to_plan, dry_run=dry_run, allow_legacy=allow_legacy)
        return self._run(flow)

    # credits -----------------------------------------------------------------------------

    def grant_credits(
        self,
        customer: str,
        feature: str,
        amount: int,
        *,
        expires_at: datetime | str | None = None,
        priority: int | None = None,
        category: str | None = None,
        idempotency_key: str | None = None,
        source: str = "admin",
    ) -> dict[str, Any]:
        """Add ``amount`` credits of ``feature`` to the customer's balance (its debt is paid
        first); the grant. With ``idempotency_key``, a retry finds the first grant and adds
        nothing (``IdempotencyConflict`` if the key was used for another grant)."""
        body = _grant_body(feature, amount, expires_at, priority, category)
        _, grant = self._run(
            self._credits().grant(customer, body, idempotency_key=idempotency_key, source=source)
        )
        return grant

    def revoke_credits(self, customer: str, grant_id: str) -> dict[str, Any]:
        """Take away what a grant still holds: ``{"feature", "grant", "revoked"}``."""
        return self._run(self._credits().revoke(customer, grant_id))

    def balance(self, customer: str, feature: str) -> int | float:
        """The customer's usable balance of ``feature`` in credits (negative in debt)."""
        return self._run(self._credits().balance(customer, feature))

    def credits(self, customer: str, *, feature: str | None = None) -> dict[str, Any]:
        """Per credits feature: balance, debt, grants and the newest ledger entries."""
        return self._run(self._credits().show(customer, feature=feature))

    def ledger(
        self, customer: str, feature: str, *, limit: int = 50, cursor: str | None = None
    ) -> dict[str, Any]:
        """A page of the ledger, newest first: ``{"entries": [...], "next_cursor": ...}``."""
        shown = self._run(
            self._credits().show(customer, feature=feature, limit=limit, cursor=cursor)
        )
        return {"entries": shown[feature]["ledger"], "next_cursor": shown[feature]["next_cursor"]}


def _grant_body(
    feature: str,
    amount: int,
    expires_at: datetime | str | None,
    priority: int | None,
    category: str | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"feature": feature, "amount": amount}
    for name, value in (("expires_at", expires_at), ("priority", priority), ("category", category)):
        if value is not None:
            body[name] = value
    return body


class AsyncCustomerStore(_Cache):
    """The same as ``CustomerStore``, with awaited store calls (ASGI)."""

    async def load(self, customer: str) -> CustomerRecord | None:
        if self.direct:
            return await self.storage.aget_customer(customer)
        entry, fresh = self._fresh(customer)
        if fresh:
            assert entry is not None
            if self.on_hit is not None:
                self.on_hit()
            return entry.record
        if self.on_miss is not None:
            self.on_miss()
        version = 0 if entry is None else entry.version
        try:
            record = await self.storage.aget_customer(customer)
        except StorageError:  # plans keep deciding from the record seen last, if any
            if entry is None or not entry.seen:
                raise
            return entry.record
        self._remember(customer, record, version)
        return record

    async def save(self, record: CustomerRecord, *, expected_version: int | None = None) -> int:
        version = await self.storage.aput_customer(record, expected_version=expected_version)
        self._remember(record.customer, replace(record, version=version), None, written=version)
        return version

    async def delete(self, customer: str) -> None:
        version = await self.storage.adelete_customer(customer)
        self._remember(customer, None, None, written=version)

    # provisioning: CustomerStore's, awaited ---------------------------------------------

    async def _run(self, flow: Flow[R]) -> R:
        from .._drivers import adrive

        return await adrive(flow, self.storage, done=self._written)

    async def show(self, customer: str) -> dict[str, Any]:
        return await self._run(self._flows().show(customer))

    async def assign(
        self,
        customer: str,
        *,
        plan: str | None = UNSET,
        trial: bool = False,
        addons: Mapping[str, int] | None = None,
        overrides: Mapping[str, Any] | None = None,
        billing_anchor: datetime | None = UNSET,
        allow_legacy: bool = False,
    ) -> dict[str, Any]:
        flow = self._flows().assign(
            customer,
            plan=plan,
            trial=trial,
            addons=addons,
            overrides=overrides,
            billing_anchor=billing_anchor,
            allow_legacy=allow_legacy,
        )
        return await self._run(flow)

    async def put(
        self,
        customer: str,
        body: Mapping[str, Any],
        *,
        if_version: int | None = None,
        allow_legacy: bool = False,
    ) -> dict[str, Any]:
        flow = self._flows().put(customer, body, if_version=if_version, allow_legacy=allow_legacy)
        return await self._run(flow)

    async def patch(
        self,
        customer: str,
        patch: Mapping[str, Any],
        *,
        if_version: int | None = None,
        allow_legacy: bool = False,
    ) -> dict[str, Any]:
        flow = self._flows().patch(
            customer, patch, if_version=if_version, allow_legacy=allow_legacy
        )
        return await self._run(flow)

    async def remove(self, customer: str, *, if_version: int | None = None) -> None:
        await self._run(self._flows().delete(customer, if_version=if_version))

    async def list(
        self, *, plan: str | None = None, limit: int = 100, cursor: str | None = None
    ) -> dict[str, Any]:
        return await self._run(self._flows().listing(plan=plan, limit=limit, cursor=cursor))

    async def migrate(
        self, from_plan: str, to_plan: str, *, dry_run: bool = False, allow_legacy: bool = False
    ) -> dict[str, Any]:
        flow = self._flows().migrate(from_plan, to_plan, dry_run=dry_run, allow_legacy=allow_legacy)
        return await self._run(flow)

    async def grant_credits(
        self,
        customer: str,
        feature: str,
        amount: int,
        *,
        expires_at: datetime | str | None = None,
        priority: int | None = None,
        category: str | None = None,
        idempotency_key: str | None = None,
        source: str = "admin",
    ) -> dict[str, Any]:
        body = _grant_body(feature, amount, expires_at, priority, category)
        _, grant = await self._run(
            self._credits().grant(customer, body, idempotency_key=idempotency_key, source=source)
        )
        return grant

    async def revoke_credits(self, customer: str, grant_id: str) -> dict[str, Any]:
        return await self._run(self._credits().revoke(customer, grant_id))

    async def balance(self, customer: str, feature: str) -> int | float:
        return await self._run(self._credits().balance(customer, feature))

    async def credits(self, customer: str, *, feature: str | None = None) -> dict[str, Any]:
        return await self._run(self._credits().show(customer, feature=feature))

    async def ledger(
        self, customer: str, feature: str, *, limit: int = 50, cursor: str | None = None
    ) -> dict[str, Any]:
        shown = await self._run(
            self._credits().show(customer, feature=feature, limit=limit, cursor=cursor)
        )
        return {"entries": shown[feature]["ledger"], "next_cursor": shown[feature]["next_cursor"]}
