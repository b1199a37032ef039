"""``PlanGateMiddleware`` for any ASGI app (Starlette, FastAPI, …): a pure ASGI middleware."""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from ._gate import AsyncGate, Clock
from ._http import (
    ENTITLEMENTS_PATH,
    json_body,
    log_shadow,
    problem_parts,
    route_path,
    take_usage,
)
from ._requirements import PENDING_KEY, Pending
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
        views: bool = False,
        gate: AsyncGate | None = None,
    ) -> None:
        self.app = app
        self.gate = gate or AsyncGate(config, storage=storage, clock=clock)
        #: requirements may be declared on views (the FastAPI adapter turns this on)
        self.views = views
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
        method, path = scope["method"], route_path(scope["path"])
        if path == self.entitlements_path and method in ("GET", "HEAD"):
            await self._entitlements(scope, send)
            return

        for name, _ in scope["headers"]:
            if name[:11] == b"x-plangate-":
                # The app may trust X-Plangate-* (a gateway sets them): never the client's own.
                kept = [(n, v) for n, v in scope["headers"] if n[:11] != b"x-plangate-"]
                scope = {**scope, "headers": kept}
                break
        token = self._token(scope)
        decision = await self.gate.check(method, path, token)
        if decision.problem is not None:
            if not decision.shadowed:
                await _send_problem(send, decision.problem)
                return
            log_shadow(decision, method, path)
        rule = decision.rule
        matched = rule is not None and not rule.public
        if not matched and not self.views:
            await self.app(scope, receive, send)
            return

        state = dict(scope.get("state") or ())
        pending = Pending(self.gate, token)
        if matched:
            state["plangate"] = decision
            pending.decisions.append(decision)
        if self.views:  # where adapters find the gate for requirements declared on views
            state[PENDING_KEY] = pending
        scope = {**scope, "state": state}
        if not self.views and not decision.reserved:
            await self._call(scope, receive, send, decision)
            return
        await self._call_tracked(scope, receive, send, pending)

    def _closing(self, send: Send) -> Send:
        """``send`` for the lifespan scope: storage connections close at shutdown."""

        async def closing_send(message: Message) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                await self.gate.storage.aclose()
            await send(message)

        return closing_send

    async def _call(self, scope: Scope, receive: Receive, send: Send, decision: Decision) -> None:
        headers = _encoded(decision.headers)
        if not headers:
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *headers]
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def _call_tracked(
        self, scope: Scope, receive: Receive, send: Send, pending: Pending
    ) -> None:
        """Call the app; settle every decision of ``pending`` once the status is known.

        Adapters may add decisions while the app runs (requirements declared on views).
        """
        status = 0
        reported: list[dict[str, int]] = []

        async def tracked_send(message: Message) -> None:
            nonlocal status
            kind = message["type"]
            if kind == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", ()))  # never change the app's own list
                for decision in pending.decisions:
                    assert decision.rule is not None
                    headers, usage = take_usage(decision.rule, headers)
                    reported.append(usage)
                    headers.extend(_encoded(decision.headers))
                message["headers"] = headers
            elif kind == "http.response.body" and not message.get("more_body", False):
                # Settle before the last byte leaves: the next request sees this usage.
                await self._settle(pending, status, reported)
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except BaseException:
            # Before the response started: nothing was served, refund. After: the client got
            # (some of) it, so it is charged as its status says, like a client that went away.
            await self._settle(pending, status or 500, reported, refund=not status)
            raise
        await self._settle(pending, status or 500, reported, refund=not status)

    async def _settle(
        self, pending: Pending, status: int, reported: list[dict[str, int]], refund: bool = False
    ) -> None:
        for i, decision in enumerate(pending.decisions):
            if decision.settled:
                continue
            usage = reported[i] if i < len(reported) else None
            await self.gate.settle(decision, status, usage, refund=refund)

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


def _encoded(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers]
