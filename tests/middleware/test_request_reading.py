"""How the middlewares read a request: the path the app routes on (``root_path``), and tokens
that could be read two ways."""

from __future__ import annotations

import anyio
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from plangate import MemoryStorage
from plangate.asgi import PlanGateMiddleware, app_path
from plangate.gateway import GatewayService
from plangate_fastapi import PlanGate
from tests.support import bearer, config


async def _ok(request):
    return PlainTextResponse("ok")


def _starlette() -> Starlette:
    return Starlette(routes=[Route("/v1/reports/{report_id}/export", _ok, methods=["POST"])])


def _fastapi() -> FastAPI:
    app = FastAPI()
    app.post("/v1/reports/{report_id}/export")(lambda report_id: {"ok": True})
    return app


@pytest.mark.parametrize(
    ("path", "root", "routed"),
    [
        ("/api/v1/x", "/api", "/v1/x"),
        ("/api", "/api", "/"),
        ("/apiv1/x", "/api", "/apiv1/x"),  # not under the root path: as it is
        ("/v1/x", "", "/v1/x"),
        ("/v1/x", "/api", "/v1/x"),  # a server that leaves the prefix out of the path
    ],
)
def test_rules_match_the_path_the_app_routes_on(path, root, routed):
    assert app_path({"path": path, "root_path": root}) == routed


def _call(app, path: str, root_path: str, headers: list[tuple[bytes, bytes]] = ()) -> int:
    """One request as uvicorn --root-path sends it: the prefix in path and in root_path."""
    statuses: list[int] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": root_path + path,
        "raw_path": (root_path + path).encode(),
        "root_path": root_path,
        "query_string": b"",
        "headers": list(headers),
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 5000),
    }
    anyio.run(app, scope, receive, send)
    return statuses[0]


def test_a_root_path_does_not_switch_the_rules_off_for_asgi():
    app = PlanGateMiddleware(_starlette(), config(), storage=MemoryStorage())
    assert _call(app, "/v1/reports/7/export", "/api") == 401  # the route needs a token
    pro = [(b"authorization", bearer("acme", "pro")["authorization"].encode())]
    assert _call(app, "/v1/reports/7/export", "/api", pro) == 200


def test_a_root_path_does_not_switch_the_rules_off_for_fastapi():
    app = _fastapi()
    PlanGate(app, config=config(), storage=MemoryStorage())
    assert _call(app, "/v1/reports/7/export", "/api") == 401
    free = [(b"authorization", bearer("acme", "free")["authorization"].encode())]
    assert _call(app, "/v1/reports/7/export", "/api", free) == 402


def test_a_mounted_app_is_matched_on_its_own_path():
    """Starlette's Mount sets root_path for the inner app: rules are written for it."""
    inner = PlanGateMiddleware(_starlette(), config(), storage=MemoryStorage())
    outer = Starlette(routes=[Mount("/api", app=inner)])
    with TestClient(outer) as client:
        assert client.post("/api/v1/reports/7/export").status_code == 401
        assert (
            client.post("/api/v1/reports/7/export", headers=bearer("a", "pro")).status_code == 200
        )


def test_two_authorization_headers_are_a_401_for_asgi():
    app = PlanGateMiddleware(_starlette(), config(), storage=MemoryStorage())
    a = bearer("acme", "pro")["authorization"].encode()
    b = bearer("globex", "pro")["authorization"].encode()
    both = [(b"authorization", a), (b"authorization", b)]
    assert _call(app, "/v1/reports/7/export", "", both) == 401
    assert _call(app, "/v1/reports/7/export", "", both[:1]) == 200


def test_two_authorization_headers_are_a_401_for_the_gateway():
    service = GatewayService(config(), storage=MemoryStorage())
    a = bearer("acme", "pro")["authorization"]
    b = bearer("globex", "pro")["authorization"]
    original = [("x-original-method", "POST"), ("x-original-uri", "/v1/reports/7/export")]
    with TestClient(service) as client:
        both = client.get("/check", headers=[*original, ("authorization", a), ("authorization", b)])
        assert both.status_code == 401
        assert "more than once" in both.json()["detail"]
        assert client.get("/check", headers=[*original, ("authorization", a)]).status_code == 200
