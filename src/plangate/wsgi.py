"""``PlanGateMiddleware`` for any WSGI app (Flask, Django, …).

It only translates WSGI calls into the request's ``Exchange`` (see ``plangate.integration``).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from http import HTTPStatus
from types import TracebackType
from typing import Any

from ._exchange import ENTITLEMENTS_PATH, Answer, Exchange, is_preflight
from ._gate import Clock, Gate
from ._lifecycle import PENDING_KEY, Pending, begin, settle
from .config import Config
from .storage import Storage

ExcInfo = tuple[type[BaseException], BaseException, TracebackType]
StartResponse = Callable[..., Callable[[bytes], object]]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

__all__ = ["PlanGateMiddleware"]


class PlanGateMiddleware:
    """Enforce ``config`` on every request before it reaches ``app``.

    ``app.wsgi_app = PlanGateMiddleware(app.wsgi_app, config="plangate.yaml")``. The handler
    reads the decision as ``environ["plangate"]``. Over a Flask app's ``wsgi_app``, Flask's
    ``got_request_exception`` tells it which 500s were a view that raised (refunded).
    """

    def __init__(
        self,
        app: WSGIApp,
        config: str | os.PathLike[str] | Mapping[str, Any] | Config,
        *,
        storage: str | Storage | None = None,
        entitlements_path: str | None = ENTITLEMENTS_PATH,
        clock: Clock = time.time,
        views: bool = False,
        gate: Gate | None = None,
    ) -> None:
        self.app = app
        self.gate = gate or Gate(config, storage=storage, clock=clock)
        if self.gate.storage_unchecked:  # a store it opened: checked now, at start-up
            self.gate.check_storage()
        #: requirements may be declared on views (the Flask adapter turns this on)
        self.views = views
        self.entitlements_path = entitlements_path
        _listen_for_exceptions(app)
        self.gate.start()  # follow config reloads (WSGI has no startup event: now)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if not self.gate.reloading.started:  # a worker forked after the app was built
            self.gate.start()
        method = environ["REQUEST_METHOD"]
        exchange = Exchange(
            method,
            environ.get("PATH_INFO") or "/",
            entitlements_path=self.entitlements_path,
            preflight=is_preflight(method, lambda n: _environ_key(n) in environ),
        )
        for key in [k for k in environ if k.startswith("HTTP_X_PLANGATE_")]:
            # The app may trust X-Plangate-* (a gateway sets them): never the client's own.
            del environ[key]
        loaded = self.gate.loaded  # one config for the whole request
        source = loaded.token_source
        value = environ.get(_environ_key(source.header))
        token = source.read(() if value is None else (value,))
        answer = begin(self.gate, exchange, token, loaded)
        if answer is not None:
            return answer_wsgi(start_response, answer)
        if not exchange.gated and not self.views:
            return self.app(environ, start_response)
        if exchange.gated:
            environ["plangate"] = exchange.decision
        environ[PENDING_KEY] = Pending(self.gate, exchange)
        if not exchange.decisions and not self.views:
            return self.app(environ, start_response)

        def tracked_start(
            status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
        ) -> Callable[[bytes], object]:
            headers = exchange.response_started(int(status[:3]), headers)
            headers.extend(exchange.quota_headers())
            return start_response(status, headers, exc_info)

        try:
            body = self.app(environ, tracked_start)
        except BaseException:
            exchange.finished(raised=True)
            settle(self.gate, exchange)
            raise
        return _Settling(body, self.gate, exchange)


class _Settling:
    """The app's response body; settles the exchange once it is sent, cut off or failed."""

    def __init__(self, body: Iterable[bytes], gate: Gate, exchange: Exchange) -> None:
        self._body = body
        self._gate = gate
        self._exchange = exchange

    def __iter__(self) -> Iterator[bytes]:
        exchange = self._exchange
        try:
            yield from self._body
        except GeneratorExit:  # the server stopped iterating: close() tells the rest
            raise
        except BaseException:
            exchange.finished(raised=True)
            settle(self._gate, exchange)
            raise
        if exchange.status and exchange.body_sent():
            settle(self._gate, exchange)

    def close(self) -> None:
        exchange = self._exchange
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            if exchange.status and not exchange.complete and not exchange.raised:
                exchange.finished(cut=True)  # the client went away mid-body
            settle(self._gate, exchange)


@functools.cache  # a few header names: the token's, those of a CORS preflight
def _environ_key(header: str) -> str:
    return "HTTP_" + header.upper().replace("-", "_")


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _listen_for_exceptions(app: WSGIApp) -> None:
    """Flask turns a view that raised into a 500 before this middleware sees it, and says so
    with its ``got_request_exception`` signal: listen to it when wrapping ``app.wsgi_app``."""
    owner = getattr(app, "__self__", None)
    if type(owner).__module__.partition(".")[0] == "flask":
        from plangate_flask import report_exceptions

        report_exceptions(owner)  # type: ignore[arg-type]  # a Flask app, by its module


def answer_wsgi(start_response: StartResponse, answer: Answer) -> list[bytes]:
    """Send an ``Answer`` through ``start_response``; the body to return."""
    start_response(f"{answer.status} {_reason(answer.status)}", answer.headers)
    return [answer.body]
