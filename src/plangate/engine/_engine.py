"""The decision of SPEC §3, as a flow that yields storage operations and does no I/O."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import replace
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from ..config import Config, Limit, Plan, Rule, compile_entitlement
from ..errors import StorageError
from ..identity import Identity, IdentityResult
from ._credits import MAX_UNITS, as_credits, micros
from ._decision import Charge, CreditUse, Decision
from ._headers import QuotaState, ceil_seconds, named_policy, policy_header, quota_headers
from ._periods import period_bounds
from ._problems import Problem, identity_problem
from ._protocol import (
    SLIDING_BUCKETS,
    Counter,
    CounterState,
    CreditCharge,
    CustomerRecord,
    Flow,
    LoadCustomer,
    Peek,
    ReadCredits,
    Reserve,
    ReserveResult,
    Settle,
    credits_key,
    customer_prefix,
)
from ._resolve import resolve_plan


def unavailable(error: StorageError) -> Problem:
    """The 503 for a store that cannot be reached, where a meter's policy says ``deny``."""
    retry = ceil_seconds(getattr(error, "retry_after", 1.0))
    detail = "usage cannot be counted right now; retry shortly"
    return Problem("entitlements-unavailable", detail, headers=(("retry-after", str(retry)),))


_CACHE_SIZE = 50_000  # entries of each per-request cache before it starts afresh

_ROUTE_CACHE_SIZE = 10_000  # (method, path) pairs remembered
_ROUTE_KEY_MAX = 256  # longer paths are matched every time

ChargeKey = tuple[str, int, int, "datetime | None"]  # customer, id(plan), rule, anchor
PlanKey = tuple[str, Mapping[str, int], Mapping[str, Any]]  # plan, add-ons, overrides


def _epoch(moment: datetime) -> float:
    """Seconds since the epoch; a time without a zone is taken as UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


#: what shadow limits would have refused (``mode: shadow`` on a limit)
shadow_logger = logging.getLogger("plangate.shadow")


class Engine:
    """Decides requests against one config. Pure: facts in, decisions and ``Op``s out.

    ``new_id`` names each reservation (commits and refunds name it, once each): the driver
    supplies an unguessable one, as it supplies the time.
    """

    def __init__(self, config: Config, *, new_id: Callable[[], str]) -> None:
        model = config.model
        self.new_id = new_id
        self.config = config
        self.catalog = config.catalog
        self.kinds = {name: feature.kind for name, feature in model.features.items()}
        self.units = {name: feature.unit for name, feature in model.features.items()}
        self.upgrade_url = model.responses.upgrade_url
        self.legacy_headers = model.responses.legacy_headers
        self.deny_unmatched = model.unmatched == "deny"
        #: ``mode: shadow`` (or PLANGATE_MODE=shadow): every rule decides and logs, none blocks
        self.shadow_all = model.mode == "shadow"
        #: what each meter does when the store cannot be reached (``on_storage_error``);
        #: credits are money: they refuse (``deny``) unless their feature says otherwise
        self.on_error = {
            name: feature.on_storage_error
            or ("deny" if feature.kind == "credits" else model.on_storage_error)
            for name, feature in model.features.items()
        }
        #: seconds the hourly usage aggregates are kept after their hour (billing.retention)
        self.usage_ttl = config.catalog.usage_retention
        #: sub-units per credit of each credits feature
        self.scales = self.catalog.credit_scales
        self._router = self.catalog.router
        self._rules = self.catalog.rules
        self._charges: dict[ChargeKey, Charge] = {}
        #: the plans of customers with add-ons or overrides, by what they are built from;
        #: charges are cached by plan identity, so both caches start afresh together
        self._resolved: dict[PlanKey, Plan] = {}
        self._addons = self.catalog.addons
        self._compile = lambda feature, value: compile_entitlement(model, feature, value)
        self._routes: dict[tuple[str, str], tuple[int, dict[str, str]] | None] = {}

    # 1. route ----------------------------------------------------------------------------

    def route(self, method: str, path: str, *, explain: bool = False) -> Decision:
        """The rule for a request. ``decision.rule is None``: unmatched; public: no more to do."""
        method = method.upper()  # werkzeug routes "get" as GET: so must the rules
        # The router's cost does not grow with the rule count (about 1 µs); a hit here costs a
        # tenth of that on the paths an API serves again and again. Bounded: clients invent
        # paths, so a full cache starts afresh and long paths are not kept.
        key = (method, path)
        try:
            found = self._routes[key]
        except KeyError:
            found = self._router.match(method, path)
            if len(path) <= _ROUTE_KEY_MAX:
                if len(self._routes) >= _ROUTE_CACHE_SIZE:
                    self._routes.clear()
                self._routes[key] = found
        if found is None:
            decision = Decision(None, {}, self.kinds, explain)
            if self.deny_unmatched:
                detail = f"{method} {path} is not an API route of this service"
                decision.problem = Problem("route-not-allowed", detail)
                decision.shadowed = self.shadow_all
            if decision.reasons is not None:
                policy = "deny" if self.deny_unmatched else "allow"
                decision.reasons.append(f"no route rule matches: unmatched {policy}")
            return decision
        index, params = found
        rule = self._rules[index]
        decision = Decision(rule, params, self.kinds, explain)
        if decision.reasons is not None:
            public = " (public)" if rule.public else ""
            decision.reasons.append(f"route rule {index}: {rule.match}{public}")
        return decision

    # 2-5. identity, entitlements, feature, meters -----------------------------------------

    def decide(
        self,
        decision: Decision,
        identity: IdentityResult,
        now: float,
        *,
        consume: bool = True,
    ) -> Flow[Decision]:
        """Complete ``decision`` for a non-public rule. ``consume=False`` reserves nothing."""
        rule = decision.rule
        assert rule is not None
        reasons = decision.reasons
        if not isinstance(identity, Identity):
            self._deny(decision, identity_problem(identity))
            return decision
        decision.identity = identity
        if reasons is not None:
            reasons.append(f"customer {identity.customer!r}")

        try:
            record: CustomerRecord | None = yield LoadCustomer(identity.customer)
        except StorageError:  # plans keep deciding from the token's claims
            record = None
        plan = self._plan(decision, identity, record, now)
        if plan is None:
            return decision
        decision.plan_entitlements = plan

        for feature in rule.required:
            if not plan.grants(feature):
                detail = f"the {plan.name} plan does not include {feature}"
                members = self._upsell(feature=feature, plan=plan.name)
                self._deny(decision, Problem("feature-not-in-plan", detail, members))
                if not decision.shadowed:
                    return decision
                break  # shadow mode: still count what the plan meters
        else:
            if reasons is not None and rule.feature:
                reasons.append(f"feature {rule.feature}: granted by {plan.name}")

        anchor = record.billing_anchor if record else None
        charge = self._charge(rule, identity.customer, plan, anchor, now)
        if charge is None:
            return decision
        decision.charge = charge
        if not consume:
            try:
                states = yield Peek(charge.counters, now)
            except StorageError as exc:
                self._deny(decision, unavailable(exc))
                return decision
            decision.states = tuple(
                CounterState(s.used + c.cost, s.reset_after)
                for c, s in zip(charge.counters, states, strict=True)
            )
            if reasons is not None:
                reasons.append("meters: " + self._describe(charge, decision.states))
            over = [
                i
                for i, (c, s) in enumerate(zip(charge.counters, states, strict=True))
                if c.limit is not None and s.used + c.cost > c.limit
            ]
            if over and decision.problem is None:
                wait = max(states[i].reset_after for i in over)
                self._deny_quota(decision, plan, over, wait)
            return decision

        decision.reservation_id = self.new_id()
        enforce = not (rule.shadow or self.shadow_all)
        try:
            result = yield Reserve(
                charge.counters,
                now,
                enforce=enforce,
                reservation_id=decision.reservation_id,
                credits=charge.credits,
            )
        except StorageError as exc:  # a policy of "deny" (the others fall back in the store)
            decision.reservation_id = ""
            self._deny(decision, unavailable(exc))
            return decision
        decision.states = result.states
        decision.slots = result.slots
        if result.admitted or result.slots or not enforce:  # shadow mode: seen, not taken
            decision.credit_states = result.credits
        if charge.shadow_limits and result.slots:
            self._shadow_limits(decision, charge, result.states)
        if reasons is not None:
            reasons.append("meters: " + self._describe(charge, result.states))
        if result.violated and decision.problem is None:
            self._deny_quota(decision, plan, result.violated, result.retry_after)
            if not decision.shadowed:
                return decision
        if result.short and decision.problem is None:
            self._deny_credits(decision, charge, result)
            if not decision.shadowed:
                return decision
        if charge.policy:
            decision.headers = self._quota_headers(charge, result.states)
        return decision

    def _plan(
        self,
        decision: Decision,
        identity: Identity,
        record: CustomerRecord | None,
        now: float,
    ) -> Plan | None:
        """The customer's plan, resolved: override > add-ons > plan > ``default_plan``."""
        name: str | None
        if record is not None and record.plan:
            name, source = record.plan, "the customer store"
            ends = record.trial_ends_at
            if ends is not None and now < _epoch(ends):
                decision.trial_ends_at = ends
            elif ends is not None:
                # The trial is over: back to the plan before it, with nothing written now.
                ended = f"the trial of {record.plan} ended {ends.isoformat()}"
                name, source = record.previous_plan, f"the customer store; {ended}"
                if not name and self.catalog.default_plan:
                    name, source = self.catalog.default_plan, f"default_plan; {ended}"
                    decision.plan_source = "default"
                if not name:
                    detail = f"customer {identity.customer!r} has no plan: {ended}"
                    self._deny(decision, Problem("no-active-plan", detail, self._upsell()))
                    return None
        elif identity.plan:
            name, source = identity.plan, "the token's plan claim"
        elif self.catalog.default_plan:
            name, source = self.catalog.default_plan, "default_plan"
            decision.plan_source = "default"
        else:
            detail = f"customer {identity.customer!r} has no plan"
            self._deny(decision, Problem("no-active-plan", detail, self._upsell()))
            return None
        plan = self.catalog.plans.get(name)
        if plan is None:
            detail = f"customer {identity.customer!r} is on plan {name!r}, which is not offered"
            self._deny(decision, Problem("no-active-plan", detail, self._upsell()))
            return None
        if decision.reasons is not None:
            decision.reasons.append(f"plan {name} (from {source})")
        if record is not None and (record.addons or record.overrides):
            plan = self._resolve(plan, record.addons, record.overrides)
            if decision.reasons is not None:
                layers = [f"add-ons {dict(record.addons)}"] if record.addons else []
                if record.overrides:
                    layers.append(f"overrides {dict(record.overrides)}")
                decision.reasons.append("with " + " and ".join(layers))
        return plan

    def _resolve(self, plan: Plan, addons: Mapping[str, int], overrides: Mapping[str, Any]) -> Plan:
        key = (plan.name, addons, overrides)
        resolved = self._resolved.get(key)
        if resolved is None:
            resolved = resolve_plan(
                plan,
                addons,
                overrides,
                catalog_addons=self._addons,
                kinds=self.kinds,
                compile_override=self._compile,
            )
            if len(self._resolved) >= _CACHE_SIZE:
                self._resolved.clear()
                self._charges.clear()
            self._resolved[key] = resolved
        return resolved

    def _charge(
        self, rule: Rule, customer: str, plan: Plan, anchor: datetime | None, now: float
    ) -> Charge | None:
        """What the rule charges; None if it meters nothing the plan grants."""
        key = (customer, id(plan), rule.index, anchor)
        charge = self._charges.get(key)
        if charge is None or now >= charge.valid_until:
            # Only a shadowed denial gets here with a meter the plan does not grant.
            costs = [(m.meter, m.cost) for m in rule.meters if m.meter in plan.meters]
            spends = [(m.meter, m.cost) for m in rule.meters if m.meter in plan.credits]
            if not costs and not spends:
                return None
            charge = self.build_charge(costs, customer, plan, anchor, now, spends)
            if len(self._charges) >= _CACHE_SIZE:
                self._charges.clear()
            self._charges[key] = charge
        return charge

    def build_charge(
        self,
        costs: list[tuple[str, int]],
        customer: str,
        plan: Plan,
        anchor: datetime | None,
        now: float,
        spends: list[tuple[str, int]] | None = None,
    ) -> Charge:
        """One counter per limit of every meter charged (unlimited meters get a monthly one),
        and one credit charge per credits feature spent: by the route (``spends``, whole
        credits) or by a meter past its limits (``overage``)."""
        counters: list[Counter] = []
        meters: list[str] = []
        limits: list[Limit | None] = []
        windows: list[int] = []
        valid_until = math.inf
        tag = customer_prefix(customer)
        for meter, cost in costs:
            grant = plan.meters[meter]
            # the meter's first counter also adds its units to the hourly usage aggregates
            usage = meter
            for limit in grant.limits or (None,):
                if limit is not None and limit.window is not None:
                    counter = Counter(
                        f"{tag}{limit.policy}",
                        None if limit.shadow else limit.limit,  # a shadow limit never refuses
                        cost,
                        window=limit.window,
                        on_error=self.on_error[meter],
                        usage=usage,
                        usage_ttl=self.usage_ttl,
                    )
                    # The policy's w: the window an exact log keeps; for buckets, the
                    # window plus the one bucket a unit may outlive it by, so that a client
                    # that sends q units in any w (as the draft reads w) is never refused.
                    window = math.ceil(
                        limit.window
                        if counter.exact
                        else limit.window * (SLIDING_BUCKETS + 1) / SLIDING_BUCKETS
                    )
                else:  # a calendar period; unlimited meters are counted per billing month
                    period = limit.period if limit is not None else "month"
                    start, end = period_bounds(period or "month", now, anchor)
                    policy = limit.policy if limit is not None else f"{meter}-month"
                    quota = limit.limit if limit is not None and not limit.shadow else None
                    counter = Counter(
                        f"{tag}{policy}:{int(start)}",
                        quota,
                        cost,
                        resets_at=end,
                        on_error=self.on_error[meter],
                        usage=usage,
                        usage_ttl=self.usage_ttl,
                    )
                    window = round(end - start)
                    valid_until = min(valid_until, end)
                usage = ""
                counters.append(counter)
                meters.append(meter)
                limits.append(limit)
                windows.append(window)
        policy = policy_header(
            (lim.policy, lim.limit, w)
            for lim, w in zip(limits, windows, strict=True)
            if lim and not lim.shadow  # a limit on trial is not the client's to see
        )
        direct = dict(spends or ())
        overage: dict[str, list[tuple[str, tuple[int, ...], int]]] = {}
        for meter, _ in costs:
            grant = plan.meters[meter]
            if grant.overage is None or grant.rate is None or grant.overage not in self.scales:
                continue
            indices = tuple(
                i for i, (m, lim) in enumerate(zip(meters, limits, strict=True)) if m == meter
                and lim is not None and not lim.shadow
            )  # fmt: skip
            rate = math.ceil(Decimal(str(grant.rate)) * self.scales[grant.overage])
            if indices:
                overage.setdefault(grant.overage, []).append((meter, indices, rate))
        credits: list[CreditCharge] = []
        uses: list[CreditUse] = []
        for feature in [*direct, *(f for f in overage if f not in direct)]:
            account, until = self.credit_charge(customer, feature, plan, anchor, now)
            valid_until = min(valid_until, until)
            groups = overage.get(feature, [])
            spent = direct.get(feature)
            entries = tuple(
                (index, rate, group)
                for group, (_, indices, rate) in enumerate(groups)
                for index in indices
            )
            credits.append(
                replace(
                    account,
                    cost=(spent or 0) * account.scale,
                    direct=spent is not None,
                    overage=entries,
                )
            )
            uses.append(CreditUse(feature, account.scale, spent, tuple(groups)))
        return Charge(
            tuple(counters),
            tuple(meters),
            tuple(limits),
            tuple(windows),
            policy,
            valid_until,
            tuple(credits),
            tuple(uses),
            any(lim is not None and lim.shadow for lim in limits),
            self.shadow_all,
        )

    def credit_charge(
        self, customer: str, feature: str, plan: Plan | None, anchor: datetime | None, now: float
    ) -> tuple[CreditCharge, float]:
        """The balance of ``feature`` for a customer on ``plan`` (None: no plan), with the
        plan's grant for the period containing ``now``; and when that period ends."""
        scale = self.scales.get(feature, 1)
        key = credits_key(customer, feature)
        granted = plan.credits.get(feature) if plan is not None else None
        if granted is None:
            return CreditCharge(
                key, feature, scale=scale, on_error=self.on_error[feature]
            ), math.inf
        start, end = period_bounds(granted.period, now, anchor)
        charge = CreditCharge(
            key,
            feature,
            grant=granted.grant * scale,
            period_start=micros(start),
            period_end=micros(end),
            scale=scale,
            on_error=self.on_error[feature],
        )
        return charge, end

    def _quota_headers(
        self,
        charge: Charge,
        states: tuple[CounterState, ...],
        violated: Collection[str] | None = None,
    ) -> list[tuple[str, str]]:
        return quota_headers(
            charge.policy,
            self._quota_states(charge, states),
            self.legacy_headers,
            violated=violated,
        )

    @staticmethod
    def _quota_states(charge: Charge, states: tuple[CounterState, ...]) -> list[QuotaState]:
        return [
            (lim.policy, lim.limit, max(0, lim.limit - s.used), s.reset_after)
            for lim, s in zip(charge.limits, states, strict=True)
            if lim is not None and not lim.shadow
        ]

    @staticmethod
    def _describe(charge: Charge, states: tuple[CounterState, ...]) -> str:
        parts = []
        for meter, limit, state in zip(charge.meters, charge.limits, states, strict=True):
            if limit is None:
                parts.append(f"{meter} unlimited")
            else:
                left = max(0, limit.limit - state.used)
                shadow = " (shadow)" if limit.shadow else ""
                parts.append(f"{limit.policy} {left}/{limit.limit} left{shadow}")
        return ", ".join(parts)

    @staticmethod
    def _shadow_limits(
        decision: Decision, charge: Charge, states: tuple[CounterState, ...]
    ) -> None:
        """The shadow limits this request went past: logged, counted, not refused."""
        over = tuple(
            lim.policy
            for lim, state in zip(charge.limits, states, strict=True)
            if lim is not None and lim.shadow and state.used > lim.limit
        )
        if over:
            decision.shadow_refused = over
            shadow_logger.info(
                "shadow limit %s would have refused %s (plan %s)",
                ", ".join(over),
                decision.customer,
                decision.plan,
            )

    def _deny(self, decision: Decision, problem: Problem) -> None:
        decision.problem = problem
        decision.shadowed = self.shadow_all or bool(decision.rule and decision.rule.shadow)
        if decision.reasons is not None:
            shadow = " (shadow: let through)" if decision.shadowed else ""
            decision.reasons.append(
                f"deny {problem.status} {problem.name}: {problem.detail}{shadow}"
            )

    def _deny_quota(
        self, decision: Decision, plan: Plan, violated: Any, retry_after: float
    ) -> None:
        charge = decision.charge
        assert charge is not None
        policies = [str(getattr(charge.limits[i], "policy", "")) for i in violated]
        # RateLimit names a violated policy, and Retry-After is never earlier than its t
        named = named_policy(self._quota_states(charge, decision.states), policies)
        retry = max(ceil_seconds(retry_after), ceil_seconds(named[3]) if named else 1)
        members = {"violated-policies": policies, **self._upsell(plan=plan.name)}
        detail = (
            f"the {plan.name} plan's quota {', '.join(policies)} is used up; retry in {retry} s"
        )
        quota = self._quota_headers(charge, decision.states, policies)
        headers = [("retry-after", str(retry)), *quota]
        self._deny(decision, Problem("quota-exceeded", detail, members, tuple(headers)))

    def _deny_credits(self, decision: Decision, charge: Charge, result: ReserveResult) -> None:
        index = result.short[0]
        use, state = charge.uses[index], result.credits[index]
        balance = as_credits(state.balance, use.scale)
        required = as_credits(state.required, use.scale)
        if state.balance <= 0 < state.required or state.required == 0:
            detail = f"the {use.feature} balance is {balance}: top up to continue"
        else:
            detail = f"this request needs {required} {use.feature}; the balance is {balance}"
        members = self._upsell(feature=use.feature, balance=balance, required=required)
        self._deny(decision, Problem("insufficient-credits", detail, members))

    def _upsell(self, **members: Any) -> dict[str, Any]:
        if self.upgrade_url:
            members["upgrade_url"] = self.upgrade_url
        return members

    # 6. after the handler -----------------------------------------------------------------

    def settle(
        self,
        decision: Decision,
        status: int,
        reported: Mapping[str, int],
        clock: Callable[[], float],
        *,
        refund: bool = False,
    ) -> Settle | None:
        """The storage call that commits, adjusts or refunds the reservation; None if none is due.

        ``reported`` holds amounts read from response headers; ``decision.record()`` wins over
        them. ``refund=True`` (the handler raised) gives everything back.
        """
        if decision.settled or not (decision.slots or decision.credit_states):
            return None
        decision.settled = True
        rule = decision.rule
        charge = decision.charge
        assert rule is not None
        assert charge is not None
        counts = not refund and (rule.count_always or status < 400)
        if counts and not reported and not decision.recorded:
            return None  # the reservation was the actual cost: nothing to change
        deltas = []
        recorded = decision.recorded

        def actual(meter: str, reserved: int) -> int:
            return recorded.get(meter, reported.get(meter, reserved)) if counts else 0

        for counter, meter in zip(charge.counters, charge.meters, strict=True):
            deltas.append(actual(meter, counter.cost) - counter.cost)
        credit_deltas = []
        # the config that decided, even if a reload swapped this one in since
        taken = bool(decision.credit_states) and not (rule.shadow or charge.shadow_all)
        for use in charge.uses if taken else ():
            delta = 0
            if use.direct is not None:
                delta += (actual(use.feature, use.direct) - use.direct) * use.scale
            for meter, indices, rate in use.overage:
                cost = charge.counters[indices[0]].cost
                used = actual(meter, cost)
                before = after = 0
                for i in indices:
                    limit, held = charge.counters[i].limit or 0, decision.states[i].used
                    before = max(before, min(cost, held - limit))
                    after = max(after, min(used, held - cost + used - limit))
                delta += (after - before) * rate
            # a reported amount is at most 10^15 units; times a scale and a rate it may pass
            # what a balance holds exactly: no charge is larger than that
            credit_deltas.append(max(-MAX_UNITS, min(MAX_UNITS, delta)))
        if not any(deltas) and not any(credit_deltas):
            return None
        burns = tuple(state.burns for state in decision.credit_states) if credit_deltas else ()
        return Settle(
            decision.reservation_id,
            charge.counters,
            decision.slots,
            tuple(deltas),
            clock(),
            credits=charge.credits if credit_deltas else (),
            credit_deltas=tuple(credit_deltas),
            burns=burns,
        )

    # the entitlements endpoint -----------------------------------------------------------

    def entitlements(self, identity: Identity, now: float) -> Flow[dict[str, Any] | Problem]:
        """What ``GET /.plangate/entitlements`` answers for the caller (nothing is consumed)."""
        try:
            record: CustomerRecord | None = yield LoadCustomer(identity.customer)
        except StorageError:
            record = None
        probe = Decision(None, {}, self.kinds)
        plan = self._plan(probe, identity, record, now)
        if plan is None:
            assert probe.problem is not None
            return probe.problem
        anchor = record.billing_anchor if record else None
        base = probe.plan_source
        features: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for name, kind in self.kinds.items():
            if kind in ("boolean", "config"):
                value = plan.values.get(name, False if kind == "boolean" else None)
                features[name] = "unlimited" if value == math.inf else value
                # a feature no layer grants has its default (off, null)
                granted = base if name in plan.values else "default"
                sources[name] = plan.sources.get(name, granted)
        meters: dict[str, Any] = {}
        for name in plan.meters:
            meter_source = plan.sources.get(name, base)
            charge = self.build_charge([(name, 0)], identity.customer, plan, anchor, now)
            try:
                states = yield Peek(charge.counters, now)
            except StorageError as exc:
                return unavailable(exc)
            entries = []
            for limit, state in zip(charge.limits, states, strict=True):
                if limit is not None and limit.shadow:
                    continue  # on trial: not the customer's to see
                entry: dict[str, Any] = {"used": state.used}
                if limit is None:
                    entry.update(policy=f"{name}-month", limit="unlimited", remaining="unlimited")
                else:
                    where = {"window": limit.window} if limit.window else {"period": limit.period}
                    remaining = max(0, limit.limit - state.used)
                    entry.update(
                        policy=limit.policy, limit=limit.limit, remaining=remaining, **where
                    )
                entry["reset"] = ceil_seconds(state.reset_after) if state.used else 0
                policy = limit.policy if limit is not None else ""
                entry["source"] = plan.limit_sources.get(policy, meter_source)
                entries.append(entry)
            meters[name] = {
                "unit": self.units.get(name),
                "limits": entries,
                "source": meter_source,
            }
        trial_ends_at = record.trial_ends_at if record else None
        credits: dict[str, Any] = {}
        charged = {g.overage for g in plan.meters.values() if g.overage in self.scales}
        for name in self.kinds:
            if name not in plan.credits and name not in charged:
                continue
            account, _ = self.credit_charge(identity.customer, name, plan, anchor, now)
            included = plan.credits.get(name)
            try:
                view = yield ReadCredits(account, micros(now), limit=0)
                balance: int | float | None = as_credits(view.balance, account.scale)
            except StorageError:
                balance = None  # not known now; everything else still is
            credits[name] = {
                "unit": self.units.get(name),
                "balance": balance,
                "grant": included.grant if included else None,
                "period": included.period if included else None,
                "source": plan.sources.get(name, base) if included else "overage",
            }
        return {
            "customer": identity.customer,
            "plan": plan.name,
            "trial_ends_at": trial_ends_at.isoformat() if trial_ends_at else None,
            "features": features,
            "sources": sources,
            "meters": meters,
            "credits": credits,
            **self._upsell(),
        }
