"""Credit balances through ``gate.customers`` (sync and async): grants checked against the
config, idempotent, revoked; the plan's grant once per period; expiry to the millisecond."""

from __future__ import annotations

import asyncio
import threading
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from plangate import AsyncGate, Gate, MemoryStorage
from plangate.customers import GrantNotFound, IdempotencyConflict, InvalidRecord
from plangate.storage import open_storage
from tests.customers.test_provisioning import redis_uri as redis_uri  # Redis, Cluster, Sentinel
from tests.support import BASE_CONFIG, Clock, config, token

START = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc).timestamp()


def catalog() -> dict[str, Any]:
    features = {
        **BASE_CONFIG["features"],
        "ai_credits": {"kind": "credits", "unit": "credit"},
        "pay_as_you_go": {"kind": "credits"},
    }
    plans = {
        **BASE_CONFIG["plans"],
        "pro": {
            **BASE_CONFIG["plans"]["pro"],
            "features": {
                **BASE_CONFIG["plans"]["pro"]["features"],
                "ai_credits": {"grant": 100, "period": "month"},
                "ai_tokens": {
                    "limit": 10,
                    "period": "month",
                    "overage": "ai_credits",
                    "rate": 0.001,
                },
            },
        },
    }
    routes = [{"match": "POST /v1/generate", "meters": {"ai_credits": 1}}, *BASE_CONFIG["routes"]]
    return config(features=features, plans=plans, routes=routes)


@pytest.fixture
def clock() -> Clock:
    return Clock(START)


@pytest.fixture
def gate(clock: Clock):
    gate = Gate(catalog(), storage=MemoryStorage(), clock=clock)
    yield gate
    gate.storage.close()


def test_a_grant_adds_to_the_balance_and_shows_with_its_terms(gate: Gate):
    grant = gate.customers.grant_credits(
        "acme", "ai_credits", 50, expires_at="2027-01-31T00:00:00Z", priority=7,
        category="promotional",
    )  # fmt: skip
    assert (grant["amount"], grant["remaining"], grant["priority"]) == (50, 50, 7)
    assert (grant["category"], grant["source"]) == ("promotional", "admin")
    assert grant["expires_at"] == "2027-01-31T00:00:00+00:00"
    assert gate.customers.balance("acme", "ai_credits") == 50
    shown = gate.customers.credits("acme")
    assert set(shown) == {"ai_credits", "pay_as_you_go"}
    assert [g["id"] for g in shown["ai_credits"]["grants"]] == [grant["id"]]


def test_the_plan_grant_is_issued_on_first_use_and_only_once_a_period(gate: Gate, clock: Clock):
    gate.customers.assign("acme", plan="pro")
    assert gate.customers.balance("acme", "ai_credits") == 100
    decision = gate.check("POST", "/v1/generate", token("acme"))
    assert decision.allowed
    assert decision.balance("ai_credits") == 99
    assert gate.customers.balance("acme", "ai_credits") == 99  # not issued twice
    clock.now += 31 * 86400  # the next billing month: last month's grant expired
    assert gate.customers.balance("acme", "ai_credits") == 100
    kinds = [e["kind"] for e in gate.customers.ledger("acme", "ai_credits")["entries"]]
    assert kinds == ["grant", "expiry", "burn", "grant"]


def test_a_plan_grant_under_concurrent_first_uses_is_issued_once(redis_server):
    with redis_server.client() as client:
        client.flushall()
    settings = catalog()
    gates = [Gate(settings, storage=open_storage(redis_server.url)) for _ in range(4)]
    gates[0].customers.assign("race", plan="pro")
    barrier = threading.Barrier(len(gates) * 5)
    admitted: list[bool] = []

    def spend(gate: Gate) -> None:
        barrier.wait()
        admitted.append(gate.check("POST", "/v1/generate", token("race")).allowed)

    threads = [threading.Thread(target=spend, args=(g,)) for g in gates for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert admitted == [True] * 20
        assert gates[0].customers.balance("race", "ai_credits") == 80  # 100 once, 20 spent
        plan_grants = [
            g for g in gates[0].customers.credits("race")["ai_credits"]["grants"]
            if g["source"] == "plan"
        ]  # fmt: skip
        assert len(plan_grants) == 1
    finally:
        for gate in gates:
            gate.storage.close()


def test_a_customer_whose_plan_does_not_list_the_credits_is_refused_whatever_its_balance(
    gate: Gate,
):
    gate.customers.grant_credits("acme", "ai_credits", 10)
    decision = gate.check("POST", "/v1/generate", token("acme", "free"))
    assert decision.problem is not None
    assert decision.problem.name == "feature-not-in-plan"


def test_a_grant_serves_until_a_millisecond_before_it_expires(gate: Gate, clock: Clock):
    gate.customers.assign("acme", plan="pro")
    expires = datetime.fromtimestamp(START + 3600, timezone.utc)
    gate.customers.grant_credits("acme", "pay_as_you_go", 5, expires_at=expires)
    settings = catalog()
    settings["routes"].insert(0, {"match": "POST /v1/payg", "meters": {"pay_as_you_go": 1}})
    settings["plans"]["pro"]["features"]["pay_as_you_go"] = {"grant": 0, "period": "month"}
    spender = Gate(settings, storage=gate.storage, clock=clock)
    clock.now = START + 3600 - 0.001
    assert spender.check("POST", "/v1/payg", token("acme")).allowed
    clock.now = START + 3600
    refused = spender.check("POST", "/v1/payg", token("acme"))
    assert refused.problem is not None
    assert refused.problem.name == "insufficient-credits"


def test_an_idempotency_key_makes_one_grant_and_refuses_another_body(gate: Gate):
    first = gate.customers.grant_credits("acme", "ai_credits", 10, idempotency_key="k-1")
    again = gate.customers.grant_credits("acme", "ai_credits", 10, idempotency_key="k-1")
    assert again == first
    with pytest.raises(IdempotencyConflict):
        gate.customers.grant_credits("acme", "ai_credits", 11, idempotency_key="k-1")
    assert gate.customers.balance("acme", "ai_credits") == 10


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"amount": 0}, "amount"),
        ({"amount": -5}, "amount"),
        ({"amount": 10**15 + 1}, "amount"),
        ({"amount": 1.5}, "amount"),
        ({"amount": True}, "amount"),
        ({"expires_at": "2020-01-01T00:00:00Z"}, "expires_at"),
        ({"expires_at": "next tuesday"}, "expires_at"),
        ({"priority": 256}, "priority"),
        ({"priority": -1}, "priority"),
        ({"category": "free"}, "category"),
        ({"feature": "nope"}, "feature"),
        ({"feature": "api_calls"}, "feature"),
    ],
)
def test_bad_input_names_the_field_and_writes_nothing(gate: Gate, changes, field):
    asked: dict[str, Any] = {"feature": "ai_credits", "amount": 10, **changes}
    with pytest.raises(InvalidRecord) as caught:
        gate.customers.grant_credits("acme", **asked)
    assert caught.value.field == field
    assert gate.customers.balance("acme", "ai_credits") == 0
    assert gate.customers.ledger("acme", "ai_credits")["entries"] == []


def test_an_amount_in_a_scaled_feature_is_bounded_by_what_a_balance_holds(gate: Gate):
    # ai_credits is kept in thousandths (an overage rate of 0.001): at most 2^53/1000 credits
    with pytest.raises(InvalidRecord) as caught:
        gate.customers.grant_credits("acme", "ai_credits", 10**13)
    assert "out of range" in str(caught.value)
    assert gate.customers.grant_credits("acme", "pay_as_you_go", 10**15)["amount"] == 10**15


def test_a_revoked_grant_gives_up_what_it_holds(gate: Gate):
    grant = gate.customers.grant_credits("acme", "ai_credits", 10)
    assert gate.customers.revoke_credits("acme", grant["id"]) == {
        "feature": "ai_credits",
        "grant": grant["id"],
        "revoked": 10,
    }
    assert gate.customers.balance("acme", "ai_credits") == 0
    with pytest.raises(GrantNotFound):
        gate.customers.revoke_credits("acme", "no-such-grant")


def test_overage_is_charged_in_fractions_of_a_credit(gate: Gate):
    gate.customers.assign("acme", plan="pro")
    decision = gate.check("POST", "/v1/completions", token("acme"))
    assert decision.allowed
    gate.settle(decision, 200, {"ai_tokens": 1510})  # 1500 past the limit of 10, at 0.001
    assert gate.customers.balance("acme", "ai_credits") == 98.5


def test_the_async_store_has_the_same_methods(clock: Clock):
    async def main() -> None:
        gate = AsyncGate(catalog(), storage=MemoryStorage(), clock=clock)
        grant = await gate.customers.grant_credits("acme", "ai_credits", 4, idempotency_key="a")
        assert await gate.customers.balance("acme", "ai_credits") == 4
        assert (await gate.customers.credits("acme"))["ai_credits"]["balance"] == 4
        assert (await gate.customers.ledger("acme", "ai_credits"))["entries"][0]["kind"] == "grant"
        assert (await gate.customers.revoke_credits("acme", grant["id"]))["revoked"] == 4

    asyncio.run(main())


def test_an_expiry_given_as_a_datetime_without_a_zone_is_utc(gate: Gate):
    moment = datetime.fromtimestamp(START, timezone.utc).replace(tzinfo=None) + timedelta(days=1)
    grant = gate.customers.grant_credits("acme", "ai_credits", 1, expires_at=moment)
    assert grant["expires_at"] == moment.replace(tzinfo=timezone.utc).isoformat()


# On Redis, Cluster and Sentinel alike ------------------------------------------------------


def test_credits_on_every_redis_topology(redis_uri: str, clock: Clock):
    gate = Gate(catalog(), storage=open_storage(redis_uri), clock=clock)
    gate.storage.inner.client.flushall()
    try:
        gate.customers.assign("acme", plan="pro")
        gate.customers.grant_credits("acme", "ai_credits", 5, idempotency_key="t1")
        spent = gate.check("POST", "/v1/generate", token("acme"))
        assert spent.allowed
        assert spent.balance("ai_credits") == 104
        completion = gate.check("POST", "/v1/completions", token("acme"))
        # the estimate (100, 90 past the limit) is taken first, the rest when settled: 2 credits
        gate.settle(completion, 200, {"ai_tokens": 2010})
        assert gate.customers.balance("acme", "ai_credits") == 102
        entries = gate.customers.ledger("acme", "ai_credits", limit=10)["entries"]
        assert [(e["kind"], e["amount"]) for e in entries] == [
            ("burn", -1.91),
            ("burn", -0.09),
            ("burn", -1),
            ("grant", 5),
            ("grant", 100),
        ]
    finally:
        gate.storage.close()


def test_a_commit_equal_to_the_reservation_makes_no_call(gate: Gate):
    gate.customers.assign("acme", plan="pro")
    decision = gate.check("POST", "/v1/generate", token("acme"))
    assert decision.allowed
    assert gate.engine.settle(decision, 200, {}, gate.clock) is None  # nothing to change
    refunded = gate.check("POST", "/v1/generate", token("acme"))
    op = gate.engine.settle(refunded, 500, {}, gate.clock)  # not counted: given back
    assert op is not None
    assert op.credit_deltas == (-1000,)


def test_reading_a_balance_first_does_not_keep_the_tokens_plan_from_its_grant(gate: Gate):
    # no record: the plan comes from the token, which only a request carries
    assert gate.customers.balance("tokened", "ai_credits") == 0
    decision = gate.check("POST", "/v1/generate", token("tokened", "pro"))
    assert decision.allowed
    assert decision.balance("ai_credits") == 99


def test_an_expiry_past_the_year_9999_is_refused(gate: Gate):
    with pytest.raises(InvalidRecord) as caught:
        gate.customers.grant_credits(
            "acme", "ai_credits", 1, expires_at="9999-12-31T23:59:59-01:00"
        )
    assert caught.value.field == "expires_at"


def test_shadow_mode_shows_the_balance_and_takes_nothing(clock: Clock):
    gate = Gate(catalog() | {"mode": "shadow"}, storage=MemoryStorage(), clock=clock)
    gate.customers.assign("acme", plan="pro")
    decision = gate.check("POST", "/v1/generate", token("acme"))
    assert decision.allowed
    assert decision.balance("ai_credits") == 100
    gate.settle(decision, 200)
    assert gate.customers.balance("acme", "ai_credits") == 100


def test_a_balance_the_route_does_not_take_from_is_a_lookup_error(gate: Gate):
    gate.customers.assign("acme", plan="pro")
    decision = gate.check("POST", "/v1/generate", token("acme"))
    with pytest.raises(LookupError, match="does not take credits from pay_as_you_go"):
        decision.balance("pay_as_you_go")
