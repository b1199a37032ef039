"""docs/integration.md: a front end of one's own, built on plangate.integration."""

from __future__ import annotations

import asyncio

import pytest

from plangate import MemoryStorage
from plangate.integration import AsyncGate, Exchange, Gate, abegin, asettle, begin, settle
from tests.support import bearer, config


def _token(customer: str, plan: str) -> str:
    return bearer(customer, plan)["authorization"].removeprefix("Bearer ")


async def _handle(gate: AsyncGate, method: str, path: str, token: str, call_app):
    """The docs' example, as written there."""
    exchange = Exchange(method, path)
    answer = await abegin(gate, exchange, token)
    if answer is not None:
        return answer.status, answer.headers, answer.body
    decision = exchange.decision
    try:
        status, app_headers, body = await call_app(decision)
    except BaseException:
        exchange.finished(raised=True)
        await asettle(gate, exchange)
        raise
    headers = exchange.response_started(status, app_headers)
    headers += exchange.quota_headers()
    exchange.body_sent()
    exchange.finished()
    await asettle(gate, exchange)
    return status, headers, body


def _used(storage: MemoryStorage, customer: str, plan: str) -> int:
    result = Gate(config(), storage=storage).entitlements(_token(customer, plan))
    assert isinstance(result, dict)
    return result["meters"]["ai_tokens"]["limits"][0]["used"]


def test_the_documented_front_end_charges_what_the_response_reports():
    storage = MemoryStorage()
    gate = AsyncGate(config(), storage=storage)

    async def app(decision):
        return 200, [("x-usage-tokens", "42")], b"done"

    status, headers, _ = asyncio.run(
        _handle(gate, "POST", "/v1/completions", _token("acme", "pro"), app)
    )
    assert status == 200
    assert "x-usage-tokens" not in dict(headers)
    assert "ratelimit" in dict(headers)
    assert _used(storage, "acme", "pro") == 42


def test_the_documented_front_end_refunds_a_handler_that_raised():
    storage = MemoryStorage()
    gate = AsyncGate(config(), storage=storage)

    async def app(decision):
        raise RuntimeError("model crashed")

    with pytest.raises(RuntimeError, match="model crashed"):
        asyncio.run(_handle(gate, "POST", "/v1/completions", _token("acme", "pro"), app))
    assert _used(storage, "acme", "pro") == 0


def test_the_blocking_twins_decide_and_settle_the_same_way():
    storage = MemoryStorage()
    gate = Gate(config(), storage=storage)
    exchange = Exchange("POST", "/v1/completions")
    assert begin(gate, exchange, _token("acme", "pro")) is None
    exchange.response_started(500, [])
    exchange.finished()
    settle(gate, exchange)
    assert _used(storage, "acme", "pro") == 0  # a 500 under count: success is refunded


def test_a_denial_is_an_answer_and_no_body_for_head():
    gate = Gate(config(), storage=MemoryStorage())
    answer = begin(gate, Exchange("HEAD", "/v1/projects"), None)
    assert answer is not None
    assert answer.status == 401
    assert answer.body == b""
