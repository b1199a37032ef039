"""The decision for one request, and the handler's view of its customer."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..config import Limit, Plan, Rule
from ..identity import Identity
from ._credits import as_credits
from ._problems import Problem
from ._protocol import Counter, CounterState, CreditCharge, CreditState

logger = logging.getLogger("plangate")


@dataclass(frozen=True, slots=True)
class CreditUse:
    """How a rule spends one credits feature, for the settle: the whole credits its route
    meters (None: it does not), and per metered meter charged past its limits, the meter,
    its counters' indices and the sub-units each unit past them costs."""

    feature: str
    scale: int
    direct: int | None
    overage: tuple[tuple[str, tuple[int, ...], int], ...] = ()


@dataclass(frozen=True, slots=True)
class Charge:
    """What a rule charges one customer on one plan: computed once, reused until ``valid_until``."""

    counters: tuple[Counter, ...]
    meters: tuple[str, ...]  # the meter of each counter
    limits: tuple[Limit | None, ...]  # the limit of each counter; None: unlimited
    windows: tuple[int, ...]  # each counter's window or period length, whole seconds
    policy: str  # the RateLimit-Policy header value ("" when nothing is limited)
    valid_until: float  # the end of the earliest calendar period among the counters
    credits: tuple[CreditCharge, ...] = ()  # the credit balances the rule takes from
    uses: tuple[CreditUse, ...] = ()  # how, one per balance
    shadow_limits: bool = False  # a limit is in shadow mode: see what it would refuse
    shadow_all: bool = False  # the whole config is in shadow mode (``mode: shadow``)


class Decision:
    """What plangate decided for one request.

    Handlers read it as ``request.state.plangate`` (ASGI) or ``environ["plangate"]`` (WSGI):
    ``customer``, ``plan``, ``has(feature)``, ``value(feature)``, ``source(feature)`` (which
    layer granted it), ``trial_ends_at``, ``remaining(meter)``, ``balance(credits)`` and
    ``record(meter, amount)`` to set what this request actually used.
    """

    __slots__ = (
        "_kinds",
        "charge",
        "credit_states",
        "headers",
        "identity",
        "params",
        "plan_entitlements",
        "plan_source",
        "problem",
        "reasons",
        "recorded",
        "reservation_id",
        "rule",
        "settled",
        "shadow_refused",
        "shadowed",
        "slots",
        "states",
        "trial_ends_at",
    )

    def __init__(
        self,
        rule: Rule | None,
        params: Mapping[str, str],
        kinds: Mapping[str, str],
        explain: bool = False,
    ) -> None:
        self.rule = rule
        self.params = params
        self._kinds = kinds
        self.identity: Identity | None = None
        #: the customer's plan, its add-ons and overrides laid over it
        self.plan_entitlements: Plan | None = None
        #: where the plan came from: "plan" (the store or the token), "default" (default_plan)
        self.plan_source = "plan"
        #: when the trial the customer is on ends (None: not on a trial)
        self.trial_ends_at: datetime | None = None
        self.problem: Problem | None = None
        self.shadowed = False  # denied, but the rule is in shadow mode: let through
        self.headers: list[tuple[str, str]] = []  # quota headers for the response
        #: why, step by step; kept only when explaining (``plangate explain``)
        self.reasons: list[str] | None = [] if explain else None
        self.charge: Charge | None = None
        self.states: tuple[CounterState, ...] = ()  # each counter after the reservation
        self.slots: tuple[int, ...] = ()  # where the storage placed each cost
        #: each credit balance after the reservation, and where its credits came from
        self.credit_states: tuple[CreditState, ...] = ()
        self.reservation_id = ""  # names the reservation, once units are reserved
        self.recorded: dict[str, int] = {}
        self.settled = False
        #: the shadow limits (``mode: shadow`` on a limit) this request went past
        self.shadow_refused: tuple[str, ...] = ()

    def __repr__(self) -> str:
        state = "allowed" if self.allowed else f"denied {self.problem.name}"  # type: ignore[union-attr]
        return f"<Decision {state} customer={self.customer!r} plan={self.plan!r}>"

    @property
    def allowed(self) -> bool:
        return self.problem is None or self.shadowed

    @property
    def reserved(self) -> bool:
        """Whether units were reserved that must be committed or refunded."""
        return bool(self.slots or self.credit_states) and not self.settled

    @property
    def customer(self) -> str | None:
        return self.identity.customer if self.identity else None

    @property
    def plan(self) -> str | None:
        return self.plan_entitlements.name if self.plan_entitlements else None

    @property
    def meters(self) -> tuple[str, ...]:
        """The meter of each reserved counter."""
        return self.charge.meters if self.charge else ()

    def has(self, feature: str) -> bool:
        """Whether the customer's plan grants ``feature``."""
        plan = self.plan_entitlements
        return plan is not None and plan.grants(feature)

    def value(self, feature: str) -> Any:
        """A config feature's value (``math.inf`` for unlimited), a boolean's on/off, else None."""
        plan = self.plan_entitlements
        if self._kinds.get(feature) == "boolean":
            return plan is not None and feature in plan.values
        if plan is None:
            return None
        return plan.values.get(feature)

    def source(self, feature: str) -> str:
        """Which layer decided ``feature``: "override", "addon", "plan" (the customer's
        plan: the store's, else the token's), or "default" (``default_plan``, or a feature
        no layer grants). The entitlements endpoint reports the same per feature."""
        plan = self.plan_entitlements
        if plan is None:
            return "default"
        granted = feature in plan.values or feature in plan.meters or feature in plan.credits
        return plan.sources.get(feature, self.plan_source if granted else "default")

    def remaining(self, meter: str) -> float:
        """Units of ``meter`` left after this request's reservation (``math.inf`` if unlimited).

        Known for the meters this request's route charges; the entitlements endpoint reports
        every meter. A meter that shadow mode let through without counting is ``math.inf``.
        """
        charge = self.charge
        left: float | None = None
        if charge is not None and self.states:
            for i, name in enumerate(charge.meters):
                if name != meter:
                    continue
                limit = charge.limits[i]
                if limit is None or limit.shadow:  # a limit on trial is not the client's
                    here = math.inf
                else:
                    here = max(0, limit.limit - self.states[i].used)
                left = here if left is None else min(left, here)
        if left is None:
            if meter in self._rule_meters():
                return math.inf  # not counted: a shadowed denial came before the meters
            charged = ", ".join(self._rule_meters()) or "none"
            raise LookupError(
                f"remaining({meter!r}): the route of this request does not meter {meter} "
                f"(it meters: {charged}); GET /.plangate/entitlements reports every meter"
            )
        return left

    def balance(self, feature: str) -> int | float:
        """The customer's balance of credits ``feature`` after this request's reservation,
        in credits (debt makes it negative). Known for the balances this request's route
        spends (directly or as overage); the entitlements endpoint reports every balance."""
        charge = self.charge
        if charge is not None and self.credit_states:
            for use, state in zip(charge.uses, self.credit_states, strict=True):
                if use.feature == feature:
                    return as_credits(state.balance, use.scale)
        features = [use.feature for use in charge.uses] if charge is not None else []
        spent = ", ".join(features)
        if feature in features:  # a denial came before the balances were asked
            raise LookupError(f"balance({feature!r}): not known: this request was refused first")
        raise LookupError(
            f"balance({feature!r}): the route of this request does not take credits from "
            f"{feature} (it takes from: {spent or 'none'}); GET /.plangate/entitlements "
            "reports every balance"
        )

    def record(self, meter: str, amount: int) -> None:
        """Set what this request actually used of ``meter``; charged once the response is sent."""
        if meter not in self._rule_meters():
            charged = ", ".join(self._rule_meters()) or "none"
            raise ValueError(
                f"record({meter!r}): the route of this request does not meter {meter} "
                f"(it meters: {charged})"
            )
        if isinstance(amount, bool) or not isinstance(amount, int) or not 0 <= amount <= 10**15:
            raise ValueError(
                f"record({meter!r}, {amount!r}): the amount is a whole number from 0 to 10^15"
            )
        if self.settled:
            logger.warning(
                "record(%r, %d) after the response was settled is ignored: call it before "
                "the handler returns its response",
                meter,
                amount,
            )
            return
        self.recorded[meter] = amount

    def _rule_meters(self) -> tuple[str, ...]:
        return tuple(m.meter for m in self.rule.meters) if self.rule else ()
