"""The WebSocket side of the ASGI middleware: a handshake is decided like a ``GET``."""

from __future__ import annotations

from collections.abc import Callable

from ._asgi import ASGIApp, Message, Receive, Scope, Send, app_path, without_client_headers
from ._exchange import Answer, Exchange, encoded
from ._gate import AsyncGate
from ._lifecycle import abegin, asettle
from ._reload import Loaded
from .identity import TokenRead


async def gate_websocket(
    gate: AsyncGate,
    app: ASGIApp,
    scope: Scope,
    receive: Receive,
    send: Send,
    token: Callable[[Scope, Loaded], TokenRead],
    with_state: Callable[[Scope, Exchange], Scope],
) -> None:
    """A WebSocket handshake is decided like a ``GET``: a denial is the problem response
    where the server supports it (the ``websocket.http.response`` extension), else a close
    with 1008; an allowed connection is charged once, when it is accepted."""
    exchange = Exchange("GET", app_path(scope), entitlements_path=None)
    scope = without_client_headers(scope)
    loaded = gate.loaded  # the config of the whole connection's decision
    answer = await abegin(gate, exchange, token(scope, loaded), loaded)
    if answer is not None:
        problem = exchange.decision.problem if exchange.decision else None
        reason = problem.name if problem is not None else "denied"
        await _deny(scope, receive, send, answer, reason)
        return
    scope = with_state(scope, exchange)
    if not exchange.decisions:
        await app(scope, receive, send)
        return

    async def tracked_send(message: Message) -> None:
        kind = message["type"]
        if kind == "websocket.accept" and not exchange.status:
            exchange.response_started(101, ())
            headers = [*message.get("headers", ()), *encoded(exchange.quota_headers())]
            message = {**message, "headers": headers}
        elif kind == "websocket.close" and not exchange.status:
            exchange.response_started(403, ())  # refused by the app before accepting
        elif kind == "websocket.http.response.start":
            exchange.response_started(message["status"], ())
        await send(message)

    try:
        await app(scope, receive, tracked_send)
    except BaseException:
        exchange.finished(raised=True)
        raise
    finally:
        exchange.body_sent()
        await asettle(gate, exchange)


async def _deny(scope: Scope, receive: Receive, send: Send, answer: Answer, reason: str) -> None:
    message = await receive()  # the handshake: websocket.connect
    if message["type"] != "websocket.connect":
        return
    if "websocket.http.response" in (scope.get("extensions") or {}):
        headers = encoded(answer.headers)
        await send(
            {"type": "websocket.http.response.start", "status": answer.status, "headers": headers}
        )
        await send({"type": "websocket.http.response.body", "body": answer.body})
        return
    await send({"type": "websocket.close", "code": 1008, "reason": reason})  # policy violation
