"""The config, compiled: plans flattened and typed, routes compiled, every reference checked."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

import jwt

from ..errors import ConfigError, ConfigIssue
from ._durations import parse_duration
from ._loader import Document, Loc, validate_model
from ._models import (
    MAX_AMOUNT,
    AddonGrantSpec,
    BillingConfig,
    ConfigModel,
    CreditGrantSpec,
    HeaderCost,
    LimitSpec,
    RouteConfig,
)
from ._routes import Router, Template, parse_template, shadowed

UNLIMITED = "unlimited"

# Names travel in quota headers (structured-field strings), problem bodies, storage keys and
# X-Plangate-* headers: keep them to characters that are safe in all of them.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True, slots=True)
class Limit:
    """``limit`` units per sliding ``window`` (seconds) or per calendar ``period``."""

    meter: str
    limit: int
    policy: str  # "api_calls-1d": the quota policy name in RateLimit headers
    window: float | None = None
    period: str | None = None
    #: ``mode: shadow``: counted, never refused; what it would refuse is logged
    shadow: bool = False


@dataclass(frozen=True, slots=True)
class MeterGrant:
    """A metered feature in a plan: every limit must hold; none at all means unlimited."""

    limits: tuple[Limit, ...]
    overage: str | None = None  # the credits feature charged past the limits
    rate: float | None = None  # credits per unit past them

    @property
    def unlimited(self) -> bool:
        return not self.limits


@dataclass(frozen=True, slots=True)
class CreditGrant:
    grant: int
    period: str


@dataclass(frozen=True)
class Plan:
    """A plan after ``extends``: every feature it grants, typed by the feature's kind."""

    name: str
    legacy: bool
    trial_days: int | None
    values: Mapping[str, Any]  # boolean → True, config → its value (unlimited → math.inf)
    meters: Mapping[str, MeterGrant]
    credits: Mapping[str, CreditGrant]
    #: a customer's resolved plan: the layer ("addon", "override") of each feature and each
    #: limit's policy that did not come from the plan itself; empty for a plan of the config
    sources: Mapping[str, str] = field(default_factory=dict)
    limit_sources: Mapping[str, str] = field(default_factory=dict)

    def grants(self, feature: str) -> bool:
        return feature in self.values or feature in self.meters or feature in self.credits


@dataclass(frozen=True, slots=True)
class MeterCost:
    """What a route charges one meter: a fixed cost, or a response header's value."""

    meter: str
    cost: int  # the fixed cost, or the estimate reserved before the handler runs
    header: str | None = None  # lower-case response header carrying the actual amount
    expose: bool = False


@dataclass(frozen=True)
class Rule:
    index: int
    template: Template
    public: bool
    feature: str | None
    meters: tuple[MeterCost, ...]
    count_always: bool
    shadow: bool
    #: every feature the plan must grant: the rule's feature, then each meter
    required: tuple[str, ...] = field(init=False)
    #: lower-case response header → the meter cost it reports
    usage_headers: Mapping[str, MeterCost] = field(init=False)

    def __post_init__(self) -> None:
        required = ((self.feature,) if self.feature else ()) + tuple(m.meter for m in self.meters)
        object.__setattr__(self, "required", required)
        headers = {m.header: m for m in self.meters if m.header}
        object.__setattr__(self, "usage_headers", headers)

    @property
    def match(self) -> str:
        methods = "|".join(self.template.methods)
        return f"{methods} {self.template.path}" if methods else self.template.path


@dataclass(frozen=True, slots=True)
class AddonGrant:
    """What one unit of an add-on gives a feature: ``add`` units to every limit of a meter,
    or (``add=None``) the feature itself."""

    feature: str
    add: int | None = None


#: the finest sub-unit a credits feature is kept in: a millionth of a credit
MAX_RATE_DECIMALS = 6
#: the most sub-units a balance holds exactly (a Redis script's numbers are doubles)
MAX_SUBUNITS = 2**53 - 1


def decimals(rate: float) -> int:
    """The decimal places ``rate`` is written with (0.001 → 3; 2.0 → 0)."""
    exponent = Decimal(str(rate)).normalize().as_tuple().exponent
    return max(0, -exponent) if isinstance(exponent, int) else 0


def max_credits(scale: int) -> int:
    """The most whole credits one grant may hold in a feature kept in ``scale`` sub-units."""
    return min(10**15, MAX_SUBUNITS // scale)


@dataclass(frozen=True)
class Catalog:
    plans: Mapping[str, Plan]
    rules: tuple[Rule, ...]
    router: Router
    default_plan: str | None
    notes: tuple[ConfigIssue, ...] = field(default=())  # valid, but has no effect
    addons: Mapping[str, tuple[AddonGrant, ...]] = field(default_factory=dict)
    #: credits feature → sub-units per credit: 10 ** (the most decimals of an overage rate
    #: that charges it), so that every charge is a whole number of sub-units
    credit_scales: Mapping[str, int] = field(default_factory=dict)
    #: seconds hourly usage aggregates are kept after their hour ends (billing.retention)
    usage_retention: int = 35 * 86400


def compile_entitlement(model: ConfigModel, feature: str, value: Any) -> Any:
    """A customer's override of ``feature``, typed as a plan's grant is (None: not granted);
    ``ConfigError`` for an unknown feature or a value of the wrong kind."""
    builder = _Builder(model, Document({}, {}, None))
    grant = builder._entitlement(feature, value, ("overrides", feature))
    if builder.issues:
        raise ConfigError(builder.issues)
    return grant


def build_catalog(model: ConfigModel, doc: Document) -> Catalog:
    builder = _Builder(model, doc)
    catalog = builder.build()
    if builder.issues:
        builder.issues.sort(key=lambda issue: (issue.line or 0, issue.path))
        raise ConfigError(builder.issues)
    return catalog


class _Builder:
    def __init__(self, model: ConfigModel, doc: Document) -> None:
        self.model = model
        self.doc = doc
        self.issues: list[ConfigIssue] = []
        self.notes: list[ConfigIssue] = []

    def fail(self, loc: Loc, message: str) -> None:
        self.issues.append(self.doc.issue(loc, message))

    def note(self, loc: Loc, message: str) -> None:
        self.notes.append(self.doc.issue(loc, message))

    def sub(self, model: Any, value: Any, loc: Loc) -> Any:
        try:
            return validate_model(model, value, self.doc, loc)
        except ConfigError as exc:
            self.issues.extend(exc.issues)
            return None

    def build(self) -> Catalog:
        self._names()
        plans = self._plans()
        rules = self._rules()
        addons = self._addons()
        self._billing()
        m = self.model
        if m.default_plan is not None and m.default_plan not in m.plans:
            self.fail(("default_plan",), f"unknown plan {m.default_plan!r}{self._known(m.plans)}")
        elif m.default_plan is not None and m.plans[m.default_plan].legacy:
            self.fail(
                ("default_plan",),
                f"{m.default_plan!r} is a legacy plan: nothing new is assigned to it; "
                "name a current plan",
            )
        self._public_key()
        self._shadowed(rules)
        scales = self._credit_scales(plans)
        router = Router([rule.template for rule in rules])
        notes = tuple(sorted(self.notes, key=lambda issue: (issue.line or 0, issue.path)))
        retention = int(parse_duration(m.billing.retention)) if m.billing else 35 * 86400
        return Catalog(
            plans, tuple(rules), router, m.default_plan, notes, addons, scales, retention
        )

    def _credit_scales(self, plans: Mapping[str, Plan]) -> dict[str, int]:
        places = {name: 0 for name, f in self.model.features.items() if f.kind == "credits"}
        for plan in plans.values():
            for grant in plan.meters.values():
                if grant.overage in places and grant.rate is not None:
                    finest = min(decimals(grant.rate), MAX_RATE_DECIMALS)  # finer: an error
                    places[grant.overage] = max(places[grant.overage], finest)
        scales = {name: 10**n for name, n in places.items()}
        for name, plan in plans.items():
            for feature, credit in plan.credits.items():
                most = max_credits(scales[feature])
                if credit.grant > most:
                    self.fail(
                        ("plans", name, "features", feature, "grant"),
                        f"{credit.grant} credits is too many for one grant: at most {most}"
                        + (
                            f" (balances of {feature} are kept in 1/{scales[feature]} credits)"
                            if scales[feature] > 1
                            else ""
                        ),
                    )
        return scales

    def _public_key(self) -> None:
        jwt_config = self.model.identity.jwt
        key, loc = jwt_config.public_key, ("identity", "jwt", "public_key")
        if key is None:
            return
        if key.startswith("file:"):
            try:
                key = Path(key[5:]).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                self.fail(loc, f"cannot read the key file {key[5:]!r}")
                return
        for name in jwt_config.algorithms:
            try:
                jwt.get_algorithm_by_name(name).prepare_key(key)
            except (jwt.InvalidKeyError, ValueError, TypeError) as exc:
                self.fail(loc, f"not a usable {name} public key: {exc}")
                return

    def _shadowed(self, rules: list[Rule]) -> None:
        for position, earlier in shadowed([rule.template for rule in rules]).items():
            rule = rules[position]
            names = " and ".join(f"routes[{rules[i].index}] ({rules[i].match})" for i in earlier)
            verb = "comes" if len(earlier) == 1 else "come"
            self.note(
                ("routes", rule.index, "match"),
                f"this rule never applies: {names} {verb} first and match"
                f"{'es' if len(earlier) == 1 else ''} every request it matches",
            )

    def _names(self) -> None:
        m = self.model
        for section, names in (("features", m.features), ("plans", m.plans), ("addons", m.addons)):
            for name in names:
                if not _NAME.fullmatch(name):
                    self.fail(
                        (section, name),
                        f"{name!r} is not a usable name: use up to 64 letters, digits, '_', "
                        "'-' and '.', starting with a letter or digit",
                    )

    @staticmethod
    def _known(names: Mapping[str, Any]) -> str:
        return f" (known: {', '.join(names)})" if names else ""

    # plans -------------------------------------------------------------------------------

    def _plans(self) -> dict[str, Plan]:
        resolved: dict[str, dict[str, Any]] = {}
        for name in self.model.plans:
            self._resolve(name, resolved, ())
        plans = {}
        for name, features in resolved.items():
            spec = self.model.plans[name]
            values, meters, credits = {}, {}, {}
            for feature, grant in features.items():
                if grant is None:
                    continue
                if isinstance(grant, MeterGrant):
                    meters[feature] = grant
                elif isinstance(grant, CreditGrant):
                    credits[feature] = grant
                else:
                    values[feature] = grant
            plans[name] = Plan(name, spec.legacy, spec.trial_days, values, meters, credits)
        return plans

    def _resolve(self, name: str, done: dict[str, dict[str, Any]], chain: tuple[str, ...]) -> Any:
        if name in done:
            return done[name]
        spec = self.model.plans[name]
        if name in chain:
            cycle = " → ".join((*chain[chain.index(name) :], name))
            self.fail(("plans", chain[-1], "extends"), f"extends cycle: {cycle}")
            return {}
        inherited: dict[str, Any] = {}
        if spec.extends is not None:
            if spec.extends not in self.model.plans:
                self.fail(
                    ("plans", name, "extends"),
                    f"unknown plan {spec.extends!r}{self._known(self.model.plans)}",
                )
            else:
                inherited = dict(self._resolve(spec.extends, done, (*chain, name)))
        features = inherited
        for feature, value in spec.features.items():
            features[feature] = self._entitlement(
                feature, value, ("plans", name, "features", feature)
            )
        done[name] = features
        return features

    def _entitlement(self, feature: str, value: Any, loc: Loc) -> Any:
        """The typed grant, or None for a feature that is not granted (``false``)."""
        spec = self.model.features.get(feature)
        if spec is None:
            self.fail(loc, f"unknown feature {feature!r}{self._known(self.model.features)}")
            return None
        if value is False:
            return None
        kind = spec.kind
        if kind == "boolean":
            if value is not True:
                self.fail(loc, f"{feature} is a boolean feature: use true or false, got {value!r}")
            return True
        if kind == "config":
            if value == UNLIMITED:
                return math.inf
            if isinstance(value, (dict, list)) or value is None:
                self.fail(loc, f"{feature} is a config feature: give a single value, got {value!r}")
            elif isinstance(value, date):
                self.fail(
                    loc,
                    f"{feature}: YAML reads {value} as a date; quote it to give it as text "
                    f"('{value}')",
                )
            elif isinstance(value, float) and not math.isfinite(value):
                self.fail(loc, f"{feature}: {value} is not a usable number; use unlimited")
            return value
        if kind == "credits":
            grant = self.sub(CreditGrantSpec, value, loc) if isinstance(value, dict) else None
            if not isinstance(value, dict):
                self.fail(loc, f"{feature} is a credits feature: use {{grant: N, period: month}}")
            return CreditGrant(grant.grant, grant.period) if grant else None
        return self._meter_grant(feature, value, loc)

    def _meter_grant(self, feature: str, value: Any, loc: Loc) -> MeterGrant | None:
        if value == UNLIMITED:
            return MeterGrant(())
        if isinstance(value, dict):
            items: list[tuple[Any, Loc]] = [(value, loc)]
        elif isinstance(value, list) and value:
            items = [(item, (*loc, i)) for i, item in enumerate(value)]
        else:
            self.fail(
                loc,
                f"{feature} is a metered feature: use unlimited, {{limit: N, window: 1d}}, "
                f"{{limit: N, period: month}} or a list of limits, got {value!r}",
            )
            return None
        limits: list[Limit] = []
        overage, rate = None, None
        for item, item_loc in items:
            spec = self.sub(LimitSpec, item, item_loc)
            if spec is None:
                continue
            if spec.overage is not None:
                overage, rate = spec.overage, spec.rate
                target = self.model.features.get(spec.overage)
                if target is None or target.kind != "credits":
                    self.fail((*item_loc, "overage"), f"{spec.overage!r} is not a credits feature")
                if spec.rate is not None and decimals(spec.rate) > MAX_RATE_DECIMALS:
                    self.fail(
                        (*item_loc, "rate"),
                        f"{spec.rate} has more than {MAX_RATE_DECIMALS} decimals: credits are "
                        "counted to a millionth",
                    )
            shadow = spec.mode == "shadow"
            if shadow and spec.overage is not None:
                self.fail(
                    (*item_loc, "mode"),
                    "a shadow limit refuses nothing, so it has no overage to charge",
                )
            if spec.window is not None:
                limit = Limit(
                    feature,
                    spec.limit,
                    f"{feature}-{spec.window}",
                    window=parse_duration(spec.window),
                    shadow=shadow,
                )
            else:
                limit = Limit(
                    feature,
                    spec.limit,
                    f"{feature}-{spec.period}",
                    period=spec.period,
                    shadow=shadow,
                )
            if any(existing.policy == limit.policy for existing in limits):
                self.fail(item_loc, f"two limits of {feature} share the policy {limit.policy!r}")
            limits.append(limit)
        return MeterGrant(tuple(limits), overage, rate)

    # routes ------------------------------------------------------------------------------

    def _rules(self) -> list[Rule]:
        rules = []
        for index, route in enumerate(self.model.routes):
            loc: Loc = ("routes", index)
            try:
                template = parse_template(route.match)
            except ValueError as exc:
                self.fail((*loc, "match"), str(exc))
                continue
            rules.append(self.rule(index, template, route, loc))
        return rules

    def rule(self, index: int, template: Template, route: RouteConfig, loc: Loc) -> Rule:
        features = self.model.features
        if route.feature is not None and route.feature not in features:
            self.fail(
                (*loc, "feature"), f"unknown feature {route.feature!r}{self._known(features)}"
            )
        costs = []
        for meter, cost in route.meters.items():
            meter_loc = (*loc, "meters", meter)
            spec = features.get(meter)
            if spec is None:
                self.fail(meter_loc, f"unknown feature {meter!r}{self._known(features)}")
                continue
            if spec.kind not in ("metered", "credits"):
                self.fail(meter_loc, f"{meter} is a {spec.kind} feature, not metered or credits")
                continue
            if isinstance(cost, bool) or not isinstance(cost, (int, dict)):
                self.fail(
                    meter_loc,
                    "the cost is a whole number, or {response_header: NAME, estimate: N}",
                )
            elif isinstance(cost, int):
                if cost < 0:
                    self.fail(meter_loc, f"the cost must be 0 or more, got {cost}")
                elif cost > MAX_AMOUNT:
                    self.fail(meter_loc, f"the cost {cost} is too large: at most {MAX_AMOUNT}")
                costs.append(MeterCost(meter, cost))
            else:
                header = self.sub(HeaderCost, cost, meter_loc)
                if header is not None:
                    name = header.response_header.lower()
                    costs.append(MeterCost(meter, header.estimate, name, header.expose))
        return Rule(
            index=index,
            template=template,
            public=route.public,
            feature=route.feature,
            meters=tuple(costs),
            count_always=route.count == "always",
            shadow=route.mode == "shadow",
        )

    def _addons(self) -> dict[str, tuple[AddonGrant, ...]]:
        addons = {}
        for name, addon in self.model.addons.items():
            grants = []
            for feature, value in addon.features.items():
                loc: Loc = ("addons", name, "features", feature)
                spec = self.model.features.get(feature)
                if spec is None:
                    self.fail(loc, f"unknown feature {feature!r}{self._known(self.model.features)}")
                elif value is True:
                    grants.append(AddonGrant(feature))
                elif spec.kind != "metered":
                    self.fail(
                        loc,
                        f"{feature} is a {spec.kind} feature: an add-on can only enable it (true)",
                    )
                elif not isinstance(value, dict):
                    self.fail(loc, "use true, or {add: N} to raise a metered limit")
                else:
                    added = self.sub(AddonGrantSpec, value, loc)
                    if added is not None:
                        grants.append(AddonGrant(feature, added.add))
            addons[name] = tuple(grants)
        return addons

    # billing: providers' prices mapped to the catalog -------------------------------------

    def _billing(self) -> None:
        billing = self.model.billing
        if billing is None:
            return
        if billing.stripe is not None and not billing.stripe.webhook_secret:
            self.note(
                ("billing", "stripe", "webhook_secret"),
                "empty: /webhooks/stripe answers 404 until it is set",
            )
        zuora = billing.zuora
        if zuora is not None and not ((zuora.username and zuora.password) or zuora.hmac_secret):
            self.note(
                ("billing", "zuora"),
                "username or password empty (and no hmac_secret): /webhooks/zuora answers 404 "
                "until they are set",
            )
        for provider, table_name in (("stripe", "prices"), ("zuora", "rate_plans")):
            section = getattr(billing, provider)
            if section is None:
                continue
            for key, target in getattr(section, table_name).items():
                self._billing_target(target, ("billing", provider, table_name, key))
            for meter in section.meters:
                feature = self.model.features.get(meter)
                if feature is None or feature.kind != "metered":
                    self.fail(
                        ("billing", provider, "meters", meter),
                        f"{meter!r} is not a metered feature{self._known(dict.fromkeys(self._metered()))}",
                    )
        self._export(billing)

    def _metered(self) -> list[str]:
        return [n for n, f in self.model.features.items() if f.kind == "metered"]

    def _export(self, billing: BillingConfig) -> None:
        export = billing.export
        if export is None:
            return
        loc: Loc = ("billing", "export")
        if export.to == "stripe":
            if billing.stripe is None or not billing.stripe.meters:
                self.fail((*loc, "to"), "export to stripe needs billing.stripe.meters")
            elif not billing.stripe.api_key:
                self.note(
                    ("billing", "stripe", "api_key"),
                    "empty: the periodic usage export to Stripe fails until it is set",
                )
        elif export.to == "zuora-csv" and (billing.zuora is None or not billing.zuora.meters):
            self.fail((*loc, "to"), "export to zuora-csv needs billing.zuora.meters")
        if export.to != "stripe" and not export.path:
            self.fail((*loc, "path"), f"export to {export.to} needs a directory to write to")

    def _billing_target(self, target: Any, loc: Loc) -> None:
        m = self.model
        if isinstance(target, str):
            if target not in m.plans:
                self.fail(loc, f"unknown plan {target!r}{self._known(m.plans)}")
        elif isinstance(target, dict) and set(target) == {"addon"}:
            if target["addon"] not in m.addons:
                self.fail(
                    (*loc, "addon"), f"unknown add-on {target['addon']!r}{self._known(m.addons)}"
                )
        elif isinstance(target, dict) and set(target) == {"credits", "amount"}:
            feature = m.features.get(target["credits"])
            if feature is None or feature.kind != "credits":
                self.fail((*loc, "credits"), f"{target['credits']!r} is not a credits feature")
            amount = target["amount"]
            if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
                self.fail((*loc, "amount"), "the amount is a whole number above 0")
        else:
            self.fail(loc, "map to a plan name, {addon: NAME} or {credits: FEATURE, amount: N}")


#: The template of a rule declared on a view rather than listed in ``routes:``.
DECLARED = Template((), "(declared on the view)", ())


def declared_rule(model: ConfigModel, declaration: Mapping[str, Any], where: str) -> Rule:
    """A route rule from a per-view declaration (``feature``, ``meters``, ``count``, ``mode``),
    checked against the config like a rule of ``routes:``; ``where`` names the view in errors."""
    doc = Document({}, {}, None)
    builder = _Builder(model, doc)
    route = builder.sub(RouteConfig, {"match": "/", **declaration}, (where,))
    rule = builder.rule(-1, DECLARED, route, (where,)) if route is not None else None
    if builder.issues or rule is None:
        raise ConfigError(builder.issues)
    return rule
