"""``plangate demo`` shows the product at its best: no 500 for any input, a customer
upgraded live through the admin API, and curl lines that do what they say."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from plangate._demo.app import CONFIG, create_app
from plangate.cli import demo_lines
from plangate.testing import bearer


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(), raise_server_exceptions=False) as client:
        yield client


def test_an_unlimited_plan_reads_its_projects_as_unlimited(client):
    response = client.get("/v1/projects", headers=bearer(CONFIG, "megacorp", "enterprise"))
    assert response.status_code == 200
    assert response.json()["max_projects"] == "unlimited"
    assert response.json()["api_calls_left"] == "unlimited"


def test_a_completion_with_a_text_body_is_answered(client):
    headers = {**bearer(CONFIG, "acme", "free"), "content-type": "text/plain"}
    response = client.post("/v1/completions", content=b"write a poem", headers=headers)
    assert response.status_code == 200
    assert response.json()["usage"]["tokens"] == 80


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    method=st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS"]),
    path=st.sampled_from(
        [
            "/health",
            "/v1/projects",
            "/v1/completions",
            "/v1/reports/7/export",
            "/v1/x/y",
            "/z",
            "/admin/customers/acme",
        ]
    ),
    plan=st.sampled_from([None, "free", "pro", "enterprise"]),
    body=st.binary(max_size=64),
)
def test_no_request_gets_a_500(client, method, path, plan, body):
    headers = bearer(CONFIG, "acme", plan) if plan else {}
    response = client.request(method, path, content=body, headers=headers)
    assert response.status_code < 500


# the live upgrade ----------------------------------------------------------------------------

BASE = "http://testserver"
ADMIN = {"authorization": "Bearer demo-admin-token"}
MERGE_PATCH = {"content-type": "application/merge-patch+json"}


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """A demo app of its own, on memory storage, with the demo's admin token."""
    monkeypatch.delenv("PLANGATE_STORAGE", raising=False)
    monkeypatch.delenv("PLANGATE_ADMIN_TOKEN", raising=False)
    with TestClient(create_app(), base_url=BASE) as client:
        yield client


def test_the_free_customer_is_upgraded_live_through_the_admin_api(fresh):
    free = bearer(CONFIG, "acme-free", "free")
    assert fresh.post("/v1/reports/42/export", headers=free).status_code == 402

    upgraded = fresh.patch(
        "/admin/customers/acme-free", headers={**ADMIN, **MERGE_PATCH}, json={"plan": "pro"}
    )
    assert upgraded.status_code == 200
    assert upgraded.json()["plan"] == "pro"

    # the same token (its plan claim still says free): the store's record decides
    assert fresh.post("/v1/reports/42/export", headers=free).status_code == 200
    assert fresh.get("/v1/projects", headers=free).json()["plan"] == "pro"


def test_the_admin_api_needs_its_token_and_is_not_metered(fresh):
    assert fresh.get("/admin/customers/acme-free").status_code == 401
    assert fresh.get("/admin/customers/acme-free", headers=ADMIN).status_code == 404
    # outside the middleware: a plangate bearer token is not what it takes
    customer = bearer(CONFIG, "acme-free", "free")
    assert fresh.get("/admin/customers/acme-free", headers=customer).status_code == 401


def test_the_admin_token_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("PLANGATE_STORAGE", raising=False)
    monkeypatch.setenv("PLANGATE_ADMIN_TOKEN", "another-admin-token")
    assert "export ADMIN_TOKEN=another-admin-token" in demo_lines(BASE)
    with TestClient(create_app(), base_url=BASE) as client:
        assert client.get("/admin/customers/x", headers=ADMIN).status_code == 401
        headers = {"authorization": "Bearer another-admin-token"}
        assert client.get("/admin/customers/x", headers=headers).status_code == 404


# what ``plangate demo`` prints, run against the app ---------------------------------------


def _curl(command: str, env: dict[str, str]) -> tuple[str, str, dict[str, str], bytes | None]:
    """Method, URL, headers and body of a printed curl line (``$NAME`` from ``env``, as the
    shell would: every one of them is in double quotes)."""
    words = shlex.split(re.sub(r"\$([A-Z_]+)", lambda m: env[m.group(1)], command))
    assert words[0] == "curl"
    method, url, headers, body = None, None, {}, None
    args = iter(words[1:])
    for word in args:
        if word == "-X":
            method = next(args)
        elif word == "-H":
            name, _, value = next(args).partition(":")
            headers[name.strip().lower()] = value.strip()
        elif word == "-d":
            body = next(args).encode()
        elif word in ("-o", "-w"):
            next(args)
        elif word.startswith("http"):
            url = word
        else:
            assert word in ("-i", "-s"), word
    assert url is not None
    return method or ("POST" if body is not None else "GET"), url, headers, body


def test_the_printed_curl_lines_get_what_their_comments_say(fresh):
    env: dict[str, str] = {}
    ran = []
    for line in demo_lines(BASE):
        if line.startswith("export "):
            name, _, value = line.removeprefix("export ").partition("=")
            env[name] = value
            continue
        loop = re.fullmatch(r"for i in ([\d ]+); do (curl .*); done\s+# (.*)", line)
        if loop is not None:
            times, command, comment = len(loop[1].split()), loop[2], loop[3]
        elif line.startswith("curl "):
            command, _, comment = line.partition("  #")
            times = 1
        else:
            continue
        method, url, headers, body = _curl(command, env)
        assert url.startswith(BASE), line
        statuses = [
            fresh.request(method, url, headers=headers, content=body).status_code
            for _ in range(times)
        ]
        said = re.search(r"\b([1-5]\d\d)\b", comment)
        if loop is not None:  # "5/10s, then 429"
            assert (statuses[0], statuses[-1]) == (200, int(said[1]) if said else 0), line
        else:
            assert statuses == [int(said[1]) if said else 200], line
        ran.append((method, url.removeprefix(BASE)))
    assert set(env) == {"TOKEN_FREE", "TOKEN_PRO", "TOKEN_ENTERPRISE", "ADMIN_TOKEN"}
    assert ran[-2:] == [
        ("PATCH", "/admin/customers/acme-free"),
        ("POST", "/v1/reports/42/export"),
    ]
