"""The shapes of ASGI that the HTTP and the WebSocket sides of the middleware share."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ._exchange import Answer, encoded

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def without_client_headers(scope: Scope) -> Scope:
    """The app may trust X-Plangate-* (a gateway sets them): never the client's own."""
    for name, _ in scope["headers"]:
        if name[:11] == b"x-plangate-":
            kept = [(n, v) for n, v in scope["headers"] if n[:11] != b"x-plangate-"]
            return {**scope, "headers": kept}
    return scope


def app_path(scope: Scope) -> str:
    """The path the application routes on: ``scope["path"]`` without ``root_path``, as
    Starlette reads it (uvicorn ``--root-path /api`` puts the prefix into both)."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        if path == root:
            return "/"
        if path[len(root)] == "/":
            return path[len(root) :]
    return path


async def send_answer(send: Send, answer: Answer) -> None:
    headers = encoded(answer.headers)
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": answer.body})
