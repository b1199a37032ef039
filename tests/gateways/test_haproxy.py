"""plangate behind a real HAProxy 2.6 with Lua (adapters/gateways/haproxy), on loopback.

Each test renders the shipped haproxy.cfg with free ports (the literal addresses replaced),
starts ``haproxy -db`` in front of the echo upstream and ``plangate gateway``, and talks to it
with httpx. Usage commits travel as HAProxy's JSON access log over UDP; the tests wait for them
with ``wait_settled`` (an event in the service), never with sleeps.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from plangate.engine import PROBLEM_BASE
from tests.gateways.support import GATEWAYS, Plangate, Upstream, plangate, substituted, upstream
from tests.servers import free_port
from tests.support import bearer

SHIPPED = GATEWAYS / "haproxy"
HAPROXY = shutil.which("haproxy", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"]))
PROBLEM_JSON = "application/problem+json"


@contextlib.contextmanager
def haproxy(
    tmp_path: Path, *, plangate_port: int, log_port: int, upstream_port: int, fail: str = "closed"
) -> Iterator[str]:
    """The shipped config with free ports, run by a real ``haproxy -db``; yields its URL."""
    assert HAPROXY is not None, "haproxy is not installed (apt-get install haproxy)"
    port = free_port()
    text = (SHIPPED / "haproxy.cfg").read_text()
    replacements = {
        "127.0.0.1:8080": f"127.0.0.1:{port}",
        "127.0.0.1:8787": f"127.0.0.1:{plangate_port}",
        "127.0.0.1:9000": f"127.0.0.1:{upstream_port}",
        "127.0.0.1:5514": f"127.0.0.1:{log_port}",
        "/etc/haproxy/plangate.lua": str(SHIPPED / "plangate.lua"),
    }
    text = substituted(text, replacements, where="haproxy.cfg")
    active = "\n    http-request lua.plangate_check plangate fail-closed "
    assert text.count(active) == 1
    if fail == "open":
        text = text.replace(active, "\n    http-request lua.plangate_check plangate fail-open ")
    config = tmp_path / "haproxy.cfg"
    config.write_text(text)
    log = tmp_path / "haproxy.log"
    with log.open("w") as output:
        proc = subprocess.Popen(
            [HAPROXY, "-db", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_for_port(proc, port, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _wait_for_port(
    proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float = 20
) -> None:
    """HAProxy prints nothing when it is ready: wait until its port accepts a connection."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"haproxy exited ({proc.returncode}):\n{log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError as error:
            if time.monotonic() > deadline:
                output = log.read_text()
                raise RuntimeError(
                    f"haproxy not listening within {timeout} s:\n{output}"
                ) from error
            time.sleep(0.05)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[str, Plangate, Upstream]]:
    """HAProxy on a free port, in front of the echo upstream, asking a live plangate."""
    with (
        upstream() as api,
        plangate(tmp_path) as service,
        haproxy(
            tmp_path,
            plangate_port=service.port,
            log_port=service.log_port,
            upstream_port=api.port,
        ) as url,
    ):
        yield url, service, api


def _problem(response: httpx.Response, status: int, name: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    body = response.json()
    assert body["type"] == PROBLEM_BASE + name
    assert body["status"] == status
    return body


def test_allowed_request_reaches_the_upstream_with_the_customer(stack) -> None:
    url, service, api = stack
    with httpx.Client(base_url=url) as client:
        response = client.get("/v1/projects", headers=bearer("acme", "pro"))
        assert response.status_code == 200, response.text
        seen = api.requests[-1]
        assert seen["path"] == "/v1/projects"
        assert seen["x-plangate-customer"] == "acme"
        assert seen["x-plangate-plan"] == "pro"
        assert len(seen["x-plangate-reservation"]) >= 32
        assert seen["authorization"].startswith("Bearer ")  # the upstream still gets it
        # the quota headers of the allow response, on the client's response
        assert "api_calls" in response.headers["ratelimit-policy"]
        assert "api_calls" in response.headers["ratelimit"]
        assert service.wait_settled(1) == 1
        assert service.used("api_calls", "acme", "pro") == 1

        # the caller's own usage, answered by plangate through the gateway
        mine = client.get("/.plangate/entitlements", headers=bearer("acme", "pro"))
        assert mine.status_code == 200, mine.text
        assert mine.json()["meters"]["api_calls"]["limits"][0]["used"] == 1
        assert api.requests[-1]["path"] == "/v1/projects"  # not the upstream's business

        # a public route passes without a token and reserves nothing
        public = client.get("/health")
        assert public.status_code == 200
        assert "x-plangate-customer" not in api.requests[-1]


def test_402_reaches_the_client_as_problem_json(stack) -> None:
    url, _, api = stack
    with httpx.Client(base_url=url) as client:
        response = client.post("/v1/reports/r1/export", headers=bearer("acme", "free"))
    body = _problem(response, 402, "feature-not-in-plan")
    assert body["title"] == "Feature not in plan"
    assert api.requests == []  # the upstream never saw it


def test_429_reaches_the_client_as_problem_json_with_retry_after(stack) -> None:
    url, _, api = stack
    token = bearer("busy", "free")
    with httpx.Client(base_url=url) as client:
        for _ in range(5):  # free: 5 api_calls a minute
            assert client.get("/v1/projects", headers=token).status_code == 200
        response = client.get("/v1/projects", headers=token)
    _problem(response, 429, "quota-exceeded")
    assert int(response.headers["retry-after"]) > 0
    assert "api_calls" in response.headers["ratelimit"]
    assert len(api.requests) == 5


def test_spoofed_plangate_headers_are_ignored(stack) -> None:
    url, _, api = stack
    spoofed = {
        "X-Plangate-Customer": "victim",
        "x-PLANGATE-plan": "enterprise",
        "X-Plangate-Reservation": "0" * 32,
        "X-Plangate-Status": "200",
        "X-Plangate-Reason": "spoofed",
        "X-Plangate-Problem": "{}",
    }
    with httpx.Client(base_url=url) as client:
        response = client.get("/v1/projects", headers={**spoofed, **bearer("acme", "free")})
        assert response.status_code == 200, response.text
        seen = api.requests[-1]
        assert seen["x-plangate-customer"] == "acme"
        assert seen["x-plangate-plan"] == "free"
        assert seen["x-plangate-reservation"] != "0" * 32
        for name in ("x-plangate-status", "x-plangate-reason", "x-plangate-problem"):
            assert name not in seen

        # without a token the spoofed customer is not an identity: still 401
        anonymous = client.get("/v1/projects", headers=spoofed)
    _problem(anonymous, 401, "unauthenticated")
    assert len(api.requests) == 1


def test_upstream_5xx_refunds_the_reservation(stack) -> None:
    url, service, api = stack
    with httpx.Client(base_url=url) as client:
        response = client.get("/v1/status/500", headers=bearer("acme", "free"))
    assert response.status_code == 500
    assert "x-plangate-reservation" in api.requests[-1]
    assert service.wait_settled(1) == 1
    assert service.used("api_calls", "acme", "free") == 0


def test_usage_header_is_charged_after_the_upstream_answered(stack) -> None:
    url, service, api = stack
    with httpx.Client(base_url=url) as client:
        response = client.post(
            "/v1/completions?tokens=1234", headers=bearer("acme", "free"), json={"prompt": "hi"}
        )
    assert response.status_code == 200, response.text
    assert "x-usage-tokens" not in response.headers  # hidden from the client
    assert "x-plangate-reservation" in api.requests[-1]  # reserved before the upstream
    assert service.wait_settled(1) == 1
    assert service.used("ai_tokens", "acme", "free") == 1234


def test_upstream_down_refunds_the_reservation(tmp_path: Path) -> None:
    """HAProxy's own 503 (no upstream) is in the access log too: the estimate is refunded."""
    with (
        plangate(tmp_path) as service,
        haproxy(
            tmp_path,
            plangate_port=service.port,
            log_port=service.log_port,
            upstream_port=free_port(),  # nothing listens there
        ) as url,
    ):
        with httpx.Client(base_url=url, timeout=30) as client:
            response = client.get("/v1/projects", headers=bearer("acme", "free"))
        assert response.status_code == 503
        assert service.wait_settled(1) == 1
        assert service.used("api_calls", "acme", "free") == 0


@contextlib.contextmanager
def broken_plangate() -> Iterator[int]:
    """A plangate that is up (its /healthz answers) but fails: 500 on /check, as plangate
    does on a storage error. Yields its port."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            status = 200 if self.path == "/healthz" else 500
            self.send_response(status)
            self.send_header("content-type", "text/plain")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def unavailable_plangate(kind: str) -> Iterator[int]:
    """The port of a plangate that is ``down`` (nothing listens) or ``broken`` (500s)."""
    if kind == "down":
        yield free_port()
    else:
        with broken_plangate() as port:
            yield port


@pytest.mark.parametrize("kind", ["down", "broken"])
def test_fail_closed_when_plangate_is_unavailable(tmp_path: Path, kind: str) -> None:
    with (
        upstream() as api,
        unavailable_plangate(kind) as plangate_port,
        haproxy(
            tmp_path, plangate_port=plangate_port, log_port=free_port(), upstream_port=api.port
        ) as url,
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        response = client.get("/v1/projects", headers=bearer("acme", "free"))
    _problem(response, 503, "entitlements-unavailable")
    assert response.headers["retry-after"] == "5"
    assert api.requests == []


@pytest.mark.parametrize("kind", ["down", "broken"])
def test_fail_open_when_plangate_is_unavailable(tmp_path: Path, kind: str) -> None:
    with (
        upstream() as api,
        unavailable_plangate(kind) as plangate_port,
        haproxy(
            tmp_path,
            plangate_port=plangate_port,
            log_port=free_port(),
            upstream_port=api.port,
            fail="open",
        ) as url,
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        headers = {**bearer("acme", "free"), "X-Plangate-Customer": "victim"}
        response = client.get("/v1/projects", headers=headers)
    assert response.status_code == 200, response.text
    seen = api.requests[-1]
    assert seen["path"] == "/v1/projects"
    assert not any(name.startswith("x-plangate-") for name in seen)  # unchecked, unmetered
