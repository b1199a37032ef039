"""``@requires(...)``: a requirement declared on one Django view."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar, cast

from asgiref.sync import async_to_sync, iscoroutinefunction, sync_to_async
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse

from plangate import AsyncGate, Decision
from plangate.integration import Pending, Requirement

from .middleware import problem_response

View = TypeVar("View", bound=Callable[..., Any])


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
