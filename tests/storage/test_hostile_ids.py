"""Customer ids that would break a key, and Redis error replies that are not outages.

Any string is a customer id (an email may start with ``}``): each makes one well-formed hash
tag of its own, so one customer's keys share a cluster slot. An error reply from Redis is the
request's problem: the circuit breaker, which speaks for every customer of the process, only
counts Redis being unreachable or silent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from urllib.parse import unquote

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from plangate import asgi
from plangate.storage import (
    CircuitBreaker,
    Counter,
    Peek,
    Reserve,
    ResilientStorage,
    customer_key,
    customer_prefix,
    open_storage,
)
from plangate.storage._redis import RedisStorage
from tests.middleware.apps import asgi_app
from tests.servers import RedisServer
from tests.support import bearer, config

HOSTILE = ["}x@example.com", "{", "}", "{}", "a:b", "%7D", "é", "a b", "\t", "x}{y", "%"]


def _tag(key: str) -> str:
    """The hash tag as Redis Cluster reads it: after the first '{', up to the next '}'."""
    start = key.index("{")
    return key[start + 1 : key.index("}", start + 1)]


@given(st.text())
def test_any_customer_id_makes_one_non_empty_hash_tag_that_names_it(customer):
    prefix = customer_prefix(customer)
    tag = _tag(prefix)
    assert tag
    assert prefix == f"plangate:{{{tag}}}:"
    assert customer_key(customer).startswith(prefix)
    if customer:  # different ids, different tags: the tag decodes back to the id
        assert unquote(tag, errors="surrogatepass") == customer


def test_usual_ids_keep_their_readable_keys():
    assert customer_prefix("acme") == "plangate:{acme}:"
    assert customer_prefix("x.y+z@example.com") == "plangate:{x.y+z@example.com}:"
    assert customer_prefix("}x@example.com") == "plangate:{%7Dx@example.com}:"
    assert customer_prefix("") == "plangate:{%}:"


def test_hostile_ids_are_distinct_customers():
    prefixes = {customer_prefix(c) for c in [*HOSTILE, "", "%25", "%257D"]}
    assert len(prefixes) == len(HOSTILE) + 3


# On a real cluster --------------------------------------------------------------------------

#: every customer sends a burst; a customer of only whitespace is refused (401) before
#: anything is counted, so the whitespace cases are the unit tests' only
BURST = [c for c in HOSTILE if c.strip()]


def _burst(store: ResilientStorage, customers: list[str], each: int) -> dict[str, list[int]]:
    app = asgi.PlanGateMiddleware(asgi_app(), config(), storage=store)

    async def run() -> dict[str, list[int]]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:

            async def chat(customer: str) -> int:  # two counters, and a settle (100 reserved)
                response = await client.post("/v1/chat?tokens=60", headers=bearer(customer))
                return response.status_code

            statuses = await asyncio.gather(*(chat(c) for c in customers for _ in range(each)))
        await store.aclose()
        return {c: sorted(statuses[i * each : (i + 1) * each]) for i, c in enumerate(customers)}

    return asyncio.run(run())


@pytest.mark.redis
@pytest.mark.cluster
def test_a_brace_customer_and_others_in_one_burst_on_a_cluster(redis_cluster):
    redis_cluster.flush()
    customers = [*BURST, "acme", "globex", "initech"]
    store = open_storage(redis_cluster.url)
    assert isinstance(store, ResilientStorage)
    statuses = _burst(store, customers, 7)
    assert statuses == {c: [200] * 5 + [429] * 2 for c in customers}
    assert store.breaker.state == "closed"
    assert store.local.peek(Peek((), time.time())) == ()
    # Redis counted every customer: another process sees each of them at its limit
    other = open_storage(redis_cluster.url)
    assert isinstance(other, ResilientStorage)
    assert _burst(other, customers, 1) == {c: [429] for c in customers}
    assert other.breaker.state == "closed"


@pytest.mark.redis
@pytest.mark.cluster
def test_keys_of_two_slots_are_that_requests_problem_not_the_breakers(redis_cluster, caplog):
    redis_cluster.flush()
    breaker = CircuitBreaker(1, 60.0)  # one failure would open it
    store = ResilientStorage(RedisStorage(redis_cluster.url), breaker=breaker)
    split = (
        Counter(customer_prefix("acme") + "api_calls-1m", 5, 1, window=60.0),
        Counter(customer_prefix("globex") + "api_calls-1m", 5, 1, window=60.0),
    )
    now = time.time()
    with caplog.at_level(logging.ERROR, logger="plangate.storage"):
        assert store.reserve(Reserve(split, now)).admitted  # on_error "local": counted here
    assert "same key slot" in caplog.text
    assert store.breaker.state == "closed"
    assert store.pending == 0  # not kept for a replay Redis would refuse again
    assert store.reserve(Reserve(split[1:], now)).states[0].used == 1  # from Redis
    store.close()


# Error replies on one node ------------------------------------------------------------------


@pytest.mark.redis
def test_a_key_of_the_wrong_type_fails_that_customer_only(redis_server, caplog):
    with redis_server.client() as client:
        client.flushall()
        client.set(customer_prefix("broken") + "api_calls-1m", "not a hash")
    store = open_storage(redis_server.url)
    assert isinstance(store, ResilientStorage)
    with caplog.at_level(logging.ERROR, logger="plangate.storage"):
        statuses = _burst(store, ["broken", "acme", "globex"], 7)
    # every request of the broken customer got an error reply and followed its policy (local)
    assert statuses == {c: [200] * 5 + [429] * 2 for c in ["broken", "acme", "globex"]}
    assert store.breaker.state == "closed"
    assert "WRONGTYPE" in caplog.text
    with redis_server.client() as client:
        assert client.exists(customer_prefix("acme") + "api_calls-1m")


@pytest.mark.redis
def test_a_key_of_the_wrong_type_under_deny_is_a_503_for_that_customer(redis_server):
    with redis_server.client() as client:
        client.flushall()
        client.set(customer_prefix("broken") + "api_calls-1m", "not a hash")
    store = open_storage(redis_server.url)
    assert isinstance(store, ResilientStorage)
    features = {
        **config()["features"],
        "api_calls": {"kind": "metered", "on_storage_error": "deny"},
    }
    app = asgi.PlanGateMiddleware(asgi_app(), config(features=features), storage=store)

    async def run() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            statuses = []
            for customer in ["broken", "broken", "broken", "broken", "acme"]:
                response = await client.get("/v1/projects", headers=bearer(customer))
                statuses.append(response.status_code)
        await store.aclose()
        return statuses

    assert asyncio.run(run()) == [503, 503, 503, 503, 200]
    assert store.breaker.state == "closed"


class _Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.redis
def test_a_poisoned_outbox_record_is_dropped_with_a_log_line(caplog):
    server = RedisServer().start()
    try:
        clock = _Clock()
        store = ResilientStorage(
            RedisStorage(server.url), breaker=CircuitBreaker(3, 1.0, clock=clock)
        )
        poisoned = Counter(customer_prefix("broken") + "api_calls-1m", 5, 1, window=60.0)
        fine = Counter(customer_prefix("acme") + "api_calls-1m", 5, 1, window=60.0)
        now = time.time()
        server.kill()
        assert store.reserve(Reserve((poisoned,), now, reservation_id="a")).admitted
        assert store.reserve(Reserve((fine,), now, reservation_id="b")).admitted
        assert store.pending == 2
        server.start()
        with server.client() as client:
            client.set(poisoned.key, "not a hash")  # its replay will be an error reply
        clock.now += 2
        with caplog.at_level(logging.ERROR, logger="plangate.storage"):
            assert store.peek(Peek((fine,), now))[0].used == 1  # replayed
            assert store.reserve(Reserve((poisoned,), now)).admitted  # locally: WRONGTYPE
        assert store.pending == 0
        assert store.outbox.discarded == 1
        assert store.breaker.state == "closed"
        assert "dropped" in caplog.text
        store.close()
    finally:
        server.cleanup()
