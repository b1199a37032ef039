"""``PlanGateMiddleware`` for any ASGI app (Starlette, FastAPI, …): a pure ASGI middleware.

It only translates ASGI messages into the request's ``Exchange`` (see ``plangate.integration``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from ._asgi import (
    ASGIApp,
    Message,
    Receive,
    Scope,
    Send,
    app_path,
    send_answer,
    without_client_headers,
)
from ._exchange import ENTITLEMENTS_PATH, Exchange, encoded, is_preflight
from ._gate import AsyncGate, Clock
from ._lifecycle import PENDING_KEY, Pending, abegin, asettle
from ._reload import Loaded
from ._websocket import gate_websocket
from .config import Config
from .identity import TokenRead
from .storage import Storage

__all__ = ["PlanGateMiddleware", "app_path"]


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

    def _token(self, scope: Scope, loaded: Loaded) -> TokenRead:
        source = loaded.token_source
        wanted = source.header_bytes  # HTTP/2 may split cookies over several header fields
        values = [v.decode("latin-1") for n, v in scope["headers"] if n == wanted]
        return source.read(values)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http":
            if kind == "websocket":
                if not self.gate.reloading.started:
                    self.gate.start()
                await gate_websocket(
                    self.gate, self.app, scope, receive, send, self._token, self._with_state
                )
                return
            if kind == "lifespan":
                send = self._closing(send)
            await self.app(scope, receive, send)
            return
        if not self.gate.reloading.started:  # no lifespan startup ran, or a forked worker
            self.gate.start()
        method = scope["method"]
        exchange = Exchange(
            method,
            app_path(scope),
            entitlements_path=self.entitlements_path,
            preflight=method == "OPTIONS" and is_preflight(method, _has_header(scope)),
        )
        scope = without_client_headers(scope)
        loaded = self.gate.loaded  # one config for the whole request
        answer = await abegin(self.gate, exchange, self._token(scope, loaded), loaded)
        if answer is not None:
            await send_answer(send, answer)
            return
        if not exchange.gated and not self.views:
            await self.app(scope, receive, send)
            return
        scope = self._with_state(scope, exchange)
        if not exchange.decisions and not self.views:
            await self.app(scope, receive, send)
            return
        await self._call(scope, receive, send, exchange)

    def _with_state(self, scope: Scope, exchange: Exchange) -> Scope:
        state = dict(scope.get("state") or ())
        if exchange.gated:
            state["plangate"] = exchange.decision
        if self.views:  # where adapters find the gate for requirements declared on views
            state[PENDING_KEY] = Pending(self.gate, exchange)
        return {**scope, "state": state}

    def _closing(self, send: Send) -> Send:
        """``send`` for the lifespan scope: the store is checked and config reloads followed
        from startup; reloads stop and the store's connections close at shutdown."""

        async def closing_send(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                if self.gate.storage_unchecked:
                    await self.gate.check_storage()  # a store it opened: checked at start-up
                self.gate.start()
            if message["type"] == "lifespan.shutdown.complete":
                self.gate.stop()
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
            if not exchange.settled:
                await asettle(self.gate, exchange)


def _has_header(scope: Scope) -> Callable[[str], bool]:
    names = {n for n, _ in scope["headers"]}
    return lambda name: name.encode("latin-1") in names
