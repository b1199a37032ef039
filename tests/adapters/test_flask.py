"""plangate_flask through Flask's own test client."""

from __future__ import annotations

import pytest
from flask import Flask, g, request

from plangate.engine import PROBLEM_BASE
from plangate_flask import PlanGate
from tests.support import bearer, config

PROBLEM = "application/problem+json"


def make_app(**settings) -> Flask:
    app = Flask(__name__)
    app.config["PLANGATE_CONFIG"] = config()
    app.config.update(settings)
    gate = PlanGate()
    gate.init_app(app)

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.post("/v1/reports/<report_id>/export")
    def export(report_id):
        return {"report": report_id, "customer": g.plangate.customer}

    @app.get("/v1/projects")
    def projects():
        return {"plan": g.plangate.plan, "left": g.plangate.remaining("api_calls")}

    # Routes that no rule of the config matches: their requirements are declared here.
    @app.post("/views/export")
    @gate.requires("export_reports")
    def view_export():
        return {"exported": True, "plan": g.plangate.plan}

    @app.post("/views/summarize")
    @gate.requires(meters={"ai_tokens": 100})
    def summarize():
        tokens = 10 * len(request.get_data().split())
        g.plangate.record("ai_tokens", tokens)
        return {"tokens": tokens}

    @app.post("/views/async-summarize")
    @gate.requires(meters={"ai_tokens": 100})
    async def async_summarize():
        g.plangate.record("ai_tokens", 7)
        return {"tokens": 7}

    return app


def test_a_feature_outside_the_plan_is_a_402_problem():
    response = make_app().test_client().post("/v1/reports/7/export", headers=bearer("acme", "free"))
    assert response.status_code == 402
    assert response.content_type == PROBLEM
    assert response.json["type"] == PROBLEM_BASE + "feature-not-in-plan"
    assert response.json["plan"] == "free"


def test_a_feature_inside_the_plan_reaches_the_view_with_g_plangate():
    response = make_app().test_client().post("/v1/reports/7/export", headers=bearer("acme", "pro"))
    assert response.status_code == 200
    assert response.json == {"report": "7", "customer": "acme"}


def test_no_token_is_401():
    response = make_app().test_client().get("/v1/projects")
    assert response.status_code == 401
    assert response.json["type"] == PROBLEM_BASE + "unauthenticated"


def test_a_public_route_needs_no_token():
    assert make_app().test_client().get("/health").json == {"status": "ok"}


def test_a_quota_of_five_then_429_with_retry_after():
    client = make_app().test_client()
    lefts = [client.get("/v1/projects", headers=bearer()).json["left"] for _ in range(5)]
    assert lefts == [4, 3, 2, 1, 0]
    refused = client.get("/v1/projects", headers=bearer())
    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) >= 1


def test_a_requirement_declared_on_the_view():
    client = make_app().test_client()
    denied = client.post("/views/export", headers=bearer("acme", "free"))
    assert denied.status_code == 402
    assert denied.json["feature"] == "export_reports"
    allowed = client.post("/views/export", headers=bearer("acme", "pro"))
    assert allowed.json == {"exported": True, "plan": "pro"}


@pytest.mark.parametrize(
    ("path", "tokens"), [("/views/summarize", 30), ("/views/async-summarize", 7)]
)
def test_usage_recorded_by_the_view_is_charged(path, tokens):
    client = make_app().test_client()
    response = client.post(path, headers=bearer(), data=b"one two three")
    assert response.json == {"tokens": tokens}
    assert "RateLimit" in response.headers
    body = client.get("/.plangate/entitlements", headers=bearer()).json
    assert body["meters"]["ai_tokens"]["limits"][0]["used"] == tokens


def test_settings_come_from_app_config():
    app = make_app(PLANGATE_ENTITLEMENTS_PATH="/me/plan", PLANGATE_STORAGE="memory://")
    assert app.test_client().get("/me/plan", headers=bearer()).json["plan"] == "free"


def test_a_missing_config_says_what_to_set():
    with pytest.raises(RuntimeError, match="PLANGATE_CONFIG"):
        PlanGate(Flask(__name__))
