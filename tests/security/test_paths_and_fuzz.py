"""No path trick reaches a gated handler as an ungated route, and nothing a client sends makes
plangate answer 500 or let through what it must refuse.

The app has a gated ``/admin`` (a feature the free plan lacks) and a metered
``/v1/{rest:path}``. Paths are sent raw over a socket to real servers (uvicorn, werkzeug), so
the servers' own decoding applies, then thrown at the middlewares directly by hypothesis.
"""

from __future__ import annotations

import asyncio
import socket
import string
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request as WRequest
from werkzeug.wrappers import Response as WResponse

from plangate import asgi, wsgi
from tests.support import config, serve_asgi, serve_wsgi, token

ROUTES = [
    {"match": "GET /admin", "feature": "export_reports"},
    {"match": "/v1/{rest:path}", "meters": {"api_calls": 1}},
]
PLANS = {
    "free": {"features": {"api_calls": {"limit": 1_000_000, "window": "1m"}}},
    "pro": {"extends": "free", "features": {"export_reports": True}},
}
CONFIG = config(routes=ROUTES, plans=PLANS, default_plan="free")


async def _admin(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ADMIN")


async def _v1(request: Request) -> PlainTextResponse:
    return PlainTextResponse("v1:" + request.path_params["rest"])


def asgi_app() -> Starlette:
    return Starlette(routes=[Route("/admin", _admin), Route("/v1/{rest:path}", _v1)])


_urls = Map(
    [Rule("/admin", endpoint="admin", methods=["GET"]), Rule("/v1/<path:rest>", endpoint="v1")]
)


def wsgi_app(environ: dict[str, Any], start_response: Any) -> Any:
    request = WRequest(environ)
    try:
        endpoint, args = _urls.bind_to_environ(environ).match()
    except Exception as exc:  # werkzeug's 404s and redirects are responses
        return exc(environ, start_response)  # type: ignore[operator]
    body = "ADMIN" if endpoint == "admin" else "v1:" + args["rest"]
    return WResponse(body)(environ, start_response) if request else None


TRICKS = [
    "/admin",
    "/admin/",
    "//admin",
    "/./admin",
    "/v1/../admin",
    "/v1/%2e%2e/admin",
    "/v1/%2E%2E/admin",
    "/v1/..%2fadmin",
    "/v1/%2e%2e%2fadmin",
    "/%61dmin",
    "/admin%2f",
    "/admin;x",
    "/admin?x=/v1/",
    "/admin#frag",
    "/ADMIN",
    "/admin%00",
    "/v1//../admin",
    "/v1/x/../../admin",
]


def raw_get(base: str, path: str, bearer_token: str) -> tuple[int, str]:
    """GET ``path`` exactly as written (no client normalizes it)."""
    host, port = base.removeprefix("http://").split(":")
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {bearer_token}\r\n"
        "Connection: close\r\n\r\n"
    ).encode("latin-1")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body.decode("latin-1")


@pytest.fixture(scope="module", params=["uvicorn", "werkzeug"])
def server(request: pytest.FixtureRequest):
    if request.param == "uvicorn":
        with serve_asgi(asgi.PlanGateMiddleware(asgi_app(), CONFIG)) as url:
            yield url
    else:
        with serve_wsgi(wsgi.PlanGateMiddleware(wsgi_app, CONFIG)) as url:
            yield url


@pytest.mark.parametrize("path", TRICKS)
def test_no_path_reaches_the_gated_handler_without_the_feature(server, path):
    status, body = raw_get(server, path, token("acme", "free"))
    assert status != 500
    assert "ADMIN" not in body  # the free plan never reaches /admin, however it is written


@pytest.mark.parametrize("path", ["/admin", "/%61dmin"])
def test_the_gated_handler_is_reached_with_the_feature(server, path):
    assert raw_get(server, path, token("acme", "pro")) == (200, "ADMIN")


# Fuzzing ---------------------------------------------------------------------------------

PATH_PARTS = st.sampled_from(
    ["/", "admin", "v1", "..", ".", "%2e", "%2f", "%2F", "%00", "//", "a", "%61", ";", "?"]
)
paths = st.lists(PATH_PARTS, min_size=1, max_size=8).map(lambda parts: "/" + "".join(parts))
header_names = st.sampled_from(
    [
        "authorization",
        "cookie",
        "x-plangate-customer",
        "x-plangate-plan",
        "x-forwarded-for",
        "x-original-uri",
    ]
)
garbage = st.text(alphabet=string.printable, max_size=60)
tokens = st.one_of(
    garbage,
    st.builds(lambda g: "Bearer " + g, garbage),
    st.just("Bearer " + "x" * 10_000),
    st.builds(
        lambda plan: "Bearer " + token("acme", plan), st.sampled_from(["free", "pro", "platinum"])
    ),
    st.builds(lambda t: "Bearer " + t[:-3] + "abc", st.just(token("acme", "pro"))),  # forged
)
headers = st.lists(st.tuples(header_names, st.one_of(tokens, garbage)), max_size=4)
methods = st.sampled_from(["GET", "HEAD", "POST", "DELETE", "OPTIONS", "PROPFIND", "get"])


def _legit_pro(pairs: list[tuple[str, str]]) -> bool:
    auth = [v for n, v in pairs if n == "authorization"]
    return bool(auth) and auth[0] == "Bearer " + token("acme", "pro")


ASGI_GATE = asgi.PlanGateMiddleware(asgi_app(), CONFIG)
WSGI_GATE = wsgi.PlanGateMiddleware(wsgi_app, CONFIG)


async def _asgi_call(method: str, path: str, pairs: list[tuple[str, str]]) -> tuple[int, bytes]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("utf-8", "surrogateescape"),
        "query_string": b"",
        "root_path": "",
        "headers": [(n.encode(), v.encode("utf-8")) for n, v in pairs],
        "server": ("test", 80),
        "client": ("127.0.0.1", 1234),
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await ASGI_GATE(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, body


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=methods, path=paths, pairs=headers)
def test_fuzzed_asgi_requests_never_500_and_never_pass_a_due_denial(method, path, pairs):
    status, body = asyncio.run(_asgi_call(method, path, pairs))
    assert status != 500
    if b"ADMIN" in body:
        assert _legit_pro(pairs)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=methods, path=paths, pairs=headers)
def test_fuzzed_wsgi_requests_never_500_and_never_pass_a_due_denial(method, path, pairs):
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "test",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.url_scheme": "http",
        "wsgi.input": __import__("io").BytesIO(b""),
    }
    for name, value in pairs:
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    seen: dict[str, str] = {}

    def start_response(status: str, response_headers: Any, exc_info: Any = None) -> Any:
        seen["status"] = status
        return lambda data: None

    body = b"".join(WSGI_GATE(environ, start_response))
    assert not seen["status"].startswith("500")
    if b"ADMIN" in body:
        assert _legit_pro(pairs)
