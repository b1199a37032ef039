"""A customer's plan, add-ons, overrides and trial, changed through ``gate.customers``,
decide that customer's very next request on every front end, and the entitlements endpoint
shows them (docs/customers.md)."""

from __future__ import annotations

from plangate import Gate
from tests.fronts.conftest import bearer, config
from tests.support import Clock


def test_an_upgrade_decides_the_next_request(start, storage):
    client = start(config())
    admin = Gate(config(), storage=storage)  # any gate on the same store
    assert client.request("GET", "/v1/reports", bearer(plan="free")).status == 402
    admin.customers.assign("acme", plan="pro")
    assert client.request("GET", "/v1/reports", bearer(plan="free")).status == 200
    admin.customers.assign("acme", plan="free")  # and a downgrade takes it away again
    assert client.request("GET", "/v1/reports", bearer(plan="pro")).status == 402


def test_an_override_and_an_addon_show_in_the_entitlements(start, storage):
    addons = {"reports_pack": {"features": {"reports": True}}}
    client = start(config(addons=addons))
    admin = Gate(config(addons=addons), storage=storage)
    admin.customers.assign(
        "acme", addons={"reports_pack": 1}, overrides={"api_calls": {"limit": 1, "window": "1h"}}
    )
    body = client.request("GET", "/.plangate/entitlements", bearer()).json()
    assert (body["features"]["reports"], body["sources"]["reports"]) == (True, "addon")
    assert body["meters"]["api_calls"]["limits"][0]["limit"] == 1
    assert body["meters"]["api_calls"]["source"] == "override"
    assert client.request("GET", "/v1/reports", bearer()).status == 200
    assert client.request("GET", "/v1/reports", bearer()).status == 429  # the override's 1


def test_a_trial_shows_its_end_in_the_entitlements(start, storage):
    plans = {
        **config()["plans"],
        "pro": {"extends": "free", "trial_days": 7, "features": {"reports": True}},
    }
    client = start(config(plans=plans))
    admin = Gate(config(plans=plans), storage=storage, clock=Clock(1_800_000_000.0))
    shown = admin.customers.assign("acme", plan="pro", trial=True)
    body = client.request("GET", "/.plangate/entitlements", bearer()).json()
    assert (body["plan"], body["trial_ends_at"]) == ("pro", shown["trial_ends_at"])
    assert client.request("GET", "/v1/reports", bearer()).status == 200
