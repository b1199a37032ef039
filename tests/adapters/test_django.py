"""plangate_django through Django's own test clients: sync (WSGI) and async (ASGI)."""

from __future__ import annotations

import asyncio
import io

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from plangate.engine import PROBLEM_BASE
from tests.support import REFERENCE, bearer, configure_django

configure_django()

from django.test import AsyncClient, Client  # noqa: E402 - needs configured settings

PROBLEM = "application/problem+json"


def _auth(customer: str = "acme", plan: str | None = None) -> dict[str, dict[str, str]]:
    return {"headers": bearer(customer, plan)}


def test_a_feature_outside_the_plan_is_a_402_problem():
    response = Client().post("/v1/reports/7/export", **_auth("acme", "free"))
    assert response.status_code == 402
    assert response["Content-Type"] == PROBLEM
    assert response.json()["type"] == PROBLEM_BASE + "feature-not-in-plan"


def test_a_feature_inside_the_plan_reaches_the_view_with_request_plangate():
    response = Client().post("/v1/reports/7/export", **_auth("acme", "pro"))
    assert response.status_code == 200
    assert response.json() == {"report": "7", "customer": "acme"}


def test_no_token_is_401():
    response = Client().get("/v1/projects")
    assert response.status_code == 401
    assert response.json()["type"] == PROBLEM_BASE + "unauthenticated"


def test_a_public_route_needs_no_token():
    assert Client().get("/health").json() == {"status": "ok"}


def test_a_quota_of_five_then_429_with_retry_after_on_a_sync_view():
    client = Client()
    lefts = [client.get("/v1/projects", **_auth()).json()["left"] for _ in range(5)]
    assert lefts == [4, 3, 2, 1, 0]
    refused = client.get("/v1/projects", **_auth())
    assert refused.status_code == 429
    assert int(refused["Retry-After"]) >= 1
    assert refused["RateLimit-Policy"] == '"api_calls-1m";q=5;w=60'


def test_a_quota_of_five_then_429_on_an_async_view_under_asgi():
    async def run() -> tuple[list[int], int]:
        client = AsyncClient()
        lefts = []
        for _ in range(5):
            response = await client.get("/v1/async-projects", **_auth())
            lefts.append(response.json()["left"])
        refused = await client.get("/v1/async-projects", **_auth())
        return lefts, refused.status_code

    assert asyncio.run(run()) == ([4, 3, 2, 1, 0], 429)


def test_a_requirement_declared_on_the_view():
    client = Client()
    denied = client.post("/views/export", **_auth("acme", "free"))
    assert denied.status_code == 402
    assert denied.json()["feature"] == "export_reports"
    allowed = client.post("/views/export", **_auth("acme", "pro"))
    assert allowed.json() == {"exported": True, "plan": "pro"}


def test_usage_recorded_by_a_sync_view_is_charged():
    client = Client()
    response = client.post(
        "/views/summarize", data=b"one two three", content_type="text/plain", **_auth()
    )
    assert response.json() == {"tokens": 30}
    assert "RateLimit" in response
    body = client.get("/.plangate/entitlements", **_auth()).json()
    assert body["meters"]["ai_tokens"]["limits"][0]["used"] == 30


def test_usage_recorded_by_an_async_view_under_asgi_is_charged():
    async def run() -> tuple[dict, int]:
        client = AsyncClient()
        response = await client.post(
            "/views/async-summarize",
            data={"prompt": "write a haiku please"},
            content_type="application/json",
            **_auth(),
        )
        body = (await client.get("/.plangate/entitlements", **_auth())).json()
        return response.json(), body["meters"]["ai_tokens"]["limits"][0]["used"]

    assert asyncio.run(run()) == ({"tokens": 40}, 40)


def test_a_streamed_response_is_charged_once_it_has_been_sent():
    client = Client()
    response = client.post("/views/stream", **_auth())
    assert b"".join(response.streaming_content) == b"once upon a time"
    body = client.get("/.plangate/entitlements", **_auth()).json()
    assert body["meters"]["ai_tokens"]["limits"][0]["used"] == 1234


def test_client_supplied_plangate_headers_never_reach_the_view():
    spoofed = {"X-Plangate-Customer": "victim-org", "X-Plangate-Plan": "enterprise"}
    response = Client().get("/v1/headers", headers={**bearer(), **spoofed})
    assert response.json() == {}


def test_manage_py_plangate_check():
    out = io.StringIO()
    call_command("plangate_check", str(REFERENCE), stdout=out)
    assert "ok — 5 features, 4 plans, 4 routes" in out.getvalue()
    with pytest.raises(CommandError, match="cannot read"):
        call_command("plangate_check", "no-such-plangate.yaml")
