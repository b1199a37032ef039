"""The engine through the sync driver, with an injected clock and a customer record."""

from __future__ import annotations

import math
import re
import time
from datetime import datetime, timezone

import pytest

from plangate import CustomerRecord, Gate, MemoryStorage
from plangate.config import load_config
from plangate.customers import CustomerStore
from plangate.engine import Engine, quota_headers
from plangate.engine._headers import ceil_seconds, policy_header
from plangate.engine._problems import MEMBERS, RETRIED, TITLES
from tests.support import config, token

UTC = timezone.utc


def at(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()


def monthly_config():
    plans = {"free": {"features": {"ai_tokens": {"limit": 100, "period": "month"}}}}
    routes = [{"match": "POST /v1/chat", "meters": {"ai_tokens": 100}}]
    return config(plans=plans, routes=routes)


def test_monthly_quota_resets_on_the_customers_billing_anchor():
    now = [at(2026, 3, 14, 12)]
    store = MemoryStorage()
    anchor = datetime(2025, 1, 15, tzinfo=UTC)
    CustomerStore(store).save(CustomerRecord("acme", billing_anchor=anchor))
    gate = Gate(monthly_config(), storage=store, clock=lambda: now[0])
    tok = token("acme")
    assert gate.check("POST", "/v1/chat", tok).allowed
    refused = gate.check("POST", "/v1/chat", tok)
    assert refused.problem is not None
    assert refused.problem.name == "quota-exceeded"
    assert dict(refused.problem.headers)["retry-after"] == str(int(at(2026, 3, 15) - now[0]))
    now[0] = at(2026, 3, 15, 0, 0, 1)  # the anchor's day: a new period
    assert gate.check("POST", "/v1/chat", tok).allowed


def test_monthly_quota_without_anchor_resets_on_the_first():
    now = [at(2026, 3, 31, 23)]
    gate = Gate(monthly_config(), clock=lambda: now[0])
    tok = token("acme")
    assert gate.check("POST", "/v1/chat", tok).allowed
    assert not gate.check("POST", "/v1/chat", tok).allowed
    now[0] = at(2026, 4, 1)
    assert gate.check("POST", "/v1/chat", tok).allowed


def test_store_plan_wins_over_the_token_claim():
    store = MemoryStorage()
    CustomerStore(store).save(CustomerRecord("acme", plan="pro"))
    gate = Gate(config(), storage=store)
    assert gate.check("GET", "/v1/projects", token("acme", "free")).plan == "pro"
    explained = gate.check("GET", "/v1/projects", token("acme", "free"), consume=False)
    assert "plan pro (from the customer store)" in (explained.reasons or [])


def test_check_without_consume_reserves_nothing():
    gate = Gate(config())
    tok = token("acme", "free")
    for _ in range(10):
        assert gate.check("GET", "/v1/projects", tok, consume=False).allowed
    assert gate.check("GET", "/v1/projects", tok).remaining("api_calls") == 4


def test_check_without_consume_reports_a_used_up_quota():
    gate = Gate(config())
    tok = token("acme", "free")
    for _ in range(5):
        assert gate.check("GET", "/v1/projects", tok).allowed
    decision = gate.check("GET", "/v1/projects", tok, consume=False)
    assert decision.problem is not None
    assert decision.problem.name == "quota-exceeded"
    assert decision.reasons[-1].startswith("deny 429 quota-exceeded")


def test_settle_is_skipped_when_the_actual_cost_equals_the_reservation():
    class Counting(MemoryStorage):
        settles = 0

        def settle(self, op):
            Counting.settles += 1
            return super().settle(op)

    gate = Gate(config(), storage=Counting())
    decision = gate.check("GET", "/v1/projects", token())
    gate.settle(decision, 200)
    assert Counting.settles == 0
    failed = gate.check("GET", "/v1/projects", token())
    gate.settle(failed, 500)
    gate.settle(failed, 500)
    assert Counting.settles == 1


def test_decision_helpers():
    gate = Gate(config())
    decision = gate.check("GET", "/v1/projects", token("acme", "enterprise"))
    assert decision.has("export_reports")
    assert not decision.has("nonexistent")
    assert decision.value("max_projects") == math.inf
    assert decision.value("export_reports") is True
    assert decision.remaining("api_calls") == math.inf
    free = gate.check("GET", "/v1/projects", token("acme", "free"))
    assert free.value("export_reports") is False
    assert free.value("max_projects") == 3


def test_remaining_of_a_meter_the_route_does_not_reserve_is_an_error():
    decision = Gate(config()).check("GET", "/v1/projects", token())
    with pytest.raises(LookupError, match="does not meter ai_tokens"):
        decision.remaining("ai_tokens")


@pytest.mark.parametrize("amount", [-1, 1.5, True, "3"])
def test_record_refuses_what_is_not_a_whole_number(amount):
    decision = Gate(config()).check("POST", "/v1/chat", token())
    with pytest.raises(ValueError, match="whole number"):
        decision.record("ai_tokens", amount)


def test_record_refuses_a_meter_the_route_does_not_meter():
    decision = Gate(config()).check("GET", "/v1/projects", token())
    with pytest.raises(ValueError, match="does not meter ai_tokens"):
        decision.record("ai_tokens", 1)


def test_quota_headers_syntax_and_the_policy_closest_to_exhaustion():
    policy = '"api_calls-1d";q=10000;w=86400, "api_calls-1s";q=10;w=1'
    states = [("api_calls-1d", 10000, 9941, 3600.0), ("api_calls-1s", 10, 10, 0.5)]
    assert quota_headers(policy, states, legacy=False) == [
        ("ratelimit-policy", policy),
        ("ratelimit", '"api_calls-1d";r=9941;t=3600'),
    ]


def test_record_refuses_amounts_past_what_a_counter_can_hold():
    decision = Gate(config()).check("POST", "/v1/chat", token())
    with pytest.raises(ValueError, match="from 0 to 10\\^15"):
        decision.record("ai_tokens", 10**19)


def test_a_refusal_names_a_violated_policy_and_retry_after_is_not_earlier_than_its_t():
    # A request of 5 refused by the minute's limit (3 left of 8) while the hour's (5 left of
    # 20, a smaller share) could take it: RateLimit names the minute, not the hour.
    plans = {
        "free": {
            "features": {"api_calls": [{"limit": 8, "window": "1m"}, {"limit": 20, "window": "1h"}]}
        }
    }
    routes = [
        {"match": "GET /small", "meters": {"api_calls": 1}},
        {"match": "GET /big", "meters": {"api_calls": 5}},
    ]
    now = [time.time()]
    gate = Gate(config(plans=plans, routes=routes), clock=lambda: now[0])
    for advance, count in [(0, 8), (70, 2), (70, 5)]:  # minute: 5 used; hour: 15 used
        now[0] += advance
        assert all(gate.check("GET", "/small", token()).problem is None for _ in range(count))
    refused = gate.check("GET", "/big", token())
    problem = refused.problem
    assert problem is not None
    assert problem.members["violated-policies"] == ["api_calls-1m"]
    headers = dict(problem.headers)
    match = re.fullmatch(r'"api_calls-1m";r=3;t=(\d+)', headers["ratelimit"])
    assert match is not None
    assert int(headers["retry-after"]) >= int(match[1])
    assert int(headers["retry-after"]) <= 63


def test_a_refusal_by_two_policies_names_the_one_whose_capacity_returns_last():
    states = [("calls-1m", 10, 0, 30.0), ("calls-1d", 1000, 0, 5000.0), ("calls-1s", 1, 1, 0.2)]
    headers = quota_headers("p", states, legacy=False, violated=["calls-1m", "calls-1d"])
    assert headers[1] == ("ratelimit", '"calls-1d";r=0;t=5000')


def test_quota_header_numbers_stay_within_structured_fields_integers():
    big = 10**20
    policy = policy_header([("calls-forever", big, big)])
    assert policy == '"calls-forever";q=999999999999999;w=999999999999999'
    headers = dict(quota_headers(policy, [("calls-forever", big, big, 1e30)], legacy=True))
    assert headers["ratelimit"] == '"calls-forever";r=999999999999999;t=999999999999999'
    assert headers["x-ratelimit-limit"] == "999999999999999"
    assert ceil_seconds(math.inf) == ceil_seconds(1e300) == 999_999_999_999_999
    assert ceil_seconds(0.0) == 1


def test_every_problem_lists_its_members():
    # the gateway's /render renders a problem only with the members listed for it
    assert MEMBERS.keys() == TITLES.keys()
    assert RETRIED.issubset(TITLES)


def test_the_route_cache_stays_bounded_whatever_paths_clients_invent():
    from plangate.engine._engine import _ROUTE_CACHE_SIZE

    engine = Engine(load_config(config()), new_id=lambda: "id")
    for i in range(_ROUTE_CACHE_SIZE + 50):
        assert engine.route("GET", f"/v1/projects/{i}").rule is not None
    engine.route("GET", "/v1/" + "x" * 1000)  # a long path is matched, never kept
    assert len(engine._routes) <= _ROUTE_CACHE_SIZE
    assert ("GET", "/v1/" + "x" * 1000) not in engine._routes
