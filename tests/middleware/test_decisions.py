"""SPEC §3-§5 through real servers: uvicorn for ASGI, werkzeug for WSGI (the ``serve`` fixture)."""

from __future__ import annotations

import logging
import re

import pytest

from plangate import CustomerRecord, MemoryStorage
from plangate.customers import CustomerStore
from plangate.engine import PROBLEM_BASE
from tests.support import bearer, config, token

PROBLEM = "application/problem+json"


def remaining(response) -> int:
    match = re.search(r";r=(\d+)", response.headers["ratelimit"])
    assert match, response.headers["ratelimit"]
    return int(match.group(1))


def used(client, meter: str, plan: str | None = None, customer: str = "acme") -> int:
    body = client.get("/.plangate/entitlements", headers=bearer(customer, plan)).json()
    return body["meters"][meter]["limits"][0]["used"]


def test_public_route_needs_no_token(serve):
    client = serve(config())
    response = client.get("/health")
    assert response.status_code == 200
    assert response.text == "up"
    assert "ratelimit" not in response.headers


def test_missing_token_is_401_problem_with_a_challenge_without_invalid_token(serve):
    response = serve(config()).get("/v1/projects")
    assert response.status_code == 401
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["type"] == PROBLEM_BASE + "unauthenticated"
    assert body["status"] == 401
    assert response.headers["www-authenticate"] == 'Bearer realm="api"'  # RFC 9110 §15.5.2


def test_feature_outside_plan_is_402_with_feature_plan_and_upgrade_url(serve):
    response = serve(config()).post("/v1/reports/7/export", headers=bearer("acme", "free"))
    assert response.status_code == 402
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["type"] == PROBLEM_BASE + "feature-not-in-plan"
    assert body["feature"] == "export_reports"
    assert body["plan"] == "free"
    assert body["upgrade_url"] == "https://example.test/pricing"


def test_feature_inside_plan_reaches_the_handler(serve):
    response = serve(config()).post("/v1/reports/7/export", headers=bearer("acme", "pro"))
    assert response.status_code == 200
    assert response.json() == {"report": "7", "customer": "acme"}


def test_quota_of_five_gives_five_200s_then_429(serve):
    client = serve(config())
    headers = bearer("acme", "free")
    seen = []
    for _ in range(5):
        response = client.get("/v1/projects", headers=headers)
        assert response.status_code == 200
        assert response.headers["ratelimit-policy"] == '"api_calls-1m";q=5;w=60'
        seen.append(remaining(response))
    assert seen == [4, 3, 2, 1, 0]

    refused = client.get("/v1/projects", headers=headers)
    assert refused.status_code == 429
    assert refused.headers["content-type"] == PROBLEM
    assert 1 <= int(refused.headers["retry-after"]) <= 63  # within the window (+ one bucket)
    body = refused.json()
    assert body["type"] == PROBLEM_BASE + "quota-exceeded"
    assert body["violated-policies"] == ["api_calls-1m"]
    assert body["plan"] == "free"
    assert body["upgrade_url"] == "https://example.test/pricing"
    assert remaining(refused) == 0


def test_quota_is_per_customer(serve):
    client = serve(config())
    for _ in range(5):
        assert client.get("/v1/projects", headers=bearer("acme", "free")).status_code == 200
    assert client.get("/v1/projects", headers=bearer("acme", "free")).status_code == 429
    assert client.get("/v1/projects", headers=bearer("globex", "free")).status_code == 200


@pytest.mark.parametrize("status", [404, 500])
def test_failed_responses_consume_nothing(serve, status):
    client = serve(config())
    headers = bearer("acme", "free")
    for _ in range(8):
        assert client.get(f"/v1/status/{status}", headers=headers).status_code == status
    assert used(client, "api_calls") == 0
    assert client.get("/v1/projects", headers=headers).status_code == 200


def test_count_always_consumes_failed_responses(serve):
    routes = [{"match": "/v1/{rest:path}", "meters": {"api_calls": 1}, "count": "always"}]
    client = serve(config(routes=routes))
    for _ in range(3):
        assert client.get("/v1/status/500", headers=bearer()).status_code == 500
    assert used(client, "api_calls") == 3


def test_handler_exception_refunds_and_propagates(serve):
    client = serve(config())
    # The server drops the connection after an app error: don't reuse it.
    response = client.get("/v1/boom", headers={**bearer(), "connection": "close"})
    assert response.status_code == 500  # the server's own answer to the app's exception
    assert response.headers.get("content-type") != PROBLEM
    assert used(client, "api_calls") == 0


def test_unlimited_plan_never_refuses_and_is_counted(serve):
    client = serve(config())
    headers = bearer("bigco", "enterprise")
    for _ in range(12):
        response = client.get("/v1/projects", headers=headers)
        assert response.status_code == 200
        assert "ratelimit" not in response.headers
    assert response.json()["api_calls_left"] == "unlimited"
    body = client.get("/.plangate/entitlements", headers=headers).json()
    assert body["meters"]["api_calls"]["limits"] == [
        {
            "used": 12,
            "policy": "api_calls-month",
            "limit": "unlimited",
            "remaining": "unlimited",
            "reset": body["meters"]["api_calls"]["limits"][0]["reset"],
            "source": "plan",
        }
    ]


def test_usage_from_response_header_is_recorded_in_full(serve):
    client = serve(config())
    headers = bearer("acme", "free")  # ai_tokens: 10 000 per month, estimate 100
    assert client.post("/v1/completions?tokens=7000", headers=headers).status_code == 200
    assert used(client, "ai_tokens") == 7000
    # 3000 left: the estimate fits, the actual 5000 overshoots and is recorded in full.
    assert client.post("/v1/completions?tokens=5000", headers=headers).status_code == 200
    assert used(client, "ai_tokens") == 12000
    refused = client.post("/v1/completions?tokens=1", headers=headers)
    assert refused.status_code == 429
    assert refused.json()["violated-policies"] == ["ai_tokens-month"]


@pytest.mark.parametrize("value", ["-5", "1_000", "12.5", "9" * 16, "³"])
def test_usage_header_that_is_not_a_plain_whole_number_charges_the_estimate(serve, value, caplog):
    client = serve(config())
    response = client.post(f"/v1/completions?tokens={value}", headers=bearer())
    assert response.status_code == 200
    assert used(client, "ai_tokens") == 100  # the route's estimate
    assert any("charging the estimate" in r.getMessage() for r in caplog.records)


def test_usage_header_is_removed_from_the_response(serve):
    response = serve(config()).post("/v1/completions?tokens=10", headers=bearer())
    assert response.status_code == 200
    assert "x-usage-tokens" not in response.headers


def test_usage_header_is_kept_with_expose(serve):
    routes = [
        {
            "match": "POST /v1/completions",
            "meters": {
                "ai_tokens": {"response_header": "X-Usage-Tokens", "estimate": 100, "expose": True}
            },
        }
    ]
    response = serve(config(routes=routes)).post("/v1/completions?tokens=10", headers=bearer())
    assert response.headers["x-usage-tokens"] == "10"


def test_record_sets_the_actual_usage(serve):
    client = serve(config())  # /v1/chat charges ai_tokens 100, the handler records 2500
    assert client.post("/v1/chat?tokens=2500", headers=bearer()).status_code == 200
    assert used(client, "ai_tokens") == 2500


def test_handler_reads_the_decision(serve):
    client = serve(config())
    body = client.get("/v1/projects", headers=bearer("acme", "pro")).json()
    assert body == {
        "customer": "acme",
        "plan": "pro",
        "export_reports": True,
        "max_projects": 50,
        "api_calls_left": 999,
    }
    body = client.get("/v1/projects", headers=bearer("bigco", "enterprise")).json()
    assert body["max_projects"] == "unlimited"


def test_default_plan_applies_without_plan_claim(serve):
    body = serve(config()).get("/v1/projects", headers=bearer("acme")).json()
    assert body["plan"] == "free"


def test_no_plan_and_no_default_is_402_no_active_plan(serve):
    response = serve(config(default_plan=None)).get("/v1/projects", headers=bearer("acme"))
    assert response.status_code == 402
    body = response.json()
    assert body["type"] == PROBLEM_BASE + "no-active-plan"
    assert body["upgrade_url"] == "https://example.test/pricing"


def test_unknown_plan_claim_is_402_no_active_plan(serve):
    response = serve(config()).get("/v1/projects", headers=bearer("acme", "platinum"))
    assert response.status_code == 402
    assert response.json()["type"] == PROBLEM_BASE + "no-active-plan"


def test_meter_not_in_plan_is_402(serve):
    plans = {"basic": {"features": {"api_calls": {"limit": 5, "window": "1m"}}}}
    response = serve(config(plans=plans, default_plan="basic")).post(
        "/v1/chat?tokens=1", headers=bearer()
    )
    assert response.status_code == 402
    assert response.json()["feature"] == "ai_tokens"


def test_unmatched_allow_passes_through_without_identity(serve):
    response = serve(config(routes=[])).get("/health")
    assert response.status_code == 200


def test_unmatched_deny_is_403_problem(serve):
    response = serve(config(routes=[], unmatched="deny")).get("/health")
    assert response.status_code == 403
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["type"] == PROBLEM_BASE + "route-not-allowed"


def test_shadow_mode_lets_a_denial_through_and_logs_it(serve, caplog):
    routes = [{"match": "/v1/{rest:path}", "meters": {"api_calls": 1}, "mode": "shadow"}]
    client = serve(config(routes=routes))
    with caplog.at_level(logging.INFO, logger="plangate"):
        statuses = [client.get("/v1/projects", headers=bearer()).status_code for _ in range(7)]
    assert statuses == [200] * 7
    assert used(client, "api_calls") == 7  # recorded, though over the limit
    assert any(
        "would deny" in r.getMessage() and "quota-exceeded" in r.getMessage()
        for r in caplog.records
    )


def test_legacy_headers_by_switch(serve):
    client = serve(config(responses={"legacy_headers": True}))
    response = client.get("/v1/projects", headers=bearer())
    assert response.headers["x-ratelimit-limit"] == "5"
    assert response.headers["x-ratelimit-remaining"] == "4"
    assert int(response.headers["x-ratelimit-reset"]) >= 1


def test_legacy_headers_off_by_default(serve):
    response = serve(config()).get("/v1/projects", headers=bearer())
    assert "x-ratelimit-limit" not in response.headers


def test_ratelimit_names_the_policy_closest_to_exhaustion(serve):
    plans = {
        "free": {
            "features": {
                "api_calls": [{"limit": 100, "window": "1d"}, {"limit": 3, "window": "1m"}],
            }
        }
    }
    routes = [{"match": "/v1/{rest:path}", "meters": {"api_calls": 1}}]
    response = serve(config(plans=plans, routes=routes)).get("/v1/projects", headers=bearer())
    assert (
        response.headers["ratelimit-policy"]
        == '"api_calls-1d";q=100;w=86400, "api_calls-1m";q=3;w=60'
    )
    assert response.headers["ratelimit"].startswith('"api_calls-1m";r=2;t=')


def test_reservation_is_all_or_nothing(serve):
    plans = {
        "free": {
            "features": {
                "api_calls": {"limit": 100, "window": "1m"},
                "ai_tokens": {"limit": 250, "window": "1m"},
            }
        }
    }
    client = serve(config(plans=plans))  # /v1/chat: api_calls 1, ai_tokens 100
    assert client.post("/v1/chat?tokens=100", headers=bearer()).status_code == 200
    assert client.post("/v1/chat?tokens=100", headers=bearer()).status_code == 200
    refused = client.post("/v1/chat?tokens=100", headers=bearer())
    assert refused.status_code == 429
    assert refused.json()["violated-policies"] == ["ai_tokens-1m"]
    assert used(client, "api_calls") == 2  # the refused request took no api_calls either


def test_entitlements_endpoint_reports_plan_features_and_meters(serve):
    client = serve(config())
    client.get("/v1/projects", headers=bearer("acme", "pro"))
    body = client.get("/.plangate/entitlements", headers=bearer("acme", "pro")).json()
    assert body["customer"] == "acme"
    assert body["plan"] == "pro"
    assert body["features"] == {"export_reports": True, "max_projects": 50}
    calls = body["meters"]["api_calls"]
    assert calls["unit"] == "call"
    assert calls["limits"][0]["policy"] == "api_calls-1m"
    assert calls["limits"][0]["limit"] == 1000
    assert calls["limits"][0]["used"] == 1
    assert calls["limits"][0]["remaining"] == 999
    assert 1 <= calls["limits"][0]["reset"] <= 63
    assert body["upgrade_url"] == "https://example.test/pricing"


def test_entitlements_endpoint_requires_a_token(serve):
    response = serve(config()).get("/.plangate/entitlements")
    assert response.status_code == 401
    assert response.headers["content-type"] == PROBLEM


def test_entitlements_path_is_configurable(serve):
    client = serve(config(), entitlements_path="/me/plan")
    assert client.get("/me/plan", headers=bearer()).json()["plan"] == "free"


def test_head_on_a_get_rule_is_enforced_like_get(serve):
    routes = [{"match": "GET /v1/reports/{id}", "feature": "export_reports"}]
    client = serve(config(routes=routes))
    assert client.head("/v1/reports/7").status_code == 401
    assert client.head("/v1/reports/7", headers=bearer("acme", "free")).status_code == 402


def test_token_from_a_cookie(serve):
    identity = {**config()["identity"], "token_from": "cookie:session"}
    client = serve(config(identity=identity))
    cookie = {"cookie": f"theme=dark; session={token('acme', 'pro')}"}
    assert client.get("/v1/projects", headers=cookie).json()["plan"] == "pro"
    assert client.get("/v1/projects", headers=bearer("acme", "pro")).status_code == 401


def test_token_from_another_header(serve):
    identity = {**config()["identity"], "token_from": "header:X-Api-Token"}
    client = serve(config(identity=identity))
    headers = {"x-api-token": token("acme", "pro")}
    assert client.get("/v1/projects", headers=headers).json()["plan"] == "pro"


def test_storage_argument_overrides_the_config(serve):
    store = MemoryStorage()
    CustomerStore(store).save(CustomerRecord("acme", plan="enterprise"))
    client = serve(config(), storage=store)
    # The store's record wins over the token's plan claim.
    assert client.get("/v1/projects", headers=bearer("acme", "free")).json()["plan"] == "enterprise"


def test_a_stored_addon_raises_the_limit_and_an_override_switches_a_feature_off(serve):
    store = MemoryStorage()
    record = CustomerRecord(
        "acme",
        plan="pro",
        addons={"extra_calls": 2},
        overrides={"export_reports": False},
    )
    CustomerStore(store).save(record)
    addons = {"extra_calls": {"features": {"api_calls": {"add": 100}}}}
    client = serve(config(addons=addons), storage=store)
    described = client.get("/v1/projects", headers=bearer("acme", "free")).json()
    assert described["plan"] == "pro"
    assert described["api_calls_left"] == 1000 + 2 * 100 - 1
    assert described["export_reports"] is False
    refused = client.post("/v1/reports/7/export", headers=bearer("acme"))
    assert refused.status_code == 402
    assert refused.json()["type"].endswith("feature-not-in-plan")
    body = client.get("/.plangate/entitlements", headers=bearer("acme")).json()
    assert body["meters"]["api_calls"]["limits"][0]["limit"] == 1200
    assert body["meters"]["api_calls"]["limits"][0]["source"] == "addon"
    assert (body["features"]["export_reports"], body["sources"]["export_reports"]) == (
        False,
        "override",
    )
    assert body["trial_ends_at"] is None


def test_record_while_streaming_the_body_is_charged(serve):
    client = serve(config())  # /v1/stream charges ai_tokens 100; the stream records 1234
    response = client.post("/v1/stream?tokens=1234", headers=bearer())
    assert response.status_code == 200
    assert response.text == "once upon a time"
    assert used(client, "ai_tokens") == 1234


def test_shadow_mode_counts_usage_of_a_feature_outside_the_plan(serve, caplog):
    routes = [
        {
            "match": "/v1/{rest:path}",
            "feature": "export_reports",
            "meters": {"api_calls": 1},
            "mode": "shadow",
        }
    ]
    client = serve(config(routes=routes))
    with caplog.at_level(logging.INFO, logger="plangate"):
        response = client.get("/v1/whoami", headers=bearer("acme", "free"))
    assert response.status_code == 200
    assert response.json() == {"customer": "acme", "left": 4}
    assert "ratelimit" in response.headers
    assert used(client, "api_calls") == 1
    assert any("feature-not-in-plan" in r.getMessage() for r in caplog.records)


def test_shadow_mode_lets_a_request_without_token_reach_the_handler(serve):
    routes = [{"match": "/v1/{rest:path}", "meters": {"api_calls": 1}, "mode": "shadow"}]
    response = serve(config(routes=routes)).get("/v1/whoami")
    assert response.status_code == 200
    assert response.json() == {"customer": None, "left": "unlimited"}


def test_mode_shadow_lets_every_denial_through_and_still_counts(serve):
    routes = [*config()["routes"]]
    client = serve(config(mode="shadow", unmatched="deny", routes=routes))
    statuses = [client.get("/v1/projects", headers=bearer()).status_code for _ in range(7)]
    assert statuses == [200] * 7  # free allows 5 a minute
    assert used(client, "api_calls") == 7
    assert client.post("/v1/reports/7/export", headers=bearer("acme", "free")).status_code == 200
    assert client.get("/v1/projects").status_code == 200  # no token
    assert client.get("/elsewhere").status_code == 404  # unmatched: deny, shadowed


def test_plangate_mode_from_the_environment_overrides_the_config(serve, monkeypatch):
    monkeypatch.setenv("PLANGATE_MODE", "shadow")
    client = serve(config())
    assert client.post("/v1/reports/7/export", headers=bearer("acme", "free")).status_code == 200


def test_client_supplied_plangate_headers_never_reach_the_app(serve):
    client = serve(config())
    spoofed = {"X-Plangate-Customer": "bigco", "X-Plangate-Plan": "enterprise", "x-plangate-x": "1"}
    assert client.get("/v1/headers", headers={**bearer(), **spoofed}).json() == {}
    assert client.get("/v1/headers", headers=spoofed).status_code == 401  # still no identity


def test_a_response_cut_off_after_it_started_is_charged():
    """An ASGI server may raise from ``send`` once the client is gone (spec 2.4): what was
    served is charged, as the WSGI middleware does for a body the server stops reading."""
    import asyncio

    from plangate import asgi
    from tests.middleware.apps import asgi_app

    app = asgi.PlanGateMiddleware(asgi_app(), config())
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/stream",
        "query_string": b"tokens=1234",
        "headers": [(b"authorization", bearer()["authorization"].encode())],
    }
    sent: list[str] = []
    received: list[int] = []

    async def receive():
        received.append(1)
        if len(received) == 1:
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # no disconnect message: the server raises from send
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message["type"])
        if message["type"] == "http.response.body" and len(sent) > 2:
            raise OSError("the client went away")

    async def run():
        with pytest.raises(OSError, match="went away"):
            await app(scope, receive, send)
        return await app.gate.entitlements(bearer()["authorization"][7:])

    body = asyncio.run(run())
    assert body["meters"]["ai_tokens"]["limits"][0]["used"] == 100  # the estimate, not 0
