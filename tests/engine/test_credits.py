"""Credit balances, as pure logic: burn order, exact admission, debt, refunds, the ledger."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from plangate.engine._credits import CreditAccount, Grant, burn_key

HOUR = 3_600_000_000  # microseconds


def grant(gid: str, amount: int, **kw) -> Grant:
    return Grant(gid, amount, amount, **kw)


def test_burn_order_priority_then_expiry_then_promotional_then_oldest():
    account = CreditAccount()
    account.add(grant("paid-late", 10, expires_at=5 * HOUR, created_at=1), 0)
    account.add(grant("paid-soon", 10, expires_at=2 * HOUR, created_at=2), 0)
    account.add(grant("promo-soon", 10, expires_at=2 * HOUR, category="promotional"), 0)
    account.add(grant("forever", 10, created_at=0), 0)
    account.add(grant("urgent", 10, priority=0, created_at=9), 0)
    account.add(grant("old-soon", 10, expires_at=2 * HOUR, created_at=0), 0)
    order = [g.id for g in account.order(0)]
    assert order == ["urgent", "promo-soon", "old-soon", "paid-soon", "paid-late", "forever"]
    assert account.take(25, 0) == (("urgent", 10), ("promo-soon", 10), ("old-soon", 5))


def test_a_charge_the_balance_cannot_cover_is_refused_whole():
    account = CreditAccount()
    account.add(grant("a", 3), 0)
    account.add(grant("b", 4), 0)
    assert account.take(8, 0) is None
    assert account.balance(0) == 7
    assert account.take(7, 0) == (("a", 3), ("b", 4))
    assert account.take(1, 0) is None


def test_a_grant_is_usable_from_its_start_until_just_before_its_end():
    account = CreditAccount()
    account.add(grant("g", 5, effective_at=HOUR, expires_at=2 * HOUR), 0)
    assert account.take(1, HOUR - 1) is None
    assert account.take(1, HOUR) == (("g", 1),)
    assert account.take(1, 2 * HOUR - 1) == (("g", 1),)
    assert account.take(1, 2 * HOUR) is None
    assert account.ledger[-1].kind == "expiry"


def test_units_already_used_become_debt_that_the_next_grant_pays_first():
    account = CreditAccount()
    account.add(grant("a", 5), 0)
    assert account.take_excess(8, 0, "r1") == (("a", 5),)
    assert (account.debt, account.balance(0)) == (3, -3)
    assert account.take(0, 0) is None  # refused while the balance is not positive... and 0 > -3
    stored = account.add(grant("b", 10), 0)
    assert (stored.remaining, account.debt, account.balance(0)) == (7, 0, 7)


def test_a_refund_goes_back_to_the_grants_it_came_from_last_first():
    account = CreditAccount()
    account.add(grant("a", 2, priority=1), 0)
    account.add(grant("b", 5, priority=2), 0)
    burns = account.take(6, 0, "r")
    assert burns == (("a", 2), ("b", 4))
    assert account.refund(burns, 5, 0, "r") == 5
    assert (account.grants["a"].remaining, account.grants["b"].remaining) == (1, 5)


def test_a_refund_to_an_expired_grant_is_not_returned():
    account = CreditAccount()
    account.add(grant("a", 5, expires_at=HOUR), 0)
    burns = account.take(5, 0)
    assert account.refund(burns, 5, HOUR) == 0
    assert account.balance(HOUR) == 0


def test_revoking_takes_what_a_grant_still_holds():
    account = CreditAccount()
    account.add(grant("a", 5), 0)
    account.take(2, 0)
    assert account.revoke("a", 0) == 3
    assert account.balance(0) == 0


operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("add"),
            st.integers(1, 50),
            st.integers(0, 3),
            st.sampled_from(["paid", "promotional"]),
            st.one_of(st.none(), st.integers(1, 20)),
        ),
        st.tuples(st.just("take"), st.integers(0, 40)),
        st.tuples(st.just("excess"), st.integers(0, 40)),
        st.tuples(st.just("refund"), st.integers(0, 40)),
        st.tuples(st.just("revoke"), st.integers(0, 10)),
        st.tuples(st.just("tick"), st.integers(0, 5)),
    ),
    max_size=60,
)


@settings(max_examples=300)
@given(operations)
def test_the_ledger_always_sums_to_the_balance_and_nothing_is_overspent(ops):
    account = CreditAccount()
    now = 0
    burns_made = []
    for n, op in enumerate(ops):
        if op[0] == "add":
            _, amount, priority, category, hours = op
            expires = None if hours is None else now + hours * HOUR
            account.add(
                Grant(f"g{n}", amount, amount, category, priority, now, expires, created_at=n), now
            )
        elif op[0] == "take":
            before = account.balance(now)
            burns = account.take(op[1], now)
            if burns is None:
                assert before < op[1]
            else:
                assert sum(u for _, u in burns) == op[1]
                assert account.balance(now) == before - op[1] >= 0  # never overspent
                order = [burn_key(account.grants[g]) for g, _ in burns]
                assert order == sorted(order)
                # every grant but the last was emptied before the next was touched
                assert all(account.grants[g].remaining == 0 for g, _ in burns[:-1])
                burns_made.append(burns)
        elif op[0] == "excess":
            account.take_excess(op[1], now)
        elif op[0] == "refund" and burns_made:
            account.refund(burns_made.pop(), op[1], now)
        elif op[0] == "revoke" and account.grants:
            account.revoke(sorted(account.grants)[op[1] % len(account.grants)], now)
        elif op[0] == "tick":
            now += op[1] * HOUR
        account.expire(now)
        held = sum(g.remaining for g in account.grants.values())
        assert sum(e.amount for e in account.ledger) == held - account.debt
        assert all(0 <= g.remaining <= g.amount for g in account.grants.values())
        assert account.debt >= 0
