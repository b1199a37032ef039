"""``decision_log:``: one JSON line per decision logged — every refusal by default, a sample
of the rest — through the ASGI middleware, WSGI and the gateway alike (they all decide
through the gate)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from plangate import Gate, MemoryStorage
from plangate.asgi import PlanGateMiddleware
from plangate.config import load_config
from plangate.errors import ConfigError
from tests.support import Clock, bearer, config, token

START = 1_800_000_000.0  # 2027-01-15T08:00:00Z


def logged(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_refusal_is_logged_with_why_and_the_quota(tmp_path: Path) -> None:
    target = tmp_path / "decisions.jsonl"
    gate = Gate(
        config(decision_log={"to": str(target)}), storage=MemoryStorage(), clock=Clock(START)
    )
    outcomes = [gate.check("GET", "/v1/projects", token("acme", "free")).allowed for _ in range(6)]
    gate.check("POST", "/v1/reports/7/export", token("acme", "free"))  # pro only: 402
    assert outcomes == [True] * 5 + [False]
    lines = logged(target)
    assert [line["reason"] for line in lines] == ["quota-exceeded", "feature-not-in-plan"]
    quota = lines[0]
    assert quota == {
        "time": "2027-01-15T08:00:00Z",
        "method": "GET",
        "path": "/v1/projects",
        "rule": "/v1/{rest:path}",
        "customer": "acme",
        "plan": "free",
        "decision": "deny",
        "status": 429,
        "reason": "quota-exceeded",
        "detail": quota["detail"],
        "remaining": {"api_calls-1m": 0},
        "policy": ["api_calls-1m"],
    }
    assert lines[1]["status"] == 402


def test_a_sample_of_allowed_decisions_and_shadow_refusals(tmp_path: Path) -> None:
    target = tmp_path / "decisions.jsonl"
    settings = config(decision_log={"to": str(target), "sample": 1.0}, mode="shadow")
    gate = Gate(settings, storage=MemoryStorage(), clock=Clock(START))
    for _ in range(6):
        assert gate.check("GET", "/v1/projects", token("acme", "free")).allowed
    gate.check("GET", "/v1/projects", token("acme", "free"), consume=False)  # explain: not logged
    lines = logged(target)
    assert [line["decision"] for line in lines] == ["allow"] * 5 + ["shadow-deny"]
    assert [line["remaining"]["api_calls-1m"] for line in lines] == [4, 3, 2, 1, 0, 0]


def test_without_refusals_and_sample_nothing_is_logged(tmp_path: Path) -> None:
    target = tmp_path / "decisions.jsonl"
    settings = config(decision_log={"to": str(target), "refusals": False})
    gate = Gate(settings, storage=MemoryStorage(), clock=Clock(START))
    for _ in range(7):
        gate.check("GET", "/v1/projects", token("acme", "free"))
    assert not target.exists()  # opened at the first line, and there was none


def test_the_middleware_logs_to_standard_output(capsys: pytest.CaptureFixture[str]) -> None:
    async def projects(request: Any) -> JSONResponse:
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/v1/projects", projects)])
    app.add_middleware(PlanGateMiddleware, config=config(decision_log={}))
    with TestClient(app) as client:
        statuses = [
            client.get("/v1/projects", headers=bearer("acme", "free")).status_code for _ in range(6)
        ]
        unauthenticated = client.get("/v1/projects").status_code
    assert statuses == [200] * 5 + [429]
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line["status"], line["customer"]) for line in lines] == [(429, "acme"), (401, None)]
    assert unauthenticated == 401


@pytest.mark.parametrize("sample", [-0.1, 1.5])
def test_a_sample_outside_0_to_1_is_refused(sample: float) -> None:
    with pytest.raises(ConfigError, match=r"decision_log\.sample"):
        load_config(config(decision_log={"sample": sample}))
