"""Requirements declared on a view instead of in ``routes:``, and the decisions of a request.

The framework adapters declare a ``Requirement`` per view (a FastAPI dependency, a Flask or
Django decorator). When the view is reached, the adapter asks the middleware's gate to decide
it for the request; the decision joins the request's ``Pending`` decisions, which the
middleware settles once the response status is known, exactly as it settles a route rule.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from .config import Config, Rule, declared_rule
from .engine import Decision

if TYPE_CHECKING:
    from ._gate import AsyncGate, Gate

#: where the middlewares put a request's ``Pending`` (ASGI scope state, WSGI environ)
PENDING_KEY = "plangate.pending"


class Requirement:
    """What a view needs: a feature, meters with their cost, as a rule of ``routes:`` says.

    ``Requirement("export_reports", meters={"api_calls": 1})``. Checked against the config the
    first time it is used with it: an unknown feature or a meter that is not metered raises
    ``ConfigError`` naming ``name``.
    """

    def __init__(
        self,
        feature: str | None = None,
        *,
        meters: Mapping[str, int | Mapping[str, Any]] | None = None,
        count: Literal["success", "always"] = "success",
        mode: Literal["enforce", "shadow"] = "enforce",
        name: str = "requires()",
    ) -> None:
        declaration: dict[str, Any] = {"meters": dict(meters or {}), "count": count, "mode": mode}
        if feature is not None:
            declaration["feature"] = feature
        self.declaration = declaration
        self.name = name
        self._rules: weakref.WeakKeyDictionary[Config, Rule] = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"Requirement({self.declaration!r})"

    def rule(self, config: Config) -> Rule:
        rule = self._rules.get(config)
        if rule is None:
            rule = declared_rule(config.model, self.declaration, self.name)
            self._rules[config] = rule
        return rule


class Pending:
    """One request's decisions that reserved units or carry quota headers, in order."""

    __slots__ = ("decisions", "gate", "token")

    def __init__(self, gate: Gate | AsyncGate, token: str | None) -> None:
        self.gate = gate
        self.token = token
        self.decisions: list[Decision] = []

    def require(self, requirement: Requirement) -> Decision:
        """Decide ``requirement`` for this request (a blocking gate: WSGI, Django sync)."""
        from ._gate import Gate

        assert isinstance(self.gate, Gate), "use arequire() under ASGI"
        decision = self.gate.check_declared(requirement.rule(self.gate.config), self.token)
        return self._keep(decision)

    async def arequire(self, requirement: Requirement) -> Decision:
        """Decide ``requirement`` for this request (an asyncio gate: ASGI, Django async)."""
        from ._gate import AsyncGate

        assert isinstance(self.gate, AsyncGate), "use require() under WSGI"
        rule = requirement.rule(self.gate.config)
        return self._keep(await self.gate.check_declared(rule, self.token))

    def _keep(self, decision: Decision) -> Decision:
        if decision.allowed and (decision.reserved or decision.headers):
            self.decisions.append(decision)
        return decision
