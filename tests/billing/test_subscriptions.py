"""What subscriptions give a record, as plain logic: precedence, add-ons added up on top of
those set by hand, duplicates and outdated events; and how a record keeps them in Redis."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timezone

from plangate.billing._subscriptions import DUPLICATE, OUTDATED, apply, given
from plangate.engine import CustomerRecord, Subscription
from plangate.storage._redis_codec import customer_fields, customer_record

PRECEDENCE = ["stripe", "zuora"]


def sub(
    provider: str, id: str, at: float, *, live: bool = True, plan: str | None = None, **addons: int
) -> Subscription:
    return Subscription(
        provider,
        id,
        "active" if live else "canceled",
        live,
        plan,
        addons,
        event_at=at,
        event_id=f"{id}@{at}",
    )


def test_the_first_provider_of_the_precedence_with_a_live_plan_gives_it() -> None:
    both = [sub("zuora", "z1", 1, plan="pro-2023"), sub("stripe", "s1", 2, plan="pro")]
    assert given(both, PRECEDENCE)[0] == "pro"
    assert given(both, ["zuora", "stripe"])[0] == "pro-2023"
    stripe_gone = [
        sub("zuora", "z1", 1, plan="pro-2023"),
        sub("stripe", "s1", 3, live=False, plan="pro"),
    ]
    assert given(stripe_gone, PRECEDENCE)[0] == "pro-2023"


def test_add_ons_of_live_subscriptions_add_up_on_top_of_those_set_by_hand() -> None:
    record = CustomerRecord("acme", plan="free", addons={"reports": 1, "token_pack": 1})
    one = apply(record, "acme", sub("stripe", "s1", 1, token_pack=2), PRECEDENCE)
    assert isinstance(one, CustomerRecord)
    assert dict(one.addons) == {"reports": 1, "token_pack": 3}
    two = apply(one, "acme", sub("zuora", "z1", 2, token_pack=1), PRECEDENCE)
    assert isinstance(two, CustomerRecord)
    assert dict(two.addons) == {"reports": 1, "token_pack": 4}
    gone = apply(two, "acme", sub("stripe", "s1", 3, live=False, token_pack=2), PRECEDENCE)
    assert isinstance(gone, CustomerRecord)
    assert dict(gone.addons) == {"reports": 1, "token_pack": 2}
    assert gone.plan == "free"  # no subscription gave a plan: the one set by hand stays


def test_a_plan_from_billing_ends_a_trial_set_by_hand() -> None:
    ends = datetime(2027, 2, 1, tzinfo=timezone.utc)
    record = CustomerRecord("acme", plan="pro", trial_ends_at=ends, previous_plan="free")
    changed = apply(record, "acme", sub("stripe", "s1", 1, plan="enterprise"), PRECEDENCE)
    assert isinstance(changed, CustomerRecord)
    assert (changed.plan, changed.trial_ends_at, changed.previous_plan) == (
        "enterprise",
        None,
        None,
    )


def test_the_same_event_is_a_duplicate_and_an_older_one_outdated() -> None:
    first = apply(None, "acme", sub("stripe", "s1", 5, plan="pro"), PRECEDENCE)
    assert isinstance(first, CustomerRecord)
    assert apply(first, "acme", sub("stripe", "s1", 5, plan="pro"), PRECEDENCE) == DUPLICATE
    assert apply(first, "acme", sub("stripe", "s1", 4, live=False), PRECEDENCE) == OUTDATED
    # another subscription of the same provider is not ordered against this one
    other = apply(first, "acme", sub("stripe", "s2", 4, plan="free"), PRECEDENCE)
    assert isinstance(other, CustomerRecord)
    assert other.plan == "pro"  # the newest live subscription of the provider gives its plan


def test_a_record_keeps_its_subscriptions_in_redis_and_reads_a_newer_releases_record() -> None:
    record = CustomerRecord(
        "acme",
        plan="pro",
        subscriptions=(replace(sub("stripe", "s1", 5, plan="pro", token_pack=2), account="cus_1"),),
        version=3,
    )
    fields = customer_fields(record)
    stored = dict(zip(fields[::2], fields[1::2], strict=True))
    assert customer_record("acme", {**stored, "version": "3"}) == record
    newer = json.loads(stored["subscriptions"])
    newer[0]["a_member_of_a_later_release"] = 1
    read = customer_record("acme", {**stored, "subscriptions": json.dumps(newer), "version": "3"})
    assert read == record
    assert customer_record("acme", {"plan": "free", "version": "1"}).subscriptions == ()  # type: ignore[union-attr]


def test_an_admin_write_in_between_does_not_throw_the_add_on_count_off() -> None:
    given_two = apply(None, "acme", sub("stripe", "s1", 1, token_pack=2), PRECEDENCE)
    assert isinstance(given_two, CustomerRecord)
    cleared = replace(given_two, addons={})  # an admin PUT without add-ons
    three = apply(cleared, "acme", sub("stripe", "s1", 2, token_pack=3), PRECEDENCE)
    assert isinstance(three, CustomerRecord)
    assert dict(three.addons) == {"token_pack": 3}  # what billing gives now, not 0 - 2 + 3


def test_billing_giving_the_plan_a_trial_was_on_ends_the_trial() -> None:
    ends = datetime(2027, 2, 1, tzinfo=timezone.utc)
    trial = CustomerRecord("acme", plan="pro", trial_ends_at=ends, previous_plan="free")
    paid = apply(trial, "acme", sub("stripe", "s1", 1, plan="pro"), PRECEDENCE)
    assert isinstance(paid, CustomerRecord)
    assert (paid.plan, paid.trial_ends_at, paid.previous_plan) == ("pro", None, None)


def test_a_plan_set_by_hand_after_billing_gave_one_stays_when_billings_ends() -> None:
    paid = apply(None, "acme", sub("stripe", "s1", 1, plan="pro"), PRECEDENCE)
    assert isinstance(paid, CustomerRecord)
    moved = replace(paid, plan="enterprise")  # an admin moved the customer since
    ended = apply(moved, "acme", sub("stripe", "s1", 2, live=False, plan="pro"), PRECEDENCE)
    assert isinstance(ended, CustomerRecord)
    assert ended.plan == "enterprise"


def test_of_two_events_in_the_same_second_the_one_further_along_is_the_later() -> None:
    created = Subscription("stripe", "s1", "incomplete", False, "pro", event_at=7, event_id="e1")
    active = Subscription("stripe", "s1", "active", True, "pro", event_at=7, event_id="e2")
    ended = Subscription("stripe", "s1", "canceled", False, "pro", event_at=7, event_id="e3")
    in_order = apply(apply(None, "acme", created, PRECEDENCE), "acme", active, PRECEDENCE)  # type: ignore[arg-type]
    assert isinstance(in_order, CustomerRecord)
    assert in_order.plan == "pro"
    late = apply(in_order, "acme", created, PRECEDENCE)
    assert late == OUTDATED  # created, delivered after the update of the same second
    assert isinstance(apply(in_order, "acme", ended, PRECEDENCE), CustomerRecord)
