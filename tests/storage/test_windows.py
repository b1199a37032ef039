"""Sliding windows mean what the headers say: a unit used at t counts while now < t + w.

A limit of at most EXACT_WINDOW_LIMIT is kept as an exact log; the guarantees here hold on
every backend (memory, Redis, Redis Cluster), with the clock passed in.
"""

from __future__ import annotations

import random
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plangate.storage import (
    EXACT_WINDOW_LIMIT,
    Counter,
    MemoryStorage,
    Peek,
    Record,
    Reserve,
    Settle,
    Storage,
    customer_prefix,
)

T0 = 1_700_000_000.0
K = customer_prefix("acme")


def window(limit: int = 5, cost: int = 1, seconds: float = 10.0, key: str = "") -> Counter:
    return Counter(key or f"{K}api-{uuid.uuid4().hex}", limit, cost, window=seconds)


def test_a_limit_up_to_the_bound_is_an_exact_log():
    assert window(limit=EXACT_WINDOW_LIMIT).exact
    assert not window(limit=EXACT_WINDOW_LIMIT + 1).exact
    assert not Counter(K + "calls-month:0", 5, 1, resets_at=T0).exact
    assert not Counter(K + "calls-1d", None, 1, window=86_400.0).exact


def test_a_client_pacing_itself_by_the_headers_is_admitted_at_exactly_w(storage):
    # requests-ratelimiter set to q=5;w=10: five at once, the sixth exactly 10 s after the first
    counter = window(limit=5, seconds=10.0)
    for i in range(5):
        assert storage.reserve(Reserve((counter,), T0 + i * 0.01)).admitted
    early = storage.reserve(Reserve((counter,), T0 + 9.999))
    assert not early.admitted
    assert early.retry_after == pytest.approx(0.001, abs=0.0011)
    assert storage.reserve(Reserve((counter,), T0 + 10.0)).admitted
    assert storage.reserve(Reserve((counter,), T0 + 10.01)).admitted
    assert not storage.reserve(Reserve((counter,), T0 + 10.015)).admitted


def test_retry_after_is_when_the_oldest_unit_that_matters_leaves(storage):
    counter = window(limit=3, seconds=60.0)
    for at in (0.0, 10.0, 20.0):
        storage.reserve(Reserve((counter,), T0 + at))
    refused = storage.reserve(Reserve((Counter(counter.key, 3, 2, window=60.0),), T0 + 30))
    assert not refused.admitted
    assert refused.retry_after == pytest.approx(40.0)  # two units must leave: the second at +70
    assert refused.states[0].reset_after == pytest.approx(30.0)  # the oldest leaves at +60
    again = Reserve((Counter(counter.key, 3, 2, window=60.0),), T0 + 70)
    assert not storage.reserve(Reserve(again.counters, T0 + 69.99)).admitted
    assert storage.reserve(again).admitted


def test_costs_count_as_that_many_units(storage):
    tokens = window(limit=1000, cost=500, seconds=60.0)
    assert storage.reserve(Reserve((tokens,), T0)).admitted
    assert storage.reserve(Reserve((tokens,), T0 + 1)).admitted
    refused = storage.reserve(Reserve((tokens,), T0 + 59.5))
    assert not refused.admitted
    assert refused.retry_after == pytest.approx(0.5)
    assert storage.reserve(Reserve((tokens,), T0 + 60)).admitted


def test_a_refund_removes_the_reservations_units(storage):
    counter = window(limit=3)
    results = [storage.reserve(Reserve((counter,), T0 + i)) for i in range(3)]
    assert storage.settle(Settle("refund-1", (counter,), results[1].slots, (-1,), T0 + 3))
    assert storage.peek(Peek((counter,), T0 + 3))[0].used == 2
    assert storage.reserve(Reserve((counter,), T0 + 4)).admitted
    assert not storage.reserve(Reserve((counter,), T0 + 5)).admitted
    # at +10 the unit of +0 has left; the refunded one of +1 left long ago
    assert storage.reserve(Reserve((counter,), T0 + 10)).admitted


def test_refunds_of_reservations_made_at_the_same_time_take_only_their_own(storage):
    counter = window(limit=5)
    first = storage.reserve(Reserve((counter,), T0))
    second = storage.reserve(Reserve((counter,), T0))
    assert storage.settle(Settle("a", (counter,), first.slots, (-1,), T0 + 1))
    assert storage.peek(Peek((counter,), T0 + 1))[0].used == 1
    assert storage.settle(Settle("b", (counter,), second.slots, (-1,), T0 + 1))
    assert storage.settle(Settle("c", (counter,), second.slots, (-1,), T0 + 1))  # nothing left
    assert storage.peek(Peek((counter,), T0 + 1))[0].used == 0


def test_an_adjustment_counts_at_the_reservations_time(storage):
    tokens = window(limit=1000, cost=100, seconds=60.0)
    reserved = storage.reserve(Reserve((tokens,), T0))
    storage.reserve(Reserve((tokens,), T0 + 30))
    # the response reported 900 tokens, settled 20 s later: they were used at T0
    assert storage.settle(Settle("r", (tokens,), reserved.slots, (800,), T0 + 20))
    assert storage.peek(Peek((tokens,), T0 + 30))[0].used == 1000
    assert not storage.reserve(Reserve((tokens,), T0 + 59.9)).admitted
    assert storage.peek(Peek((tokens,), T0 + 60))[0].used == 100  # all 900 left at +60
    assert storage.reserve(Reserve((tokens,), T0 + 60)).admitted


def test_a_settle_is_applied_once_per_reservation(storage):
    tokens = window(limit=1000, cost=100, seconds=60.0)
    reserved = storage.reserve(Reserve((tokens,), T0))
    settle = Settle("once", (tokens,), reserved.slots, (400,), T0 + 1)
    assert storage.settle(settle)
    assert not storage.settle(settle)
    assert storage.peek(Peek((tokens,), T0 + 1))[0].used == 500


def test_an_adjustment_after_the_unit_left_the_window_is_dropped(storage):
    counter = window(limit=5, seconds=10.0)
    old = storage.reserve(Reserve((counter,), T0))
    storage.reserve(Reserve((counter,), T0 + 10))
    assert storage.settle(Settle("late", (counter,), old.slots, (3,), T0 + 10))
    assert storage.peek(Peek((counter,), T0 + 10))[0].used == 1


def test_replayed_usage_is_counted_once_and_can_be_settled(storage):
    counter = window(limit=10)
    slots = storage.record(Record("outage-1", (counter,), (4,), T0))
    assert slots is not None
    assert storage.record(Record("outage-1", (counter,), (4,), T0)) is None
    assert storage.peek(Peek((counter,), T0 + 1))[0].used == 4
    assert storage.settle(Settle("r", (counter,), slots, (-3,), T0 + 1))
    assert storage.peek(Peek((counter,), T0 + 1))[0].used == 1
    assert storage.peek(Peek((counter,), T0 + 10))[0].used == 0


def test_a_log_holds_at_most_limit_entries(storage):
    counter = window(limit=3, cost=0)  # free calls: each reservation would be an entry
    for i in range(20):
        assert storage.reserve(Reserve((counter,), T0 + i * 0.1)).admitted
    if isinstance(storage, MemoryStorage):
        assert len(storage._counters[counter.key].times) <= 3  # type: ignore[union-attr]
    else:
        assert storage.inner.client.llen(counter.key) <= 1 + 3  # the header, then the entries


def test_a_plan_change_across_the_bound_keeps_the_usage(storage):
    key = f"{K}api-{uuid.uuid4().hex}"
    small, large = window(limit=5, key=key), window(limit=5000, key=key)
    for i in range(3):
        storage.reserve(Reserve((small,), T0 + i))
    assert storage.reserve(Reserve((large,), T0 + 3)).states[0].used == 4  # now buckets
    assert storage.reserve(Reserve((small,), T0 + 4)).states[0].used == 5  # a log again
    assert not storage.reserve(Reserve((small,), T0 + 5)).admitted
    # no unit counts shorter than it did: the first left no earlier than T0 + 10
    assert storage.peek(Peek((small,), T0 + 9.9))[0].used == 5
    assert storage.peek(Peek((small,), T0 + 20))[0].used == 0


class ExactModel:
    """What the window means, written out: every unit's time, a unit used at t counting
    while now < t + w."""

    def __init__(self, limit: int, seconds: float) -> None:
        self.limit, self.seconds = limit, seconds
        self.units: dict[int, tuple[float, int]] = {}  # reservation → (time, units)

    def used(self, now: float) -> int:
        return sum(u for t, u in self.units.values() if t <= now < t + self.seconds)

    def admits(self, now: float, cost: int) -> bool:
        return self.used(now) + cost <= self.limit

    def wait(self, now: float, cost: int) -> float:
        """Seconds until ``cost`` fits: when the oldest unit that matters leaves."""
        excess = self.used(now) + cost - self.limit
        for t, u in sorted(v for v in self.units.values() if now < v[0] + self.seconds):
            excess -= u
            if excess <= 0:
                return t + self.seconds - now
        return self.seconds


def paced(gaps_and_costs: list[tuple[float, int]], q: int, seconds: float) -> list[float]:
    """Request times of a client that sends exactly q units in any window: each unit at
    least ``seconds`` after the unit q places before it (``gap`` more, when it waits)."""
    unit_times: list[float] = []
    times = []
    now = T0
    for gap, cost in gaps_and_costs:
        now += gap
        earliest = len(unit_times) + cost - 1 - q  # the latest unit this request's must follow
        if earliest >= 0:
            now = max(now, unit_times[earliest] + seconds)
        unit_times += [now] * cost
        times.append(now)
    return times


@settings(max_examples=300, deadline=None)
@given(
    q=st.integers(min_value=1, max_value=30),
    seconds=st.sampled_from([0.5, 1.0, 10.0, 60.0, 86_400.0, 0.1, 3.7]),
    steps=st.lists(
        st.tuples(st.sampled_from([0.0, 0.0, 1e-6, 0.01, 0.3, 1.0, 7.0]), st.integers(1, 5)),
        max_size=150,
    ),
)
def test_a_client_sending_q_units_in_any_window_is_never_refused_in_memory(q, seconds, steps):
    store = MemoryStorage()
    key = f"{K}paced"
    steps = [(gap, min(cost, q)) for gap, cost in steps]
    for now, (_, cost) in zip(paced(steps, q, seconds), steps, strict=True):
        result = store.reserve(Reserve((Counter(key, q, cost, window=seconds),), now))
        assert result.admitted, (now - T0, cost)


@settings(max_examples=300, deadline=None)
@given(
    limit=st.integers(min_value=1, max_value=12),
    seconds=st.sampled_from([1.0, 5.0, 10.0, 0.3]),
    steps=st.lists(
        st.tuples(
            st.sampled_from([0.0, 1e-7, 0.05, 0.2, 1.0, 4.0]),  # seconds since the last request
            st.integers(min_value=1, max_value=4),  # cost
            st.integers(min_value=-4, max_value=3),  # settled later by this much (refund: <0)
        ),
        max_size=120,
    ),
)
def test_memory_admits_exactly_what_the_window_allows(limit, seconds, steps):
    check_against_the_model(MemoryStorage(), limit, seconds, steps)


@settings(max_examples=200, deadline=None)
@given(
    limit=st.integers(min_value=1, max_value=6),
    steps=st.lists(
        st.tuples(
            st.sampled_from([0.0, 0.05, 0.2, 1.0, 4.0]),
            st.integers(min_value=0, max_value=2),  # free calls too: zero-unit entries
            st.integers(min_value=-2, max_value=3),
        ),
        max_size=120,
    ),
)
def test_memory_never_admits_more_than_the_window_allows_with_free_calls(limit, steps):
    # Past the bound on entries (free calls hold entries), new units join the newest entry
    # at the later time: units may count longer than they should, never shorter.
    check_against_the_model(MemoryStorage(), limit, 5.0, steps, exact=False)


def check_against_the_model(
    store: Storage,
    limit: int,
    seconds: float,
    steps: list[tuple[float, int, int]],
    *,
    exact: bool = True,
) -> None:
    """Admitted iff the exact model admits (never more than the limit in any trailing window,
    and never refused when it fits), Retry-After exactly when it fits, usage exact after
    refunds and adjustments. Adjustments upward are applied only where they keep within
    the limit in every window, so that the first property stays checkable.

    ``exact=False``: only never more, never counted shorter (admitted implies the model
    admits; the store's usage at least the model's)."""
    key = f"{K}model-{uuid.uuid4().hex}"
    model = ExactModel(limit, seconds)
    now = T0
    pending: list[tuple[int, Reserve, int, tuple[int, ...]]] = []
    for n, (gap, cost, delta) in enumerate(steps):
        now += gap
        counter = Counter(key, limit, cost, window=seconds)
        op = Reserve((counter,), now)
        expected = model.admits(now, cost)
        result = store.reserve(op)
        if not exact:
            assert expected or not result.admitted
            expected = result.admitted
        assert result.admitted == expected, (n, now - T0, cost, model.used(now))
        if not expected:
            if exact:
                assert result.retry_after == pytest.approx(model.wait(now, cost), abs=1e-3)
            continue
        model.units[n] = (now, cost)
        if exact:
            assert result.states[0].used == model.used(now)
        pending.append((n, op, delta, result.slots))
        if len(pending) > 2:  # settle a reservation made a little earlier
            m, made, change, slots = pending.pop(0)
            t, units = model.units[m]
            change = max(change, -units)
            if change > 0 and now < t + seconds:
                # only what keeps every trailing window within the limit
                peak = max(model.used(u) for u, _ in model.units.values() if u >= t)
                change = min(change, limit - peak)
            # an adjustment of a unit that left the window is dropped
            change_seen = 0 if now >= t + seconds else change
            assert store.settle(Settle(f"{key}-{m}", made.counters, slots, (change,), now))
            model.units[m] = (t, units + change_seen)
        used = store.peek(Peek((counter,), now))[0].used
        assert used == model.used(now) if exact else used >= model.used(now)


@pytest.mark.parametrize("seed", range(6))
def test_every_backend_admits_exactly_what_the_window_allows(storage, seed):
    rng = random.Random(seed)
    limit = rng.choice([1, 3, 8, 20])
    seconds = rng.choice([1.0, 10.0, 0.5])
    steps = [
        (rng.choice([0.0, 1e-6, 0.05, 0.2, 1.0, 3.0]), rng.randint(1, 4), rng.randint(-4, 3))
        for _ in range(150)
    ]
    # the backend itself: ResilientStorage answers a refusal it remembers with a wait of at
    # most its refusal_ttl (1 s), not the exact one
    check_against_the_model(getattr(storage, "inner", storage), limit, seconds, steps)


@pytest.mark.parametrize("seed", range(4))
def test_every_backend_admits_a_paced_client_every_time(storage, seed):
    rng = random.Random(seed)
    q, seconds = rng.choice([(5, 10.0), (1, 1.0), (7, 0.3), (20, 60.0)])
    steps = [(rng.choice([0.0, 0.0, 1e-6, 0.01, 0.5, 2.0]), rng.randint(1, q)) for _ in range(120)]
    key = f"{K}paced-{uuid.uuid4().hex}"
    for now, (_, cost) in zip(paced(steps, q, seconds), steps, strict=True):
        assert storage.reserve(Reserve((Counter(key, q, cost, window=seconds),), now)).admitted


def advertised_window(limit: int, seconds: int) -> int:
    """The ``w`` plangate advertises for a window of ``limit`` per ``seconds``."""
    from plangate.config import load_config
    from plangate.engine import Engine

    config = load_config(
        {
            "version": 1,
            "identity": {
                "jwt": {"algorithms": ["HS256"], "secret": "s" * 32, "customer_claim": "sub"}
            },
            "features": {"api_calls": {"kind": "metered"}},
            "plans": {
                "free": {"features": {"api_calls": {"limit": limit, "window": f"{seconds}s"}}}
            },
        }
    )
    engine = Engine(config, new_id=lambda: "id")
    charge = engine.build_charge([("api_calls", 1)], "acme", config.catalog.plans["free"], None, T0)
    return charge.windows[0]


def test_an_exact_window_advertises_its_own_length():
    assert advertised_window(EXACT_WINDOW_LIMIT, 86_400) == 86_400


def test_a_bucketed_window_advertises_the_window_its_units_may_count_in():
    # a unit counts up to one bucket (w/20) past the window: q units in any 21/20 w always fit
    assert advertised_window(EXACT_WINDOW_LIMIT + 1, 86_400) == 90_720


@settings(max_examples=100, deadline=None)
@given(
    q=st.integers(min_value=EXACT_WINDOW_LIMIT + 1, max_value=EXACT_WINDOW_LIMIT + 30),
    seconds=st.sampled_from([10, 60, 3600]),
    steps=st.lists(
        st.tuples(st.sampled_from([0.0, 0.01, 0.3, 1.0, 7.0, 30.0]), st.integers(1, 400)),
        max_size=60,
    ),
)
def test_a_bucketed_window_never_refuses_a_client_pacing_by_the_advertised_w(q, seconds, steps):
    store = MemoryStorage()
    key = f"{K}paced-buckets"
    w = advertised_window(q, seconds)
    steps = [(gap, min(cost, q)) for gap, cost in steps]
    for now, (_, cost) in zip(paced(steps, q, w), steps, strict=True):
        result = store.reserve(Reserve((Counter(key, q, cost, window=float(seconds)),), now))
        assert result.admitted, (now - T0, cost)
