"""The storage contract: reserve all-or-nothing, settle once, peek without touching."""

from __future__ import annotations

import asyncio
import math
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plangate.storage import (
    SLIDING_BUCKETS,
    Counter,
    MemoryStorage,
    Peek,
    Reserve,
    Settle,
    customer_prefix,
)

T0 = 1_700_000_000.0
K = customer_prefix("acme")  # keys of one customer share a Redis Cluster hash tag


def sliding(key=None, limit=5, cost=1, window=60.0):
    return Counter(key or K + "api-1m", limit, cost, window=window)


def fixed(key=None, limit=100, cost=10, resets_at=T0 + 3600):
    return Counter(key or K + "tokens-month:0", limit, cost, resets_at=resets_at)


def test_reserve_admits_up_to_the_limit(storage):
    results = [storage.reserve(Reserve((sliding(),), T0)) for _ in range(6)]
    assert [r.admitted for r in results] == [True] * 5 + [False]
    assert [r.states[0].used for r in results[:5]] == [1, 2, 3, 4, 5]
    assert results[5].violated == (0,)


def test_reservation_is_all_or_nothing(storage):
    roomy, tight = sliding(K + "a", limit=100), sliding(K + "b", limit=1)
    assert storage.reserve(Reserve((roomy, tight), T0)).admitted
    refused = storage.reserve(Reserve((roomy, tight), T0))
    assert not refused.admitted
    assert refused.violated == (1,)
    assert storage.peek(Peek((roomy, tight), T0))[0].used == 1  # roomy took nothing


def test_sliding_window_recovers_after_the_window(storage):
    for _ in range(5):
        storage.reserve(Reserve((sliding(),), T0))
    assert not storage.reserve(Reserve((sliding(),), T0 + 59)).admitted
    width = 60 / SLIDING_BUCKETS
    assert storage.reserve(Reserve((sliding(),), T0 + 60 + width)).admitted


def test_retry_after_is_exactly_when_capacity_returns(storage):
    for i in range(5):
        storage.reserve(Reserve((sliding(),), T0 + i * 10))
    refused = storage.reserve(Reserve((sliding(),), T0 + 45))
    assert not refused.admitted
    assert 0 < refused.retry_after <= 60
    again = T0 + 45 + refused.retry_after
    assert not storage.reserve(Reserve((sliding(),), again - 0.01)).admitted
    assert storage.reserve(Reserve((sliding(),), again)).admitted


def test_fixed_period_refuses_until_it_resets(storage):
    counter = fixed(limit=20, cost=10)
    assert storage.reserve(Reserve((counter,), T0)).admitted
    assert storage.reserve(Reserve((counter,), T0)).admitted
    refused = storage.reserve(Reserve((counter,), T0 + 600))
    assert not refused.admitted
    assert refused.retry_after == pytest.approx(3000)


def test_unlimited_counter_counts_and_never_refuses(storage):
    counter = Counter(K + "calls-month:0", None, 1000, resets_at=T0 + 3600)
    for _ in range(50):
        assert storage.reserve(Reserve((counter,), T0)).admitted
    assert storage.peek(Peek((counter,), T0))[0].used == 50_000


def test_refund_gives_the_units_back(storage):
    counters = (sliding(), fixed())
    result = storage.reserve(Reserve(counters, T0))
    assert storage.settle(Settle("r1", counters, result.slots, (-1, -10), T0 + 1))
    assert [s.used for s in storage.peek(Peek(counters, T0 + 1))] == [0, 0]


def test_settle_is_idempotent_per_reservation(storage):
    counters = (sliding(),)
    result = storage.reserve(Reserve(counters, T0))
    assert storage.settle(Settle("r1", counters, result.slots, (-1,), T0))
    assert not storage.settle(Settle("r1", counters, result.slots, (-1,), T0))
    storage.reserve(Reserve(counters, T0))
    assert storage.peek(Peek(counters, T0))[0].used == 1


def test_commit_beyond_the_limit_is_recorded_in_full(storage):
    counter = fixed(limit=100, cost=10)
    result = storage.reserve(Reserve((counter,), T0))
    assert storage.settle(Settle("r1", (counter,), result.slots, (490,), T0))
    assert storage.peek(Peek((counter,), T0))[0].used == 500
    assert not storage.reserve(Reserve((counter,), T0)).admitted


def test_refund_after_the_window_moved_on_takes_nothing_from_newer_usage(storage):
    counter = sliding(limit=10)
    old = storage.reserve(Reserve((counter,), T0))
    storage.reserve(Reserve((counter,), T0 + 120))
    storage.settle(Settle("late", (counter,), old.slots, (-1,), T0 + 120))
    assert storage.peek(Peek((counter,), T0 + 120))[0].used == 1


def test_peek_consumes_nothing(storage):
    counter = sliding()
    storage.reserve(Reserve((counter,), T0))
    for _ in range(10):
        assert storage.peek(Peek((counter,), T0))[0].used == 1


def test_peek_of_an_unknown_counter_is_zero(storage):
    assert storage.peek(Peek((fixed(key=K + "nobody"),), T0))[0].used == 0


def test_not_enforced_reservation_takes_the_cost_and_reports_the_violation(storage):
    counter = sliding(limit=1)
    storage.reserve(Reserve((counter,), T0))
    shadow = storage.reserve(Reserve((counter,), T0, enforce=False))
    assert not shadow.admitted
    assert shadow.violated == (0,)
    assert shadow.states[0].used == 2


def test_async_calls_share_the_same_counters(storage):
    async def run():
        try:
            await storage.areserve(Reserve((sliding(),), T0))
            return await storage.apeek(Peek((sliding(),), T0))
        finally:
            await storage.aclose()

    assert asyncio.run(run())[0].used == 1
    assert storage.reserve(Reserve((sliding(),), T0)).states[0].used == 2


def test_memory_forgets_expired_counters():
    store = MemoryStorage()
    store.reserve(Reserve((sliding("a"), fixed("b")), T0))
    store.reserve(Reserve((sliding("c"),), T0 + 10_000))  # the next sweep runs here
    assert set(store._counters) == {"c"}


@settings(
    max_examples=150,
    deadline=None,
    # one store serves every example; each example counts under a key of its own
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    steps=st.lists(
        st.tuples(
            # seconds since the last request; negative: this request read the clock a little
            # before the previous one did (threads read it outside the store's lock)
            st.floats(min_value=-0.5, max_value=7, allow_nan=False),
            st.integers(min_value=1, max_value=4),  # cost
            st.booleans(),  # refund it afterwards (a failed response)
        ),
        max_size=120,
    ),
    limit=st.integers(min_value=1, max_value=12),
    window=st.sampled_from([1.0, 5.0, 10.0, 60.0]),
)
def test_no_trailing_window_ever_holds_more_than_the_limit(storage, steps, limit, window):
    # The memory store keeps one clock for all its counters (Redis one per key): a fresh one
    # per example, so that an earlier example's times do not carry over.
    store = MemoryStorage() if isinstance(storage, MemoryStorage) else storage
    key = f"{K}prop-{uuid.uuid4().hex}"
    now = T0
    latest = -math.inf  # the latest time the store has seen for this key: none yet
    kept: list[tuple[float, int]] = []
    for n, (dt, cost, refund) in enumerate(steps):
        now += dt
        # The store counts a request that read the clock late at the latest time it has seen.
        latest = max(latest, now)
        counter = Counter(key, limit, cost, window=window)
        result = store.reserve(Reserve((counter,), now))
        if not result.admitted:
            continue
        if refund:
            store.settle(Settle(f"{key}-r{n}", (counter,), result.slots, (-cost,), now))
            continue
        kept.append((latest, cost))
    # The fullest trailing window ends at one of the admitted requests.
    for end, _ in kept:
        assert sum(c for t, c in kept if end - window < t <= end) <= limit


def test_a_request_that_read_the_clock_late_still_counts_for_a_whole_window():
    base = 3 * 566_666_667.0  # a bucket boundary: a 60 s window has buckets of 3 s
    store = MemoryStorage()
    store.reserve(Reserve((sliding("other"),), base + 3.0))  # the next sweep runs at +63
    counter = Counter("k", 2, 1, window=60.0)
    assert store.reserve(Reserve((counter,), base + 3.5)).admitted
    assert store.reserve(Reserve((counter,), base + 2.5)).admitted  # read the clock earlier
    # At +63.2 the unit of +3.5 is still inside the trailing minute: the sweep that runs now
    # must keep the counter, and the request is refused.
    assert not store.reserve(Reserve((counter,), base + 63.2)).admitted


def test_a_time_on_a_bucket_edge_lands_in_the_same_bucket_everywhere(storage):
    # 1800000002.95 // 0.05 and floor(1800000002.95 / 0.05) differ in floating point: every
    # backend must use the second, as the Redis scripts do.
    edge = 1_800_000_002.95
    result = storage.reserve(Reserve((sliding(limit=5000, window=1.0),), edge))
    assert result.slots == (36_000_000_059,)
    assert result.states[0].reset_after == pytest.approx(1.05)


def test_memory_forgets_counters_left_empty():
    store = MemoryStorage()
    huge = sliding("plangate:{acme}:x-1m", limit=1, cost=5)  # can never fit: nothing is kept
    assert not store.reserve(Reserve((huge,), T0)).admitted
    store.reserve(Reserve((sliding("plangate:{acme}:y-1m"),), T0 + 10_000))  # a sweep
    assert "plangate:{acme}:x-1m" not in store._counters
