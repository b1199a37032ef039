"""The units admitted during a real Redis outage and replayed once it is back, counted in
``plangate_outbox_replayed_units_total`` beside the outbox's depth."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from plangate import Gate
from plangate.storage import CircuitBreaker, ResilientStorage
from plangate.storage._redis import RedisStorage
from tests.observability.test_metrics import samples
from tests.servers import RedisServer
from tests.support import Clock, config, token

pytestmark = pytest.mark.redis


def test_replayed_units_are_counted_once_redis_is_back(server: RedisServer) -> None:
    clock = Clock()
    store = ResilientStorage(RedisStorage(server.url), breaker=CircuitBreaker(3, 1.0, clock=clock))
    settings = config()
    settings["features"]["api_calls"] = {"kind": "metered", "on_storage_error": "local"}
    gate = Gate(settings, storage=store)
    registry = CollectorRegistry()
    instrument_gate(gate, registry)

    def metric(name: str) -> float:
        return samples(generate_latest(registry).decode(), name).get((), 0.0)

    assert gate.check("GET", "/v1/projects", token("acme", "free")).problem is None
    server.kill()
    for _ in range(3):  # counted here during the outage
        assert gate.check("GET", "/v1/projects", token("acme", "free")).problem is None
    assert metric("plangate_outbox_records") == 1.0  # merged: one bucket
    assert metric("plangate_outbox_replayed_units_total") == 0.0
    server.start()
    clock.now += 2  # the breaker lets a probe through: it replays the outage first
    assert gate.check("GET", "/v1/projects", token("acme", "free")).problem is None
    assert metric("plangate_outbox_records") == 0.0
    assert metric("plangate_outbox_replayed_units_total") == 3.0
    store.close()


def instrument_gate(gate: Gate, registry: CollectorRegistry) -> None:
    from plangate.metrics import instrument

    instrument(gate, registry)
