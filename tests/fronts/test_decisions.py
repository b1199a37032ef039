"""SPEC §3-§4 on every front end: denials, quota headers, public and unmatched routes, shadow
mode, and the client's own X-Plangate-* headers."""

from __future__ import annotations

import logging
import re

from plangate.engine import PROBLEM_BASE
from tests.fronts.conftest import PROBLEM, bearer, config


def test_no_token_is_a_401_problem(start):
    response = start(config()).request("GET", "/v1/ok")
    assert response.status == 401
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["type"] == PROBLEM_BASE + "unauthenticated"


def test_a_feature_outside_the_plan_is_a_402_problem(start):
    client = start(config())
    denied = client.request("GET", "/v1/reports", bearer("acme", "free"))
    assert denied.status == 402
    assert denied.headers["content-type"] == PROBLEM
    body = denied.json()
    assert body["type"] == PROBLEM_BASE + "feature-not-in-plan"
    assert body["feature"] == "reports"
    assert body["plan"] == "free"
    assert client.request("GET", "/v1/reports", bearer("acme", "pro")).status == 200


def test_an_allowed_metered_request_carries_the_quota_headers(start):
    response = start(config()).request("GET", "/v1/ok", bearer())
    assert response.status == 200
    assert response.json()["customer"] == "acme"
    assert response.headers["ratelimit-policy"] == '"api_calls-1h";q=3;w=3600'
    assert re.fullmatch(r'"api_calls-1h";r=2;t=\d+', response.headers["ratelimit"])


def test_a_used_up_quota_is_a_429_with_retry_after_and_the_quota_headers(start):
    client = start(config())
    assert [client.request("GET", "/v1/ok", bearer()).status for _ in range(3)] == [200] * 3
    refused = client.request("GET", "/v1/ok", bearer())
    assert refused.status == 429
    assert refused.headers["content-type"] == PROBLEM
    body = refused.json()
    assert body["type"] == PROBLEM_BASE + "quota-exceeded"
    assert body["violated-policies"] == ["api_calls-1h"]
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["ratelimit-policy"] == '"api_calls-1h";q=3;w=3600'
    assert re.fullmatch(r'"api_calls-1h";r=0;t=\d+', refused.headers["ratelimit"])


def test_a_public_route_needs_no_token_and_has_no_quota_headers(start):
    response = start(config()).request("GET", "/public")
    assert response.status == 200
    assert response.json()["customer"] is None
    assert "ratelimit" not in response.headers
    assert "ratelimit-policy" not in response.headers


def test_unmatched_deny_is_a_403_route_not_allowed_problem(start):
    response = start(config(unmatched="deny")).request("GET", "/elsewhere", bearer())
    assert response.status == 403
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["type"] == PROBLEM_BASE + "route-not-allowed"


def test_unmatched_allow_reaches_the_view_without_a_token(start):
    response = start(config()).request("GET", "/elsewhere")
    assert response.status == 200
    assert response.json()["customer"] is None


SPOOFED = {"X-Plangate-Customer": "mallory", "X-Plangate-Plan": "enterprise"}


def test_the_clients_plangate_headers_never_reach_the_view(front, start):
    response = start(config()).request("GET", "/v1/ok", {**bearer("acme"), **SPOOFED})
    assert response.status == 200
    seen = response.json()
    assert seen["customer"] == "acme"
    if front.tells_the_views:
        # The gateway's check answers with the verified customer; the upstream gets that.
        assert seen["plangate_headers"]["x-plangate-customer"] == "acme"
        assert seen["plangate_headers"]["x-plangate-plan"] == "free"
    else:
        assert seen["plangate_headers"] == {}


def test_the_clients_plangate_headers_identify_nobody(start):
    response = start(config()).request("GET", "/v1/ok", SPOOFED)
    assert response.status == 401


def shadow(rule: dict) -> dict:
    return config(routes=[{**rule, "mode": "shadow"}])


def test_shadow_mode_lets_a_request_over_its_quota_through_logs_and_counts_it(start, used, caplog):
    settings = shadow({"match": "/v1/{rest:path}", "meters": {"api_calls": 1}})
    client = start(settings)
    with caplog.at_level(logging.INFO, logger="plangate"):
        statuses = [client.request("GET", "/v1/ok", bearer()).status for _ in range(5)]
    assert statuses == [200] * 5  # the limit is 3
    assert used(settings, "acme", "api_calls") == 5
    assert any(
        "would deny" in r.getMessage() and "quota-exceeded" in r.getMessage()
        for r in caplog.records
    )


def test_shadow_mode_lets_a_request_without_the_feature_through_logs_and_counts_it(
    start, used, caplog
):
    settings = shadow(
        {"match": "/v1/{rest:path}", "feature": "reports", "meters": {"api_calls": 1}}
    )
    client = start(settings)
    with caplog.at_level(logging.INFO, logger="plangate"):
        response = client.request("GET", "/v1/ok", bearer("acme", "free"))
    assert response.status == 200
    assert response.json()["customer"] == "acme"
    assert used(settings, "acme", "api_calls") == 1
    assert any(
        "would deny" in r.getMessage() and "feature-not-in-plan" in r.getMessage()
        for r in caplog.records
    )


def test_a_limit_in_shadow_refuses_nothing_and_is_not_shown(start):
    """A new limit tried on live traffic (``mode: shadow`` on one limit): the client sees and
    is held to the enforced limit only."""
    settings = config()
    settings["plans"]["free"]["features"]["api_calls"] = [
        {"limit": 3, "window": "1h"},
        {"limit": 1, "window": "1m", "mode": "shadow"},
    ]
    client = start(settings)
    statuses = [client.request("GET", "/v1/ok", bearer()).status for _ in range(4)]
    assert statuses == [200, 200, 200, 429]  # the shadow limit's 1 a minute refused nothing
    response = client.request("GET", "/v1/ok", bearer("globex"))
    assert response.headers["ratelimit-policy"] == '"api_calls-1h";q=3;w=3600'
    assert "api_calls-1m" not in response.headers["ratelimit"]
