"""``PlanGateMiddleware`` for any ASGI app (Starlette, FastAPI, …): a pure ASGI middleware.

It only translates ASGI messages into the request's ``Exchange`` (see ``plangate.integration``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from ._exchange import ENTITLEMENTS_PATH, Answer, Exchange, encoded
from ._gate import AsyncGate, Clock
from ._lifecycle import PENDING_KEY, Pending, abegin, asettle
from .config import Config
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
                send = self._closing(send)
            await self.app(scope, receive, send)
            return
        exchange = Exchange(
            scope["method"], scope["path"], entitlements_path=self.entitlements_path
        )
        for name, _ in scope["headers"]:
            if name[:11] == b"x-plangate-":
                # The app may trust X-Plangate-* (a gateway sets them): never the client's own.
                kept = [(n, v) for n, v in scope["headers"] if n[:11] != b"x-plangate-"]
                scope = {**scope, "headers": kept}
                break
        answer = await abegin(self.gate, exchange, self._token(scope))
        if answer is not None:
            await _send_answer(send, answer)
            return
        if not exchange.gated and not self.views:
            await self.app(scope, receive, send)
            return
        state = dict(scope.get("state") or ())
        if exchange.gated:
            state["plangate"] = exchange.decision
        if self.views:  # where adapters find the gate for requirements declared on views
            state[PENDING_KEY] = Pending(self.gate, exchange)
        scope = {**scope, "state": state}
        if not exchange.decisions and not self.views:
            await self.app(scope, receive, send)
            return
        await self._call(scope, receive, send, exchange)

    def _closing(self, send: Send) -> Send:
        """``send`` for the lifespan scope: storage connections close at shutdown."""

        async def closing_send(message: Message) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                await self.gate.storage.aclose()
            await send(message)

        return closing_send

    async def _call(self, scope: Scope, receive: Receive, send: Send, exchange: Exchange) -> None:
        """Call the app; settle the exchange once the response's cost is certain."""

        async def tracked_send(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                headers = exchange.response_started(message["status"], message.get("headers", ()))
                headers.extend(encoded(exchange.quota_headers()))
                message["headers"] = headers
            elif (
                kind == "http.response.body"
                and not message.get("more_body", False)
                and exchange.status
                and exchange.body_sent()
            ):
                # Settle before the last byte leaves: the next request sees this usage.
                await asettle(self.gate, exchange)
            try:
                await send(message)
            except BaseException:
                exchange.finished(cut=True)  # the client went away
                raise

        try:
            await self.app(scope, receive, tracked_send)
        except BaseException:
            # Starlette re-raises after sending its 500: the handler raised all the same.
            exchange.finished(raised=True)
            raise
        finally:
            await asettle(self.gate, exchange)


async def _send_answer(send: Send, answer: Answer) -> None:
    headers = encoded(answer.headers)
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": answer.body})
