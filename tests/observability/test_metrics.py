"""Prometheus metrics: the page parsed with ``prometheus_client.parser`` and its numbers
checked against the requests sent (a gate of its own registry; the gateway's /metrics)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from plangate import Gate, MemoryStorage
from plangate.gateway import GatewayService
from plangate.metrics import instrument
from plangate.storage import Storage
from tests.gateways.support import gateway_config
from tests.support import Clock, bearer, config, token

START = 1_800_000_000.0


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Each sample of the metric ``name`` (``_total``, ``_count`` … included) by its labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def test_decisions_storage_calls_and_gauges_are_counted(storage: Storage) -> None:
    registry = CollectorRegistry()
    gate = Gate(config(), storage=storage, clock=Clock(START))
    instrument(gate, registry)
    for _ in range(6):
        gate.check("GET", "/v1/projects", token("acme", "free"))  # 5 a minute
    gate.check("POST", "/v1/reports/7/export", token("acme", "free"))  # pro only
    gate.check("GET", "/v1/projects", token("acme", "free"), consume=False)  # explain: not counted
    text = generate_latest(registry).decode()
    decisions = samples(text, "plangate_decisions_total")
    rest = {"rule": "/v1/{rest:path}", "feature": "", "plan": "free"}
    assert decisions == {
        tuple(sorted({**rest, "outcome": "allow", "reason": ""}.items())): 5.0,
        tuple(sorted({**rest, "outcome": "deny", "reason": "quota-exceeded"}.items())): 1.0,
        tuple(
            sorted(
                {
                    "rule": "POST /v1/reports/{report_id}/export",
                    "feature": "export_reports",
                    "plan": "free",
                    "outcome": "deny",
                    "reason": "feature-not-in-plan",
                }.items()
            )
        ): 1.0,
    }
    counts = samples(text, "plangate_storage_call_duration_seconds_count")
    assert counts[(("operation", "reserve"),)] == 6.0  # the 402 reserved nothing
    assert samples(text, "plangate_storage_breaker_open") == {(): 0.0}
    assert samples(text, "plangate_outbox_records") == {(): 0.0}


def test_shadow_refusals_are_counted_by_limit() -> None:
    registry = CollectorRegistry()
    settings = config()
    settings["plans"]["free"]["features"]["api_calls"] = [
        {"limit": 5, "window": "1m"},
        {"limit": 2, "window": "1h", "mode": "shadow"},
    ]
    gate = Gate(settings, storage=MemoryStorage(), clock=Clock(START))
    instrument(gate, registry)
    for _ in range(4):
        gate.check("GET", "/v1/projects", token("acme", "free"))
    shadow = samples(generate_latest(registry).decode(), "plangate_shadow_refusals_total")
    key = (("plan", "free"), ("policy", "api_calls-1h"), ("rule", "/v1/{rest:path}"))
    assert shadow == {key: 2.0}


def test_the_gateway_serves_them(tmp_path: Any) -> None:
    with TestClient(GatewayService(gateway_config())) as client:
        before = samples(client.get("/metrics").text, "plangate_decisions_total")
        for _ in range(3):
            client.get("/check/v1/projects", headers=bearer("acme", "free"))
        page = client.get("/metrics")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/plain")
    after = samples(page.text, "plangate_decisions_total")
    allowed = tuple(
        sorted(
            {"rule": "/v1/{rest:path}", "feature": "", "plan": "free", "outcome": "allow",
             "reason": ""}.items()
        )
    )  # fmt: skip
    assert after[allowed] - before.get(allowed, 0.0) == 3.0


def test_an_async_gate_on_memory_times_each_call_once() -> None:
    import asyncio

    from plangate import AsyncGate

    registry = CollectorRegistry()
    gate = AsyncGate(config(), storage=MemoryStorage(), clock=Clock(START))
    instrument(gate, registry)

    async def checks() -> None:
        for _ in range(3):
            await gate.check("GET", "/v1/projects", token("acme", "free"))

    asyncio.run(checks())
    counts = samples(
        generate_latest(registry).decode(), "plangate_storage_call_duration_seconds_count"
    )
    assert counts[(("operation", "reserve"),)] == 3.0


def test_metrics_answers_without_a_redirect() -> None:
    with TestClient(GatewayService(gateway_config())) as client:
        page = client.get("/metrics", follow_redirects=False)
    assert page.status_code == 200


def test_customer_reads_are_counted_from_the_cache_or_the_store(storage: Storage) -> None:
    from plangate.engine import CustomerRecord

    if storage.in_process:  # memory:// reads its records directly: no cache to count
        storage = MemoryStorage()
        storage.customer_cache_ttl = 60.0  # a cache in front of it, as Redis has
    registry = CollectorRegistry()
    storage.put_customer(CustomerRecord("acme", plan="pro"))
    gate = Gate(config(), storage=storage, clock=Clock(START))
    instrument(gate, registry)
    for _ in range(3):
        gate.check("GET", "/v1/projects", token("acme"))
    reads = samples(generate_latest(registry).decode(), "plangate_customer_cache_reads_total")
    assert reads == {(("result", "miss"),): 1.0, (("result", "hit"),): 2.0}
