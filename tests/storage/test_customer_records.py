"""A backend's customer records: raw reads and writes, the same on every backend."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

from plangate import CustomerRecord
from plangate.storage import Storage

ANCHOR = datetime(2026, 1, 31, 9, 30, tzinfo=timezone.utc)


def test_a_record_round_trips(storage: Storage):
    storage.put_customer(CustomerRecord("acme", plan="pro", billing_anchor=ANCHOR))
    assert storage.get_customer("acme") == CustomerRecord("acme", "pro", ANCHOR)


def test_an_unknown_customer_has_no_record(storage: Storage):
    assert storage.get_customer("nobody") is None


def test_a_write_replaces_the_whole_record(storage: Storage):
    storage.put_customer(CustomerRecord("acme", plan="pro", billing_anchor=ANCHOR))
    storage.put_customer(CustomerRecord("acme", plan="free"))
    assert storage.get_customer("acme") == CustomerRecord("acme", "free", None)


def test_a_deleted_record_is_gone(storage: Storage):
    storage.put_customer(CustomerRecord("acme", plan="pro"))
    storage.delete_customer("acme")
    storage.delete_customer("nobody")  # nothing to delete: no error
    assert storage.get_customer("acme") is None


def test_the_async_methods_read_and_write_the_same_records(storage: Storage):
    async def run() -> list[CustomerRecord | None]:
        try:
            await storage.aput_customer(CustomerRecord("acme", plan="pro", billing_anchor=ANCHOR))
            seen = [await storage.aget_customer("acme")]
            await storage.adelete_customer("acme")
            return [*seen, await storage.aget_customer("acme")]
        finally:
            await storage.aclose()

    assert asyncio.run(run()) == [CustomerRecord("acme", "pro", ANCHOR), None]
