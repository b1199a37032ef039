"""nginx (auth_request) in front of an upstream, plangate deciding: live, on 127.0.0.1.

Each test starts the real nginx with a shipped config of adapters/gateways/nginx/ (its literal
addresses replaced by free ports), ``plangate gateway`` and the echo upstream of support.py.
The behaviour tests run with both variants (fail-closed and fail-open): they differ only in
what happens when plangate cannot be reached, which the last tests check.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from plangate.engine import PROBLEM_BASE
from tests.gateways.support import GATEWAYS, Plangate, Upstream, plangate, substituted, upstream
from tests.servers import drain, free_port
from tests.support import bearer

CONFIGS = GATEWAYS / "nginx"
FAIL_CLOSED = "nginx.conf"
FAIL_OPEN = "nginx-fail-open.conf"
PROBLEM = "application/problem+json"
RESERVATION = re.compile(r"[0-9a-f]{32}")
#: nginx's master logs this once its listening sockets are open
READY = "start worker processes"


def nginx_binary() -> str:
    """The nginx executable. Missing, the test fails: these tests are the proof of the config."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    assert found, "nginx is not installed (Debian: apt-get install nginx)"
    return found


def render(name: str, *, port: int, plangate_port: int, upstream_port: int, log_port: int) -> str:
    """A shipped config with its literal addresses replaced by the test's ports."""
    ports = {"8080": port, "8787": plangate_port, "9000": upstream_port, "5514": log_port}
    return substituted(
        (CONFIGS / name).read_text(),
        {f"127.0.0.1:{literal}": f"127.0.0.1:{actual}" for literal, actual in ports.items()},
        where=name,
    )


@contextlib.contextmanager
def nginx(prefix: Path, config: str, port: int) -> Iterator[str]:
    """nginx in the foreground with ``config``, everything it writes under ``prefix``."""
    prefix.mkdir()
    (prefix / "nginx.conf").write_text(config)
    directives = "daemon off;"
    if os.geteuid() == 0:  # else its workers would run as nobody, locked out of tmp_path
        directives += f" user {pwd.getpwuid(0).pw_name};"
    proc = subprocess.Popen(
        [nginx_binary(), "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-g", directives],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        log = []
        for line in proc.stderr:  # the error log (stderr) says when it listens
            log.append(line)
            if READY in line:
                break
        else:
            proc.stderr.close()
            raise RuntimeError("nginx exited:\n" + "".join(log))
        drain(proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()  # SIGTERM: fast shutdown
        proc.wait(20)


@contextlib.contextmanager
def gateway(
    tmp_path: Path, name: str, *, plangate_port: int, upstream_port: int, log_port: int
) -> Iterator[httpx.Client]:
    port = free_port()
    config = render(
        name, port=port, plangate_port=plangate_port, upstream_port=upstream_port, log_port=log_port
    )
    with nginx(tmp_path / "nginx", config, port) as url, httpx.Client(base_url=url) as client:
        yield client


@pytest.fixture
def api() -> Iterator[Upstream]:
    with upstream() as running:
        yield running


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Plangate]:
    with plangate(tmp_path) as running:
        yield running


@pytest.fixture(params=[FAIL_CLOSED, FAIL_OPEN])
def client(request, tmp_path: Path, api: Upstream, service: Plangate) -> Iterator[httpx.Client]:
    """A client of nginx in front of ``api``, asking ``service``."""
    with gateway(
        tmp_path,
        request.param,
        plangate_port=service.port,
        upstream_port=api.port,
        log_port=service.log_port,
    ) as running:
        yield running


def assert_problem(response: httpx.Response, status: int, name: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["type"] == PROBLEM_BASE + name
    assert problem["status"] == status
    return problem


# Allowed ------------------------------------------------------------------------------------


def test_an_allowed_request_reaches_the_upstream_with_the_customer(client, api, service):
    response = client.get("/v1/projects?page=2", headers=bearer("acme", "pro"))
    assert response.status_code == 200
    seen = api.requests[-1]
    assert seen["path"] == "/v1/projects?page=2"
    assert seen["x-plangate-customer"] == "acme"
    assert seen["x-plangate-plan"] == "pro"
    assert RESERVATION.fullmatch(seen["x-plangate-reservation"])
    # the decision's quota headers reach the client
    assert response.headers["RateLimit-Policy"] == '"api_calls-1m";q=1000;w=60'
    assert response.headers["RateLimit"].startswith('"api_calls-1m";r=999;')
    assert service.wait_settled(1) == 1
    assert service.used("api_calls", "acme", "pro") == 1


def test_a_request_body_reaches_the_upstream(client, api):
    response = client.put("/v1/projects/7", headers=bearer(), content=b'{"name": "x"}')
    assert response.status_code == 200
    assert api.requests[-1]["content-length"] == "13"


def test_a_public_route_needs_no_token_and_reserves_nothing(client, api, service):
    response = client.get("/health")
    assert response.status_code == 200
    assert "x-plangate-customer" not in api.requests[-1]
    assert "x-plangate-reservation" not in api.requests[-1]
    assert "RateLimit" not in response.headers
    assert service.settled() == 0


def test_the_entitlements_of_the_caller(client, service):
    client.get("/v1/projects", headers=bearer("globex"))
    service.wait_settled(1)
    response = client.get("/.plangate/entitlements", headers=bearer("globex"))
    assert response.status_code == 200
    body = response.json()
    assert (body["customer"], body["plan"]) == ("globex", "free")
    assert body["meters"]["api_calls"]["limits"][0]["used"] == 1


# Denied -------------------------------------------------------------------------------------


def test_a_missing_token_is_a_401_problem(client, api):
    missing = client.get("/v1/projects")
    assert_problem(missing, 401, "unauthenticated")
    assert missing.headers.get_list("www-authenticate") == ['Bearer realm="api"']
    bad = client.get("/v1/projects", headers={"authorization": "Bearer not-a-jwt"})
    assert_problem(bad, 401, "unauthenticated")
    assert bad.headers.get_list("www-authenticate") == ['Bearer realm="api", error="invalid_token"']
    assert api.requests == []


def test_a_feature_outside_the_plan_is_a_402_problem(client, api):
    response = client.post("/v1/reports/r1/export", headers=bearer("acme", "free"))
    problem = assert_problem(response, 402, "feature-not-in-plan")
    assert problem["feature"] == "export_reports"
    assert problem["plan"] == "free"
    assert api.requests == []
    # the same request on pro passes
    assert client.post("/v1/reports/r1/export", headers=bearer("acme", "pro")).status_code == 200


def test_a_used_up_quota_is_a_429_problem_with_retry_after(client, api):
    free = bearer("initech", "free")
    statuses = [client.get("/v1/projects", headers=free).status_code for _ in range(5)]
    assert statuses == [200] * 5
    response = client.get("/v1/projects", headers=free)
    problem = assert_problem(response, 429, "quota-exceeded")
    assert problem["violated-policies"] == ["api_calls-1m"]
    # the window slides in 1/20 steps: capacity returns within 63 s, never early
    assert 1 <= int(response.headers["Retry-After"]) <= 63
    assert response.headers["RateLimit"].startswith('"api_calls-1m";r=0;')
    assert len(api.requests) == 5


# Spoofing -----------------------------------------------------------------------------------

SPOOFED = {
    "X-Plangate-Customer": "mallory",
    "X-Plangate-Plan": "enterprise",
    "X-Plangate-Reservation": "0" * 32,
    "X-Plangate-Status": "200",
    "X-Plangate-Reason": "allowed",
    "X-Plangate-Problem": '{"type":"about:blank"}',
    "X-Plangate-Retry-After": "1",
}


def test_spoofed_plangate_headers_are_replaced_or_stripped(client, api):
    response = client.get("/v1/projects", headers={**bearer("acme"), **SPOOFED})
    assert response.status_code == 200
    seen = api.requests[-1]
    assert seen["x-plangate-customer"] == "acme"
    assert seen["x-plangate-plan"] == "free"
    assert seen["x-plangate-reservation"] != "0" * 32
    for name in ("status", "reason", "problem", "retry-after"):
        assert f"x-plangate-{name}" not in seen
    # a public route: no customer at all, whatever the client says
    assert client.get("/health", headers=SPOOFED).status_code == 200
    assert not [name for name in api.requests[-1] if name.startswith("x-plangate-")]


def test_spoofed_headers_without_a_token_are_still_a_401(client, api):
    assert_problem(client.get("/v1/projects", headers=SPOOFED), 401, "unauthenticated")
    assert api.requests == []


#: raw request paths, the status without a token, and the path the upstream then gets
PATH_TRICKS = [
    # "//v1/..." would be read as "//authority/path" by plangate: the config squeezes it
    ("//v1/projects", 401, None),
    ("///v1//projects/", 401, None),
    ("/health/..%2Fv1%2Fprojects", 401, None),
    ("/%2F%2Fv1/projects", 401, None),
    # public for plangate, and the upstream gets the very path plangate decided on
    ("/v1/projects/..%2F..%2Fhealth", 200, "/health"),
    ("/v1/x/%2e%2e/%2E%2E/health?q=1", 200, "/health?q=1"),
]


def test_the_upstream_gets_the_path_plangate_decided_on(client, api):
    base = str(client.base_url).rstrip("/")
    for raw, status, upstream_path in PATH_TRICKS:
        api.requests.clear()
        response = client.get(base + raw)  # no token
        assert response.status_code == status, raw
        assert [seen["path"] for seen in api.requests] == ([upstream_path] if upstream_path else [])


# After the upstream -------------------------------------------------------------------------


def test_an_upstream_5xx_refunds_the_reservation(client, api, service):
    response = client.get("/v1/status/503", headers=bearer("umbrella"))
    assert response.status_code == 503
    assert RESERVATION.fullmatch(api.requests[-1]["x-plangate-reservation"])
    assert service.wait_settled(1) == 1
    assert service.used("api_calls", "umbrella") == 0


def test_the_usage_header_is_charged_after_the_upstream_answered(client, api, service):
    response = client.post("/v1/completions?tokens=42", headers=bearer("hooli"), content=b"hi")
    assert response.status_code == 200
    assert "x-usage-tokens" not in response.headers  # for plangate, not for the client
    assert RESERVATION.fullmatch(api.requests[-1]["x-plangate-reservation"])
    assert service.wait_settled(1) == 1  # the access-log line of this response
    assert service.used("ai_tokens", "hooli") == 42  # not the estimate of 100


# plangate unreachable -----------------------------------------------------------------------


def test_fail_closed_refuses_with_a_503_problem_when_plangate_is_down(tmp_path, api):
    down = free_port()  # nothing listens there
    with gateway(
        tmp_path, FAIL_CLOSED, plangate_port=down, upstream_port=api.port, log_port=free_port()
    ) as client:
        response = client.get("/v1/projects", headers=bearer())
        assert_problem(response, 503, "entitlements-unavailable")
        assert response.headers["Retry-After"] == "5"
        assert client.get("/health").status_code == 503  # no decision, not even "public"
    assert api.requests == []


def test_fail_open_lets_requests_through_unmetered_when_plangate_is_down(tmp_path, api):
    down = free_port()
    with gateway(
        tmp_path, FAIL_OPEN, plangate_port=down, upstream_port=api.port, log_port=free_port()
    ) as client:
        response = client.post(
            "/v1/completions?tokens=42", headers={**bearer(), **SPOOFED}, content=b"hello"
        )
        assert response.status_code == 200
        assert "x-usage-tokens" not in response.headers
        assert "RateLimit" not in response.headers
    seen = api.requests[-1]
    assert seen["content-length"] == "5"
    assert not [name for name in seen if name.startswith("x-plangate-")]
