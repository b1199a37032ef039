"""A backend's customer records: raw reads and writes, the same on every backend."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import pytest

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


def test_addons_overrides_and_a_trial_round_trip(storage: Storage):
    record = CustomerRecord(
        "acme",
        plan="pro",
        billing_anchor=ANCHOR,
        addons={"extra_calls": 5, "reports": 0},
        overrides={
            "export_reports": False,
            "max_projects": "unlimited",
            "api_calls": [{"limit": 9, "window": "1m"}, {"limit": 100, "period": "month"}],
        },
        trial_ends_at=ANCHOR + timedelta(days=14),
        previous_plan="free",
    )
    storage.put_customer(record)
    assert storage.get_customer("acme") == record


def test_a_write_clears_addons_overrides_and_the_trial(storage: Storage):
    storage.put_customer(
        CustomerRecord(
            "acme",
            plan="pro",
            addons={"extra_calls": 1},
            overrides={"max_projects": 9},
            trial_ends_at=ANCHOR,
            previous_plan="free",
        )
    )
    storage.put_customer(CustomerRecord("acme", plan="free"))
    assert storage.get_customer("acme") == CustomerRecord("acme", "free")


def test_records_with_the_same_addons_and_overrides_hash_alike():
    one = CustomerRecord("acme", "pro", addons={"a": 1}, overrides={"m": {"limit": 1}})
    two = CustomerRecord("acme", "pro", addons={"a": 1}, overrides={"m": {"limit": 1}})
    assert one == two
    assert hash(one) == hash(two)
    assert one.addons == {"a": 1}
    with pytest.raises(TypeError):
        one.addons["a"] = 2  # type: ignore[index]
