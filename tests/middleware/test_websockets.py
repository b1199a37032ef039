"""A WebSocket handshake is decided like a GET request, and metered once per connection."""

from __future__ import annotations

import anyio
import pytest
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.testclient import TestClient, WebSocketDenialResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from plangate import MemoryStorage
from plangate.asgi import PlanGateMiddleware
from tests.support import bearer, config

RULES = [
    {"match": "/v1/live", "feature": "export_reports", "meters": {"api_calls": 1}},
    {"match": "/v1/refused", "meters": {"api_calls": 1}},
]


async def live(websocket: WebSocket) -> None:
    await websocket.accept()
    decision = websocket.state.plangate
    await websocket.send_json({"customer": decision.customer, "plan": decision.plan})
    await websocket.close()


async def refused(websocket: WebSocket) -> None:
    await websocket.close(code=4000)  # the app turns the connection down itself


def _client(storage: MemoryStorage, **changes) -> TestClient:
    app = Starlette(
        routes=[WebSocketRoute("/v1/live", live), WebSocketRoute("/v1/refused", refused)]
    )
    cfg = config(routes=RULES, **changes)
    return TestClient(PlanGateMiddleware(app, cfg, storage=storage))


def _used(storage: MemoryStorage, customer: str = "acme") -> int:
    from plangate import Gate

    token = bearer(customer, "pro")["authorization"].removeprefix("Bearer ")
    body = Gate(config(routes=RULES), storage=storage).entitlements(token)
    return body["meters"]["api_calls"]["limits"][0]["used"]


def test_a_handshake_without_a_token_is_refused_with_the_401_problem():
    with _client(MemoryStorage()) as client, pytest.raises(WebSocketDenialResponse) as denied:
        client.websocket_connect("/v1/live").__enter__()
    assert denied.value.status_code == 401
    assert denied.value.json()["type"].endswith("/unauthenticated")


def test_a_handshake_outside_the_plan_is_refused_with_402():
    with _client(MemoryStorage()) as client, pytest.raises(WebSocketDenialResponse) as denied:
        client.websocket_connect("/v1/live", headers=bearer("acme", "free")).__enter__()
    assert denied.value.status_code == 402


def test_an_accepted_connection_sees_the_decision_and_is_charged_once():
    storage = MemoryStorage()
    with (
        _client(storage) as client,
        client.websocket_connect("/v1/live", headers=bearer("acme", "pro")) as ws,
    ):
        assert ws.receive_json() == {"customer": "acme", "plan": "pro"}
    assert _used(storage) == 1


def test_a_connection_the_app_refuses_is_refunded():
    storage = MemoryStorage()
    with (
        _client(storage) as client,
        pytest.raises(WebSocketDisconnect) as closed,
        client.websocket_connect("/v1/refused", headers=bearer("acme", "pro")) as ws,
    ):
        ws.receive_text()
    assert closed.value.code == 4000
    assert _used(storage) == 0


def test_a_used_up_quota_refuses_the_handshake_with_429():
    storage = MemoryStorage()
    changes = {
        "plans": {
            **config()["plans"],
            "pro": {
                "extends": "free",
                "features": {"export_reports": True, "api_calls": {"limit": 2, "window": "1d"}},
            },
        }
    }
    with _client(storage, **changes) as client:
        for _ in range(2):
            with client.websocket_connect("/v1/live", headers=bearer("acme", "pro")) as ws:
                ws.receive_json()
        with pytest.raises(WebSocketDenialResponse) as denied:
            client.websocket_connect("/v1/live", headers=bearer("acme", "pro")).__enter__()
    assert denied.value.status_code == 429
    assert "retry-after" in denied.value.headers


def test_without_the_denial_extension_a_refused_handshake_is_closed_with_1008():
    app = PlanGateMiddleware(
        Starlette(routes=[WebSocketRoute("/v1/live", live)]),
        config(routes=RULES),
        storage=MemoryStorage(),
    )
    sent: list[dict] = []
    inbox = [{"type": "websocket.connect"}]

    async def receive():
        return inbox.pop(0)

    async def send(message):
        sent.append(message)

    scope = {
        "type": "websocket",
        "path": "/v1/live",
        "root_path": "",
        "headers": [],
        "query_string": b"",
        "subprotocols": [],
    }
    anyio.run(app, scope, receive, send)
    assert sent == [{"type": "websocket.close", "code": 1008, "reason": "unauthenticated"}]
