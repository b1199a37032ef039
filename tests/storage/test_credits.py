"""Credit balances in every store: the same rules (plangate.engine._credits) in memory and in
the Redis scripts, on one server and on a cluster."""

from __future__ import annotations

import random

import pytest

from plangate.engine import (
    Counter,
    CreditCharge,
    GrantCredits,
    ReadCredits,
    Reserve,
    RevokeCredits,
    Settle,
    credits_key,
)
from plangate.engine._credits import Grant, micros
from plangate.storage import Storage

NOW = 1_800_000_000.0  # seconds
US = micros(NOW)


def charge(customer: str = "acme", **kw) -> CreditCharge:
    return CreditCharge(credits_key(customer, "ai_credits"), "ai_credits", **kw)


def give(storage: Storage, amount: int, gid: str, *, key: str | None = None, **kw):
    grant = Grant(gid, amount, amount, idempotency_key=key, created_at=US, **kw)
    return storage.grant_credits(GrantCredits(charge(), grant, f"{amount}", US))


def balance(storage: Storage, now: float = NOW, **kw) -> int:
    return storage.read_credits(ReadCredits(charge(**kw), micros(now))).balance


def spend(storage: Storage, cost: int, now: float = NOW, rid: str = "r1", counters=()):
    op = Reserve(
        tuple(counters), now, reservation_id=rid, credits=(charge(cost=cost, direct=True),)
    )
    return storage.reserve(op)


def test_a_charge_is_taken_whole_or_refused_whole(storage: Storage):
    give(storage, 3, "a")
    give(storage, 4, "b")
    refused = spend(storage, 8)
    assert not refused.admitted
    assert refused.short == (0,)
    assert refused.credits[0].balance == 7
    assert refused.credits[0].required == 8
    admitted = spend(storage, 7, rid="r2")
    assert admitted.admitted
    assert admitted.credits[0].charged == 7
    assert admitted.credits[0].balance == 0
    assert sorted(admitted.credits[0].burns) == [("a", 3), ("b", 4)]
    assert balance(storage) == 0


def test_a_refusal_for_credits_consumes_no_quota(storage: Storage):
    counter = Counter("plangate:{acme}:api_calls-month:0", 10, 1, resets_at=NOW + 3600)
    refused = spend(storage, 5, counters=[counter])
    assert not refused.admitted
    assert refused.violated == ()
    assert refused.short == (0,)
    give(storage, 5, "a")
    admitted = spend(storage, 5, counters=[counter], rid="r2")
    assert admitted.admitted
    assert admitted.states[0].used == 1


def test_burn_order_priority_then_expiry_then_promotional_then_oldest(storage: Storage):
    later = US + 3_600_000_000
    give(storage, 1, "forever")
    give(storage, 1, "paid-soon", expires_at=later)
    give(storage, 1, "promo-soon", expires_at=later, category="promotional")
    give(storage, 1, "urgent", priority=0)
    result = spend(storage, 4)
    assert [grant for grant, _ in result.credits[0].burns] == [
        "urgent",
        "promo-soon",
        "paid-soon",
        "forever",
    ]


def test_a_settle_refunds_to_the_grants_and_charges_past_the_balance_as_debt(storage: Storage):
    give(storage, 10, "a")
    result = spend(storage, 6)
    burns = result.credits[0].burns
    refund = Settle("r1", (), (), (), NOW, credits=(charge(),), credit_deltas=(-4,), burns=(burns,))
    assert storage.settle(refund)
    assert not storage.settle(refund)  # once per reservation
    assert balance(storage) == 8
    again = spend(storage, 8, rid="r2")
    excess = Settle(
        "r2",
        (),
        (),
        (),
        NOW,
        credits=(charge(),),
        credit_deltas=(5,),
        burns=(again.credits[0].burns,),
    )
    assert storage.settle(excess)
    view = storage.read_credits(ReadCredits(charge(), US))
    assert (view.balance, view.debt) == (-5, 5)
    assert not spend(storage, 0, rid="r3").admitted  # in debt: refused until positive
    give(storage, 7, "b")  # the debt is paid first
    assert balance(storage) == 2
    assert spend(storage, 0, rid="r4").admitted


def test_overage_charges_the_units_over_the_limit(storage: Storage):
    counter = Counter("plangate:{acme}:ai_tokens-month:0", 100, 30, resets_at=NOW + 3600)
    over = charge(overage=((0, 2, 0),))
    give(storage, 50, "a")
    for i in range(3):  # 90 of 100: within the quota, no credits
        result = storage.reserve(Reserve((counter,), NOW, reservation_id=f"q{i}", credits=(over,)))
        assert result.admitted
        assert result.credits[0].charged == 0
    result = storage.reserve(Reserve((counter,), NOW, reservation_id="q3", credits=(over,)))
    assert result.admitted
    assert result.credits[0].charged == 40
    assert result.states[0].used == 120
    result = storage.reserve(Reserve((counter,), NOW, reservation_id="q4", credits=(over,)))
    assert not result.admitted
    assert result.short == (0,)
    assert result.violated == ()
    assert result.credits[0].required == 60
    assert result.credits[0].balance == 10


def test_the_plan_grant_is_issued_once_per_period(storage: Storage):
    period = charge(grant=100, period_start=US - 10, period_end=US + 3_600_000_000)
    assert storage.read_credits(ReadCredits(period, US)).balance == 100
    op = Reserve((), NOW, reservation_id="r1", credits=(period._replace() if False else period,))
    for i in range(3):
        op = Reserve((), NOW, reservation_id=f"r{i}", credits=(replace_cost(period, 10),))
        assert storage.reserve(op).admitted
    assert storage.read_credits(ReadCredits(period, US)).balance == 70


def replace_cost(c: CreditCharge, cost: int) -> CreditCharge:
    from dataclasses import replace

    return replace(c, cost=cost, direct=True)


def test_a_grant_serves_until_a_millisecond_before_it_expires(storage: Storage):
    expires = US + 60_000_000
    give(storage, 5, "a", expires_at=expires)
    assert spend(storage, 1, now=(expires - 1000) / 1e6).admitted
    assert not spend(storage, 1, now=expires / 1e6, rid="r2").admitted
    view = storage.read_credits(ReadCredits(charge(), expires))
    assert view.balance == 0
    assert view.ledger[0].kind == "expiry"


def test_an_idempotency_key_makes_one_grant(storage: Storage):
    first = give(storage, 10, "a", key="k1")
    again = give(storage, 10, "b", key="k1")
    assert first.created
    assert not again.created
    assert again.grant.id == "a"
    other = give(storage, 11, "c", key="k1")
    assert other.conflict
    assert other.grant is None
    assert balance(storage) == 10


def test_a_revoked_grant_gives_up_what_it_holds(storage: Storage):
    give(storage, 10, "a")
    spend(storage, 4)
    assert storage.revoke_credits(RevokeCredits(charge(), "a", US)) == 6
    assert storage.revoke_credits(RevokeCredits(charge(), "nope", US)) is None
    assert balance(storage) == 0


def test_the_ledger_pages_newest_first_and_sums_to_the_balance(storage: Storage):
    give(storage, 10, "a")
    for i in range(5):
        spend(storage, 1, rid=f"r{i}")
    first = storage.read_credits(ReadCredits(charge(), US, limit=4))
    assert [e.kind for e in first.ledger] == ["burn"] * 4
    assert first.cursor is not None
    rest = storage.read_credits(ReadCredits(charge(), US, limit=4, before=first.cursor))
    assert [e.kind for e in rest.ledger] == ["burn", "grant"]
    assert rest.cursor is None
    assert first.ledger_sum == first.balance == 5


@pytest.mark.parametrize("seed", range(3))
def test_random_traffic_keeps_the_ledger_equal_to_the_balance(storage: Storage, seed: int):
    rng = random.Random(seed)
    now = NOW
    reservations = []
    for step in range(60):
        now += rng.random() * 5
        action = rng.random()
        if action < 0.2:
            expires = micros(now + rng.choice([2, 30, 600])) if rng.random() < 0.5 else None
            grant = Grant(f"g{step}", rng.randint(1, 9), 0, expires_at=expires, created_at=US)
            grant = Grant(grant.id, grant.amount, grant.amount, expires_at=expires)
            storage.grant_credits(GrantCredits(charge(), grant, "x", micros(now)))
        elif action < 0.7:
            result = spend(storage, rng.randint(0, 7), now=now, rid=f"r{step}")
            if result.admitted:
                reservations.append((f"r{step}", result.credits[0].burns))
        elif reservations:
            rid, burns = reservations.pop(rng.randrange(len(reservations)))
            delta = rng.randint(-5, 5)
            storage.settle(
                Settle(
                    rid,
                    (),
                    (),
                    (),
                    now,
                    credits=(charge(),),
                    credit_deltas=(delta,),
                    burns=(burns,),
                )
            )
        view = storage.read_credits(ReadCredits(charge(), micros(now)))
        held = sum(
            g.remaining for g in view.grants if g.expires_at is None or g.expires_at > micros(now)
        )
        assert view.ledger_sum == held - view.debt
        assert view.balance == held - view.debt


def test_a_capped_ledger_still_sums_to_the_balance(storage: Storage):
    from plangate.engine._credits import LEDGER_CAP, LEDGER_SLACK

    charges = LEDGER_CAP + LEDGER_SLACK + 5
    give(storage, charges + 95, "a")
    for i in range(charges):
        assert spend(storage, 1, rid=f"r{i}").admitted
    view = storage.read_credits(ReadCredits(charge(), US, limit=500))
    assert view.balance == 95
    assert view.ledger_sum == 95  # the entries trimmed are summed into the base
    kept, cursor = 0, None
    while True:
        page = storage.read_credits(ReadCredits(charge(), US, limit=500, before=cursor))
        kept += len(page.ledger)
        cursor = page.cursor
        if cursor is None:
            break
    assert LEDGER_CAP <= kept <= LEDGER_CAP + LEDGER_SLACK


# What a review found ------------------------------------------------------------------------


def test_a_reservation_sent_again_takes_nothing_twice(storage: Storage):
    # a client that lost the reply sends the same reservation again
    give(storage, 10, "a")
    first = spend(storage, 4, rid="again")
    second = spend(storage, 4, rid="again")
    assert first.admitted
    assert second.admitted
    assert second.credits[0].burns == first.credits[0].burns == (("a", 4),)
    assert balance(storage) == 6


def test_a_refund_does_not_return_to_a_revoked_grant(storage: Storage):
    give(storage, 10, "a")
    burns = spend(storage, 4).credits[0].burns
    assert storage.revoke_credits(RevokeCredits(charge(), "a", US)) == 6
    refund = Settle("r1", (), (), (), NOW, credits=(charge(),), credit_deltas=(-4,), burns=(burns,))
    assert storage.settle(refund)
    assert balance(storage) == 0


def test_a_charge_past_what_a_balance_holds_is_debt_no_larger_than_it_holds(storage: Storage):
    from plangate.engine._credits import MAX_UNITS

    give(storage, 10, "a")
    burns = spend(storage, 1).credits[0].burns
    huge = Settle(
        "r1", (), (), (), NOW, credits=(charge(),), credit_deltas=(MAX_UNITS,), burns=(burns,)
    )
    assert storage.settle(huge)
    again = Settle(
        "r2", (), (), (), NOW, credits=(charge(),), credit_deltas=(MAX_UNITS,), burns=((),)
    )
    assert storage.settle(again)
    view = storage.read_credits(ReadCredits(charge(), US))
    assert view.debt == MAX_UNITS
    assert view.balance == -MAX_UNITS
    assert not spend(storage, 1, rid="r3").admitted


def test_a_settle_giving_back_to_an_empty_bucket_is_taken(storage: Storage):
    counter = Counter("plangate:{acme}:api_calls-1d", 5000, 0, window=86400.0)
    result = storage.reserve(Reserve((counter,), NOW, reservation_id="z"))
    settle = Settle("z", (counter,), result.slots, (-1,), NOW)
    assert storage.settle(settle)  # nothing to give back: not an error


def test_a_cursor_at_the_first_entry_pages_nothing(storage: Storage):
    give(storage, 10, "a")
    assert storage.read_credits(ReadCredits(charge(), US, before="0-0")).ledger == ()


def test_reading_or_revoking_for_a_customer_with_no_balance_writes_nothing(storage: Storage):
    nobody = CreditCharge(credits_key("nobody", "ai_credits"), "ai_credits")
    assert storage.read_credits(ReadCredits(nobody, US)).balance == 0
    assert storage.revoke_credits(RevokeCredits(nobody, "no-such-grant", US)) is None
    inner = getattr(storage, "inner", None)
    if inner is not None:  # Redis: not a key was made
        assert inner.client.keys("plangate:{nobody}*") in ([], {})
