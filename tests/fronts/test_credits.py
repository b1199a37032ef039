"""Credits on every front end: a route that spends them, a metered route charged past its
limit (overage), the 402 ``insufficient-credits`` when both are spent, usage read from a
response header settling the balance, and the balance in the entitlements (docs/credits.md)."""

from __future__ import annotations

from typing import Any

from plangate import Gate
from tests.fronts.conftest import PROBLEM, USAGE_COST, bearer, config

UPGRADE = "https://example.test/pricing"


def _credits(**routes: Any) -> dict[str, Any]:
    features = {**config()["features"], "ai_credits": {"kind": "credits", "unit": "credit"}}
    plans = {
        "free": {
            "features": {
                "api_calls": {
                    "limit": 2,
                    "window": "1h",
                    "overage": "ai_credits",
                    "rate": 0.5,
                },
                "ai_credits": {"grant": 0, "period": "month"},
            }
        }
    }
    rules = [
        {"match": "GET /v1/ok", "meters": {"ai_credits": 2}},
        {"match": "GET /v1/usage", "meters": {"ai_credits": USAGE_COST | {"estimate": 5}}},
        {"match": "GET /v1/raise", "meters": {"ai_credits": 3}},
        {"match": "/v1/{rest:path}", "meters": {"api_calls": 1}},
    ]
    return config(features=features, plans=plans, routes=rules, responses={"upgrade_url": UPGRADE})


def _gate(storage, settings) -> Gate:
    return Gate(settings, storage=storage)


def test_a_route_spends_credits_until_the_balance_is_gone(start, storage):
    settings = _credits()
    client = start(settings)
    admin = _gate(storage, settings)
    admin.customers.grant_credits("acme", "ai_credits", 5)
    assert [client.request("GET", "/v1/ok", bearer()).status for _ in range(2)] == [200, 200]
    refused = client.request("GET", "/v1/ok", bearer())
    assert refused.status == 402
    assert refused.headers["content-type"] == PROBLEM
    body = refused.json()
    assert body["type"].endswith("/insufficient-credits")
    assert (body["feature"], body["balance"], body["required"]) == ("ai_credits", 1, 2)
    assert body["upgrade_url"] == UPGRADE
    assert "ratelimit" not in refused.headers  # no quota headers are made up for credits
    assert admin.customers.balance("acme", "ai_credits") == 1


def test_a_view_that_raises_gives_its_credits_back(start, storage):
    settings = _credits()
    client = start(settings)
    admin = _gate(storage, settings)
    admin.customers.grant_credits("acme", "ai_credits", 5)
    assert client.request("GET", "/v1/raise", bearer()).status == 500
    assert admin.customers.balance("acme", "ai_credits") == 5


def test_a_usage_header_settles_the_credits_spent(start, storage, front):
    settings = _credits()
    client = start(settings)
    admin = _gate(storage, settings)
    admin.customers.grant_credits("acme", "ai_credits", 10)
    assert client.request("GET", "/v1/usage?value=2", bearer()).status == 200
    assert admin.customers.balance("acme", "ai_credits") == 8  # 5 reserved, 3 given back
    assert client.request("GET", "/v1/usage?value=9", bearer()).status == 200
    # 9 used with 8 left: the tokens were generated, so the balance goes into debt ...
    assert admin.customers.balance("acme", "ai_credits") == -1
    refused = client.request("GET", "/v1/ok", bearer())
    assert refused.status == 402  # ... and nothing more is admitted until a top-up
    admin.customers.grant_credits("acme", "ai_credits", 3)  # pays the debt first
    assert admin.customers.balance("acme", "ai_credits") == 2
    assert client.request("GET", "/v1/ok", bearer()).status == 200


def test_overage_charges_credits_past_the_limit_and_refuses_with_402(start, storage):
    settings = _credits()
    client = start(settings)
    admin = _gate(storage, settings)
    admin.customers.grant_credits("acme", "ai_credits", 1)
    statuses = [client.request("GET", "/v1/status/200", bearer()).status for _ in range(4)]
    assert statuses == [200, 200, 200, 200]  # 2 on the quota, 2 at 0.5 credits each
    assert admin.customers.balance("acme", "ai_credits") == 0
    refused = client.request("GET", "/v1/status/200", bearer())
    assert refused.status == 402  # quota and credits both spent: 402, not 429
    body = refused.json()
    assert body["type"].endswith("/insufficient-credits")
    assert (body["balance"], body["required"]) == (0, 0.5)


def test_the_entitlements_show_the_balance(start, storage):
    settings = _credits()
    client = start(settings)
    _gate(storage, settings).customers.grant_credits("acme", "ai_credits", 7)
    client.request("GET", "/v1/ok", bearer())
    body = client.request("GET", "/.plangate/entitlements", bearer()).json()
    assert body["credits"]["ai_credits"]["balance"] == 5
    assert body["credits"]["ai_credits"]["unit"] == "credit"
