"""A backend's customer records: raw reads and writes, the same on every backend."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest

from plangate import CustomerRecord
from plangate.errors import VersionConflict
from plangate.storage import Storage

ANCHOR = datetime(2026, 1, 31, 9, 30, tzinfo=timezone.utc)


def test_a_record_round_trips(storage: Storage):
    storage.put_customer(CustomerRecord("acme", plan="pro", billing_anchor=ANCHOR))
    assert storage.get_customer("acme") == CustomerRecord("acme", "pro", ANCHOR, version=1)


def test_an_unknown_customer_has_no_record(storage: Storage):
    assert storage.get_customer("nobody") is None


def test_a_write_replaces_the_whole_record(storage: Storage):
    storage.put_customer(CustomerRecord("acme", plan="pro", billing_anchor=ANCHOR))
    assert storage.put_customer(CustomerRecord("acme", plan="free")) == 2
    assert storage.get_customer("acme") == CustomerRecord("acme", "free", None, version=2)


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

    assert asyncio.run(run()) == [CustomerRecord("acme", "pro", ANCHOR, version=1), None]


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
    assert storage.get_customer("acme") == replace(record, version=1)


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
    assert storage.get_customer("acme") == CustomerRecord("acme", "free", version=2)


def test_records_with_the_same_addons_and_overrides_hash_alike():
    one = CustomerRecord("acme", "pro", addons={"a": 1}, overrides={"m": {"limit": 1}})
    two = CustomerRecord("acme", "pro", addons={"a": 1}, overrides={"m": {"limit": 1}})
    assert one == two
    assert hash(one) == hash(two)
    assert one.addons == {"a": 1}
    with pytest.raises(TypeError):
        one.addons["a"] = 2  # type: ignore[index]


def test_a_write_that_expects_another_version_changes_nothing(storage: Storage):
    assert storage.put_customer(CustomerRecord("acme", plan="free"), expected_version=0) == 1
    with pytest.raises(VersionConflict) as raised:
        storage.put_customer(CustomerRecord("acme", plan="pro"), expected_version=0)
    assert (raised.value.expected, raised.value.current) == (0, 1)
    assert storage.put_customer(CustomerRecord("acme", plan="pro"), expected_version=1) == 2
    with pytest.raises(VersionConflict):
        storage.put_customer(CustomerRecord("acme", plan="enterprise"), expected_version=1)
    assert storage.get_customer("acme") == CustomerRecord("acme", "pro", version=2)
    with pytest.raises(VersionConflict):  # no record: only version 0 is expected
        storage.put_customer(CustomerRecord("nobody", plan="pro"), expected_version=3)
    assert storage.get_customer("nobody") is None


def test_the_async_write_checks_the_version_too(storage: Storage):
    async def run() -> int:
        try:
            await storage.aput_customer(CustomerRecord("acme", plan="free"))
            with pytest.raises(VersionConflict):
                await storage.aput_customer(CustomerRecord("acme"), expected_version=7)
            return await storage.aput_customer(CustomerRecord("acme"), expected_version=1)
        finally:
            await storage.aclose()

    assert asyncio.run(run()) == 2


@pytest.mark.parametrize("limit", [1, 3, 100])
def test_a_listing_pages_through_every_record_once(storage: Storage, limit: int):
    ids = ["", "a b", "a@b.co", "}x", "ünï", *(f"c{i:02}" for i in range(25))]
    for i, customer in enumerate(ids):
        storage.put_customer(CustomerRecord(customer, plan="pro" if i % 3 else "free"))
    seen: list[str] = []
    pro: list[str] = []
    cursor = None
    for _ in range(1000):
        page = storage.list_customers(limit=limit, cursor=cursor)
        seen += [r.customer for r in page.records]
        cursor = page.cursor
        if cursor is None:
            break
    cursor = None
    for _ in range(1000):
        page = storage.list_customers(plan="pro", limit=limit, cursor=cursor)
        assert all(r.plan == "pro" for r in page.records)
        pro += [r.customer for r in page.records]
        cursor = page.cursor
        if cursor is None:
            break
    assert sorted(set(seen)) == sorted(ids)  # SCAN may repeat a key; never misses one
    assert sorted(set(pro)) == sorted(c for i, c in enumerate(ids) if i % 3)


def test_a_listing_refuses_a_cursor_it_did_not_make(storage: Storage):
    with pytest.raises(ValueError, match="cursor"):
        storage.list_customers(cursor="not-a-cursor!")


def test_an_empty_store_lists_nothing(storage: Storage):
    page = storage.list_customers(plan="pro")
    assert page.records == ()
    assert page.cursor is None


def test_a_delete_leaves_a_version_that_a_new_record_continues_from(storage: Storage):
    assert storage.put_customer(CustomerRecord("acme", plan="pro")) == 1
    with pytest.raises(VersionConflict):
        storage.delete_customer("acme", expected_version=7)
    assert storage.get_customer("acme") is not None
    assert storage.delete_customer("acme", expected_version=1) == 2
    assert storage.get_customer("acme") is None
    assert storage.delete_customer("acme") == 0
    assert storage.list_customers().records == ()  # a tombstone is not a customer
    with pytest.raises(VersionConflict):  # no record: only version 0 is expected
        storage.put_customer(CustomerRecord("acme", plan="free"), expected_version=2)
    assert storage.put_customer(CustomerRecord("acme", plan="free"), expected_version=0) == 3
    assert storage.get_customer("acme") == CustomerRecord("acme", "free", version=3)


def test_a_listing_refuses_a_cursor_out_of_range(storage: Storage):
    import base64

    for value in (b'["", -1]', b'["", 18446744073709551616]', b"[[[[[[[[", b"[" * 5000):
        with pytest.raises(ValueError, match="cursor"):
            storage.list_customers(cursor=base64.urlsafe_b64encode(value).decode())
