"""Provisioning through the gate's customer store: what is assigned is checked against the
config, resolves as the engine resolves it, and decides the very next request."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from plangate import AsyncGate, Gate, MemoryStorage
from plangate.customers import (
    CustomerNotFound,
    InvalidRecord,
    LegacyPlanRefused,
    VersionConflict,
    merge_patch,
)
from plangate.storage import open_storage
from tests.support import BASE_CONFIG, Clock, config, token

START = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc).timestamp()


def catalog(**changes: Any) -> dict[str, Any]:
    """The test config with a trial on pro, a legacy plan and two add-ons."""
    plans = {
        **BASE_CONFIG["plans"],
        "pro": {**BASE_CONFIG["plans"]["pro"], "trial_days": 14},
        "pro-2023": {
            "extends": "pro",
            "legacy": True,
            "features": {"api_calls": {"limit": 500, "window": "1m"}},
        },
    }
    addons = {
        "token_pack": {"features": {"ai_tokens": {"add": 1000}}},
        "reports": {"features": {"export_reports": True}},
    }
    return config(plans=plans, addons=addons, **changes)


@pytest.fixture
def clock() -> Clock:
    return Clock(START)


@pytest.fixture
def gate(clock: Clock) -> Iterator[Gate]:
    gate = Gate(catalog(), storage=MemoryStorage(), clock=clock)
    yield gate
    gate.storage.close()


def plan_of(gate: Gate, customer: str = "acme", claim: str | None = "free") -> str | None:
    return gate.check("GET", "/v1/projects", token(customer, claim), consume=False).plan


def test_an_assigned_plan_wins_over_the_tokens_claim(gate: Gate):
    assert plan_of(gate) == "free"
    shown = gate.customers.assign("acme", plan="enterprise")
    assert (shown["customer"], shown["plan"], shown["version"]) == ("acme", "enterprise", 1)
    assert shown["entitlements"]["plan"] == "enterprise"
    assert plan_of(gate) == "enterprise"
    assert gate.customers.show("acme") == shown


def test_an_unknown_customer_is_not_found(gate: Gate):
    with pytest.raises(CustomerNotFound):
        gate.customers.show("nobody")
    with pytest.raises(CustomerNotFound):
        gate.customers.remove("nobody")


def test_a_removed_customer_goes_back_to_its_token(gate: Gate):
    gate.customers.assign("acme", plan="enterprise")
    gate.customers.remove("acme")
    assert plan_of(gate, claim="pro") == "pro"


@pytest.mark.parametrize(("quantity", "limit"), [(0, 10000), (1, 11000), (5, 15000)])
def test_addon_quantities_raise_the_limit_times_the_quantity(gate: Gate, quantity, limit):
    shown = gate.customers.assign("acme", plan="free", addons={"token_pack": quantity})
    assert shown["addons"] == ({"token_pack": quantity} if quantity else {})
    meter = shown["entitlements"]["meters"]["ai_tokens"]
    assert meter["limits"][0]["limit"] == limit
    assert meter["source"] == ("addon" if quantity else "plan")


def test_an_addon_that_enables_a_feature(gate: Gate):
    decide = lambda: gate.check("POST", "/v1/reports/1/export", token("acme", "free")).problem  # noqa: E731
    assert decide() is not None  # free has no export
    gate.customers.assign("acme", addons={"reports": 1})
    assert decide() is None
    gate.customers.assign("acme", addons={"reports": 0})  # removed again
    assert decide() is not None


@pytest.mark.parametrize(
    ("feature", "value", "shown"),
    [
        ("export_reports", True, True),
        ("export_reports", False, False),
        ("max_projects", 99, 99),
        ("max_projects", "unlimited", "unlimited"),
    ],
)
def test_an_override_of_a_boolean_or_config_feature(gate: Gate, feature, value, shown):
    entitlements = gate.customers.assign("acme", plan="pro", overrides={feature: value})
    assert entitlements["overrides"] == {feature: value}
    assert entitlements["entitlements"]["features"][feature] == shown
    assert entitlements["entitlements"]["sources"][feature] == "override"


def test_an_override_of_a_metered_feature_replaces_its_limits(gate: Gate):
    shown = gate.customers.assign(
        "acme", plan="free", overrides={"api_calls": {"limit": 2, "window": "1m"}}
    )
    meter = shown["entitlements"]["meters"]["api_calls"]
    assert [(x["limit"], x["source"]) for x in meter["limits"]] == [(2, "override")]
    statuses = [gate.check("GET", "/v1/projects", token("acme")).problem for _ in range(3)]
    assert [p is None for p in statuses] == [True, True, False]
    shown = gate.customers.assign("acme", overrides={"api_calls": "unlimited"})
    assert shown["entitlements"]["meters"]["api_calls"]["limits"][0]["limit"] == "unlimited"


def test_a_trial_starts_ends_and_falls_back_with_nothing_written(gate: Gate, clock: Clock):
    gate.customers.assign("acme", plan="free")
    shown = gate.customers.assign("acme", plan="pro", trial=True)
    ends = datetime.fromtimestamp(START, timezone.utc) + timedelta(days=14)
    assert shown["trial_ends_at"] == ends.isoformat()
    assert shown["previous_plan"] == "free"
    assert shown["entitlements"]["trial_ends_at"] == ends.isoformat()
    assert plan_of(gate, claim="enterprise") == "pro"
    clock.now = ends.timestamp() - 1
    assert plan_of(gate) == "pro"
    clock.now = ends.timestamp()
    assert plan_of(gate, claim="enterprise") == "free"  # the plan before, not the token's
    assert gate.customers.show("acme")["version"] == 2  # nothing was written at the end


def test_a_trial_of_a_new_customer_falls_back_to_the_default_plan(gate: Gate, clock: Clock):
    shown = gate.customers.assign("acme", plan="pro", trial=True)
    assert shown["previous_plan"] is None
    clock.now += 15 * 86400
    assert plan_of(gate, claim=None) == "free"  # default_plan


def test_assigning_a_plan_for_good_ends_the_trial(gate: Gate, clock: Clock):
    gate.customers.assign("acme", plan="pro", trial=True)
    shown = gate.customers.assign("acme", plan="pro")
    assert (shown["trial_ends_at"], shown["previous_plan"]) == (None, None)
    clock.now += 30 * 86400
    assert plan_of(gate) == "pro"


def test_a_plan_without_trial_days_has_no_trial(gate: Gate):
    with pytest.raises(InvalidRecord) as raised:
        gate.customers.assign("acme", plan="enterprise", trial=True)
    assert raised.value.field == "trial"


def test_a_legacy_plan_is_refused_unless_asked_for_and_kept_by_who_has_it(gate: Gate):
    with pytest.raises(LegacyPlanRefused):
        gate.customers.assign("acme", plan="pro-2023")
    with pytest.raises(LegacyPlanRefused):
        gate.customers.put("acme", {"plan": "pro-2023"})
    shown = gate.customers.assign("acme", plan="pro-2023", allow_legacy=True)
    assert shown["plan"] == "pro-2023"
    assert plan_of(gate) == "pro-2023"  # honoured
    shown = gate.customers.assign("acme", addons={"token_pack": 2})  # kept: no flag needed
    assert (shown["plan"], shown["addons"]) == ("pro-2023", {"token_pack": 2})
    assert gate.customers.patch("acme", {"overrides": {"max_projects": 7}})["plan"] == "pro-2023"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"plan": "platinum"}, "plan"),
        ({"plan": 7}, "plan"),
        ({"addons": {"token_pack": -1}}, "addons.token_pack"),
        ({"addons": {"token_pack": "5"}}, "addons.token_pack"),
        ({"addons": {"token_pack": True}}, "addons.token_pack"),
        ({"addons": {"token_pack": 1.5}}, "addons.token_pack"),
        ({"addons": {"gold_pack": 1}}, "addons.gold_pack"),
        ({"addons": [1]}, "addons"),
        ({"overrides": {"api_calls": "lots"}}, "overrides.api_calls"),
        ({"overrides": {"export_reports": 3}}, "overrides.export_reports"),
        ({"overrides": {"teleport": True}}, "overrides.teleport"),
        ({"trial_ends_at": "tomorrow"}, "trial_ends_at"),
        ({"billing_anchor": 5}, "billing_anchor"),
        ({"previous_plan": "gold"}, "previous_plan"),
        ({"colour": "blue"}, "colour"),
        ({"customer": "globex"}, "customer"),
        ({"trial": "yes"}, "trial"),
    ],
)
def test_an_invalid_record_names_the_field_and_stores_nothing(gate: Gate, body, field):
    with pytest.raises(InvalidRecord) as raised:
        gate.customers.put("acme", {"plan": "pro", **body})
    assert raised.value.field == field
    assert field in str(raised.value)
    with pytest.raises(CustomerNotFound):
        gate.customers.show("acme")


def test_a_body_read_back_from_show_can_be_put_again(gate: Gate):
    shown = gate.customers.assign("acme", plan="pro", addons={"token_pack": 2})
    again = gate.customers.put("acme", shown)  # customer, version, entitlements: ignored
    assert again["version"] == 2
    assert {k: v for k, v in again.items() if k != "version"} == {
        k: v for k, v in shown.items() if k != "version"
    }


def test_a_put_replaces_the_whole_record(gate: Gate):
    gate.customers.assign("acme", plan="pro", addons={"token_pack": 2})
    shown = gate.customers.put("acme", {"plan": "free"})
    assert (shown["plan"], shown["addons"]) == ("free", {})


def test_a_merge_patch_changes_only_what_it_names(gate: Gate):
    gate.customers.assign(
        "acme", plan="pro", addons={"token_pack": 2, "reports": 1}, overrides={"max_projects": 9}
    )
    shown = gate.customers.patch("acme", {"addons": {"reports": None}, "overrides": None})
    assert (shown["plan"], shown["addons"], shown["overrides"]) == ("pro", {"token_pack": 2}, {})
    created = gate.customers.patch("globex", {"plan": "enterprise"})
    assert (created["plan"], created["version"]) == ("enterprise", 1)


def test_merge_patch_follows_rfc_7396():
    # RFC 7396 appendix A, a selection
    assert merge_patch({"a": "b"}, {"a": "c"}) == {"a": "c"}
    assert merge_patch({"a": "b"}, {"b": "c"}) == {"a": "b", "b": "c"}
    assert merge_patch({"a": "b"}, {"a": None}) == {}
    assert merge_patch({"a": [{"b": "c"}]}, {"a": [1]}) == {"a": [1]}
    assert merge_patch({"e": None}, {"a": 1}) == {"e": None, "a": 1}
    assert merge_patch([1, 2], {"a": "b", "c": None}) == {"a": "b"}
    assert merge_patch({}, {"a": {"bb": {"ccc": None}}}) == {"a": {"bb": {}}}


def test_a_write_that_names_an_old_version_is_refused(gate: Gate):
    gate.customers.assign("acme", plan="pro")
    with pytest.raises(VersionConflict):
        gate.customers.patch("acme", {"plan": "free"}, if_version=5)
    with pytest.raises(VersionConflict):
        gate.customers.put("acme", {"plan": "free"}, if_version=0)
    with pytest.raises(VersionConflict):
        gate.customers.remove("acme", if_version=3)
    assert gate.customers.patch("acme", {"plan": "free"}, if_version=1)["version"] == 2


def test_a_listing_filters_by_plan_and_pages(gate: Gate):
    for i in range(7):
        gate.customers.assign(f"c{i}", plan="pro" if i % 2 else "free")
    first = gate.customers.list(plan="pro", limit=2)
    assert [c["customer"] for c in first["customers"]] == ["c1", "c3"]
    rest = gate.customers.list(plan="pro", limit=2, cursor=first["next_cursor"])
    assert [c["customer"] for c in rest["customers"]] == ["c5"]
    assert rest["next_cursor"] is None


def test_a_migration_moves_everyone_off_a_plan_once(gate: Gate):
    for i in range(12):
        gate.customers.assign(f"c{i:02}", plan="pro-2023", allow_legacy=True)
    gate.customers.assign("c00", plan="enterprise", trial=False)
    gate.customers.patch("c01", {"plan": "pro", "trial": True})  # falls back to pro-2023
    gate.customers.assign("other", plan="free")
    with pytest.raises(LegacyPlanRefused):
        gate.customers.migrate("pro", "pro-2023")
    with pytest.raises(InvalidRecord) as raised:
        gate.customers.migrate("pro-2023", "gold")
    assert raised.value.field == "to"
    assert gate.customers.migrate("pro-2023", "pro", dry_run=True) == {
        "from": "pro-2023",
        "to": "pro",
        "matched": 11,
        "migrated": 0,
    }
    assert gate.customers.migrate("pro-2023", "pro")["migrated"] == 11
    assert gate.customers.migrate("pro-2023", "pro")["matched"] == 0  # idempotent
    records = gate.customers.list(limit=100)["customers"]
    assert not [r for r in records if "pro-2023" in (r["plan"], r["previous_plan"])]
    assert gate.customers.show("c01")["previous_plan"] == "pro"
    assert gate.customers.show("other")["plan"] == "free"


def test_the_async_store_provisions_the_same(clock: Clock):
    gate = AsyncGate(catalog(), storage=MemoryStorage(), clock=clock)

    async def run() -> list[Any]:
        c = gate.customers
        shown = await c.assign("acme", plan="pro", trial=True, addons={"token_pack": 1})
        patched = await c.patch("acme", {"overrides": {"max_projects": 4}})
        put = await c.put("globex", {"plan": "free"})
        listed = await c.list(plan="free")
        migrated = await c.migrate("free", "enterprise")
        await c.remove("globex")
        with pytest.raises(CustomerNotFound):
            await c.show("globex")
        decided = await gate.check("GET", "/v1/projects", token("acme", "free"))
        return [
            shown["plan"],
            patched["overrides"],
            put["version"],
            [r["customer"] for r in listed["customers"]],
            migrated["migrated"],
            decided.plan,
        ]

    assert asyncio.run(run()) == ["pro", {"max_projects": 4}, 1, ["globex"], 1, "pro"]


# On Redis, Cluster and Sentinel alike ------------------------------------------------------


@pytest.fixture(params=["redis_server", "redis_cluster", "redis_sentinel"])
def redis_uri(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(request.param).url)


def test_provisioning_on_every_redis_topology(redis_uri: str, clock: Clock):
    gate = Gate(catalog(), storage=open_storage(redis_uri), clock=clock)
    gate.storage.inner.client.flushall()
    try:
        gate.customers.assign("acme", plan="pro", trial=True, addons={"token_pack": 5})
        gate.customers.patch("acme", {"overrides": {"max_projects": 77}})
        shown = gate.customers.show("acme")
        assert (shown["plan"], shown["previous_plan"], shown["version"]) == ("pro", None, 2)
        assert shown["entitlements"]["features"]["max_projects"] == 77
        assert shown["entitlements"]["meters"]["ai_tokens"]["limits"][0]["limit"] == 15000
        assert plan_of(gate) == "pro"
        assert [c["customer"] for c in gate.customers.list(plan="pro")["customers"]] == ["acme"]
        assert gate.customers.migrate("pro", "enterprise")["migrated"] == 1
        assert plan_of(gate) == "enterprise"
    finally:
        gate.storage.close()


def test_concurrent_patches_of_different_fields_all_survive(redis_server):
    with redis_server.client() as client:
        client.flushall()
    gates = [Gate(catalog(), storage=open_storage(redis_server.url)) for _ in range(4)]
    features = ["export_reports", "max_projects", "api_calls", "ai_tokens"]
    values = [True, 12, {"limit": 3, "window": "1m"}, "unlimited"]
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def patch(i: int) -> None:
        try:
            barrier.wait()
            if i < 4:
                gates[i].customers.patch("acme", {"overrides": {features[i]: values[i]}})
            else:
                addon = "token_pack" if i % 2 else "reports"
                gates[i % 4].customers.patch("acme", {"addons": {addon: i}})
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=patch, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert errors == []
        shown = gates[0].customers.show("acme")
        assert shown["overrides"] == dict(zip(features, values, strict=True))
        assert set(shown["addons"]) == {"token_pack", "reports"}
        assert shown["version"] == 8  # every write counted, none lost
    finally:
        for gate in gates:
            gate.storage.close()


def test_the_handler_sees_the_trial_end_and_each_features_source(gate: Gate, clock: Clock):
    gate.customers.assign("acme", plan="free", addons={"token_pack": 1, "reports": 1})
    gate.customers.assign("acme", plan="pro", trial=True, overrides={"max_projects": 8})
    decision = gate.check("GET", "/v1/projects", token("acme", "enterprise"))
    ends = datetime.fromtimestamp(START, timezone.utc) + timedelta(days=14)
    assert decision.trial_ends_at == ends
    sources = {f: decision.source(f) for f in ("max_projects", "ai_tokens", "api_calls")}
    assert sources == {"max_projects": "override", "ai_tokens": "addon", "api_calls": "plan"}
    clock.now = ends.timestamp()  # the trial is over: free, and no trial any more
    decision = gate.check("GET", "/v1/projects", token("acme", "enterprise"))
    assert (decision.plan, decision.trial_ends_at) == ("free", None)
    assert decision.source("export_reports") == "addon"
    other = gate.check("GET", "/v1/projects", token("globex", None))
    assert (other.source("max_projects"), other.source("export_reports")) == ("default", "default")


def test_a_migration_page_is_written_together_on_every_redis_topology(redis_uri: str):
    gate = Gate(catalog(), storage=open_storage(redis_uri))
    gate.storage.inner.client.flushall()
    try:
        for i in range(30):
            gate.customers.assign(f"c{i:02}", plan="pro-2023", allow_legacy=True)
        assert gate.customers.migrate("pro-2023", "pro")["migrated"] == 30
        plans = {c["plan"] for c in gate.customers.list(limit=1000)["customers"]}
        assert plans == {"pro"}
    finally:
        gate.storage.close()


def test_a_put_without_a_version_wins_over_a_write_that_came_between(gate: Gate):
    gate.customers.assign("acme", plan="free")
    storage = gate.storage
    real = storage.put_customer
    raced = []

    def racing(record, *, expected_version=None):
        if not raced:  # another writer gets in between the read and the write, once
            raced.append(real(record.__class__("acme", plan="enterprise")))
        return real(record, expected_version=expected_version)

    storage.put_customer = racing  # type: ignore[method-assign]
    shown = gate.customers.put("acme", {"plan": "pro"})
    assert (shown["plan"], shown["version"]) == ("pro", 3)


def test_a_legacy_plan_cannot_be_slipped_in_as_a_trials_fallback(gate: Gate):
    body = {"plan": "pro", "trial_ends_at": "2020-01-01T00:00:00Z", "previous_plan": "pro-2023"}
    with pytest.raises(LegacyPlanRefused):
        gate.customers.patch("acme", body)
    gate.customers.assign("globex", plan="pro-2023", allow_legacy=True)
    shown = gate.customers.assign("globex", plan="pro", trial=True)  # its own plan: kept
    assert shown["previous_plan"] == "pro-2023"


def test_a_migration_onto_the_same_plan_is_refused(gate: Gate):
    with pytest.raises(InvalidRecord) as raised:
        gate.customers.migrate("pro", "pro")
    assert raised.value.field == "to"


def test_a_cursor_nested_deep_is_refused_as_a_cursor(gate: Gate):
    import base64

    deep = base64.urlsafe_b64encode(b"[" * 5000).decode()
    with pytest.raises(ValueError, match="cursor"):
        gate.customers.list(cursor=deep)
