"""Building the admin API: mounted in an ASGI app, from a config, or for ``uvicorn --factory``
beside a WSGI project; the token never shown."""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from plangate import AsyncGate, MemoryStorage
from plangate.admin import TITLES, AdminAPI, from_environment
from plangate.asgi import PlanGateMiddleware
from plangate.engine import PROBLEM_BASE
from plangate_fastapi import PlanGate
from tests.admin.support import AUTH, PROBLEM, TOKEN, admin, admin_config, mounted
from tests.servers import free_port, ready_process
from tests.support import bearer

ROOT = Path(__file__).parents[2]
DOCS = ROOT / "docs"


def test_the_api_mounts_in_fastapi():
    app = FastAPI()
    app.mount("/admin", AdminAPI(AsyncGate(admin_config(), storage=MemoryStorage())))
    with TestClient(app, headers=AUTH) as client:
        put = client.put("/admin/customers/acme", json={"plan": "pro"})
        got = client.get("/admin/customers/acme")
    assert put.status_code == got.status_code == 200
    assert got.json()["entitlements"]["plan"] == "pro"


def test_in_fastapi_with_unmatched_deny_a_public_rule_lets_the_api_through():
    routes = [{"match": "/admin/{rest:path}", "public": True}, *admin_config()["routes"]]
    app = FastAPI()
    plangate = PlanGate(app, config=admin_config(unmatched="deny", routes=routes))
    app.mount("/admin", AdminAPI(plangate.gate))
    with TestClient(app, headers=AUTH) as client:
        response = client.put("/admin/customers/acme", json={"plan": "pro"})
    assert response.status_code == 200
    assert "ratelimit" not in response.headers  # not metered


def test_beside_the_middleware_a_change_decides_the_apis_next_request():
    async def export(request: Request) -> JSONResponse:
        return JSONResponse({"plan": request.state.plangate.plan})

    gate = AsyncGate(admin_config(), storage=MemoryStorage())
    api = Starlette(routes=[Route("/v1/reports/{report_id}/export", export, methods=["POST"])])
    app = Starlette(
        routes=[
            Mount("/admin", app=AdminAPI(gate)),
            Mount("", app=PlanGateMiddleware(api, gate.config, gate=gate)),
        ]
    )
    with TestClient(app) as client:
        before = client.post("/v1/reports/7/export", headers=bearer("acme"))
        client.patch("/admin/customers/acme", json={"plan": "pro"}, headers=AUTH)
        after = client.post("/v1/reports/7/export", headers=bearer("acme"))
    assert before.status_code == 402
    assert after.status_code == 200
    assert after.json() == {"plan": "pro"}


def test_the_api_mounts_under_any_prefix():
    api = AdminAPI(AsyncGate(admin_config(), storage=MemoryStorage()))
    app = Starlette(routes=[Mount("/internal/billing-admin", app=api)])
    with TestClient(app, headers=AUTH) as client:
        response = client.put("/internal/billing-admin/customers/a%2Fb", json={"plan": "pro"})
    assert response.json()["customer"] == "a/b"


def test_the_app_shares_the_gate_of_the_middleware():
    gate = AsyncGate(admin_config(), storage=MemoryStorage())
    with TestClient(mounted(AdminAPI(gate)), headers=AUTH) as client:
        client.put("/admin/customers/acme", json={"plan": "pro"})
    assert gate.storage.get_customer("acme").plan == "pro"


def test_from_config_builds_the_api_on_a_gate_of_its_own():
    storage = MemoryStorage()
    api = AdminAPI.from_config(admin_config(), storage)
    with TestClient(mounted(api), headers=AUTH) as client:
        response = client.put("/admin/customers/acme", json={"plan": "pro"})
    assert response.status_code == 200
    assert api.gate.storage is storage
    assert api.enabled


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "plangate.yaml"
    body = admin_config(admin={"token": "${PLANGATE_ADMIN_TOKEN}"})
    path.write_text(yaml.safe_dump(body), encoding="utf-8")
    return path


def test_from_environment_serves_the_api_under_admin(tmp_path, monkeypatch):
    monkeypatch.setenv("PLANGATE_CONFIG", str(write_config(tmp_path)))
    monkeypatch.setenv("PLANGATE_ADMIN_TOKEN", TOKEN)
    monkeypatch.delenv("PLANGATE_STORAGE", raising=False)
    with TestClient(from_environment(), headers=AUTH) as client:  # with its lifespan
        put = client.put("/admin/customers/acme", json={"plan": "pro"})
        outside = client.get("/customers/acme")
    assert put.status_code == 200
    assert outside.status_code == 404
    assert outside.headers["content-type"] == PROBLEM


def test_from_environment_needs_plangate_config(monkeypatch):
    monkeypatch.delenv("PLANGATE_CONFIG", raising=False)
    with pytest.raises(RuntimeError, match="PLANGATE_CONFIG"):
        from_environment()


def test_uvicorn_runs_the_factory_beside_a_wsgi_project(tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "PLANGATE_CONFIG": str(write_config(tmp_path)),
        "PLANGATE_ADMIN_TOKEN": TOKEN,
    }
    env.pop("PLANGATE_STORAGE", None)
    command = [
        *(sys.executable, "-m", "uvicorn", "--factory", "plangate.admin:from_environment"),
        *("--host", "127.0.0.1", "--port", str(port)),
    ]
    log: list[str] = []
    with (
        ready_process(command, "Uvicorn running on", cwd=ROOT, env=env, log=log),
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client,
    ):
        put = client.put("/admin/customers/acme", json={"plan": "pro"}, headers=AUTH)
        refused = client.get("/admin/customers/acme")
    assert put.status_code == 200
    assert put.json()["entitlements"]["plan"] == "pro"
    assert refused.status_code == 401
    assert TOKEN not in "".join(log)


def test_the_token_is_never_logged_nor_shown(caplog):
    caplog.set_level(logging.DEBUG)
    with admin() as client:
        client.put("/admin/customers/acme", json={"plan": "pro"})
        client.patch("/admin/customers/acme", json={"plan": "platinum"})
        client.get("/admin/customers/acme", headers={"authorization": "Bearer wrong"})
        client.post("/admin/plans/migrate", json={"from": "pro", "to": "free"})
        client.delete("/admin/customers/acme")
    api = AdminAPI(AsyncGate(admin_config(), storage=MemoryStorage()))
    assert TOKEN not in caplog.text
    assert TOKEN not in repr(api)


def test_writes_are_logged_for_the_audit_trail(caplog):
    caplog.set_level(logging.INFO, logger="plangate.admin")
    with admin() as client:
        client.put("/admin/customers/acme", json={"plan": "pro"})
        client.delete("/admin/customers/acme")
    assert [record.getMessage() for record in caplog.records] == [
        "admin: customer 'acme' written (PUT), version 1",
        "admin: customer 'acme' deleted",
    ]


# the docs keep up ----------------------------------------------------------------------------


def test_the_admin_page_documents_every_problem_type_with_its_status_and_title():
    text = (DOCS / "admin.md").read_text(encoding="utf-8")
    for name, (status, title) in TITLES.items():
        rows = [
            line
            for line in text.splitlines()
            if line.startswith("|") and f"`{PROBLEM_BASE}{name}`" in line
        ]
        assert rows, f"docs/admin.md: no table row with the type URI {PROBLEM_BASE}{name}"
        assert any(f"| {status} |" in row and title in row for row in rows), name


def test_the_admin_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    assert re.search(r"^\s+- .+: admin\.md$", nav, re.MULTILINE)
