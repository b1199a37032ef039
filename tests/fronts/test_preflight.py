"""CORS preflights carry no credentials (Fetch standard): they pass unauthenticated and
unmetered, to the app's own CORS handling, on every front end."""

from __future__ import annotations

from tests.fronts.conftest import bearer, config

PREFLIGHT = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}


def test_a_preflight_passes_without_a_token_and_costs_nothing(start, used):
    cfg = config()
    response = start(cfg).request("OPTIONS", "/v1/ok", PREFLIGHT)
    assert response.status != 401
    assert "ratelimit" not in response.headers
    assert used(cfg, "acme", "api_calls") == 0


def test_a_preflight_with_a_token_is_not_charged(start, used):
    cfg = config()
    response = start(cfg).request("OPTIONS", "/v1/ok", {**PREFLIGHT, **bearer()})
    assert response.status not in (401, 402, 429)
    assert used(cfg, "acme", "api_calls") == 0


def test_an_options_request_that_is_no_preflight_is_decided_as_usual(start):
    client = start(config())
    assert client.request("OPTIONS", "/v1/ok", {"Origin": "https://app.example"}).status == 401
    # decided and metered (the quota headers); whether it is charged is the app's status
    assert "ratelimit" in client.request("OPTIONS", "/v1/ok", bearer()).headers


def test_cors_preflight_decide_decides_a_preflight_like_any_request(start):
    client = start(config(cors_preflight="decide"))
    assert client.request("OPTIONS", "/v1/ok", PREFLIGHT).status == 401
