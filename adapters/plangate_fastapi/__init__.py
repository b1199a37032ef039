"""plangate for FastAPI: ``PlanGate(app, config=...)``, ``Depends(requires(...))``.

``PlanGate`` installs ``plangate.asgi.PlanGateMiddleware`` (every route rule of the config is
enforced there, before routing), renders denials of per-operation requirements as problem
responses, and documents plangate's responses in the app's OpenAPI schema.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.routing import APIRoute
from starlette.responses import Response

from plangate import AsyncGate, Decision, Problem, Storage
from plangate.asgi import PlanGateMiddleware
from plangate.config import Config
from plangate.engine import PROBLEM_BASE
from plangate.integration import (
    ENTITLEMENTS_PATH,
    PENDING_KEY,
    Clock,
    Pending,
    ReloadOutcome,
    Requirement,
    problem_answer,
)

__all__ = ["Denied", "PlanGate", "PlanGateDecision", "get_decision", "requires"]


class Denied(Exception):
    """Raised by a ``requires()`` dependency; ``PlanGate`` renders it as the problem response."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.detail)
        self.problem = problem


class PlanGate:
    """Put plangate in front of a FastAPI app.

    ``PlanGate(app, config="plangate.yaml")`` loads and checks the config now (a broken file
    fails here), adds the middleware, and documents 401/402/429 on every gated operation.
    """

    def __init__(
        self,
        app: FastAPI,
        config: str | os.PathLike[str] | Mapping[str, Any] | Config,
        *,
        storage: str | Storage | None = None,
        entitlements_path: str | None = ENTITLEMENTS_PATH,
        clock: Clock = time.time,
    ) -> None:
        self.gate = AsyncGate(config, storage=storage, clock=clock)
        app.add_middleware(
            PlanGateMiddleware,
            config=self.gate.config,
            gate=self.gate,
            views=True,
            entitlements_path=entitlements_path,
        )
        app.add_exception_handler(Denied, _render_denial)
        app.state.plangate = self
        self._app = app
        # a reloaded config may gate other operations: the schema is built again
        self.gate.reload_listeners.append(self._forget_schema)
        self._openapi = app.openapi
        app.openapi = self.openapi  # type: ignore[method-assign]

    def _forget_schema(self, outcome: ReloadOutcome) -> None:
        if outcome.changed:
            self._app.openapi_schema = None

    def openapi(self) -> dict[str, Any]:
        """The app's schema, with plangate's responses on every operation it gates."""
        app = self._app
        if app.openapi_schema:
            return app.openapi_schema
        schema = self._openapi()
        components = schema.setdefault("components", {})
        components.setdefault("schemas", {})["Problem"] = PROBLEM_SCHEMA
        components.setdefault("securitySchemes", {})[SECURITY_SCHEME] = self._security_scheme()
        for route in app.routes:
            if not isinstance(route, APIRoute):
                continue
            for method in route.methods or ():
                gated, metered = self._gated(route, method)
                operation = schema.get("paths", {}).get(route.path_format, {}).get(method.lower())
                if gated and operation is not None:
                    operation.setdefault("security", [{SECURITY_SCHEME: []}])
                    responses = operation.setdefault("responses", {})
                    for status, response in _responses(metered).items():
                        responses.setdefault(status, response)
        app.openapi_schema = schema
        return schema

    def _security_scheme(self) -> dict[str, Any]:
        """Where the token goes, as the config's ``identity.token_from`` says: the scheme
        behind Swagger UI's Authorize button."""
        source = self.gate.config.model.identity.token_from
        kind, _, name = source.partition(":")
        if kind == "cookie":
            return {"type": "apiKey", "in": "cookie", "name": name}
        if name.lower() == "authorization":
            return {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
        return {"type": "apiKey", "in": "header", "name": name}

    def _gated(self, route: APIRoute, method: str) -> tuple[bool, bool]:
        """Whether plangate decides this operation, and whether it meters it."""
        gated = metered = False
        sample = re.sub(r"\{[^}]*\}", "x", route.path_format)  # a path the route would match
        rule = self.gate.engine.route(method, sample).rule
        if rule is not None and not rule.public:
            gated, metered = True, bool(rule.meters)
        for requirement in _requirements(route.dependant):
            gated = True
            metered = metered or bool(requirement.declaration["meters"])
        return gated, metered


def requires(
    feature: str | None = None,
    *,
    meters: Mapping[str, int | Mapping[str, Any]] | None = None,
    count: Literal["success", "always"] = "success",
    mode: Literal["enforce", "shadow"] = "enforce",
) -> Callable[[Request], Any]:
    """A dependency that enforces a requirement for one operation, like a rule of ``routes:``.

    ``@app.post("/export", dependencies=[Depends(requires("export_reports"))])``, or
    ``decision: Decision = Depends(requires(meters={"ai_tokens": 500}))`` to receive the
    decision. Denials are the same problem responses as the middleware's.
    """
    label = f"requires({feature!r})" if feature else f"requires(meters={dict(meters or {})!r})"
    requirement = Requirement(feature, meters=meters, count=count, mode=mode, name=label)

    async def dependency(request: Request) -> Decision:
        pending: Pending | None = request.scope.get("state", {}).get(PENDING_KEY)
        if pending is None:
            raise RuntimeError(f"{label} needs plangate: call PlanGate(app, config=...) first")
        decision = await pending.arequire(requirement)
        if decision.problem is not None and not decision.shadowed:
            raise Denied(decision.problem)
        request.state.plangate = decision
        return decision

    dependency.plangate_requirement = requirement  # type: ignore[attr-defined]
    dependency.__name__ = f"plangate_{label}"
    return dependency


async def get_decision(request: Request) -> Decision | None:
    """The decision plangate made for this request: a matching rule's, or a requirement's.

    ``None`` for a route plangate does not gate (public, or matched by no rule).
    """
    decision: Decision | None = getattr(request.state, "plangate", None)
    return decision


#: ``decision: PlanGateDecision`` in a path operation's parameters
PlanGateDecision = Annotated[Decision | None, Depends(get_decision)]


async def _render_denial(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Denied)
    answer = problem_answer(exc.problem, head=request.method == "HEAD")
    return Response(answer.body, status_code=answer.status, headers=dict(answer.headers))


def _requirements(dependant: Any) -> list[Requirement]:
    found = []
    for sub in dependant.dependencies:
        requirement = getattr(sub.call, "plangate_requirement", None)
        if isinstance(requirement, Requirement):
            found.append(requirement)
        found.extend(_requirements(sub))
    return found


#: the name of plangate's entry in ``components.securitySchemes``
SECURITY_SCHEME = "plangate"

PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "An RFC 9457 problem: why plangate refused the request.",
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string", "format": "uri", "examples": [PROBLEM_BASE + "quota-exceeded"]},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "feature": {"type": "string", "description": "402: the feature the plan lacks"},
        "plan": {"type": "string", "description": "the customer's plan"},
        "upgrade_url": {"type": "string", "format": "uri"},
        "violated-policies": {
            "type": "array",
            "items": {"type": "string"},
            "description": "429: the quota policies that are used up",
        },
    },
}

_PROBLEM = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
_QUOTA_HEADERS = {
    "RateLimit-Policy": {
        "description": "The quota policies of this operation (draft-ietf-httpapi-ratelimit-headers-10).",
        "schema": {"type": "string"},
    },
    "RateLimit": {
        "description": "What is left of the policy closest to exhaustion.",
        "schema": {"type": "string"},
    },
}


def _responses(metered: bool) -> dict[str, Any]:
    responses: dict[str, Any] = {
        "401": {
            "description": "Unauthenticated: a missing, expired or invalid token.",
            "content": _PROBLEM,
            "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
        },
        "402": {
            "description": "Payment required: the plan does not include this, or has no credits left.",
            "content": _PROBLEM,
        },
    }
    if metered:
        responses["429"] = {
            "description": "Quota exceeded.",
            "content": _PROBLEM,
            "headers": {
                "Retry-After": {
                    "description": "Seconds until the quota has room again.",
                    "schema": {"type": "integer"},
                },
                **_QUOTA_HEADERS,
            },
        }
    return responses
