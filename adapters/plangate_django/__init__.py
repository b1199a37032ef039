"""plangate for Django: ``"plangate_django.PlanGateMiddleware"`` in ``MIDDLEWARE``, configured
from ``settings.PLANGATE``, and ``@requires(...)`` per view.

The middleware runs the same gate as ``plangate.wsgi``/``plangate.asgi`` (a blocking one when
Django serves synchronously, an asyncio one under ASGI) and only translates between Django's
request/response and plangate's decision.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any, Literal, TypeVar, cast

from asgiref.sync import async_to_sync, iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse, HttpResponseBase, StreamingHttpResponse

from plangate import Decision, Problem
from plangate._gate import AsyncGate, Gate
from plangate._http import (
    ENTITLEMENTS_PATH,
    json_body,
    log_shadow,
    problem_parts,
    route_path,
    take_usage,
)
from plangate._requirements import Pending, Requirement

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

    def _token(self, request: HttpRequest) -> str | None:
        """The caller's token, once the client's own ``X-Plangate-*`` headers are gone: the
        app may trust those (a gateway sets them), never the client's."""
        meta = request.META
        spoofed = [k for k in meta if k.startswith("HTTP_X_PLANGATE_")]
        for key in spoofed:
            del meta[key]
        if spoofed:
            request.__dict__.pop("headers", None)  # a middleware before us may have read them
        source = self.gate.token_source
        return source.extract(request.headers.get(source.header))

    def __call__(self, request: HttpRequest) -> Any:
        if self.async_mode:
            return self._acall(request)
        gate = self.gate
        assert isinstance(gate, Gate)
        token = self._token(request)
        if self._is_entitlements(request):
            return _entitlements_response(request, gate.entitlements(token))
        decision = gate.check(request.method or "GET", route_path(request.path_info), token)
        early = self._begin(request, decision, token)
        if early is not None:
            return early
        response = self.get_response(request)
        self._finish(request, response, lambda d, s, u, r: gate.settle(d, s, u, refund=r))
        return response

    async def _acall(self, request: HttpRequest) -> Any:
        gate = self.gate
        assert isinstance(gate, AsyncGate)
        token = self._token(request)
        if self._is_entitlements(request):
            return _entitlements_response(request, await gate.entitlements(token))
        decision = await gate.check(request.method or "GET", route_path(request.path_info), token)
        early = self._begin(request, decision, token)
        if early is not None:
            return early
        response = await self.get_response(request)
        if not await self._afinish(request, response, gate):
            # A streamed body settles once sent, from the thread Django iterates it in.
            settle = async_to_sync(gate.settle)
            self._finish(request, response, lambda d, s, u, r: settle(d, s, u, refund=r))
        return response

    def _is_entitlements(self, request: HttpRequest) -> bool:
        return request.path_info == self.entitlements_path and request.method in ("GET", "HEAD")

    def _begin(
        self, request: HttpRequest, decision: Decision, token: str | None
    ) -> HttpResponse | None:
        """The problem response of a denial; else the request's ``Pending`` decisions."""
        if decision.problem is not None:
            if not decision.shadowed:
                return problem_response(decision.problem)
            log_shadow(decision, request.method or "GET", request.path_info)
        pending = Pending(self.gate, token)
        rule = decision.rule
        if rule is not None and not rule.public:
            request.plangate = decision  # type: ignore[attr-defined]
            pending.decisions.append(decision)
        request.plangate_pending = pending  # type: ignore[attr-defined]
        return None

    @staticmethod
    def _headers(response: HttpResponseBase, pending: Pending) -> list[dict[str, int]]:
        """Read and drop usage headers, add quota headers; the usage of each decision."""
        reported = []
        for decision in pending.decisions:
            rule = decision.rule
            assert rule is not None
            _, usage = take_usage(rule, list(response.items()))
            reported.append(usage)
            for name, cost in rule.usage_headers.items():
                if not cost.expose and name in response.headers:
                    del response.headers[name]
            for name, value in decision.headers:
                old = response.headers.get(name)
                response.headers[name] = f"{old}, {value}" if old else value
        return reported

    def _finish(self, request: HttpRequest, response: HttpResponseBase, settle: Settle) -> None:
        pending: Pending = request.plangate_pending  # type: ignore[attr-defined]
        if not pending.decisions:
            return
        reported = self._headers(response, pending)
        status = response.status_code

        def settle_all(refund: bool = False) -> None:
            for decision, usage in zip(pending.decisions, reported, strict=True):
                settle(decision, status, usage, refund)

        if isinstance(response, StreamingHttpResponse):
            response.streaming_content = _settle_after(response, settle_all)
        else:
            settle_all()

    async def _afinish(
        self, request: HttpRequest, response: HttpResponseBase, gate: AsyncGate
    ) -> bool:
        """Settle a complete response without leaving the event loop; False if it streams."""
        if isinstance(response, StreamingHttpResponse):
            return False
        pending: Pending = request.plangate_pending  # type: ignore[attr-defined]
        reported = self._headers(response, pending) if pending.decisions else []
        for decision, usage in zip(pending.decisions, reported, strict=True):
            await gate.settle(decision, response.status_code, usage)
        return True


Settle = Callable[[Decision, int, dict[str, int], bool], None]


def _settle_after(
    response: StreamingHttpResponse, settle_all: Callable[..., None]
) -> Iterator[bytes] | AsyncIterator[bytes]:
    """The response's body, settling once it has been sent (refunding if it failed)."""
    if response.is_async:
        content = cast(AsyncIterator[bytes], response.streaming_content)
        settle = sync_to_async(settle_all)

        async def aiterate() -> AsyncIterator[bytes]:
            try:
                async for chunk in content:
                    yield chunk
            except Exception:
                await settle(refund=True)
                raise
            await settle()

        return aiterate()
    body = cast(Iterator[bytes], response.streaming_content)

    def iterate() -> Iterator[bytes]:
        try:
            yield from body
        except Exception:
            settle_all(refund=True)
            raise
        settle_all()

    return iterate()


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
    status, headers, body = problem_parts(problem)
    response = HttpResponse(body, status=status)
    for name, value in headers:
        response.headers[name] = value
    return response


def _entitlements_response(request: HttpRequest, result: dict[str, Any] | Problem) -> HttpResponse:
    if isinstance(result, Problem):
        return problem_response(result)
    body = json_body(result) if request.method == "GET" else b""
    response = HttpResponse(body, content_type="application/json")
    response.headers["Cache-Control"] = "no-store"
    return response
