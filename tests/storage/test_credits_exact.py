"""Exact credits under concurrency: two uvicorn processes share one Redis (or a 3-master
cluster) and a burst of requests spends one balance; never a credit more than it holds."""

from __future__ import annotations

import asyncio
import random
from collections import Counter as Tally
from pathlib import Path

import httpx
import pytest
import yaml

from plangate import Gate
from tests.storage.test_overload import uvicorn_process
from tests.support import config, token

pytestmark = pytest.mark.redis

BALANCE = 100
REQUESTS = 300


def _config(tmp_path: Path) -> tuple[Path, dict]:
    features = {**config()["features"], "ai_credits": {"kind": "credits", "unit": "credit"}}
    plans = {"free": {"features": {"ai_credits": {"grant": 0, "period": "month"}}}}
    routes = [
        {"match": f"GET /v1/status/20{cost}", "meters": {"ai_credits": cost}}
        for cost in range(1, 8)
    ]
    data = config(features=features, plans=plans, routes=routes, default_plan="free")
    path = tmp_path / "plangate.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, data


async def _burst(urls: list[str], customer: str, costs: list[int]) -> list[tuple[int, int]]:
    """One request per cost, all at once, alternating between the processes."""
    headers = {"authorization": f"Bearer {token(customer)}"}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:

        async def one(i: int, cost: int) -> tuple[int, int]:
            url = f"{urls[i % len(urls)]}/v1/status/20{cost}"
            return cost, (await client.get(url, headers=headers)).status_code

        return await asyncio.gather(*(one(i, cost) for i, cost in enumerate(costs)))


def _spend(storage_url: str, tmp_path: Path, customer: str, costs: list[int]) -> tuple[int, dict]:
    """Grant BALANCE, send the burst; the credits admitted and what the store holds after."""
    path, data = _config(tmp_path)
    gate = Gate(data, storage=storage_url)
    try:
        gate.customers.grant_credits(customer, "ai_credits", BALANCE, idempotency_key=customer)
        log: list[str] = []
        with (
            uvicorn_process(storage_url, path, log) as a,
            uvicorn_process(storage_url, path, log) as b,
        ):
            seen = asyncio.run(_burst([a, b], customer, costs))
        statuses = Tally(status for _, status in seen)
        assert set(statuses) <= {200 + c for c in range(1, 8)} | {402}, (statuses, "".join(log))
        spent = sum(cost for cost, status in seen if status != 402)
        shown = gate.customers.credits(customer, feature="ai_credits")["ai_credits"]
        shown["ledger"] = gate.customers.ledger(customer, "ai_credits", limit=500)["entries"]
        return spent, shown
    finally:
        gate.storage.close()


def _check(spent: int, shown: dict, costs: list[int]) -> None:
    assert spent <= BALANCE
    assert shown["balance"] == BALANCE - spent >= 0
    assert shown["debt"] == 0
    burned = -sum(e["amount"] for e in shown["ledger"] if e["kind"] == "burn")
    assert burned == spent  # the ledger holds every burn, once
    if len(set(costs)) == 1:  # cost 1: every credit is spent, exactly
        assert spent == BALANCE


def test_two_processes_spend_a_balance_of_100_exactly(redis_server, tmp_path):
    costs = [1] * REQUESTS
    spent, shown = _spend(redis_server.url, tmp_path, "exact-one", costs)
    _check(spent, shown, costs)


def test_mixed_costs_never_overspend(redis_server, tmp_path):
    costs = [random.Random(i).randint(1, 7) for i in range(REQUESTS)]
    spent, shown = _spend(redis_server.url, tmp_path, "exact-mixed", costs)
    _check(spent, shown, costs)


@pytest.mark.cluster
def test_a_cluster_spends_exactly_too(redis_cluster, tmp_path):
    costs = [1] * REQUESTS
    spent, shown = _spend(redis_cluster.url, tmp_path, "exact-cluster", costs)
    _check(spent, shown, costs)
    mixed = [random.Random(i).randint(1, 7) for i in range(REQUESTS)]
    spent, shown = _spend(redis_cluster.url, tmp_path, "exact-cluster-mixed", mixed)
    _check(spent, shown, mixed)
