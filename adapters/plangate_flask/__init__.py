"""plangate for Flask: a ``PlanGate`` extension, ``@gate.requires(...)`` per view, ``g.plangate``.

``PlanGate(app)`` or ``gate = PlanGate(); gate.init_app(app)`` wraps ``app.wsgi_app`` in
``plangate.wsgi.PlanGateMiddleware`` (every route rule of the config is enforced there, before
Flask routes the request) and exposes the decision as ``g.plangate``.
"""

from __future__ import annotations

import functools
import inspect
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar, cast

from flask import Flask, Response, g, got_request_exception, request

from plangate import Decision, Gate, Problem, Storage
from plangate.config import Config
from plangate.integration import (
    ENTITLEMENTS_PATH,
    PENDING_KEY,
    Clock,
    Pending,
    Requirement,
    problem_answer,
)
from plangate.wsgi import PlanGateMiddleware

__all__ = ["PlanGate", "problem_response", "report_exceptions"]

View = TypeVar("View", bound=Callable[..., Any])


class PlanGate:
    """The Flask extension.

    Settings, from the arguments or else from ``app.config``: ``PLANGATE_CONFIG`` (a path, a
    mapping or a loaded ``Config``; required), ``PLANGATE_STORAGE`` (a storage URI; else the
    config's ``storage:``), ``PLANGATE_ENTITLEMENTS_PATH`` (default
    ``/.plangate/entitlements``; ``None`` turns the endpoint off).
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        config: str | os.PathLike[str] | Mapping[str, Any] | Config | None = None,
        storage: str | Storage | None = None,
        clock: Clock = time.time,
    ) -> None:
        self._config = config
        self._storage = storage
        self._clock = clock
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        config = self._config if self._config is not None else app.config.get("PLANGATE_CONFIG")
        if config is None:
            raise RuntimeError("plangate: set app.config['PLANGATE_CONFIG'] to plangate.yaml")
        storage = self._storage or app.config.get("PLANGATE_STORAGE")
        gate = Gate(config, storage=storage, clock=self._clock)
        app.wsgi_app = PlanGateMiddleware(  # type: ignore[method-assign]
            app.wsgi_app,
            config=gate.config,
            gate=gate,
            views=True,
            entitlements_path=app.config.get("PLANGATE_ENTITLEMENTS_PATH", ENTITLEMENTS_PATH),
        )
        app.extensions["plangate"] = gate
        report_exceptions(app)  # also when app.wsgi_app was wrapped by another middleware first
        app.before_request(_expose_decision)

    def requires(
        self,
        feature: str | None = None,
        *,
        meters: Mapping[str, int | Mapping[str, Any]] | None = None,
        count: Literal["success", "always"] = "success",
        mode: Literal["enforce", "shadow"] = "enforce",
    ) -> Callable[[View], View]:
        """Enforce a requirement on one view, like a rule of ``routes:``.

        ``@gate.requires("export_reports", meters={"api_calls": 1})`` under ``@app.post``.
        A denial returns the problem response; otherwise ``g.plangate`` is the decision.
        """

        def decorate(view: View) -> View:
            label = f"@requires on {view.__qualname__}"
            requirement = Requirement(feature, meters=meters, count=count, mode=mode, name=label)

            def check() -> Response | None:
                pending: Pending | None = request.environ.get(PENDING_KEY)
                if pending is None:
                    raise RuntimeError(f"{label} needs plangate: call PlanGate(app) first")
                decision = pending.require(requirement)
                if decision.problem is not None and not decision.shadowed:
                    return problem_response(decision.problem)
                g.plangate = request.environ["plangate"] = decision
                return None

            if inspect.iscoroutinefunction(view):

                @functools.wraps(view)
                async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                    return check() or await view(*args, **kwargs)

                return cast(View, async_wrapper)

            @functools.wraps(view)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                return check() or view(*args, **kwargs)

            return cast(View, wrapper)

        return decorate


def _expose_decision() -> None:
    decision: Decision | None = request.environ.get("plangate")
    g.plangate = decision


def problem_response(problem: Problem) -> Response:
    """A plangate denial as a Flask response (``application/problem+json``)."""
    answer = problem_answer(problem, head=request.method == "HEAD")
    return Response(answer.body, status=answer.status, headers=answer.headers)


def report_exceptions(app: Flask) -> None:
    """Tell plangate when one of ``app``'s views raised: Flask answers 500 itself and only
    says so with ``got_request_exception``; such a request is refunded, as a raise is."""
    got_request_exception.connect(_view_raised, app)


def _view_raised(sender: Flask, **extra: Any) -> None:
    pending: Pending | None = request.environ.get(PENDING_KEY)
    if pending is not None:
        pending.exchange.handler_raised()
