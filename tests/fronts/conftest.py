"""The config every front-end test starts from, and the fixtures: ``front`` (each row of
``harness.FRONTS``), ``start(config)`` → a client of that front, ``used(...)`` → a counter."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from plangate import Gate, MemoryStorage
from plangate.testing import token
from tests.fronts.harness import FRONTS, Client, Front

PROBLEM = "application/problem+json"

#: reserve 500 tokens, charge what the view's X-Usage-Tokens says
USAGE_COST = {"response_header": "X-Usage-Tokens", "estimate": 500}

CONFIG: dict[str, Any] = {
    "version": 1,
    "identity": {
        "jwt": {
            "algorithms": ["HS256"],
            "secret": "a-secret-for-the-front-end-tests-long-enough-for-hs256",
            "customer_claim": "org_id",
            "plan_claim": "plan",
        }
    },
    "features": {
        "reports": {"kind": "boolean"},
        "api_calls": {"kind": "metered", "unit": "call"},
        "ai_tokens": {"kind": "metered", "unit": "token"},
    },
    "plans": {
        "free": {
            "features": {
                "api_calls": {"limit": 3, "window": "1h"},
                "ai_tokens": {"limit": 100_000, "period": "month"},
            }
        },
        "pro": {"extends": "free", "features": {"reports": True}},
    },
    "default_plan": "free",
    # /elsewhere and /.plangate/entitlements/ match no rule
    "routes": [
        {"match": "GET /public", "public": True},
        {"match": "GET /v1/reports", "feature": "reports", "meters": {"api_calls": 1}},
        {"match": "GET /v1/usage", "meters": {"ai_tokens": USAGE_COST}},
        {"match": "GET /v1/stream", "meters": {"ai_tokens": USAGE_COST}},
        {"match": "/v1/{rest:path}", "meters": {"api_calls": 1}},
    ],
}


def config(**changes: Any) -> dict[str, Any]:
    """A deep copy of CONFIG with top-level keys replaced."""
    result = copy.deepcopy(CONFIG)
    result.update(copy.deepcopy(changes))
    return result


def bearer(customer: str = "acme", plan: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(CONFIG, customer, plan)}"}


@pytest.fixture(params=FRONTS, ids=lambda front: front.name)
def front(request: pytest.FixtureRequest) -> Front:
    return request.param


@pytest.fixture
def storage() -> Iterator[MemoryStorage]:
    store = MemoryStorage()
    yield store
    store.close()


@pytest.fixture
def start(front: Front, storage: MemoryStorage) -> Iterator[Callable[..., Client]]:
    """``start(config)`` → a client of ``front``, counting in ``storage``."""
    clients: list[Client] = []

    def start(config: dict[str, Any]) -> Client:
        client = front.start(config, storage)
        clients.append(client)
        return client

    yield start
    for client in reversed(clients):
        client.close()


@pytest.fixture
def used(storage: MemoryStorage) -> Callable[..., int]:
    """``used(config, customer, meter)``: what the store counted, read as an app would."""

    def used(config: dict[str, Any], customer: str, meter: str, plan: str | None = None) -> int:
        body = Gate(config, storage=storage).entitlements(token(config, customer, plan))
        assert isinstance(body, dict), body
        return body["meters"][meter]["limits"][0]["used"]

    return used
