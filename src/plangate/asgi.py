"""``PlanGateMiddleware`` for any ASGI app (Starlette, FastAPI, …): a pure ASGI middleware."""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from ._enforcer import AsyncEnforcer, Clock
from ._http import ENTITLEMENTS_PATH, json_body, log_shadow, problem_parts, take_usage
from .config import Config
from .engine import Decision, Problem
from .storage import Storage

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

__all__ = ["PlanGateMiddleware"]


class PlanGateMiddleware:
    """Enforce ``config`` on every HTTP request before it reaches ``app``.

    ``app.add_middleware(PlanGateMiddleware, config="plangate.yaml")`` or
    ``PlanGateMiddleware(app, config=...)``. ``storage=`` overrides the config's storage (a
    URI or a ``Storage``); ``entitlements_path=None`` turns the entitlements endpoint off.
    """

    def __init__(
        self,
        app: ASGIApp,
        config: str | os.PathLike[str] | Mapping[str, Any] | Config,
        *,
        storage: str | Storage | None = None,
        entitlements_path: str | None = ENTITLEMENTS_PATH,
        clock: Clock = time.time,
    ) -> None:
        self.app = app
        self.gate = AsyncEnforcer(config, storage=storage, clock=clock)
        self.entitlements_path = entitlements_path
        self._token_header = self.gate.token_source.header.encode("latin-1")

    def _token(self, scope: Scope) -> str | None:
        wanted = self._token_header
        if wanted == b"cookie":  # HTTP/2 may split cookies over several header fields
            values = [v for n, v in scope["headers"] if n == wanted]
            joined = b"; ".join(values).decode("latin-1")
            return self.gate.token_source.extract(joined) if values else None
        for name, value in scope["headers"]:
            if name == wanted:
                return self.gate.token_source.extract(value.decode("latin-1"))
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self.app(scope, receive, self._closing(send))
                return
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        if path == self.entitlements_path and method in ("GET", "HEAD"):
            await self._entitlements(scope, send)
            return

        decision = await self.gate.check(method, path, self._token(scope))
        if decision.problem is not None:
            if not decision.shadowed:
                await _send_problem(send, decision.problem)
                return
            log_shadow(decision, method, path)
        rule = decision.rule
        if rule is None or rule.public:
            await self.app(scope, receive, send)
            return

        state = scope.get("state")
        scope = {
            **scope,
            "state": {**state, "plangate": decision} if state else {"plangate": decision},
        }
        if not decision.reserved:
            await self._call(scope, receive, send, decision)
            return
        await self._call_metered(scope, receive, send, decision)

    def _closing(self, send: Send) -> Send:
        """``send`` for the lifespan scope: storage connections close at shutdown."""

        async def closing_send(message: Message) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                await self.gate.storage.aclose()
            await send(message)

        return closing_send

    async def _call(self, scope: Scope, receive: Receive, send: Send, decision: Decision) -> None:
        headers = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in decision.headers]
        if not headers:
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *headers]
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def _call_metered(
        self, scope: Scope, receive: Receive, send: Send, decision: Decision
    ) -> None:
        rule = decision.rule
        assert rule is not None
        quota = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in decision.headers]
        status = 0
        reported: dict[str, int] = {}

        async def metered_send(message: Message) -> None:
            nonlocal status, reported
            kind = message["type"]
            if kind == "http.response.start":
                status = message["status"]
                kept, reported = take_usage(rule, message.get("headers", ()))
                message["headers"] = [*kept, *quota]
            elif kind == "http.response.body" and not message.get("more_body", False):
                # Settle before the last byte leaves: the next request sees this usage.
                await self.gate.settle(decision, status, reported)
            await send(message)

        try:
            await self.app(scope, receive, metered_send)
        except BaseException:
            await self.gate.settle(decision, 500, refund=True)
            raise
        await self.gate.settle(decision, status or 500, reported, refund=not status)

    async def _entitlements(self, scope: Scope, send: Send) -> None:
        result = await self.gate.entitlements(self._token(scope))
        if isinstance(result, Problem):
            await _send_problem(send, result)
            return
        body = json_body(result)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send(
            {"type": "http.response.body", "body": body if scope["method"] == "GET" else b""}
        )


async def _send_problem(send: Send, problem: Problem) -> None:
    status, headers, body = problem_parts(problem)
    raw = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
