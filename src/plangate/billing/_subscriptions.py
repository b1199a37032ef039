"""What billing providers' subscriptions give a customer, and a change applied to a record.

Each provider's subscription is kept on the customer's record (``CustomerRecord.
subscriptions``) as the last event applied to it left it. What they give is written into the
record's ``plan`` and ``addons``, which the engine reads:

- the plan: that of the first provider in ``billing.precedence`` holding a live subscription
  that maps to a plan (the newest such subscription of that provider); a trial set by hand
  ends with it. When no live subscription gives a plan any more, the plan billing gave is
  dropped (the customer falls to ``default_plan``); a plan set by hand stays until billing
  gives one, and one set by hand since billing gave one stays when billing's ends.
- add-ons: every live subscription's, of every provider, added up, on top of those set by
  hand (each change takes away what the subscription gave before and adds what it gives now).

An event older than the one applied last to its subscription is outdated (of two at the same
time, the one earlier in the subscription's life: see ``stage``); the same event again is a
duplicate: neither changes anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

from ..engine import CustomerRecord, Subscription

APPLIED, DUPLICATE, OUTDATED = "applied", "duplicate", "outdated"


def given(
    subscriptions: Iterable[Subscription], precedence: Sequence[str]
) -> tuple[str | None, dict[str, int]]:
    """The plan and the add-ons ``subscriptions`` give, ``precedence`` deciding the plan."""
    live = [s for s in subscriptions if s.live]
    addons: dict[str, int] = {}
    for subscription in live:
        for name, quantity in subscription.addons.items():
            addons[name] = addons.get(name, 0) + quantity
    order = list(precedence) + sorted({s.provider for s in live} - set(precedence))
    for provider in order:
        planned = [s for s in live if s.provider == provider and s.plan]
        if planned:
            return max(planned, key=lambda s: s.event_at).plan, addons
    return None, addons


def apply(
    record: CustomerRecord | None,
    customer: str,
    change: Subscription,
    precedence: Sequence[str],
) -> CustomerRecord | str:
    """``record`` (None: the customer has none yet) with ``change`` applied, or
    ``DUPLICATE`` / ``OUTDATED`` when it changes nothing."""
    current = record if record is not None else CustomerRecord(customer)
    subscriptions = list(current.subscriptions)
    for i, held in enumerate(subscriptions):
        if held.provider == change.provider and held.id == change.id:
            if held.event_id == change.event_id:
                return DUPLICATE
            if change.event_at < held.event_at or (
                change.event_at == held.event_at and stage(change) < stage(held)
            ):
                return OUTDATED
            subscriptions[i] = replace(change, account=change.account or held.account)
            break
    else:
        subscriptions.append(change)
    plan_before, addons_before = given(current.subscriptions, precedence)
    plan_now, addons_now = given(subscriptions, precedence)
    plan = current.plan
    if plan_now is not None:
        plan = plan_now
    elif plan_before is not None and current.plan == plan_before:
        plan = None  # no subscription gives a plan any more (one set by hand since stays)
    changed = replace(
        current,
        plan=plan,
        addons=_moved(current.addons, addons_before, addons_now),
        subscriptions=tuple(subscriptions),
    )
    if plan_now is not None:  # a paid plan: a trial set by hand must not end it
        changed = replace(changed, trial_ends_at=None, previous_plan=None)
    return changed


#: how far along its life a subscription is, by provider and status: of two events of one
#: subscription at the same time (Stripe's are to the second), the one further along is
#: the later (a subscription is created incomplete, becomes active, ends canceled)
STAGES = {
    "stripe": {"incomplete": 0, "active": 1, "trialing": 1, "past_due": 1, "paused": 1},
    "zuora": {"Draft": 0, "Pending Activation": 0, "Pending Acceptance": 0, "Active": 1},
}


def stage(subscription: Subscription) -> int:
    """0 before it starts, 1 while it runs, 2 once it has ended (any other status)."""
    return STAGES.get(subscription.provider, {}).get(subscription.status, 2)


def _moved(
    addons: Mapping[str, int], before: Mapping[str, int], now: Mapping[str, int]
) -> dict[str, int]:
    """``addons`` less what billing gave ``before``, plus what it gives ``now``."""
    moved = dict(addons)
    for name in set(before) | set(now):
        # what billing gave before is taken away only as far as the record still holds it
        # (an admin write may have changed it since)
        quantity = max(moved.get(name, 0) - before.get(name, 0), 0) + now.get(name, 0)
        if quantity > 0:
            moved[name] = quantity
        else:
            moved.pop(name, None)
    return moved
