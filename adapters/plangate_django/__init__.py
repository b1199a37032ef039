"""plangate for Django: ``"plangate_django.PlanGateMiddleware"`` in ``MIDDLEWARE``, configured
from ``settings.PLANGATE``, and ``@requires(...)`` per view.

The middleware runs the same gate as ``plangate.wsgi``/``plangate.asgi`` (a blocking one when
Django serves synchronously, an asyncio one under ASGI) and only translates between Django's
request/response and plangate's decision.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any, Literal, TypeVar, cast

from asgiref.sync import async_to_sync, iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse, HttpResponseBase, StreamingHttpResponse

from plangate import AsyncGate, Decision, Gate, Problem
from plangate.integration import (
    ENTITLEMENTS_PATH,
    Answer,
    Exchange,
    Pending,
    Requirement,
    abegin,
    asettle,
    begin,
    problem_answer,
    settle,
)

__all__ = ["PlanGateMiddleware", "problem_response", "requires"]

View = TypeVar("View", bound=Callable[..., Any])
GetResponse = Callable[[HttpRequest], Any]


def _settings() -> Mapping[str, Any]:
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
        settings = _settings()
        gate_class = AsyncGate if self.async_mode else Gate
        self.gate: Gate | AsyncGate = gate_class(
            settings["CONFIG"], storage=settings.get("STORAGE")
        )
        self.entitlements_path = settings.get("ENTITLEMENTS_PATH", ENTITLEMENTS_PATH)

    def _begin(self, request: HttpRequest) -> tuple[Exchange, str | None]:
        """The request's exchange and token, once the client's own ``X-Plangate-*`` headers
        are gone: the app may trust those (a gateway sets them), never the client's."""
        meta = request.META
        spoofed = [k for k in meta if k.startswith("HTTP_X_PLANGATE_")]
        for key in spoofed:
            del meta[key]
        if spoofed:
            request.__dict__.pop("headers", None)  # a middleware before us may have read them
        source = self.gate.token_source
        exchange = Exchange(
            request.method or "GET", request.path_info, entitlements_path=self.entitlements_path
        )
        request.plangate_pending = Pending(self.gate, exchange)  # type: ignore[attr-defined]
        return exchange, source.extract(request.headers.get(source.header))

    def __call__(self, request: HttpRequest) -> Any:
        if self.async_mode:
            return self._acall(request)
        gate = self.gate
        assert isinstance(gate, Gate)
        exchange, token = self._begin(request)
        answer = begin(gate, exchange, token)
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
        exchange, token = self._begin(request)
        answer = await abegin(gate, exchange, token)
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

        async def aiterate() -> AsyncIterator[bytes]:
            try:
                async for chunk in content:
                    yield chunk
            except BaseException as exc:
                _ended(exchange, exc)
                await asettle_now()
                raise
            exchange.body_sent()
            await asettle_now()

        response.streaming_content = aiterate()
        return
    body = cast(Iterator[bytes], response.streaming_content)

    def iterate() -> Iterator[bytes]:
        try:
            yield from body
        except BaseException as exc:
            _ended(exchange, exc)
            settle_now()
            raise
        exchange.body_sent()
        settle_now()

    response.streaming_content = iterate()


def _ended(exchange: Exchange, exc: BaseException) -> None:
    """A stream stopped early: closed by the server (the client went away) or failed."""
    closed = isinstance(exc, GeneratorExit)
    exchange.finished(cut=closed, raised=not closed)


def requires(
    feature: str | None = None,
    *,
    meters: Mapping[str, int | Mapping[str, Any]] | None = None,
    count: Literal["success", "always"] = "success",
    mode: Literal["enforce", "shadow"] = "enforce",
) -> Callable[[View], View]:
    """Enforce a requirement on one view (sync or async), like a rule of ``routes:``.

    ``@requires("export_reports", meters={"api_calls": 1})``. A denial returns the problem
    response; otherwise ``request.plangate`` is the decision.
    """

    def decorate(view: View) -> View:
        label = f"@requires on {view.__qualname__}"
        requirement = Requirement(feature, meters=meters, count=count, mode=mode, name=label)

        def pending_of(request: HttpRequest) -> Pending:
            pending: Pending | None = getattr(request, "plangate_pending", None)
            if pending is None:
                raise ImproperlyConfigured(
                    f"{label} needs plangate_django.PlanGateMiddleware in MIDDLEWARE"
                )
            return pending

        def outcome(request: HttpRequest, decision: Decision) -> HttpResponse | None:
            if decision.problem is not None and not decision.shadowed:
                return problem_response(decision.problem)
            request.plangate = decision  # type: ignore[attr-defined]
            return None

        if iscoroutinefunction(view):

            @functools.wraps(view)
            async def async_view(request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
                pending = pending_of(request)
                if isinstance(pending.gate, AsyncGate):
                    decision = await pending.arequire(requirement)
                else:
                    decision = await sync_to_async(pending.require)(requirement)
                return outcome(request, decision) or await view(request, *args, **kwargs)

            return cast(View, async_view)

        @functools.wraps(view)
        def sync_view(request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
            pending = pending_of(request)
            if isinstance(pending.gate, AsyncGate):
                decision = async_to_sync(pending.arequire)(requirement)
            else:
                decision = pending.require(requirement)
            return outcome(request, decision) or view(request, *args, **kwargs)

        return cast(View, sync_view)

    return decorate


def problem_response(problem: Problem) -> HttpResponse:
    """A plangate denial as a Django response (``application/problem+json``)."""
    return _answer_response(problem_answer(problem))


def _answer_response(answer: Answer) -> HttpResponse:
    response = HttpResponse(answer.body, status=answer.status)
    for name, value in answer.headers:
        response.headers[name] = value
    return response
