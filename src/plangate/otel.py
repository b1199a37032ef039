"""OpenTelemetry (the ``otel`` extra: ``opentelemetry-api`` only, never the SDK).

``instrument(gate)``: when a span is current and recording as a request is decided (the
app's own, or its framework instrumentation's), it gets ``entitlement.*`` attributes —
customer, plan, feature, decision, reason — and an ``entitlement.decision`` event. Without
an SDK configured no span records, and this costs one context lookup a request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._gate import _Gate
    from .engine import Decision


def attributes(decision: Decision) -> dict[str, Any]:
    """The ``entitlement.*`` attributes of a decision (those it has)."""
    problem = decision.problem
    outcome = "allow" if problem is None else ("shadow-deny" if decision.shadowed else "deny")
    found: dict[str, Any] = {"entitlement.decision": outcome}
    if decision.customer is not None:
        found["entitlement.customer"] = decision.customer
    if decision.plan is not None:
        found["entitlement.plan"] = decision.plan
    rule = decision.rule
    if rule is not None:
        found["entitlement.rule"] = rule.match
        if rule.feature:
            found["entitlement.feature"] = rule.feature
    if problem is not None:
        found["entitlement.reason"] = problem.name
        policies = problem.members.get("violated-policies")
        if policies:
            found["entitlement.policies"] = list(policies)
    if decision.shadow_refused:
        found["entitlement.shadow_policies"] = list(decision.shadow_refused)
    return found


def observe(method: str, path: str, decision: Decision) -> None:
    """A gate observer: the current span, if it records, gets the decision."""
    span = _current_span()
    if not span.is_recording():
        return
    found = attributes(decision)
    span.set_attributes(found)
    span.add_event("entitlement.decision", found)


def _no_span() -> Any:
    raise RuntimeError("plangate.otel.instrument() was not called")


_current_span = _no_span


def instrument(gate: _Gate) -> None:
    """Put each of ``gate``'s decisions on the span current when it is made
    (``ImportError`` here, not on every request, without ``opentelemetry-api``)."""
    global _current_span
    from opentelemetry import trace

    _current_span = trace.get_current_span
    if observe not in gate.observers:
        gate.observers.append(observe)
