"""Hostile input to the forward-auth service: bodies bounded in size (413) and JSON in depth,
anything malformed a 400 problem, never a 500; ``/render`` renders only problems plangate
itself could have issued; the commit token's 401 challenges."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from plangate.engine import PROBLEM_BASE
from plangate.gateway import GatewayService, LogCommitter
from plangate.gateway._bodies import MAX_BODY, MAX_DEPTH, BadRequest, load_json
from tests.gateways.support import gateway_config
from tests.support import bearer, serve_asgi

PROBLEM = "application/problem+json"


def service(**kwargs: Any) -> GatewayService:
    return GatewayService(gateway_config(), **kwargs)


def assert_problem(response: httpx.Response, status: int, detail: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["type"] == "about:blank"
    assert body["status"] == status
    assert detail in body["detail"]


# bodies ------------------------------------------------------------------------------------


def test_deeply_nested_json_is_a_400_not_a_recursion_error():
    with TestClient(service(max_body=1 << 20)) as client:
        response = client.post("/commit", content=b"[" * 100_000)
    assert_problem(response, 400, f"nests deeper than {MAX_DEPTH} levels")


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b"reservation=1", "not JSON"),
        (b'{"reservation": "r", ', "not JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"1" * 5000, "not JSON"),  # past Python's digits limit for int()
        (b"", "not JSON"),
    ],
)
def test_a_malformed_body_is_a_400_problem(body, detail):
    with TestClient(service()) as client:
        assert_problem(client.post("/commit", content=body), 400, detail)


def test_brackets_inside_strings_are_not_nesting():
    deep = "[{" * 1000
    assert load_json(json.dumps({"text": deep, "quote": '"[[', "escaped": "\\[[["})) == {
        "text": deep,
        "quote": '"[[',
        "escaped": "\\[[[",
    }
    assert load_json("[" * MAX_DEPTH + "]" * MAX_DEPTH) is not None
    with pytest.raises(BadRequest, match="nests deeper"):
        load_json("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))


def test_a_body_past_the_limit_is_a_413_problem():
    with TestClient(service(max_body=100)) as client:
        body = json.dumps({"reservation": "r" * 200, "status": 200}).encode()
        assert_problem(client.post("/commit", content=body), 413, "larger than 100 bytes")


async def _post(app: Any, headers: list[tuple[bytes, bytes]], chunks: Any) -> tuple[int, Any]:
    """POST /commit over ASGI; ``chunks`` yields the body's parts as the server reads them."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/commit",
        "raw_path": b"/commit",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver"), *headers],
        "client": ("testclient", 50000),
        "server": ("testserver", 80),
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        chunk = next(chunks, None)
        return {"type": "http.request", "body": chunk or b"", "more_body": chunk is not None}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body)


def test_an_endless_body_is_refused_once_the_limit_is_read():
    read = 0

    def endless():  # 16 MiB, as good as endless (and not enough to hurt if it is all read)
        nonlocal read
        for _ in range(1024):
            read += 1
            yield b"[" * 16_384

    status, body = asyncio.run(_post(service(), [], endless()))
    assert status == 413
    assert body["detail"] == f"the body is larger than {MAX_BODY} bytes"
    assert read == MAX_BODY // 16_384 + 1  # not a chunk more


def test_a_declared_content_length_past_the_limit_is_refused_before_reading():
    def unread():
        raise AssertionError("the body was read")
        yield b""

    headers = [(b"content-length", b"100000000")]
    status, body = asyncio.run(_post(service(), headers, unread()))
    assert status == 413
    headers = [(b"content-length", b"1" * 5000)]
    assert asyncio.run(_post(service(), headers, unread()))[0] == 413
    status, body = asyncio.run(_post(service(), [(b"content-length", b"ten")], unread()))
    assert status == 400
    assert body["detail"] == "Content-Length is not a number"


def test_a_real_server_refuses_a_large_body_and_keeps_serving():
    with serve_asgi(service()) as url, httpx.Client(base_url=url) as client:
        big = client.post("/commit", content=b" " * (4 * MAX_BODY))
        assert_problem(big, 413, "larger than")

        def chunked():  # no Content-Length: counted while read
            for _ in range(64):
                yield b" " * 16_384

        assert_problem(client.post("/commit", content=chunked()), 413, "larger than")
        assert client.get("/healthz").json()["status"] == "ok"


def test_access_log_lines_nested_too_deep_are_refused_with_a_log_line(caplog):
    class Service:
        records: list[Any] = []

        async def settle(self, record: Any) -> tuple[str, str]:
            self.records.append(record)
            return "settled", "settled"

    async def run() -> list[Any]:
        target = Service()
        committer = LogCommitter(target)
        committer.feed("{" + '"a":[' * 100_000 + "\n" + '{"reservation":"r1","status":200}')
        await committer.drain()
        return target.records

    with caplog.at_level(logging.WARNING, logger="plangate.gateway"):
        assert asyncio.run(run()) == [{"reservation": "r1", "status": 200}]
    assert any("nests deeper" in r.getMessage() for r in caplog.records)


# the commit token's 401 ----------------------------------------------------------------------


def test_the_commit_tokens_401_is_a_problem_with_a_challenge():
    with TestClient(service(commit_token="s3cret-commit-token")) as client:
        missing = client.post("/commit", json={"reservation": "r", "status": 200})
        wrong = client.post(
            "/commit",
            json={"reservation": "r", "status": 200},
            headers={"Authorization": "Bearer nope"},
        )
    assert_problem(missing, 401, "commit token")
    assert missing.headers["www-authenticate"] == 'Bearer realm="plangate-commit"'
    assert wrong.headers["www-authenticate"] == (
        'Bearer realm="plangate-commit", error="invalid_token"'
    )


def test_a_request_the_check_cannot_place_is_a_400_problem():
    with TestClient(service()) as client:
        response = client.get(
            "/check", headers={"X-Original-URI": "/v1/projects", "X-Forwarded-Uri": "/admin"}
        )
    assert_problem(response, 400, "cannot tell the original request")


# /render -----------------------------------------------------------------------------------


def _denials(client: TestClient) -> dict[str, httpx.Response]:
    """One denial of each kind /check issues for this config."""
    denials = {
        "unauthenticated": client.get("/check/v1/projects"),
        "feature-not-in-plan": client.post("/check/v1/reports/1/export", headers=bearer()),
        "no-active-plan": client.get("/check/v1/projects", headers=bearer("x", "gold")),
    }
    for _ in range(5):
        client.get("/check/v1/projects", headers=bearer("busy"))
    denials["quota-exceeded"] = client.get("/check/v1/projects", headers=bearer("busy"))
    return denials


def _render(client: TestClient, denied: httpx.Response) -> httpx.Response:
    headers = {"X-Plangate-Problem": denied.headers["x-plangate-problem"]}
    if "retry-after" in denied.headers:
        headers["X-Plangate-Retry-After"] = denied.headers["retry-after"]
    return client.get("/render", headers=headers)


def test_every_denial_of_check_renders_back_as_it_was_sent():
    with TestClient(service()) as client:
        denials = _denials(client)
        for name, denied in denials.items():
            assert denied.json()["type"] == PROBLEM_BASE + name
            rendered = _render(client, denied)
            assert rendered.status_code == denied.status_code, name
            assert rendered.headers["content-type"] == PROBLEM
            assert rendered.content == denied.content, name
            assert rendered.headers.get("retry-after") == denied.headers.get("retry-after")


def test_a_route_not_allowed_renders_back():
    with TestClient(GatewayService({**gateway_config(), "unmatched": "deny"})) as client:
        original = {"X-Original-Method": "GET", "X-Original-URI": "/elsewhere/%0a%22x"}
        denied = client.get("/check", headers={**original, **bearer()})
        assert denied.status_code == 403
        assert _render(client, denied).content == denied.content


def _forged(**changes: Any) -> str:
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + "quota-exceeded",
        "title": "Quota exceeded",
        "status": 429,
        "detail": "the free plan's quota api_calls-1m is used up; retry in 60 s",
        "violated-policies": ["api_calls-1m"],
        "plan": "free",
        "upgrade_url": "https://example.test/pricing",
    }
    body.update(changes)
    return json.dumps({k: v for k, v in body.items() if v is not None})


@pytest.mark.parametrize(
    ("problem", "retry_after", "why"),
    [
        (_forged(), "1" * 20, "Retry-After is not whole seconds"),
        (_forged(), "-5", "Retry-After is not whole seconds"),
        (_forged(), "0", "Retry-After is not whole seconds"),
        (_forged(), "12, 13", "Retry-After is not whole seconds"),
        (
            json.dumps(
                {
                    "type": PROBLEM_BASE + "route-not-allowed",
                    "title": "Route not allowed",
                    "status": 403,
                    "detail": "GET /x is not an API route of this service",
                }
            ),
            "60",
            "route-not-allowed has no Retry-After",
        ),
        (_forged(type="about:blank"), "", "not a plangate problem type"),
        (_forged(type=PROBLEM_BASE + "evil"), "", "not a plangate problem type"),
        (_forged(type="https://evil.test/problems/quota-exceeded"), "", "not a plangate"),
        (_forged(status=200), "", "the status of quota-exceeded is 429"),
        (_forged(status=429.0), "", "the status of quota-exceeded is 429"),
        (_forged(status="429"), "", "the status of quota-exceeded is 429"),
        (_forged(title="Pay up"), "", "the title of quota-exceeded"),
        (_forged(detail=["x"]), "", "detail is not text"),
        (_forged(detail=None), "", "detail is not text"),
        (_forged(script="<script>alert(1)</script>"), "", "has no member 'script'"),
        (_forged(feature="api_calls"), "", "has no member 'feature'"),
        (_forged(plan="platinum"), "", "its 'plan' is not one this config has"),
        (_forged(upgrade_url="https://evil.test/"), "", "'upgrade_url' is not one"),
        (_forged(**{"violated-policies": ["x-1s"]}), "", "'violated-policies' is not one"),
        (_forged(**{"violated-policies": []}), "", "'violated-policies' is not one"),
        (_forged(**{"violated-policies": "api_calls-1m"}), "", "'violated-policies'"),
        (_forged(**{"violated-policies": [["api_calls-1m"]]}), "", "nests deeper than 2"),
        ("[" * 10_000, "", "nests deeper than 2"),
        ("[]", "", "not a JSON object"),
        ("", "", "not JSON"),
        (_forged(detail="x" * 20_000), "", "longer than"),
    ],
)
def test_render_refuses_what_plangate_did_not_issue(problem, retry_after, why):
    with TestClient(service()) as client:
        headers = {"X-Plangate-Problem": problem}
        if retry_after:
            headers["X-Plangate-Retry-After"] = retry_after
        response = client.get("/render", headers=headers)
    assert_problem(response, 400, "no plangate problem to render")
    assert why in response.json()["detail"]


def test_render_writes_the_problem_afresh_instead_of_echoing_it():
    with TestClient(service()) as client:
        spaced = json.dumps(json.loads(_forged()), indent=4)  # same problem, other bytes
        response = client.get(
            "/render", headers={"X-Plangate-Problem": spaced, "X-Plangate-Retry-After": "60"}
        )
    assert response.status_code == 429
    assert response.content == json.dumps(json.loads(_forged()), separators=(",", ":")).encode()
    assert response.headers["retry-after"] == "60"
