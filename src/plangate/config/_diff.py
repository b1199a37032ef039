"""What changes between two configs, in words (``plangate diff``): plans, features, limits,
add-ons, routes and settings added, removed and changed. Pure: the impact on live customers
is the CLI's, from the store."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ..storage._registry import masked
from ._catalog import CreditGrant, Limit, MeterGrant, Plan

#: the settings compared, as the top level of the file names them
SETTINGS = ("default_plan", "mode", "unmatched", "on_storage_error", "storage", "cors_preflight")
#: the sections compared whole (their secrets are not printed)
SECTIONS = ("identity", "responses", "admin", "billing", "decision_log")


@dataclass(frozen=True)
class Change:
    """One difference. ``section``: plans, features, addons, routes or settings; ``sign``:
    ``+`` added, ``-`` removed, ``~`` changed; ``name`` what it is about; ``text`` the change
    in words. A change that may put a plan's customers over a limit (a lowered or a new
    limit, a new plan) carries them in ``binds``: (plan, its limits)."""

    section: str
    sign: str
    name: str
    text: str
    binds: tuple[str, tuple[Limit, ...]] | None = None


def diff(old: Any, new: Any) -> list[Change]:
    """The changes from config ``old`` to ``new`` (``plangate.config.Config``), in the
    order of the file's sections, each sorted by name."""
    changes: list[Change] = []
    changes += _features(old.model.features, new.model.features)
    changes += _plans(old.catalog.plans, new.catalog.plans)
    changes += _addons(old.model.addons, new.model.addons)
    changes += _routes(old.model.routes, new.model.routes)
    for name in SETTINGS:
        before, after = getattr(old.model, name), getattr(new.model, name)
        if before != after:
            if name == "storage":  # a password in it is not for a terminal or a CI log
                before, after = masked(before), masked(after)
            changes.append(Change("settings", "~", name, f"{_show(before)} → {_show(after)}"))
    for name in SECTIONS:  # compared whole: what changed in them is for the reader
        if getattr(old.model, name) != getattr(new.model, name):
            changes.append(
                Change("settings", "~", name, "changed (not shown: it may hold secrets)")
            )
    return changes


def _features(old: Mapping[str, Any], new: Mapping[str, Any]) -> Iterator[Change]:
    for name in sorted(old.keys() | new.keys()):
        before, after = old.get(name), new.get(name)
        if before is None:
            assert after is not None
            yield Change("features", "+", name, f"new {after.kind} feature")
        elif after is None:
            yield Change("features", "-", name, f"{before.kind} feature removed")
        else:
            for key in ("kind", "unit", "on_storage_error"):
                a, b = getattr(before, key), getattr(after, key)
                if a != b:
                    yield Change("features", "~", name, f"{key} {_show(a)} → {_show(b)}")


def _plans(old: Mapping[str, Plan], new: Mapping[str, Plan]) -> Iterator[Change]:
    for name in sorted(old.keys() | new.keys()):
        before, after = old.get(name), new.get(name)
        if before is None:
            assert after is not None
            limits = tuple(lim for _, g in sorted(after.meters.items()) for lim in g.limits)
            yield Change("plans", "+", name, f"new plan: {_grants(after)}", (name, limits))
        elif after is None:
            yield Change("plans", "-", name, "plan removed: its customers fall back to "
                         "default_plan (or are refused)")  # fmt: skip
        else:
            yield from _plan(name, before, after)


def _plan(name: str, before: Plan, after: Plan) -> Iterator[Change]:
    if before.legacy != after.legacy:
        text = "now legacy: kept by its customers, assigned to no one new" if after.legacy else (
            "no longer legacy: may be assigned again")  # fmt: skip
        yield Change("plans", "~", name, text)
    if before.trial_days != after.trial_days:
        text = f"trial {_days(before.trial_days)} → {_days(after.trial_days)}"
        yield Change("plans", "~", name, text)
    for feature in sorted(before.values.keys() | after.values.keys()):
        a, b = before.values.get(feature), after.values.get(feature)
        if a != b:
            yield Change("plans", _sign(a, b), f"{name}: {feature}", _value_change(a, b))
    for meter in sorted(before.meters.keys() | after.meters.keys()):
        yield from _meter(name, meter, before.meters.get(meter), after.meters.get(meter))
    for feature in sorted(before.credits.keys() | after.credits.keys()):
        c, d = before.credits.get(feature), after.credits.get(feature)
        if c != d:
            yield Change("plans", _sign(c, d), f"{name}: {feature}", f"{_credit(c)} → {_credit(d)}")


def _meter(plan: str, meter: str, a: MeterGrant | None, b: MeterGrant | None) -> Iterator[Change]:
    name = f"{plan}: {meter}"
    if a == b:
        return
    if a is None or b is None:
        shown = _meter_grant(b if a is None else a)
        binds = (plan, b.limits) if a is None and b is not None and b.limits else None
        yield Change("plans", _sign(a, b), name, f"granted: {shown}" if a is None else
                     f"no longer granted (was {shown}): requests that use it are refused",
                     binds)  # fmt: skip
        return
    before = {lim.policy: lim for lim in a.limits}
    after = {lim.policy: lim for lim in b.limits}
    if a.unlimited != b.unlimited:
        yield Change("plans", "~", name, f"{_meter_grant(a)} → {_meter_grant(b)}")
    for policy in sorted(before.keys() | after.keys()):
        old, new = before.get(policy), after.get(policy)
        if old is None:
            assert new is not None
            binds = None if new.shadow else (plan, (new,))  # a shadow limit refuses no one
            yield Change("plans", "+", name, f"new limit {_limit(new)}", binds)
        elif new is None:
            yield Change("plans", "-", name, f"limit {_limit(old)} removed")
        else:
            if old.limit != new.limit:
                lower = new.limit < old.limit
                text = (
                    f"{policy} {old.limit:,} → {new.limit:,} ({'lowered' if lower else 'raised'})"
                )
                binds = (plan, (new,)) if lower and not new.shadow else None
                yield Change("plans", "~", name, text, binds)
            if old.shadow != new.shadow:
                text = (
                    f"{policy} now in shadow: counted, no longer refused"
                    if new.shadow
                    else f"{policy} enforced (was in shadow): it refuses from now on"
                )
                yield Change("plans", "~", name, text, None if new.shadow else (plan, (new,)))
    if (a.overage, a.rate) != (b.overage, b.rate):
        yield Change("plans", "~", name, f"overage {_overage(a)} → {_overage(b)}")


def _addons(old: Mapping[str, Any], new: Mapping[str, Any]) -> Iterator[Change]:
    for name in sorted(old.keys() | new.keys()):
        a, b = old.get(name), new.get(name)
        if a is None:
            yield Change("addons", "+", name, f"new add-on: {_features_of(b)}")
        elif b is None:
            yield Change(
                "addons", "-", name, "add-on removed: customers holding it lose what it gave"
            )
        elif a.features != b.features:
            yield Change("addons", "~", name, f"{_features_of(a)} → {_features_of(b)}")


def _keyed(routes: list[Any]) -> dict[str, tuple[int, Any]]:
    """Rules by their match, a second rule of the same match as ``match (2)``."""
    keyed: dict[str, tuple[int, Any]] = {}
    for i, route in enumerate(routes):
        key, n = route.match, 1
        while key in keyed:
            n += 1
            key = f"{route.match} ({n})"
        keyed[key] = (i, route)
    return keyed


def _routes(old: list[Any], new: list[Any]) -> Iterator[Change]:
    before, after = _keyed(old), _keyed(new)
    # the order of the rules both have: a rule moved past another decides differently
    kept_before = [k for k in before if k in after]
    kept_after = [k for k in after if k in before]
    for match in sorted(before.keys() | after.keys()):
        a, b = before.get(match), after.get(match)
        if a is None:
            assert b is not None
            yield Change("routes", "+", match, f"new rule: {_rule(b[1])}")
        elif b is None:
            yield Change("routes", "-", match, "rule removed: its requests fall to the next "
                         "rule that matches, or to unmatched")  # fmt: skip
        else:
            for key in ("public", "feature", "meters", "count", "mode"):
                x, y = getattr(a[1], key), getattr(b[1], key)
                if x != y:
                    yield Change("routes", "~", match, f"{key} {_show(x)} → {_show(y)}")
            if kept_before.index(match) != kept_after.index(match):
                yield Change("routes", "~", match, f"moved: rule {a[0] + 1} → {b[0] + 1} "
                             "(the first rule that matches decides)")  # fmt: skip


# words ------------------------------------------------------------------------------------


def _sign(a: Any, b: Any) -> str:
    return "+" if a is None else "-" if b is None else "~"


def _show(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isinf(value):
        return "unlimited"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    return str(value)


def _value_change(a: Any, b: Any) -> str:
    if a is None:
        return f"granted: {_show(b)}"
    if b is None:
        return f"no longer granted (was {_show(a)})"
    return f"{_show(a)} → {_show(b)}"


def _days(days: int | None) -> str:
    return "none" if not days else f"{days} days"


def _limit(limit: Limit) -> str:
    shadow = " (shadow)" if limit.shadow else ""
    if limit.window is not None:
        return f"{limit.limit:,} per {_duration(limit.window)}{shadow}"
    return f"{limit.limit:,} a {limit.period}{shadow}"


def _duration(seconds: float) -> str:
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _meter_grant(grant: MeterGrant | None) -> str:
    if grant is None:
        return "not granted"
    if grant.unlimited:
        return "unlimited"
    return ", ".join(_limit(lim) for lim in grant.limits)


def _overage(grant: MeterGrant) -> str:
    return "none" if grant.overage is None else f"{grant.rate:g} {grant.overage} a unit"


def _credit(grant: CreditGrant | None) -> str:
    return "none" if grant is None else f"{grant.grant:,} a {grant.period}"


def _grants(plan: Plan) -> str:
    parts = [f"{k} {_show(v)}" for k, v in sorted(plan.values.items())]
    parts += [f"{k} {_meter_grant(g)}" for k, g in sorted(plan.meters.items())]
    parts += [f"{k} {_credit(g)}" for k, g in sorted(plan.credits.items())]
    return ", ".join(parts) or "nothing"


def _features_of(addon: Any) -> str:
    return ", ".join(f"{k} {_show(v)}" for k, v in sorted(addon.features.items())) or "nothing"


def _rule(route: Any) -> str:
    if route.public:
        return "public"
    parts = [f"feature {route.feature}"] if route.feature else []
    if route.meters:
        parts.append(f"meters {_show(route.meters)}")
    if route.mode == "shadow":
        parts.append("shadow")
    return ", ".join(parts) or "identity only"
