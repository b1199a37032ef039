"""The Django middleware: it runs the same gate as ``plangate.wsgi``/``plangate.asgi`` (a
blocking one when Django serves synchronously, an asyncio one under ASGI) and only translates
Django's request and response into the request's ``Exchange``."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any, cast

from asgiref.sync import async_to_sync, iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse, HttpResponseBase, StreamingHttpResponse

from plangate import AsyncGate, Gate, Problem
from plangate.identity import TokenRead
from plangate.integration import (
    ENTITLEMENTS_PATH,
    Answer,
    Exchange,
    Loaded,
    Pending,
    abegin,
    asettle,
    astream_settling,
    begin,
    is_preflight,
    problem_answer,
    settle,
    stream_settling,
)

__all__ = ["PlanGateMiddleware", "problem_response"]

GetResponse = Callable[[HttpRequest], Any]


def settings_of() -> Mapping[str, Any]:
    """``settings.PLANGATE``, checked."""
    from django.conf import settings

    value = getattr(settings, "PLANGATE", None)
    if not isinstance(value, Mapping) or not value.get("CONFIG"):
        raise ImproperlyConfigured(
            'plangate: set settings.PLANGATE = {"CONFIG": "plangate.yaml"} '
            '(optional: "STORAGE", "ENTITLEMENTS_PATH")'
        )
    return value


class PlanGateMiddleware:
    """Enforce the config on every request; the decision is ``request.plangate``.

    Settings: ``PLANGATE = {"CONFIG": path or mapping, "STORAGE": uri (optional),
    "ENTITLEMENTS_PATH": "/.plangate/entitlements" (optional; None turns it off)}``.
    A view that raises is refunded (``process_exception``), as under every front end.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: GetResponse) -> None:
        self.get_response = get_response
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)
        settings = settings_of()
        gate_class = AsyncGate if self.async_mode else Gate
        self.gate: Gate | AsyncGate = gate_class(
            settings["CONFIG"], storage=settings.get("STORAGE")
        )
        self.entitlements_path = settings.get("ENTITLEMENTS_PATH", ENTITLEMENTS_PATH)
        self.gate.start()  # follow config reloads (Django has no startup event: now)

    def _begin(self, request: HttpRequest) -> tuple[Exchange, TokenRead, Loaded]:
        """The request's exchange and token, once the client's own ``X-Plangate-*`` headers
        are gone: the app may trust those (a gateway sets them), never the client's."""
        meta = request.META
        spoofed = [k for k in meta if k.startswith("HTTP_X_PLANGATE_")]
        for key in spoofed:
            del meta[key]
        if spoofed:
            request.__dict__.pop("headers", None)  # a middleware before us may have read them
        if not self.gate.reloading.started:  # a worker forked after the app was built
            self.gate.start()
        loaded = self.gate.loaded  # one config for the whole request
        source = loaded.token_source
        method = request.method or "GET"
        exchange = Exchange(
            method,
            request.path_info,
            entitlements_path=self.entitlements_path,
            preflight=is_preflight(method, request.headers.__contains__),
        )
        request.plangate_pending = Pending(self.gate, exchange)  # type: ignore[attr-defined]
        value = request.headers.get(source.header)
        return exchange, source.read(() if value is None else (value,)), loaded

    def __call__(self, request: HttpRequest) -> Any:
        if self.async_mode:
            return self._acall(request)
        gate = self.gate
        assert isinstance(gate, Gate)
        exchange, token, loaded = self._begin(request)
        answer = begin(gate, exchange, token, loaded)
        if answer is not None:
            return _answer_response(answer)
        _expose(request, exchange)
        response = self.get_response(request)
        if _respond(exchange, response):
            settle(gate, exchange)
        else:
            sync_settle = functools.partial(settle, gate, exchange)
            _settle_after(response, exchange, sync_settle, sync_to_async(sync_settle))
        return response

    async def _acall(self, request: HttpRequest) -> Any:
        gate = self.gate
        assert isinstance(gate, AsyncGate)
        exchange, token, loaded = self._begin(request)
        answer = await abegin(gate, exchange, token, loaded)
        if answer is not None:
            return _answer_response(answer)
        _expose(request, exchange)
        response = await self.get_response(request)
        if _respond(exchange, response):
            await asettle(gate, exchange)
        else:
            # a sync stream is iterated in a thread of Django's: it settles from there
            async_settle = functools.partial(asettle, gate, exchange)
            _settle_after(response, exchange, async_to_sync(async_settle), async_settle)
        return response

    def process_exception(self, request: HttpRequest, exception: Exception) -> None:
        """Django turns a view that raised into a 500: such a request is refunded."""
        pending: Pending | None = getattr(request, "plangate_pending", None)
        if pending is not None:
            pending.exchange.handler_raised()


def _expose(request: HttpRequest, exchange: Exchange) -> None:
    if exchange.gated:
        request.plangate = exchange.decision  # type: ignore[attr-defined]


def _respond(exchange: Exchange, response: HttpResponseBase) -> bool:
    """Usage headers read (and dropped unless exposed), quota headers added. True when the
    response is complete (settle now); False for a stream, which settles once sent."""
    if not exchange.decisions:
        return True
    original = list(response.items())
    kept = exchange.response_started(response.status_code, original)
    kept_names = {name.lower() for name, _ in kept}
    for name, _ in original:
        if name.lower() not in kept_names:
            del response.headers[name]
    for name, value in exchange.quota_headers():
        old = response.headers.get(name)
        response.headers[name] = f"{old}, {value}" if old else value
    if isinstance(response, StreamingHttpResponse):
        return False
    exchange.body_sent()
    exchange.finished()
    return True


def _settle_after(
    response: StreamingHttpResponse,
    exchange: Exchange,
    settle_now: Callable[[], None],
    asettle_now: Callable[[], Awaitable[None]],
) -> None:
    """Stream the response's body, settling once it has been sent, failed or was cut off."""
    if response.is_async:
        content = cast(AsyncIterator[bytes], response.streaming_content)
        response.streaming_content = astream_settling(content, exchange, asettle_now)
    else:
        body = cast(Iterator[bytes], response.streaming_content)
        response.streaming_content = stream_settling(body, exchange, settle_now)


def problem_response(problem: Problem) -> HttpResponse:
    """A plangate denial as a Django response (``application/problem+json``)."""
    return _answer_response(problem_answer(problem))


def _answer_response(answer: Answer) -> HttpResponse:
    response = HttpResponse(answer.body, status=answer.status)
    for name, value in answer.headers:
        response.headers[name] = value
    return response
