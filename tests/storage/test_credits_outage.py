"""Credit balances while Redis is out: each balance follows its ``on_storage_error`` —
``deny`` (the default for credits: they are money) refuses with a 503, ``allow`` admits and
charges on replay, ``local`` admits up to the balance Redis last reported to this process."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import httpx
import pytest

from plangate import wsgi
from plangate.engine import CreditCharge, GrantCredits, ReadCredits, Reserve, Settle, credits_key
from plangate.engine._credits import Grant, micros
from plangate.storage import CircuitBreaker, ResilientStorage
from plangate.storage._breaker import StorageUnavailable
from plangate.storage._redis import RedisStorage
from tests.middleware.apps import wsgi_app
from tests.servers import RedisServer
from tests.storage.test_outage import Clock
from tests.storage.test_outage import server as server  # the fixture (one Redis per test)
from tests.support import bearer, config

pytestmark = pytest.mark.redis

T0 = 1_800_000_000.0


@pytest.fixture
def stores() -> Iterator[list[ResilientStorage]]:
    made: list[ResilientStorage] = []
    yield made
    for store in made:
        store.close()


def _store(server: RedisServer, clock: Clock, made: list[ResilientStorage]) -> ResilientStorage:
    store = ResilientStorage(RedisStorage(server.url), breaker=CircuitBreaker(1, 1.0, clock=clock))
    made.append(store)
    return store


def _charge(policy: str, cost: int = 5) -> CreditCharge:
    key = credits_key("acme", "ai_credits")
    return CreditCharge(key, "ai_credits", cost=cost, direct=True, on_error=policy)


def _give(store: ResilientStorage, amount: int) -> None:
    grant = Grant(os.urandom(4).hex(), amount, amount)
    store.grant_credits(GrantCredits(_charge("deny"), grant, "x", micros(T0)))


def _spend(store: ResilientStorage, charge: CreditCharge, rid: str):
    return store.reserve(Reserve((), T0, reservation_id=rid, credits=(charge,)))


def _balance(server: RedisServer) -> int:
    backend = RedisStorage(server.url)
    try:
        return backend.read_credits(ReadCredits(_charge("deny"), micros(T0))).balance
    finally:
        backend.close()


def _pause(server: RedisServer) -> None:
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)


def _back(server: RedisServer, store: ResilientStorage, clock: Clock) -> None:
    """Redis answers again; the breaker's probe replays what waited for it."""
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGCONT)
    clock.now += 2
    _spend(store, _charge("allow", cost=0), "probe")
    assert store.pending == 0


def test_credits_refuse_with_503_by_default_when_redis_is_out(server, stores):
    store = _store(server, Clock(), stores)
    _give(store, 100)
    server.kill()
    with pytest.raises(StorageUnavailable):
        _spend(store, _charge("deny"), "r1")


def test_a_credits_route_answers_a_503_problem_when_redis_is_out(server, stores):
    features = {**config()["features"], "ai_credits": {"kind": "credits"}}
    plans = {"free": {"features": {"ai_credits": {"grant": 10, "period": "month"}}}}
    routes = [{"match": "GET /v1/headers", "meters": {"ai_credits": 1}}]
    changes = {"features": features, "plans": plans, "default_plan": "free", "routes": routes}
    app = wsgi.PlanGateMiddleware(
        wsgi_app, config(**changes), storage=_store(server, Clock(), stores)
    )
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://t") as client:
        assert client.get("/v1/headers", headers=bearer()).status_code == 200
        server.kill()
        response = client.get("/v1/headers", headers=bearer())
    assert response.status_code == 503
    assert response.json()["type"].endswith("entitlements-unavailable")


def test_allow_admits_during_the_outage_and_charges_on_replay(server, stores):
    clock = Clock()
    store = _store(server, clock, stores)
    _give(store, 12)
    _pause(server)
    for i in range(3):  # 15 credits: more than the balance, admitted all the same
        assert _spend(store, _charge("allow"), f"r{i}").admitted
    assert store.pending == 3  # money is not merged: one record a reservation
    _back(server, store, clock)
    assert _balance(server) == -3  # charged in full on replay: what the grants lacked is debt


def test_local_admits_up_to_the_balance_redis_last_reported(server, stores):
    clock = Clock()
    store = _store(server, clock, stores)
    _give(store, 10)
    assert _spend(store, _charge("local", cost=2), "before").admitted  # Redis says 8 left
    _pause(server)
    assert _spend(store, _charge("local"), "r1").admitted  # 3 left here
    refused = _spend(store, _charge("local"), "r2")
    assert not refused.admitted
    assert refused.short == (0,)
    _back(server, store, clock)
    assert _balance(server) == 3  # 10 - 2 - 5: charged once, not twice


def test_local_without_a_balance_seen_here_refuses_with_503(server, stores):
    store = _store(server, Clock(), stores)
    _give(store, 10)
    server.kill()
    with pytest.raises(StorageUnavailable):
        _spend(store, _charge("local"), "r1")


def test_a_refund_during_the_outage_lowers_what_is_replayed(server, stores):
    clock = Clock()
    store = _store(server, clock, stores)
    _give(store, 10)
    assert _spend(store, _charge("local", cost=1), "before").admitted  # 9 reported
    _pause(server)
    result = _spend(store, _charge("local", cost=6), "r1")
    assert result.admitted
    burns = result.credits[0].burns
    refund = Settle(
        "r1", (), (), (), T0, credits=(_charge("local"),), credit_deltas=(-4,), burns=(burns,)
    )
    assert store.settle(refund)
    _back(server, store, clock)
    backend = RedisStorage(server.url)
    view = backend.read_credits(ReadCredits(_charge("deny"), micros(T0), limit=20))
    backend.close()
    assert view.balance == 7, view.ledger  # 10 - 1 - (6 - 4)


def test_a_meter_with_overage_keeps_its_quota_during_an_outage_under_deny(server, stores):
    from plangate.engine import Counter

    clock = Clock()
    store = _store(server, clock, stores)
    _give(store, 100)
    counter = Counter("plangate:{acme}:ai_tokens-month:0", 2, 1, resets_at=T0 + 3600)
    overage = CreditCharge(credits_key("acme", "ai_credits"), "ai_credits", overage=((0, 5, 0),))
    server.kill()
    results = [
        store.reserve(Reserve((counter,), T0, reservation_id=f"r{i}", credits=(overage,)))
        for i in range(3)
    ]
    # below the limit: admitted (not a 503); past it: refused on the quota (a 429), since
    # the balance that overage would charge cannot be read
    assert [r.admitted for r in results] == [True, True, False]
    assert results[2].violated == (0,)


def test_a_settle_past_what_an_outage_reservation_took_is_charged_on_replay(server, stores):
    from plangate.engine import Counter

    clock = Clock()
    store = _store(server, clock, stores)
    _give(store, 100)
    assert _spend(store, _charge("local", cost=1), "before").admitted  # a balance seen: 99
    counter = Counter("plangate:{acme}:ai_tokens-month:0", 10, 5, resets_at=T0 + 3600)
    overage = CreditCharge(
        credits_key("acme", "ai_credits"), "ai_credits", overage=((0, 1, 0),), on_error="local"
    )
    _pause(server)
    result = store.reserve(Reserve((counter,), T0, reservation_id="r1", credits=(overage,)))
    assert result.admitted
    assert result.credits[0].charged == 0
    # the response says 50 were used: 40 past the limit, at 1 credit each
    settle = Settle(
        "r1", (counter,), result.slots, (45,), T0, credits=(overage,), credit_deltas=(40,),
        burns=((),),
    )  # fmt: skip
    assert store.settle(settle)
    _back(server, store, clock)
    assert _balance(server) == 59  # 100 - 1 - 40


def test_a_route_with_two_balances_keeps_each_in_its_place_during_an_outage(server, stores):
    from plangate.engine import Counter

    store = _store(server, Clock(), stores)
    _give(store, 100)
    gpu = CreditCharge(credits_key("acme", "gpu"), "gpu", overage=((0, 1, 0),))  # deny
    direct = _charge("allow", cost=3)
    counter = Counter("plangate:{acme}:ai_tokens-month:0", 10, 1, resets_at=T0 + 3600)
    server.kill()
    result = store.reserve(Reserve((counter,), T0, reservation_id="r1", credits=(gpu, direct)))
    assert result.admitted
    assert [state.charged for state in result.credits] == [0, 3]  # one state a balance, in order
    settle = Settle(
        "r1", (counter,), result.slots, (0,), T0, credits=(gpu, direct), credit_deltas=(0, -3),
        burns=tuple(state.burns for state in result.credits),
    )  # fmt: skip
    assert store.settle(settle)


def test_a_replay_answered_recorded_before_asks_nothing_more():
    from plangate.engine import MADE_THERE
    from plangate.storage._outbox import Outbox

    outbox = Outbox()
    op = Reserve((), T0, reservation_id="r1", credits=(_charge("allow"),))
    outbox.count(op, (5,))
    (entry,) = outbox.batch(10)
    outbox.take(entry)
    # a retry of a record whose first reply was lost: recorded before, nothing to follow
    assert outbox.replayed(entry, None) == []
    outbox.count(replace_rid(op, "r2"), (5,))
    (again,) = outbox.batch(10)
    outbox.take(again)
    outbox.settle(
        Settle("r2", (), (), (), T0, credits=op.credits, credit_deltas=(-2,), burns=((),))
    )
    (follow,) = outbox.replayed(again, MADE_THERE)  # made in Redis: settled there
    assert follow.credit_deltas == (-2,)


def replace_rid(op: Reserve, rid: str) -> Reserve:
    from dataclasses import replace

    return replace(op, reservation_id=rid)


def test_a_reservation_made_there_after_all_gets_what_was_used_here_past_it():
    """Its reserve timed out here but was made in Redis: the replay changes nothing, and the
    follow-up settle carries what the response reported past the reservation, for the
    counters (their periods and the usage aggregates billing exports) as for the credits."""
    from plangate.engine import MADE_THERE, Counter
    from plangate.storage._outbox import Outbox

    counter = Counter(
        "plangate:{acme}:ai_tokens-month:0", None, 100, resets_at=T0 + 3600, usage="ai_tokens",
        usage_ttl=3600,
    )  # fmt: skip
    outbox = Outbox()
    op = Reserve((counter,), T0, reservation_id="r1", credits=(_charge("allow", cost=1),))
    outbox.count(op, (1,))
    outbox.settle(
        Settle("r1", (counter,), (0,), (150,), T0, credits=op.credits, credit_deltas=(0,),
               burns=((),))
    )  # fmt: skip
    (entry,) = outbox.batch(10)
    outbox.take(entry)
    (follow,) = outbox.replayed(entry, MADE_THERE)
    assert follow.counters == (counter,)
    assert follow.deltas == (150,)
