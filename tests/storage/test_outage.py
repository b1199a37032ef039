"""Redis outages with real servers: killed, paused (SIGSTOP), slowed down, restarted empty.

The app keeps answering: no 5xx, each request bounded by the storage timeout, every meter
following its ``on_storage_error`` policy, and the usage admitted meanwhile replayed to Redis
when it is back.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from plangate import CustomerRecord, wsgi
from plangate.customers import CustomerStore
from plangate.engine import PROBLEM_BASE
from plangate.storage import CircuitBreaker, ResilientStorage, Storage
from plangate.storage._redis import RedisStorage
from tests.middleware.apps import wsgi_app
from tests.servers import RedisServer, free_port
from tests.support import bearer, config

pytestmark = pytest.mark.redis

FREE = {"free": {"features": {"api_calls": {"limit": 5, "window": "1m"}}}}


@pytest.fixture
def server() -> Iterator[RedisServer]:
    """A Redis of this test's own, to kill, pause and restart."""
    redis = RedisServer().start()
    try:
        yield redis
    finally:
        if redis.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(redis.proc.pid, signal.SIGCONT)
        redis.cleanup()


class Clock:
    """The circuit breaker's clock, moved by the test instead of waited for."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def resilient(url: str, clock: Clock, **kwargs) -> ResilientStorage:
    breaker = CircuitBreaker(3, 1.0, clock=clock)
    return ResilientStorage(RedisStorage(url), breaker=breaker, **kwargs)


def client_for(storage: Storage, **changes) -> httpx.Client:
    app = wsgi.PlanGateMiddleware(wsgi_app, config(**changes), storage=storage)
    return httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://test")


def calls(client: httpx.Client, count: int, path: str = "/v1/projects", **kw) -> list[int]:
    return [client.get(path, headers=bearer(**kw)).status_code for _ in range(count)]


def _policy(policy: str) -> dict:
    features = {
        **config()["features"],
        "api_calls": {"kind": "metered", "on_storage_error": policy},
    }
    return {"features": features, "plans": FREE, "default_plan": "free"}


# Killed ------------------------------------------------------------------------------------


def test_killed_redis_local_keeps_enforcing_the_limit(server):
    store = resilient(server.url, Clock())
    with client_for(store, **_policy("local")) as client:
        server.kill()
        assert calls(client, 6) == [200] * 5 + [429]


def test_killed_redis_allow_lets_everything_through(server):
    store = resilient(server.url, Clock())
    with client_for(store, **_policy("allow")) as client:
        server.kill()
        assert calls(client, 8) == [200] * 8


def test_killed_redis_deny_answers_503_problem(server):
    store = resilient(server.url, Clock())
    with client_for(store, **_policy("deny")) as client:
        assert calls(client, 1) == [200]
        server.kill()
        response = client.get("/v1/projects", headers=bearer())
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"] == PROBLEM_BASE + "entitlements-unavailable"
    assert int(response.headers["retry-after"]) >= 1


def test_killed_redis_still_decides_features_from_the_last_customer_record(server):
    store = resilient(server.url, Clock())
    CustomerStore(store).save(CustomerRecord("acme", plan="pro"))
    with client_for(store) as client:
        # the token says free; the store's record (pro) was read before the outage
        assert (
            client.post("/v1/reports/7/export", headers=bearer("acme", "free")).status_code == 200
        )
        server.kill()
        assert (
            client.post("/v1/reports/7/export", headers=bearer("acme", "free")).status_code == 200
        )
        # a customer never seen: its token's plan decides
        assert (
            client.post("/v1/reports/7/export", headers=bearer("globex", "free")).status_code == 402
        )
        assert (
            client.post("/v1/reports/7/export", headers=bearer("initech", "pro")).status_code == 200
        )


def test_local_counting_starts_from_the_usage_redis_last_reported(server):
    plans = {"free": {"features": {"api_calls": {"limit": 50, "window": "1h"}}}}
    a, b = resilient(server.url, Clock()), resilient(server.url, Clock())
    with client_for(a, plans=plans) as first, client_for(b, plans=plans) as second:
        assert calls(first, 47) == [200] * 47
        assert calls(second, 1) == [200]  # Redis answers 48 of 50
        entitlements = first.get("/.plangate/entitlements", headers=bearer()).json()
        assert entitlements["meters"]["api_calls"]["limits"][0]["used"] == 48
        server.kill()
        # each process counts on from the 48 Redis last reported to it: 2 more each, not 50
        assert calls(first, 4) == [200, 200, 429, 429]
        assert calls(second, 4) == [200, 200, 429, 429]
        # a customer Redis never reported on here starts from nothing
        assert calls(first, 51, customer="globex") == [200] * 50 + [429]


# Restarted empty ---------------------------------------------------------------------------


def test_usage_admitted_during_the_outage_is_replayed_when_redis_is_back(server):
    clock = Clock()
    # One record replayed per successful call: the rest must be replayed because this
    # customer's reservation needs them first.
    store = resilient(server.url, clock, replay_batch=1)
    with client_for(store, **_policy("local")) as client:
        server.kill()
        assert calls(client, 2, customer="globex") == [200, 200]
        assert calls(client, 5) == [200] * 5  # counted in this process meanwhile
        assert store.pending == 2  # one record per customer: usage in one bucket is merged
        server.start()  # back, empty: the counts of before the outage are gone
        clock.now += 2  # the breaker lets a probe through
        # The probe's own batch replays globex's record; acme's is replayed because this
        # reservation needs it: 5 of 5 used, so this one is refused.
        assert calls(client, 1) == [429]
        assert store.pending == 0
        assert store.replayed_units == 7  # 2 of globex's, 5 of acme's
        assert store.breaker.state == "closed"
    # Shared counting resumes: another process, with nothing local, sees the 5.
    other = resilient(server.url, Clock())
    with client_for(other, **_policy("local")) as client:
        assert calls(client, 1) == [429]
        assert calls(client, 1, customer="globex") == [200]  # 2 + 1 of 5


def test_a_settle_that_missed_redis_is_replayed(server):
    clock = Clock()
    store = resilient(server.url, clock)
    with client_for(store) as client:
        client.get("/v1/projects", headers=bearer())  # warm
        server.kill()
        # reserved locally, committed with the header's value; both wait for Redis
        client.post("/v1/completions?tokens=777", headers=bearer())
        server.start()
        clock.now += 2
        body = client.get("/.plangate/entitlements", headers=bearer()).json()
    assert body["meters"]["ai_tokens"]["limits"][0]["used"] == 777


# Paused, slow -------------------------------------------------------------------------------


def test_a_paused_redis_costs_one_timeout_then_nothing(server):
    store = resilient(server.url, Clock())
    with client_for(store, **_policy("local")) as client:
        assert calls(client, 2) == [200, 200]
        os.kill(server.proc.pid, signal.SIGSTOP)
        statuses, slowest = [], 0.0
        for _ in range(10):
            started = time.perf_counter()
            statuses.append(client.get("/v1/projects", headers=bearer("globex")).status_code)
            slowest = max(slowest, time.perf_counter() - started)
        assert store.breaker.state == "open"
        tried = store.backend_calls
        assert calls(client, 3, customer="initech") == [200, 200, 200]
        os.kill(server.proc.pid, signal.SIGCONT)
    assert statuses == [200] * 5 + [429] * 5  # no 5xx; the limit held, counted locally
    assert slowest < 1.0  # the bound; each call is capped at 50 ms by default
    assert store.backend_calls == tried  # with the breaker open, Redis was not asked


def test_a_paused_redis_costs_an_asgi_request_one_timeout_then_nothing(server):
    import asyncio

    from plangate import asgi
    from tests.middleware.apps import asgi_app

    store = resilient(server.url, Clock())
    app = asgi.PlanGateMiddleware(asgi_app(), config(**_policy("local")), storage=store)

    async def run() -> tuple[list[int], float, int, list[int]]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:

            async def get(customer: str) -> int:
                response = await client.get("/v1/projects", headers=bearer(customer))
                return response.status_code

            assert [await get("acme"), await get("acme")] == [200, 200]
            os.kill(server.proc.pid, signal.SIGSTOP)
            statuses, slowest = [], 0.0
            for _ in range(10):
                started = time.perf_counter()
                statuses.append(await get("globex"))
                slowest = max(slowest, time.perf_counter() - started)
            tried = store.backend_calls
            later = [await get("initech") for _ in range(3)]
            os.kill(server.proc.pid, signal.SIGCONT)
            untried = store.backend_calls - tried
        await store.aclose()
        return statuses, slowest, untried, later

    statuses, slowest, untried, later = asyncio.run(run())
    assert statuses == [200] * 5 + [429] * 5  # no 5xx; the limit held, counted locally
    assert slowest < 1.0  # the bound; each call is capped at 50 ms by default
    assert untried == 0  # with the breaker open, Redis was not asked
    assert later == [200, 200, 200]


@contextlib.contextmanager
def slow_proxy(target_port: int, delay: float) -> Iterator[int]:
    """A TCP proxy in front of Redis that holds every reply for ``delay`` seconds."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    stop = threading.Event()
    sockets: list[socket.socket] = [listener]

    def pipe(source: socket.socket, sink: socket.socket, hold: float) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if hold:
                    stop.wait(hold)
                sink.sendall(data)

    def accept() -> None:
        with contextlib.suppress(OSError):
            while not stop.is_set():
                downstream, _ = listener.accept()
                upstream = socket.create_connection(("127.0.0.1", target_port))
                sockets.extend((downstream, upstream))
                threading.Thread(target=pipe, args=(downstream, upstream, 0), daemon=True).start()
                threading.Thread(
                    target=pipe, args=(upstream, downstream, delay), daemon=True
                ).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        stop.set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        thread.join(5)


def test_a_slow_redis_is_bounded_by_the_timeout(server):
    with slow_proxy(server.port, delay=0.2) as port:
        store = resilient(f"redis://127.0.0.1:{port}/0", Clock())
        with client_for(store, **_policy("local")) as client:
            durations, statuses = [], []
            for _ in range(6):
                started = time.perf_counter()
                statuses.append(client.get("/v1/projects", headers=bearer()).status_code)
                durations.append(time.perf_counter() - started)
        store.close()
    assert statuses == [200] * 5 + [429]
    assert max(durations) < 1.0  # never the 200 ms reply: the 50 ms timeout answers first
    assert store.breaker.state == "open"


# Not a storage outage: a bug ----------------------------------------------------------------


class Broken(RedisStorage):
    def reserve(self, op):
        raise RuntimeError("a bug, not an outage")


def test_an_unexpected_error_in_plangate_is_not_a_500(server, caplog):
    with client_for(Broken(server.url)) as client:
        response = client.get("/v1/projects", headers=bearer())
    assert response.status_code == 200  # on_storage_error: local (the default) lets it through
    assert response.json()["customer"] is None
    assert any("plangate failed to decide" in r.getMessage() for r in caplog.records)


def test_an_unexpected_error_under_deny_is_a_503(server):
    with client_for(Broken(server.url), on_storage_error="deny") as client:
        response = client.get("/v1/projects", headers=bearer())
    assert response.status_code == 503
    assert response.json()["type"] == PROBLEM_BASE + "entitlements-unavailable"


def test_free_port_is_not_the_machines_redis():
    assert free_port() != 6379


def test_the_asgi_middleware_follows_the_same_policies(server):
    import asyncio

    from plangate import asgi
    from tests.middleware.apps import asgi_app

    clock = Clock()
    store = resilient(server.url, clock, replay_batch=1)
    app = asgi.PlanGateMiddleware(asgi_app(), config(**_policy("local")), storage=store)

    async def run() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            statuses = [(await client.get("/v1/projects", headers=bearer())).status_code]
            server.kill()
            for _ in range(5):
                statuses.append((await client.get("/v1/projects", headers=bearer())).status_code)
            server.start()
            clock.now += 2
            statuses.append((await client.get("/v1/projects", headers=bearer())).status_code)
        await store.aclose()
        return statuses

    # 1 in Redis before, as Redis reported; 4 more locally (local counting starts from the
    # last usage Redis reported), then refused; Redis restarted empty: after recovery it holds
    # the 4 replayed, and a 5th fits.
    assert asyncio.run(run()) == [200, 200, 200, 200, 200, 429, 200]


# The bookkeeping of an outage ----------------------------------------------------------------

T0 = 1_700_000_000.0


def _reserve(store: ResilientStorage, counter, rid: str, now: float = T0):
    from plangate.storage import Reserve

    return store.reserve(Reserve((counter,), now, reservation_id=rid))


def _counter(limit: int = 100, cost: int = 100, key: str = "plangate:{acme}:ai_tokens-1d"):
    from plangate.storage import Counter

    return Counter(key, limit, cost, window=86_400.0)


def _used(server: RedisServer, key: str = "plangate:{acme}:ai_tokens-1d") -> int:
    with server.client() as client:
        if client.type(key) == b"list":  # an exact log: its header holds the total
            return int(client.lindex(key, 0).split()[1])
        return sum(int(v) for k, v in client.hgetall(key).items() if k != b"t")


def test_usage_of_one_bucket_is_one_record_however_many_requests(server):
    store = resilient(server.url, Clock())
    server.kill()
    for i in range(500):
        assert _reserve(store, _counter(10_000, 1), f"r{i}").admitted
    assert store.pending == 1


def test_a_settle_of_an_outage_reservation_counts_once(server):
    from plangate.storage import Settle

    clock = Clock()
    store = resilient(server.url, clock)
    server.kill()
    counter = _counter(cost=100)
    reserved = _reserve(store, counter, "r1")
    settle = Settle("r1", (counter,), reserved.slots, (1900,), T0)  # actual 2000
    assert store.settle(settle)
    assert not store.settle(settle)  # a repeated commit changes nothing
    server.start()
    clock.now += 2
    store.peek(__import__("plangate.storage", fromlist=["Peek"]).Peek((counter,), T0))
    assert _used(server) == 2000


def test_a_settle_after_redis_came_back_adjusts_the_replayed_usage(server):
    from plangate.storage import Peek, Settle

    clock = Clock()
    store = resilient(server.url, clock)
    server.kill()
    counter = _counter(limit=10_000, cost=500)
    reserved = _reserve(store, counter, "r1")  # an LLM call starts during the outage
    server.start()
    clock.now += 2
    store.peek(Peek((counter,), T0))  # Redis is back: the estimate is replayed
    assert _used(server) == 500
    assert store.settle(Settle("r1", (counter,), reserved.slots, (1500,), T0))  # used 2000
    assert _used(server) == 2000
    assert not store.settle(Settle("r1", (counter,), reserved.slots, (1500,), T0))
    assert _used(server) == 2000


def test_a_refusal_is_forgotten_when_this_process_gives_units_back(server):
    from plangate.storage import Settle

    store = resilient(server.url, Clock())
    counter = _counter(limit=10, cost=1, key="plangate:{acme}:api-1d")
    results = [_reserve(store, counter, f"r{i}") for i in range(10)]
    assert not _reserve(store, counter, "r10").admitted  # remembered
    # the 10th request failed: its unit is refunded, so the next request fits again
    assert store.settle(Settle("r9", (counter,), results[9].slots, (-1,), T0))
    assert _reserve(store, counter, "r11").admitted


def test_a_refusal_is_trusted_for_at_most_refusal_ttl(server):
    store = ResilientStorage(RedisStorage(server.url), refusal_ttl=1.0)
    counter = _counter(limit=1, cost=1, key="plangate:{acme}:api-1d")
    assert _reserve(store, counter, "a").admitted
    refused = _reserve(store, counter, "b")
    assert not refused.admitted
    assert refused.retry_after > 3600  # the window is a day
    calls = store.backend_calls
    assert not _reserve(store, counter, "c", T0 + 0.5).admitted
    assert store.backend_calls == calls  # answered from memory
    assert not _reserve(store, counter, "d", T0 + 1.5).admitted
    assert store.backend_calls == calls + 1  # a second later: asked again


def test_a_probe_that_never_reports_is_replaced():
    clock = Clock()
    breaker = CircuitBreaker(1, 1.0, clock=clock)
    breaker.failed()
    assert not breaker.allow()
    clock.now += 1
    assert breaker.allow()  # the probe goes out, and is cancelled: it never reports
    assert not breaker.allow()
    clock.now += 1
    assert breaker.allow()  # another probe


# Restarted after a burst: every pooled connection is dead at once ---------------------------

WARM = 24  # connections a warm-up burst leaves idle; each probe used to clear two of them


def _warm_counter(i: int):
    from plangate.storage import Counter, customer_prefix

    return Counter(customer_prefix(f"warm-{i}") + "api_calls-1h", 1000, 1, window=3600.0)


def _in_redis(server: RedisServer, counter) -> int:
    return _used(server, counter.key)


def _warm_up_threads(server: RedisServer, store: ResilientStorage) -> int:
    """WARM blocking reservations in flight at once (Redis holds the writes until all of them
    are connected and waiting), so the pool ends with WARM idle connections."""
    from plangate.storage import Reserve

    store.reserve(Reserve((_warm_counter(0),), time.time()))  # scripts loaded
    with server.client() as control:
        control.client_pause(60_000, all=False)  # writes (EVALSHA) wait, CLIENT LIST answers
        threads = [
            threading.Thread(
                target=store.reserve, args=(Reserve((_warm_counter(i),), time.time()),)
            )
            for i in range(WARM)
        ]
        for thread in threads:
            thread.start()
        while sum(c["cmd"] == "evalsha" for c in control.client_list()) < WARM:
            pass  # every thread's command is in Redis: an event, read from Redis
        control.client_unpause()
    for thread in threads:
        thread.join(30)
    direct = store.inner._direct
    assert direct is not None
    return len(direct.idle)


def test_after_a_restart_the_first_blocking_call_is_served_by_redis(server):
    from plangate.storage import Reserve

    store = resilient(f"{server.url}?socket_timeout=5", Clock())
    assert _warm_up_threads(server, store) == WARM
    server.restart()  # every idle connection is dead
    counter = _warm_counter(1)
    assert store.reserve(Reserve((counter,), time.time())).admitted
    assert _in_redis(server, counter) == 1  # Redis counted it: not the local fallback
    assert store.breaker.state == "closed"
    assert store.pending == 0
    store.close()


def test_after_a_restart_the_first_probe_is_served_by_redis(server):
    from plangate.storage import Reserve

    clock = Clock()
    store = resilient(f"{server.url}?socket_timeout=5", clock)
    assert _warm_up_threads(server, store) == WARM
    server.kill()
    for i in range(3):
        store.reserve(Reserve((_warm_counter(i),), time.time()))  # counted locally
    assert store.breaker.state == "open"
    server.start()
    clock.now += 1  # the breaker's next probe
    calls = store.backend_calls
    counter = _warm_counter(3)
    assert store.reserve(Reserve((counter,), time.time())).admitted
    assert store.backend_calls == calls + 1  # one probe
    assert store.breaker.state == "closed"
    assert _in_redis(server, counter) == 1
    assert store.pending == 0  # and what was counted meanwhile is replayed
    store.close()


def test_after_a_restart_the_first_asgi_probe_is_served_by_redis(server):
    import asyncio

    from plangate.storage import Reserve

    clock = Clock()
    store = resilient(server.url, clock)

    async def run() -> tuple[int, int, bool, str, int]:
        await store.areserve(Reserve((_warm_counter(0),), time.time()))  # scripts loaded
        await asyncio.gather(
            *(store.areserve(Reserve((_warm_counter(i),), time.time())) for i in range(WARM))
        )
        direct = store.inner._async().direct
        assert direct is not None
        idle = len(direct.idle)
        server.kill()
        for i in range(3):
            await store.areserve(Reserve((_warm_counter(i),), time.time()))  # locally
        assert store.breaker.state == "open"
        server.start()
        clock.now += 1  # the breaker's next probe
        calls = store.backend_calls
        admitted = (await store.areserve(Reserve((_warm_counter(3),), time.time()))).admitted
        probes = store.backend_calls - calls
        await store.aclose()
        return idle, probes, admitted, store.breaker.state, store.pending

    idle, probes, admitted, state, pending = asyncio.run(run())
    assert idle == WARM
    assert (probes, admitted, state, pending) == (1, True, "closed", 0)
    assert _in_redis(server, _warm_counter(3)) == 1
