"""A customer's entitlements, layer over layer: override > add-ons (each times its quantity) > plan.

The plan itself is chosen by the engine (the store's, else the token's claim, else
``default_plan``); this module lays a record's add-ons and overrides over it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from ..config import AddonGrant, CreditGrant, MeterGrant, Plan
from ..errors import ConfigError

#: a limit raised by add-ons stays a number the store can count to
_MAX_LIMIT = 10**15


def resolve_plan(
    plan: Plan,
    addons: Mapping[str, int],
    overrides: Mapping[str, Any],
    *,
    catalog_addons: Mapping[str, tuple[AddonGrant, ...]],
    kinds: Mapping[str, str],
    compile_override: Callable[[str, Any], Any],
) -> Plan:
    """``plan`` with the add-ons and overrides of one customer laid over it.

    ``add: N`` raises every limit of a meter the plan grants by N times the quantity (an unlimited
    meter stays unlimited; a meter the plan does not grant has nothing to raise); ``true``
    enables a feature the plan lacks (a meter: unlimited). An override replaces the
    feature's grant whole; ``false`` takes it away. An unknown add-on, a quantity below 1,
    or an override that is not a value of its feature's kind is ignored: the admin side
    refuses them before they are stored.
    """
    values = dict(plan.values)
    meters = dict(plan.meters)
    credits = dict(plan.credits)
    sources: dict[str, str] = {}
    limit_sources: dict[str, str] = {}
    for name in sorted(addons):
        quantity = addons[name]
        grants = catalog_addons.get(name)
        if grants is None or isinstance(quantity, bool) or not isinstance(quantity, int):
            continue
        if quantity <= 0:
            continue
        for grant in grants:
            feature, kind = grant.feature, kinds.get(grant.feature)
            if grant.add is None:
                if kind == "metered" and feature not in meters:
                    meters[feature] = MeterGrant(())
                    sources[feature] = "addon"
                elif kind in ("boolean", "config") and feature not in values:
                    values[feature] = True
                    sources[feature] = "addon"
                continue
            granted = meters.get(feature)
            if granted is None or granted.unlimited:
                continue
            limits = tuple(
                replace(limit, limit=min(_MAX_LIMIT, limit.limit + grant.add * quantity))
                for limit in granted.limits
            )
            meters[feature] = MeterGrant(limits, granted.overage, granted.rate)
            sources[feature] = "addon"
            limit_sources.update((limit.policy, "addon") for limit in limits)
    for feature, value in overrides.items():
        try:
            typed = compile_override(feature, value)
        except ConfigError:
            continue
        for layer in (values, meters, credits):
            layer.pop(feature, None)
        sources[feature] = "override"
        if isinstance(typed, MeterGrant):
            meters[feature] = typed
            limit_sources.update((limit.policy, "override") for limit in typed.limits)
        elif isinstance(typed, CreditGrant):
            credits[feature] = typed
        elif typed is not None:
            values[feature] = typed
    return Plan(
        plan.name,
        plan.legacy,
        plan.trial_days,
        values,
        meters,
        credits,
        sources,
        limit_sources,
    )
