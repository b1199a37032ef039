"""Credits in the metrics, in credits (not the store's sub-units): granted (once per
idempotency key), burned by reservations and by settles charging more, refunded by settles
giving back; checked against the balance the store keeps, on each backend."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from plangate import AsyncGate, Gate
from plangate.metrics import instrument
from plangate.storage import Storage
from tests.observability.test_metrics import samples
from tests.support import BASE_CONFIG, Clock, config, token

START = 1_800_000_000.0


def settings() -> dict[str, Any]:
    """``ai_credits`` on pro, bought only (no plan grant): spent by ``POST /v1/generate``
    (an estimate of 5, settled from a header) and by ``ai_tokens`` past 10 a month at
    0.001 credits a token (the store keeps thousandths of a credit)."""
    features = {**BASE_CONFIG["features"], "ai_credits": {"kind": "credits"}}
    plans = {
        **BASE_CONFIG["plans"],
        "pro": {
            **BASE_CONFIG["plans"]["pro"],
            "features": {
                **BASE_CONFIG["plans"]["pro"]["features"],
                "ai_credits": {"grant": 0, "period": "month"},
                "ai_tokens": {
                    "limit": 10,
                    "period": "month",
                    "overage": "ai_credits",
                    "rate": 0.001,
                },
            },
        },
    }
    generate = {"ai_credits": {"response_header": "X-Credits", "estimate": 5}}
    routes = [{"match": "POST /v1/generate", "meters": generate}, *BASE_CONFIG["routes"]]
    return config(features=features, plans=plans, routes=routes)


def credits(registry: CollectorRegistry) -> dict[str, dict[str, float]]:
    """granted, burned, refunded: credits by feature."""
    text = generate_latest(registry).decode()
    return {
        what: {
            dict(labels)["feature"]: value
            for labels, value in samples(text, f"plangate_credits_{what}_total").items()
        }
        for what in ("granted", "burned", "refunded")
    }


def test_credits_granted_burned_and_refunded_are_counted_in_credits(storage: Storage) -> None:
    registry = CollectorRegistry()
    gate = Gate(settings(), storage=storage, clock=Clock(START))
    instrument(gate, registry)
    assert gate.engine.scales["ai_credits"] == 1000
    assert credits(registry) == {
        "granted": {"ai_credits": 0},
        "burned": {"ai_credits": 0},
        "refunded": {"ai_credits": 0},
    }
    customers = gate.customers
    customers.delete("acme")  # whatever another test left in the store
    customers.delete("broke")
    customers.assign("acme", plan="pro")
    customers.assign("broke", plan="pro")
    customers.grant_credits("acme", "ai_credits", 50, idempotency_key="order-1")
    customers.grant_credits("acme", "ai_credits", 50, idempotency_key="order-1")  # a replay
    customers.grant_credits("acme", "ai_credits", 20)
    assert credits(registry)["granted"] == {"ai_credits": 70}

    def generate(**settle: Any) -> None:
        decision = gate.check("POST", "/v1/generate", token("acme"))
        assert decision.allowed
        gate.settle(decision, **settle)

    generate(status=200)  # the estimate was the cost: 5, no settle call
    generate(status=200, reported={"ai_credits": 2})  # 5 reserved, 3 given back
    generate(status=200, reported={"ai_credits": 8})  # 5 reserved, 3 more charged
    generate(status=500, refund=True)  # the handler raised: 5 reserved, 5 given back
    chat = gate.check("POST", "/v1/chat", token("acme"))  # 100 tokens, 90 past the 10
    assert chat.allowed
    gate.settle(chat, 200)
    refused = gate.check("POST", "/v1/generate", token("broke"))  # no balance: nothing taken
    assert refused.problem is not None
    assert refused.problem.name == "insufficient-credits"

    counted = credits(registry)
    assert counted["granted"] == {"ai_credits": 70}
    assert counted["burned"] == {"ai_credits": pytest.approx(5 + 5 + 5 + 3 + 5 + 0.09)}
    assert counted["refunded"] == {"ai_credits": 3 + 5}
    spent = counted["burned"]["ai_credits"] - counted["refunded"]["ai_credits"]
    assert spent == pytest.approx(5 + 2 + 8 + 0 + 0.09)
    assert customers.balance("acme", "ai_credits") == pytest.approx(70 - spent)


def test_an_async_gate_counts_each_grant_and_reservation_once(storage: Storage) -> None:
    registry = CollectorRegistry()
    gate = AsyncGate(settings(), storage=storage, clock=Clock(START))
    instrument(gate, registry)

    async def run() -> None:
        try:
            await gate.customers.delete("acme")
            await gate.customers.assign("acme", plan="pro")
            await gate.customers.grant_credits("acme", "ai_credits", 12)
            decision = await gate.check("POST", "/v1/generate", token("acme"))
            assert decision.allowed
            await gate.settle(decision, 200, {"ai_credits": 1})
        finally:
            await storage.aclose()  # the async connections belong to this event loop

    asyncio.run(run())
    assert credits(registry) == {
        "granted": {"ai_credits": 12},
        "burned": {"ai_credits": 5},
        "refunded": {"ai_credits": 4},
    }
