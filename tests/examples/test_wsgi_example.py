"""The WSGI example (examples/wsgi) behaves as its README says."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import httpx
import pytest
from werkzeug.test import Client

from plangate.cli import mint_token
from plangate.config import load_config
from tests.support import load_module

EXAMPLE = Path(__file__).parents[2] / "examples" / "wsgi"


def load_example() -> ModuleType:
    return load_module(EXAMPLE / "app.py", "wsgi_example")


@pytest.fixture
def example(monkeypatch) -> ModuleType:
    monkeypatch.delenv("PLANGATE_JWT_SECRET", raising=False)
    monkeypatch.delenv("PLANGATE_STORAGE", raising=False)
    return load_example()


@pytest.fixture
def client(example) -> Client:
    return Client(example.create_app())  # a fresh memory store per test


def bearer(plan: str, customer: str = "acme") -> dict[str, str]:
    config = load_config(EXAMPLE / "plangate.yaml")
    return {"Authorization": f"Bearer {mint_token(config, customer, plan)}"}


def test_health_is_public(client):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_a_metered_route_needs_a_token(client):
    response = client.get("/projects")
    assert response.status_code == 401
    assert response.mimetype == "application/problem+json"


def test_the_boolean_feature_is_refused_on_free_with_a_problem(client):
    response = client.post("/reports/1/export", headers=bearer("free"))
    assert response.status_code == 402
    assert response.mimetype == "application/problem+json"
    problem = response.get_json()
    assert problem["status"] == 402
    assert problem["feature"] == "export_reports"
    assert problem["plan"] == "free"
    assert problem["upgrade_url"] == "https://example.com/pricing"


def test_the_boolean_feature_is_granted_on_pro(client):
    response = client.post("/reports/1/export", headers=bearer("pro"))
    assert response.status_code == 200
    assert response.get_json() == {"report": "1", "status": "exporting"}


def test_the_handler_reads_the_decision(client):
    body = client.get("/projects", headers=bearer("free")).get_json()
    assert body == {"plan": "free", "max_projects": 3, "calls_left": 4}
    assert client.get("/projects", headers=bearer("pro")).get_json()["max_projects"] == 50


def test_free_allows_five_calls_then_429_with_retry_after(client):
    free = bearer("free")
    for left in (4, 3, 2, 1, 0):
        response = client.get("/projects", headers=free)
        assert response.status_code == 200
        # reading the body sends it, as a server would: plangate settles the call then
        assert response.get_json()["calls_left"] == left
        assert response.headers["RateLimit"].startswith(f'"api_calls-10s";r={left};')
    refused = client.get("/projects", headers=free)
    assert refused.status_code == 429
    assert refused.mimetype == "application/problem+json"
    # the window slides in 1/20 steps: capacity returns within 10.5 s, never early
    assert 1 <= int(refused.headers["Retry-After"]) <= 11
    problem = refused.get_json()
    assert problem["plan"] == "free"
    assert problem["violated-policies"] == ["api_calls-10s"]
    # another customer on the same plan has its own quota
    assert client.get("/projects", headers=bearer("free", "globex")).status_code == 200


def test_the_ai_endpoint_charges_what_the_handler_records(client):
    free = bearer("free")
    response = client.post("/summarize", headers=free, data="a long text to summarize")
    assert response.status_code == 200
    assert response.get_json() == {"summary": "a long text to summarize", "tokens": 5}
    usage = client.get("/.plangate/entitlements", headers=free).get_json()
    ai_tokens = usage["meters"]["ai_tokens"]["limits"][0]
    assert ai_tokens["used"] == 5  # the recorded amount, not the 500 reserved
    assert usage["meters"]["api_calls"]["limits"][0]["used"] == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_example_runs_as_a_script():
    port = _free_port()
    env = {
        k: v for k, v in os.environ.items() if k not in ("PLANGATE_JWT_SECRET", "PLANGATE_STORAGE")
    }
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLE / "app.py"), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:  # blocks until the example says it is listening
            lines.append(line)
            if line.startswith("Serving on http://"):
                break
        assert lines, "the example exited without output"
        assert lines[-1].strip() == f"Serving on http://127.0.0.1:{port}", lines
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            response = http.get("/projects", headers=bearer("pro"))
        assert response.status_code == 200
        assert response.json()["plan"] == "pro"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_a_refused_head_has_no_body_so_waitress_keeps_the_connection_sound(example):
    """RFC 9110 §9.3.2: waitress sends whatever body the app returns for HEAD, and the next
    response on the keep-alive connection would be read from the middle of it."""
    import http.client
    import threading

    from waitress.server import create_server

    server = create_server(example.create_app(), host="127.0.0.1", port=0, threads=2)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        connection = http.client.HTTPConnection("127.0.0.1", server.effective_port, timeout=10)
        connection.request("HEAD", "/projects")  # no token: 401
        refused = connection.getresponse()
        assert refused.status == 401
        assert refused.read() == b""
        connection.request("GET", "/health")  # the same connection
        healthy = connection.getresponse()
        assert healthy.status == 200
        assert json.loads(healthy.read()) == {"status": "ok"}
        connection.close()
    finally:
        # closed from waitress's own loop thread, which then ends
        server.trigger.pull_trigger(lambda: [c.close() for c in list(server._map.values())])
        thread.join(timeout=10)
        server.task_dispatcher.shutdown()
