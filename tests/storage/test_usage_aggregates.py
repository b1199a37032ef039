"""Hourly usage aggregates: written by the scripts that already run (reserve, settle, record),
per customer, hour and meter, on memory, a real Redis and a real Redis Cluster."""

from __future__ import annotations

from typing import Any

import pytest

from plangate import Gate
from plangate.engine import Counter, Record, usage_key
from plangate.storage import ResilientStorage, Storage, customer_prefix
from tests.storage.conftest import BACKENDS
from tests.support import Clock, config, token

HOUR = 3600
START = 1_800_000_000.0  # 2027-01-15T08:00:00Z, the start of an hour
RETENTION = 35 * 86400


def gate(storage: Storage, clock: Clock, **changes: Any) -> Gate:
    return Gate(config(**changes), storage=storage, clock=clock)


def call(g: Gate, path: str, *, customer: str = "acme", plan: str = "pro", **settle: Any) -> bool:
    """One request, settled with status 200 (``settle``: what it reported, or a refund)."""
    decision = g.check("POST", path, token(customer, plan))
    if decision.allowed:
        g.settle(decision, 200, settle.get("reported"), refund=settle.get("refund", False))
    return decision.allowed


def usage(storage: Storage, customer: str = "acme") -> dict[int, dict[str, int]]:
    return storage.usage_hours(customer, int(START) - HOUR, int(START) + 10 * HOUR)


def test_each_meter_is_counted_per_hour(storage: Storage) -> None:
    clock = Clock(START + 10)
    g = gate(storage, clock)
    for _ in range(3):
        assert call(g, "/v1/chat")  # api_calls 1, ai_tokens 100
    clock.now = START + HOUR + 5
    assert call(g, "/v1/chat")
    assert call(g, "/v1/chat", customer="globex")
    assert usage(storage) == {
        int(START): {"api_calls": 3, "ai_tokens": 300},
        int(START) + HOUR: {"api_calls": 1, "ai_tokens": 100},
    }
    assert usage(storage, "globex") == {int(START) + HOUR: {"api_calls": 1, "ai_tokens": 100}}


def test_a_meter_with_several_limits_is_counted_once(storage: Storage) -> None:
    changes = config()
    changes["plans"]["pro"]["features"]["api_calls"] = [
        {"limit": 1000, "window": "1m"},
        {"limit": 100000, "period": "month"},
    ]
    g = Gate(changes, storage=storage, clock=Clock(START))
    assert call(g, "/v1/things")
    assert usage(storage) == {int(START): {"api_calls": 1}}


def test_what_is_reported_counts_and_refunds_count_nothing(storage: Storage) -> None:
    g = gate(storage, Clock(START))
    # reserved at its estimate (100), settled at what the response reported
    assert call(g, "/v1/completions", reported={"ai_tokens": 250})
    assert call(g, "/v1/completions", reported={"ai_tokens": 40})
    assert call(g, "/v1/chat", refund=True)
    assert usage(storage) == {int(START): {"api_calls": 2, "ai_tokens": 290}}


def test_a_refused_request_adds_nothing(storage: Storage) -> None:
    g = gate(storage, Clock(START))
    results = [call(g, "/v1/things", plan="free") for _ in range(7)]  # 5 a minute
    assert results == [True] * 5 + [False] * 2
    assert usage(storage) == {int(START): {"api_calls": 5}}


def test_a_settle_in_the_next_hour_changes_that_hour(storage: Storage) -> None:
    """Usage goes to the hour it was committed in: a refund after the hour turned makes
    that hour negative, and the two add up to what was used."""
    clock = Clock(START + HOUR - 1)
    g = gate(storage, clock)
    first = g.check("POST", "/v1/chat", token("acme", "pro"))
    clock.now = START + HOUR + 1
    g.settle(first, 200, refund=True)
    assert usage(storage) == {
        int(START): {"api_calls": 1, "ai_tokens": 100},
        int(START) + HOUR: {"api_calls": -1, "ai_tokens": -100},
    }


def test_usage_replayed_after_an_outage_counts_once_in_its_own_hour(storage: Storage) -> None:
    inner = storage.inner if isinstance(storage, ResilientStorage) else storage
    prefix = customer_prefix("acme")
    counter = Counter(
        f"{prefix}api_calls-month:0", None, 1, resets_at=START + 86400, usage="api_calls",
        usage_ttl=RETENTION,
    )  # fmt: skip
    replay = Record("r1", (counter,), (4,), START + 2 * HOUR + 30)
    assert inner.record(replay) is not None
    assert inner.record(replay) is None  # replayed again: nothing added
    assert usage(storage) == {int(START) + 2 * HOUR: {"api_calls": 4}}


@pytest.mark.redis
def test_the_hours_aggregates_expire_after_the_retention(redis_server: Any) -> None:
    from plangate.storage import open_storage

    with redis_server.client() as client:
        client.flushall()
    store = open_storage(redis_server.url)
    try:
        g = Gate(config(billing={"retention": "2d"}), storage=store, clock=Clock(START + 600))
        assert call(g, "/v1/things")
        with redis_server.client() as client:
            ttl = client.ttl(usage_key(customer_prefix("acme"), int(START)))
        # until the hour's end (3000 s from the clock's now), then two days
        assert 2 * 86400 + 3000 - 5 <= ttl <= 2 * 86400 + 3000
    finally:
        store.close()


def test_customers_with_usage_are_listed_by_hour(storage: Storage) -> None:
    clock = Clock(START)
    g = gate(storage, clock)
    call(g, "/v1/things", customer="acme")
    clock.now = START + 3 * HOUR
    call(g, "/v1/things", customer="a}b:{c")  # a hostile id keeps its own keys
    found = set(storage.usage_customers(int(START), int(START) + HOUR))
    assert found == {"acme"}
    found = set(storage.usage_customers(int(START), int(START) + 4 * HOUR))
    assert found == {"acme", "a}b:{c"}
    assert usage(storage, "a}b:{c") == {int(START) + 3 * HOUR: {"api_calls": 1}}


def test_marks_set_fields_of_hours_still_kept(storage: Storage) -> None:
    g = gate(storage, Clock(START))
    call(g, "/v1/things")
    storage.mark_usage(
        "acme",
        {int(START): {"exported:jsonl:api_calls": 1}, int(START) + HOUR: {"exported:x:y": 9}},
    )
    # the hour with no usage is not made by a mark
    assert usage(storage) == {int(START): {"api_calls": 1, "exported:jsonl:api_calls": 1}}


@pytest.mark.parametrize("storage", BACKENDS[1:], indirect=True)  # the Redis ones
def test_a_reservation_made_there_whose_reply_was_lost_is_counted_once(storage: Storage) -> None:
    """Redis made the reservation, its reply was lost (a timeout), and the process counted
    it locally: the replay finds it made (the hour's last reservation), adds nothing, and
    only what its response reported past the reservation follows."""
    from plangate.engine import MADE_THERE, Reserve, Settle
    from plangate.storage._outbox import Outbox

    assert isinstance(storage, ResilientStorage)
    inner = storage.inner
    counter = Counter(
        f"{customer_prefix('acme')}ai_tokens-month:0", None, 100, resets_at=START + 86400,
        usage="ai_tokens", usage_ttl=RETENTION,
    )  # fmt: skip
    made = Reserve((counter,), START + 10, reservation_id="r-made")
    assert inner.reserve(made).admitted  # made in Redis; the client never heard
    outbox = Outbox()
    outbox.count(made, sent=True)
    outbox.settle(Settle("r-made", (counter,), (0,), (150,), START + 11))  # reported 250
    lost = Reserve((counter,), START + 12, reservation_id="r-lost")  # never reached Redis
    outbox.count(lost, sent=True)
    replies = []
    for entry in outbox.batch(10):
        op = outbox.take(entry)
        assert op is not None
        result = inner.record(op)
        replies.append(result)
        for follow in outbox.replayed(entry, result):
            assert inner.settle(follow)
    assert MADE_THERE in replies
    assert usage(storage) == {int(START): {"ai_tokens": 250 + 100}}
