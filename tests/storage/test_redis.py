"""What only the Redis backend has: round trips, scripts, keys and TTLs, URIs, restarts."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from datetime import datetime, timezone

import httpx
import pytest

from plangate import CustomerRecord, asgi, wsgi
from plangate.customers import CustomerStore
from plangate.errors import ConfigError
from plangate.storage import Counter, Peek, Reserve, customer_prefix, open_storage
from plangate.storage._redis import RedisStorage
from plangate.storage._redis_uri import parse_redis_uri
from tests.middleware.apps import asgi_app, wsgi_app
from tests.support import bearer, config

pytestmark = pytest.mark.redis

T0 = 1_700_000_000.0
K = customer_prefix("acme")


@pytest.fixture
def redis_url(redis_server) -> str:
    with redis_server.client() as client:
        client.flushall()
    return redis_server.url


class Tally:
    """What clients send a server, seen through MONITOR (commands that scripts run inside
    Redis are not round trips and are left out)."""

    def __init__(self, server) -> None:
        self.server = server
        self.client = server.client()
        self.seen: list[str] = []
        self.marked = threading.Condition()
        self.monitor = server.client().monitor()
        self.monitor.__enter__()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        with contextlib.suppress(Exception):  # the connection closes when the test ends
            for line in self.monitor.listen():
                if line["client_type"] == "lua":
                    continue
                with self.marked:
                    self.seen.append(line["command"])
                    self.marked.notify_all()

    def _mark(self) -> str:
        """Send a marker and wait until MONITOR shows it: everything before it is in."""
        marker = f"ECHO tally-{uuid.uuid4().hex}"
        self.client.echo(marker[5:])
        with self.marked:
            assert self.marked.wait_for(lambda: marker in self.seen, timeout=10)
        return marker

    def during(self, action) -> list[str]:
        """The commands other clients sent while ``action`` ran."""
        start = self._mark()
        action()
        end = self._mark()
        with self.marked:
            return self.seen[self.seen.index(start) + 1 : self.seen.index(end)]

    def close(self) -> None:
        self.monitor.__exit__(None, None, None)
        self.client.close()


@pytest.fixture
def tally(redis_server):
    counter = Tally(redis_server)
    yield counter
    counter.close()


# One round trip per request --------------------------------------------------------------


def _verbs(commands: list[str]) -> list[str]:
    return [command.split()[0] for command in commands]


def _subscribed(storage) -> None:
    """Wait until the store's customer-change subscription is made: it starts with the first
    customer cached, on a connection and a thread of its own, and its commands (once per
    process) must not fall into a tallied request."""
    inner = getattr(storage, "inner", storage)
    assert inner.changes.wait_subscribed(1, 10)


def test_a_warm_asgi_request_is_one_redis_command(tally, redis_url):
    app = asgi.PlanGateMiddleware(asgi_app(), config(), storage=redis_url)

    async def run() -> list[str]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.get("/v1/projects", headers=bearer())).status_code == 200
            await asyncio.to_thread(_subscribed, app.gate.storage)
            loop = asyncio.get_running_loop()
            done: list[int] = []

            def request() -> None:  # drive the request on the loop, from the tally's thread
                future = asyncio.run_coroutine_threadsafe(
                    client.get("/v1/projects", headers=bearer()), loop
                )
                done.append(future.result(10).status_code)

            commands = await asyncio.to_thread(tally.during, request)
            assert done == [200]
        await app.gate.storage.aclose()
        return commands

    assert _verbs(asyncio.run(run())) == ["EVALSHA"]


def test_a_warm_wsgi_request_is_one_redis_command(tally, redis_url):
    app = wsgi.PlanGateMiddleware(wsgi_app, config(), storage=redis_url)
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://test") as client:
        assert client.get("/v1/projects", headers=bearer()).status_code == 200
        _subscribed(app.gate.storage)
        commands = tally.during(lambda: client.get("/v1/projects", headers=bearer()))
    assert _verbs(commands) == ["EVALSHA"]
    app.gate.storage.close()


def test_a_commit_that_differs_from_the_estimate_is_one_more_command(tally, redis_url):
    app = wsgi.PlanGateMiddleware(wsgi_app, config(), storage=redis_url)
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://test") as client:
        client.get("/v1/projects", headers=bearer())  # warm: customer cached, scripts loaded
        _subscribed(app.gate.storage)
        commands = tally.during(lambda: client.post("/v1/chat?tokens=2500", headers=bearer()))
        body = client.get("/.plangate/entitlements", headers=bearer()).json()
    assert _verbs(commands) == ["EVALSHA", "EVALSHA"]  # reserve, then settle
    assert body["meters"]["ai_tokens"]["limits"][0]["used"] == 2500
    app.gate.storage.close()


# Scripts survive a flush and a restart ---------------------------------------------------


def test_script_flush_is_survived(redis_server, redis_url):
    store = RedisStorage(redis_url)
    counter = Counter(K + "api-1m", 5, 1, window=60.0)
    assert store.reserve(Reserve((counter,), T0)).admitted
    with redis_server.client() as client:
        client.script_flush()
    assert store.reserve(Reserve((counter,), T0)).states[0].used == 2
    store.close()


def test_a_redis_restart_is_survived(redis_server, redis_url):
    store = RedisStorage(redis_url)
    counter = Counter(K + "api-1m", 5, 1, window=60.0)
    assert store.reserve(Reserve((counter,), T0)).admitted
    redis_server.restart()  # the counts are gone (no persistence here), the client reconnects
    assert store.reserve(Reserve((counter,), T0)).states[0].used == 1
    store.close()


# Keys ------------------------------------------------------------------------------------


def test_every_counter_key_expires_by_itself(redis_server, redis_url):
    app = wsgi.PlanGateMiddleware(wsgi_app, config(), storage=redis_url)
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://test") as client:
        client.get("/v1/projects", headers=bearer())
        client.post("/v1/chat?tokens=2500", headers=bearer())  # adjusted: a settled marker
        client.post("/v1/completions?tokens=5", headers=bearer("globex", "enterprise"))
    app.gate.customers.save(CustomerRecord("initech", plan="pro"))
    with redis_server.client() as client:
        ttls = {key.decode(): client.pttl(key) for key in client.scan_iter("*")}
    counters = {key: ttl for key, ttl in ttls.items() if not key.endswith(":customer")}
    assert counters, ttls
    assert all(ttl > 0 for ttl in counters.values()), counters
    assert all(key.startswith(("plangate:{acme}:", "plangate:{globex}:")) for key in counters)
    # Customer records are the customer's plan, not usage: they stay until changed.
    assert ttls["plangate:{initech}:customer"] == -1
    app.gate.storage.close()


def test_a_sliding_window_key_lives_one_window_past_its_newest_bucket(redis_server, redis_url):
    store = RedisStorage(redis_url)
    store.reserve(Reserve((Counter(K + "api-1h", 5000, 1, window=3600.0),), T0))
    with redis_server.client() as client:
        ttl = client.pttl(K + "api-1h")
    assert 3600_000 < ttl <= 3600_000 + 180_000  # the window, plus up to one bucket


def test_an_exact_log_key_lives_one_window_past_its_newest_entry(redis_server, redis_url):
    store = RedisStorage(redis_url)
    store.reserve(Reserve((Counter(K + "api-1h", 5, 1, window=3600.0),), T0))
    with redis_server.client() as client:
        ttl = client.pttl(K + "api-1h")
    assert 3600_000 - 1000 < ttl <= 3600_000
    store.close()


def test_keys_of_one_customer_share_a_cluster_slot(redis_cluster):
    redis_cluster.flush()
    store = RedisStorage(redis_cluster.url)
    counters = (
        Counter(K + "api_calls-1s", 20, 1, window=1.0),
        Counter(K + "api_calls-1d", 10_000, 1, window=86_400.0),
        Counter(K + f"ai_tokens-month:{int(T0)}", 10**6, 500, resets_at=T0 + 86_400),
    )
    assert store.reserve(Reserve(counters, T0)).admitted  # one script over all three keys
    slots = {store.client.keyslot(c.key) for c in counters}
    assert len(slots) == 1
    store.close()


# Customers -------------------------------------------------------------------------------


def test_customer_records_are_read_once_per_cache_ttl(tally, redis_url):
    store = RedisStorage(redis_url)
    customers = CustomerStore(store)
    anchor = datetime(2026, 1, 31, 9, 30, tzinfo=timezone.utc)
    customers.save(CustomerRecord("acme", plan="pro", billing_anchor=anchor))
    _subscribed(store)
    assert tally.during(lambda: customers.load("acme")) == []  # what this process wrote
    customers.invalidate("acme")
    assert _verbs(tally.during(lambda: customers.load("acme"))) == ["HGETALL"]
    assert tally.during(lambda: customers.load("acme")) == []  # the in-process cache
    store.close()


def test_a_customer_record_is_one_hash_written_by_one_script_then_published(
    tally, redis_server, redis_url
):
    store = RedisStorage(redis_url)
    record = CustomerRecord("acme", plan="pro")
    store.get_customer("acme")  # connected
    assert _verbs(tally.during(lambda: store.put_customer(record))) == ["EVALSHA", "PUBLISH"]
    with redis_server.client() as client:
        assert client.hgetall(K + "customer") == {
            b"plan": b"pro",
            b"billing_anchor": b"",
            b"addons": b"",
            b"overrides": b"",
            b"trial_ends_at": b"",
            b"previous_plan": b"",
            b"subscriptions": b"",
            b"version": b"1",
        }
    store.close()


def test_a_record_written_before_addons_existed_reads_without_them(redis_server, redis_url):
    with redis_server.client() as client:
        client.hset(K + "customer", mapping={"plan": "pro", "billing_anchor": ""})
    store = RedisStorage(redis_url)
    assert store.get_customer("acme") == CustomerRecord("acme", plan="pro")
    store.close()


def test_addons_and_overrides_are_json_fields(redis_server, redis_url):
    store = RedisStorage(redis_url)
    store.put_customer(
        CustomerRecord("acme", plan="pro", addons={"x": 2}, overrides={"max_projects": 9})
    )
    with redis_server.client() as client:
        fields = client.hgetall(K + "customer")
    assert (fields[b"addons"], fields[b"overrides"]) == (b'{"x": 2}', b'{"max_projects": 9}')
    store.close()


def test_a_monthly_period_resets_on_the_billing_anchor_in_redis(redis_url):
    plans = {"free": {"features": {"ai_tokens": {"limit": 100, "period": "month"}}}}
    routes = [{"match": "POST /v1/chat", "meters": {"ai_tokens": 60}}]
    now = [datetime(2026, 3, 14, 23, 0, tzinfo=timezone.utc).timestamp()]
    app = wsgi.PlanGateMiddleware(
        wsgi_app, config(plans=plans, routes=routes), storage=redis_url, clock=lambda: now[0]
    )
    anchor = datetime(2026, 1, 15, tzinfo=timezone.utc)  # months start on the 15th
    app.gate.customers.save(CustomerRecord("acme", plan="free", billing_anchor=anchor))
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://test") as client:
        assert client.post("/v1/chat?tokens=60", headers=bearer()).status_code == 200
        refused = client.post("/v1/chat?tokens=60", headers=bearer())
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "3600"  # the 15th, 00:00 UTC
        now[0] = datetime(2026, 3, 15, 0, 0, 1, tzinfo=timezone.utc).timestamp()
        assert client.post("/v1/chat?tokens=60", headers=bearer()).status_code == 200
    app.gate.storage.close()


def test_a_two_second_window_refuses_then_recovers(redis_url):
    plans = {"free": {"features": {"api_calls": {"limit": 3, "window": "2s"}}}}
    now = [T0]
    app = wsgi.PlanGateMiddleware(
        wsgi_app, config(plans=plans), storage=redis_url, clock=lambda: now[0]
    )
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://test") as client:
        for _ in range(3):
            assert client.get("/v1/projects", headers=bearer()).status_code == 200
        now[0] += 1.0
        refused = client.get("/v1/projects", headers=bearer())
        assert refused.status_code == 429
        wait = int(refused.headers["retry-after"])
        assert 1 <= wait <= 2  # within the window
        now[0] += wait
        assert client.get("/v1/projects", headers=bearer()).status_code == 200
    app.gate.storage.close()


# Sentinel --------------------------------------------------------------------------------


@pytest.mark.sentinel
def test_sentinel_finds_the_master_and_counts_there(redis_sentinel):
    with redis_sentinel.master.client() as client:
        client.flushall()
    store = RedisStorage(redis_sentinel.url)
    counter = Counter(K + "api-1m", 2, 1, window=60.0)
    assert [store.reserve(Reserve((counter,), T0)).admitted for _ in range(3)] == [
        True,
        True,
        False,
    ]

    async def peek() -> int:
        try:
            return (await store.apeek(Peek((counter,), T0)))[0].used
        finally:
            await store.aclose()

    assert asyncio.run(peek()) == 2
    with redis_sentinel.master.client() as client:
        assert client.exists(K + "api-1m")
    store.close()


# URIs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "kind", "nodes", "expected"),
    [
        ("redis://cache:6380/2", "single", [("cache", 6380)], {"db": 2}),
        (
            "redis://:s3cret@cache/0?socket_timeout=0.05&max_connections=20",
            "single",
            [("cache", 6379)],
            {"password": "s3cret", "socket_timeout": 0.05, "max_connections": 20},
        ),
        ("rediss://cache:6380/0?ssl_cert_reqs=none", "single", [("cache", 6380)], {"ssl": True}),
        (
            "redis+cluster://a:7000,b:7001",
            "cluster",
            [("a", 7000), ("b", 7001)],
            {"socket_timeout": 0.05},
        ),
        (
            "redis+sentinel://s1:26379,s2:26379/main/3",
            "sentinel",
            [("s1", 26379), ("s2", 26379)],
            {"db": 3},
        ),
    ],
)
def test_uri_forms(uri, kind, nodes, expected):
    target = parse_redis_uri(uri)
    assert target.kind == kind
    assert list(target.nodes) == nodes
    for key, value in expected.items():
        assert target.connection[key] == value


def test_plangate_options_are_taken_from_the_uri():
    uri = (
        "redis://cache/0?customer_cache_ttl=0.5&socket_timeout=0.2&refusal_ttl=3&breaker_failures=5"
    )
    target = parse_redis_uri(uri)
    assert (target.customer_cache_ttl, target.refusal_ttl, target.breaker_failures) == (0.5, 3, 5)
    assert open_storage(uri).refusal_ttl == 3
    assert "customer_cache_ttl" not in target.connection
    assert target.connection["socket_timeout"] == 0.2


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("redis://a:1,b:2/0", "redis:// names one server; use redis+cluster:// for several"),
        ("redis+cluster://a:7000/1", "a Redis Cluster has only database 0"),
        ("redis+sentinel://s1:26379", "name the master: redis+sentinel://host:port/SERVICE"),
        ("redis://cache:port/0", "invalid port in 'cache:port'"),
        (
            "redis://cache/0?customer_cache_ttl=soon",
            "invalid value for 'customer_cache_ttl': 'soon' (seconds, at least 0)",
        ),
        ("redis://cache/abc", "invalid database 'abc' (a whole number, at least 0)"),
    ],
)
def test_bad_uris_say_what_is_wrong(uri, message):
    with pytest.raises(ConfigError) as info:
        RedisStorage(uri)
    assert str(info.value).endswith(message)


def test_a_refused_customer_costs_no_redis_call_until_the_window_can_admit(tally, redis_url):
    now = [T0]
    app = wsgi.PlanGateMiddleware(
        wsgi_app, config(), storage=open_storage(redis_url), clock=lambda: now[0]
    )
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://test") as client:
        for _ in range(5):  # free: 5 a minute
            assert client.get("/v1/projects", headers=bearer()).status_code == 200
        first = client.get("/v1/projects", headers=bearer())
        assert first.status_code == 429  # Redis said so
        _subscribed(app.gate.storage)
        wait = float(first.headers["retry-after"])

        def refused_again() -> None:
            for _ in range(3):
                response = client.get("/v1/projects", headers=bearer())
                assert response.status_code == 429
                assert 1 <= int(response.headers["retry-after"]) <= wait

        assert tally.during(refused_again) == []  # remembered: no round trip
        now[0] += wait  # the window can admit again: Redis is asked, and admits
        assert _verbs(tally.during(lambda: client.get("/v1/projects", headers=bearer()))) == [
            "EVALSHA"
        ]
        assert client.get("/v1/projects", headers=bearer("globex")).status_code == 200
    app.gate.storage.close()


def test_a_remembered_refusal_does_not_refuse_a_smaller_cost_or_a_larger_limit(redis_url):
    store = open_storage(redis_url)
    big = Counter(K + "tokens-1m", 10, 8, window=60.0)
    assert store.reserve(Reserve((big,), T0)).admitted
    assert not store.reserve(Reserve((big,), T0)).admitted  # 8 + 8 > 10: remembered
    small = Counter(K + "tokens-1m", 10, 2, window=60.0)
    assert store.reserve(Reserve((small,), T0)).admitted  # 8 + 2 fits: Redis is asked
    upgraded = Counter(K + "tokens-1m", 100, 8, window=60.0)
    assert store.reserve(Reserve((upgraded,), T0)).admitted  # a new plan's limit
    store.close()
