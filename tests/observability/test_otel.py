"""OpenTelemetry: a decision made while a span records lands on it as ``entitlement.*``
attributes and an event (the SDK's in-memory exporter; plangate uses the API only)."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from plangate import Gate, MemoryStorage
from plangate.otel import instrument
from tests.support import Clock, config, token

START = 1_800_000_000.0


@pytest.fixture
def spans() -> tuple[InMemorySpanExporter, TracerProvider]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter, provider


def test_the_current_span_gets_the_decision(
    spans: tuple[InMemorySpanExporter, TracerProvider],
) -> None:
    exporter, provider = spans
    tracer = provider.get_tracer("the-app")
    gate = Gate(config(), storage=MemoryStorage(), clock=Clock(START))
    instrument(gate)
    for _ in range(5):
        gate.check("GET", "/v1/projects", token("acme", "free"))
    with tracer.start_as_current_span("GET /v1/projects"):
        gate.check("GET", "/v1/projects", token("acme", "free"))  # the 6th: 429
    with tracer.start_as_current_span("POST /v1/chat"):
        gate.check("POST", "/v1/chat", token("acme", "pro"))
    refused, allowed = exporter.get_finished_spans()
    assert dict(refused.attributes or {}) == {
        "entitlement.decision": "deny",
        "entitlement.customer": "acme",
        "entitlement.plan": "free",
        "entitlement.rule": "/v1/{rest:path}",
        "entitlement.reason": "quota-exceeded",
        "entitlement.policies": ("api_calls-1m",),
    }
    (event,) = refused.events
    assert event.name == "entitlement.decision"
    assert dict(allowed.attributes or {})["entitlement.decision"] == "allow"
    assert "entitlement.reason" not in dict(allowed.attributes or {})


def test_without_a_recording_span_nothing_happens() -> None:
    gate = Gate(config(), storage=MemoryStorage(), clock=Clock(START))
    instrument(gate)
    instrument(gate)  # once is enough
    assert gate.observers.count(gate.observers[-1]) == 1
    assert gate.check("GET", "/v1/projects", token("acme", "free")).allowed
