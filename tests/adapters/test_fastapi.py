"""plangate_fastapi through FastAPI's own TestClient."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.testclient import TestClient

from plangate import Decision
from plangate.engine import PROBLEM_BASE
from plangate_fastapi import PlanGate, PlanGateDecision, requires
from tests.support import bearer, config

PROBLEM = "application/problem+json"


def make_app() -> FastAPI:
    app = FastAPI()
    PlanGate(app, config=config())

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/reports/{report_id}/export")
    def export(report_id: str, decision: PlanGateDecision) -> dict[str, str | None]:
        assert decision is not None
        return {"report": report_id, "customer": decision.customer}

    @app.get("/v1/projects")
    def projects(decision: PlanGateDecision) -> dict[str, object]:
        assert decision is not None
        return {"plan": decision.plan, "left": decision.remaining("api_calls")}

    # Routes that no rule of the config matches: their requirements are declared here.
    @app.post("/views/export", dependencies=[Depends(requires("export_reports"))])
    def view_export() -> dict[str, bool]:
        return {"exported": True}

    @app.post("/views/summarize")
    async def summarize(
        request: Request,
        decision: Annotated[Decision, Depends(requires(meters={"ai_tokens": 100}))],
    ) -> dict[str, int]:
        words = len((await request.body()).split())
        decision.record("ai_tokens", words * 10)
        return {"tokens": words * 10}

    return app


def test_a_feature_outside_the_plan_is_a_402_problem():
    response = TestClient(make_app()).post("/v1/reports/7/export", headers=bearer("acme", "free"))
    assert response.status_code == 402
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["type"] == PROBLEM_BASE + "feature-not-in-plan"
    assert response.json()["feature"] == "export_reports"


def test_a_feature_inside_the_plan_reaches_the_handler_with_the_decision():
    response = TestClient(make_app()).post("/v1/reports/7/export", headers=bearer("acme", "pro"))
    assert response.status_code == 200
    assert response.json() == {"report": "7", "customer": "acme"}


def test_no_token_is_401():
    response = TestClient(make_app()).get("/v1/projects")
    assert response.status_code == 401
    assert response.json()["type"] == PROBLEM_BASE + "unauthenticated"


def test_a_public_route_needs_no_token():
    assert TestClient(make_app()).get("/health").json() == {"status": "ok"}


def test_a_quota_of_five_then_429_with_retry_after():
    client = TestClient(make_app())
    lefts = [client.get("/v1/projects", headers=bearer()).json()["left"] for _ in range(5)]
    assert lefts == [4, 3, 2, 1, 0]
    refused = client.get("/v1/projects", headers=bearer())
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["violated-policies"] == ["api_calls-1m"]


def test_a_requirement_declared_on_the_operation():
    client = TestClient(make_app())
    denied = client.post("/views/export", headers=bearer("acme", "free"))
    assert denied.status_code == 402
    assert denied.headers["content-type"] == PROBLEM
    assert denied.json()["feature"] == "export_reports"
    assert client.post("/views/export", headers=bearer("acme", "pro")).json() == {"exported": True}
    assert client.post("/views/export").status_code == 401


def test_usage_recorded_by_the_handler_is_charged():
    client = TestClient(make_app())
    response = client.post("/views/summarize", headers=bearer(), content=b"one two three")
    assert response.json() == {"tokens": 30}
    assert (
        response.headers["ratelimit-policy"]
        == '"ai_tokens-month";q=10000;w='
        + (response.headers["ratelimit-policy"].rsplit("w=", 1)[1])
    )
    body = client.get("/.plangate/entitlements", headers=bearer()).json()
    assert body["meters"]["ai_tokens"]["limits"][0]["used"] == 30


def test_the_openapi_schema_documents_plangates_responses():
    schema = TestClient(make_app()).get("/openapi.json").json()
    export = schema["paths"]["/v1/reports/{report_id}/export"]["post"]["responses"]
    assert export["402"]["content"]["application/problem+json"]["schema"] == {
        "$ref": "#/components/schemas/Problem"
    }
    assert {"401", "402", "429"} <= set(export)
    assert "Retry-After" in export["429"]["headers"]
    declared = schema["paths"]["/views/export"]["post"]["responses"]
    assert "402" in declared
    assert "429" not in declared  # it meters nothing
    assert "402" not in schema["paths"]["/health"]["get"]["responses"]
    assert "violated-policies" in schema["components"]["schemas"]["Problem"]["properties"]


def test_the_openapi_schema_has_the_bearer_scheme_on_gated_operations():
    schema = TestClient(make_app()).get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["plangate"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
    }
    assert schema["paths"]["/v1/projects"]["get"]["security"] == [{"plangate": []}]
    assert schema["paths"]["/views/export"]["post"]["security"] == [{"plangate": []}]
    assert "security" not in schema["paths"]["/health"]["get"]


def test_a_token_in_a_cookie_is_an_api_key_scheme():
    app = FastAPI()
    cfg = config()
    PlanGate(app, config={**cfg, "identity": {**cfg["identity"], "token_from": "cookie:session"}})

    @app.get("/v1/projects")
    def projects() -> dict[str, str]:
        return {}

    schema = TestClient(app).get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["plangate"] == {
        "type": "apiKey",
        "in": "cookie",
        "name": "session",
    }


def test_a_reloaded_config_rebuilds_the_openapi_schema():
    import yaml

    app = FastAPI()
    cfg = config()
    plangate = PlanGate(app, config=cfg)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {}

    client = TestClient(app)
    assert "security" not in client.get("/openapi.json").json()["paths"]["/health"]["get"]
    gated = {**cfg, "routes": [{"match": "GET /health", "meters": {"api_calls": 1}}]}
    assert plangate.gate.reload(yaml.safe_dump(gated).encode()).changed
    operation = client.get("/openapi.json").json()["paths"]["/health"]["get"]
    assert operation["security"] == [{"plangate": []}]
    assert "429" in operation["responses"]
