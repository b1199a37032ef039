"""One cache of customer records, in front of a store's raw reads and writes.

A record read from the store is reused for ``ttl`` seconds. It is also the last record seen:
when the store fails, plans keep deciding from it, however old (and, for a customer never
seen, from the token's claims: the engine's part).

Each customer has a version in this process, raised by every change the process makes or
hears of (``save``, ``delete``, ``invalidate``). A read that started before a change does not
put its older answer back in the cache afterwards. Invalidations from other processes (a
pub/sub channel) call ``invalidate``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..engine import CustomerRecord
from ..errors import StorageError

if TYPE_CHECKING:
    from ..storage import Storage

CACHE_SIZE = 100_000  # customers remembered; the oldest are forgotten first


class _Entry:
    __slots__ = ("expires", "record", "seen", "version")

    def __init__(self, record: CustomerRecord | None, expires: float, version: int) -> None:
        self.record = record
        self.expires = expires  # monotonic; -inf: read the store again
        self.version = version
        self.seen = True  # False: no record is known (only a version)


class _Cache:
    def __init__(
        self,
        storage: Storage,
        *,
        ttl: float | None = None,
        size: int = CACHE_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.storage = storage
        #: seconds a record read from the store is reused; the store's ``customer_cache_ttl``
        self.ttl = storage.customer_cache_ttl if ttl is None else ttl
        #: read the store every time, no cache: it is in this process and never fails
        self.direct = storage.in_process and self.ttl <= 0
        self.size = size
        self.clock = clock
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()

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
                entry = self._entries[customer] = _Entry(None, -float("inf"), 0)
                entry.seen = False
            entry.expires = -float("inf")
            entry.version += 1

    def _fresh(self, customer: str) -> tuple[_Entry | None, bool]:
        entry = self._entries.get(customer)
        return entry, entry is not None and self.clock() < entry.expires

    def _remember(self, customer: str, record: CustomerRecord | None, read_at: int | None) -> None:
        """Keep what the store answered. ``read_at``: the version when the read started (a
        read older than the current version is dropped); None for a change made here."""
        expires = self.clock() + self.ttl
        with self._lock:
            entry = self._entries.get(customer)
            if entry is None:
                if len(self._entries) >= self.size:
                    del self._entries[next(iter(self._entries))]
                self._entries[customer] = _Entry(record, expires, 1 if read_at is None else read_at)
                return
            if read_at is None:
                entry.version += 1
            elif read_at != entry.version:
                return
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
            return entry.record
        version = 0 if entry is None else entry.version
        try:
            record = self.storage.get_customer(customer)
        except StorageError:  # plans keep deciding from the record seen last, if any
            if entry is None or not entry.seen:
                raise
            return entry.record
        self._remember(customer, record, version)
        return record

    def save(self, record: CustomerRecord) -> None:
        """Write ``record`` to the store (replacing the customer's previous one)."""
        self.storage.put_customer(record)
        self._remember(record.customer, record, None)

    def delete(self, customer: str) -> None:
        """Remove the customer's record from the store."""
        self.storage.delete_customer(customer)
        self._remember(customer, None, None)


class AsyncCustomerStore(_Cache):
    """The same as ``CustomerStore``, with awaited store calls (ASGI)."""

    async def load(self, customer: str) -> CustomerRecord | None:
        if self.direct:
            return await self.storage.aget_customer(customer)
        entry, fresh = self._fresh(customer)
        if fresh:
            assert entry is not None
            return entry.record
        version = 0 if entry is None else entry.version
        try:
            record = await self.storage.aget_customer(customer)
        except StorageError:  # plans keep deciding from the record seen last, if any
            if entry is None or not entry.seen:
                raise
            return entry.record
        self._remember(customer, record, version)
        return record

    async def save(self, record: CustomerRecord) -> None:
        await self.storage.aput_customer(record)
        self._remember(record.customer, record, None)

    async def delete(self, customer: str) -> None:
        await self.storage.adelete_customer(customer)
        self._remember(customer, None, None)
