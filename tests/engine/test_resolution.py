"""How a customer's entitlements resolve: override > add-ons (each times its quantity) >
plan > default_plan, and trials that end without a write."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from plangate import CustomerRecord, Gate, MemoryStorage
from plangate.customers import CustomerStore
from tests.support import config, token

UTC = timezone.utc
NOW = datetime(2026, 3, 14, 12, tzinfo=UTC)

ADDONS = {
    "extra_calls": {"features": {"api_calls": {"add": 100}}},
    "reports": {"features": {"export_reports": True}},
}


def gate_for(record: CustomerRecord, now: datetime = NOW, **changes: Any) -> Gate:
    store = MemoryStorage()
    CustomerStore(store).save(record)
    return Gate(config(addons=ADDONS, **changes), storage=store, clock=now.timestamp)


def entitlements(gate: Gate, plan: str | None = None) -> dict[str, Any]:
    answer = gate.entitlements(token("acme", plan))
    assert isinstance(answer, dict), answer
    return answer


def api_calls_limit(gate: Gate) -> int:
    [limit] = entitlements(gate)["meters"]["api_calls"]["limits"]
    return int(limit["limit"])


# add-ons -------------------------------------------------------------------------------


@pytest.mark.parametrize(("quantity", "limit"), [(0, 5), (1, 105), (5, 505)])
def test_an_addon_raises_a_limit_by_its_quantity(quantity: int, limit: int):
    gate = gate_for(CustomerRecord("acme", plan="free", addons={"extra_calls": quantity}))
    assert api_calls_limit(gate) == limit
    decision = gate.check("GET", "/v1/projects", token("acme"))
    assert decision.remaining("api_calls") == limit - 1


def test_a_raised_limit_is_enforced():
    gate = gate_for(CustomerRecord("acme", plan="free", addons={"extra_calls": 1}))
    tok = token("acme")
    assert all(gate.check("GET", "/v1/projects", tok).allowed for _ in range(105))
    refused = gate.check("GET", "/v1/projects", tok)
    assert refused.problem is not None
    assert refused.problem.name == "quota-exceeded"


def test_an_addon_says_it_raised_the_limit():
    gate = gate_for(CustomerRecord("acme", plan="free", addons={"extra_calls": 1}))
    meter = entitlements(gate)["meters"]["api_calls"]
    assert meter["source"] == "addon"
    assert meter["limits"][0]["source"] == "addon"
    assert entitlements(gate)["meters"]["ai_tokens"]["limits"][0]["source"] == "plan"


def test_an_addon_of_true_enables_a_feature():
    gate = gate_for(CustomerRecord("acme", plan="free", addons={"reports": 1}))
    answer = entitlements(gate)
    assert answer["features"]["export_reports"] is True
    assert answer["sources"]["export_reports"] == "addon"
    decision = gate.check("POST", "/v1/reports/7/export", token("acme"))
    assert decision.allowed
    assert decision.has("export_reports")
    assert decision.value("export_reports") is True


def test_an_addon_of_quantity_zero_is_no_addon():
    gate = gate_for(CustomerRecord("acme", plan="free", addons={"reports": 0}))
    assert entitlements(gate)["features"]["export_reports"] is False
    assert not gate.check("POST", "/v1/reports/7/export", token("acme")).allowed


def test_an_addon_does_not_raise_an_unlimited_meter():
    gate = gate_for(CustomerRecord("acme", plan="enterprise", addons={"extra_calls": 3}))
    [limit] = entitlements(gate)["meters"]["api_calls"]["limits"]
    assert limit["limit"] == "unlimited"


# overrides -----------------------------------------------------------------------------


def test_an_override_switches_a_boolean_on():
    gate = gate_for(CustomerRecord("acme", plan="free", overrides={"export_reports": True}))
    assert gate.check("POST", "/v1/reports/7/export", token("acme")).allowed
    assert entitlements(gate)["sources"]["export_reports"] == "override"


def test_an_override_switches_a_boolean_off():
    gate = gate_for(CustomerRecord("acme", plan="pro", overrides={"export_reports": False}))
    decision = gate.check("POST", "/v1/reports/7/export", token("acme"))
    assert decision.problem is not None
    assert decision.problem.name == "feature-not-in-plan"
    assert decision.value("export_reports") is False
    answer = entitlements(gate)
    assert answer["features"]["export_reports"] is False
    assert answer["sources"]["export_reports"] == "override"


def test_an_override_sets_a_config_value():
    gate = gate_for(CustomerRecord("acme", plan="pro", overrides={"max_projects": 7}))
    assert gate.check("GET", "/v1/projects", token("acme")).value("max_projects") == 7
    answer = entitlements(gate)
    assert answer["features"]["max_projects"] == 7
    assert answer["sources"]["max_projects"] == "override"


def test_an_override_of_unlimited_config():
    gate = gate_for(CustomerRecord("acme", plan="free", overrides={"max_projects": "unlimited"}))
    assert gate.check("GET", "/v1/projects", token("acme")).value("max_projects") == math.inf
    assert entitlements(gate)["features"]["max_projects"] == "unlimited"


def test_an_override_replaces_a_metered_limit():
    override = {"api_calls": {"limit": 2, "window": "1m"}}
    gate = gate_for(CustomerRecord("acme", plan="pro", overrides=override))
    tok = token("acme")
    assert gate.check("GET", "/v1/projects", tok).allowed
    assert gate.check("GET", "/v1/projects", tok).allowed
    assert not gate.check("GET", "/v1/projects", tok).allowed
    [limit] = entitlements(gate)["meters"]["api_calls"]["limits"]
    assert (limit["limit"], limit["source"]) == (2, "override")


def test_an_override_wins_over_an_addon():
    record = CustomerRecord(
        "acme",
        plan="free",
        addons={"extra_calls": 5},
        overrides={"api_calls": {"limit": 9, "window": "1m"}},
    )
    assert api_calls_limit(gate_for(record)) == 9


def test_an_override_of_the_wrong_kind_is_ignored():
    gate = gate_for(CustomerRecord("acme", plan="pro", overrides={"export_reports": 3}))
    assert gate.check("POST", "/v1/reports/7/export", token("acme")).allowed


def test_a_customer_without_addons_or_overrides_keeps_the_configs_plan():
    gate = gate_for(CustomerRecord("acme", plan="pro"))
    decision = gate.check("GET", "/v1/projects", token("acme"))
    assert decision.plan_entitlements is gate.engine.catalog.plans["pro"]


def test_resolved_plans_are_built_once_per_record_shape():
    gate = gate_for(CustomerRecord("acme", plan="free", addons={"extra_calls": 1}))
    first = gate.check("GET", "/v1/projects", token("acme")).plan_entitlements
    second = gate.check("GET", "/v1/projects", token("acme")).plan_entitlements
    assert first is second


# where the plan comes from ----------------------------------------------------------------


def test_the_token_claim_is_ignored_when_the_store_has_a_plan():
    gate = gate_for(CustomerRecord("acme", plan="free"))
    assert gate.check("GET", "/v1/projects", token("acme", "enterprise")).plan == "free"
    assert entitlements(gate, "enterprise")["plan"] == "free"


def test_default_plan_values_say_so():
    gate = Gate(config(addons=ADDONS), clock=NOW.timestamp)
    answer = entitlements(gate)
    assert answer["plan"] == "free"
    assert answer["sources"]["max_projects"] == "default"
    assert answer["meters"]["api_calls"]["limits"][0]["source"] == "default"
    assert answer["trial_ends_at"] is None


def test_a_plan_from_the_token_says_plan():
    gate = Gate(config(addons=ADDONS), clock=NOW.timestamp)
    answer = entitlements(gate, "pro")
    assert answer["sources"]["max_projects"] == "plan"
    assert answer["sources"]["export_reports"] == "plan"


# trials --------------------------------------------------------------------------------


def trial(ends: datetime, previous: str | None = "free") -> CustomerRecord:
    return CustomerRecord("acme", plan="pro", trial_ends_at=ends, previous_plan=previous)


def test_an_active_trial_is_on_the_trial_plan():
    ends = NOW + timedelta(days=3)
    gate = gate_for(trial(ends))
    assert gate.check("POST", "/v1/reports/7/export", token("acme")).plan == "pro"
    answer = entitlements(gate)
    assert answer["plan"] == "pro"
    assert answer["trial_ends_at"] == ends.isoformat()


def test_a_passed_trial_falls_back_to_the_previous_plan():
    ends = NOW - timedelta(seconds=1)
    gate = gate_for(trial(ends, "free"))
    decision = gate.check("POST", "/v1/reports/7/export", token("acme"))
    assert decision.plan == "free"
    assert decision.problem is not None
    assert decision.problem.name == "feature-not-in-plan"
    assert entitlements(gate)["trial_ends_at"] == ends.isoformat()


def test_a_trial_ends_at_its_moment_with_no_write():
    ends = NOW + timedelta(minutes=1)
    now = [NOW.timestamp()]
    store = MemoryStorage()
    CustomerStore(store).save(trial(ends, "free"))
    gate = Gate(config(), storage=store, clock=lambda: now[0])
    assert gate.check("GET", "/v1/projects", token("acme")).plan == "pro"
    now[0] = ends.timestamp()
    assert gate.check("GET", "/v1/projects", token("acme")).plan == "free"


def test_a_passed_trial_without_a_previous_plan_falls_back_to_default_plan():
    gate = gate_for(trial(NOW - timedelta(days=1), previous=None))
    assert gate.check("GET", "/v1/projects", token("acme", "enterprise")).plan == "free"
    assert entitlements(gate)["sources"]["max_projects"] == "default"


def test_a_passed_trial_with_no_plan_to_fall_back_to_is_402():
    gate = gate_for(trial(NOW - timedelta(days=1), previous=None), default_plan=None)
    decision = gate.check("GET", "/v1/projects", token("acme"))
    assert decision.problem is not None
    assert (decision.problem.status, decision.problem.name) == (402, "no-active-plan")


def test_a_trial_end_without_a_zone_is_utc():
    gate = gate_for(trial(datetime(2026, 3, 14, 11, 59)))
    assert gate.check("GET", "/v1/projects", token("acme")).plan == "free"


def test_addons_still_apply_after_a_trial():
    record = CustomerRecord(
        "acme",
        plan="pro",
        trial_ends_at=NOW - timedelta(days=1),
        previous_plan="free",
        addons={"extra_calls": 1},
    )
    assert api_calls_limit(gate_for(record)) == 105


def test_the_explanation_names_the_layers():
    ends = NOW - timedelta(days=1)
    record = CustomerRecord(
        "acme",
        plan="pro",
        trial_ends_at=ends,
        previous_plan="free",
        overrides={"max_projects": 9},
    )
    reasons = gate_for(record).check("GET", "/v1/projects", token("acme"), consume=False).reasons
    assert reasons is not None
    assert any("the trial of pro ended" in r for r in reasons)
    assert "with overrides {'max_projects': 9}" in reasons
