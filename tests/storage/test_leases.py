"""Local quota leases (storage/_leases.py) against real Redis servers: exact, nothing lost.

Several ``ResilientStorage``s on one Redis stand for several processes. Each request
carries its own time, and the leases' clock (the background flush's) is the test's, so a
run is deterministic; the background thread itself is tested on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from plangate.errors import ConfigError
from plangate.storage import (
    Counter,
    Peek,
    Reserve,
    ResilientStorage,
    Settle,
    customer_prefix,
    open_storage,
)
from plangate.storage._base import CreditCharge
from plangate.storage._leases import Leases
from plangate.storage._resilient import _Flusher

pytestmark = pytest.mark.redis

T0 = 1_700_000_000.0
K = customer_prefix("acme")

SERVERS = [
    pytest.param("redis_server", id="redis"),
    pytest.param("redis_cluster", id="redis-cluster", marks=pytest.mark.cluster),
    pytest.param("redis_sentinel", id="redis-sentinel", marks=pytest.mark.sentinel),
]


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=SERVERS)
def processes(
    request: pytest.FixtureRequest, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., ResilientStorage]]:
    """Opens stores on one Redis as separate processes would, leases on, no flush thread
    (the test flushes when it means to)."""
    server = request.getfixturevalue(request.param)
    server.flush() if request.param == "redis_cluster" else _flush(server)
    monkeypatch.setattr(_Flusher, "start", lambda self: None)
    opened: list[ResilientStorage] = []

    def open_process(options: str = "") -> ResilientStorage:
        store = open_storage(f"{server.url}{'&' if '?' in server.url else '?'}{options}")
        assert isinstance(store, ResilientStorage)
        if store.leases is not None:
            store.leases.clock = clock
        opened.append(store)
        return store

    yield open_process
    for store in opened:
        store.close()


def _flush(server) -> None:
    with getattr(server, "master", server).client() as client:
        client.flushall()


def counted(store: ResilientStorage, counter: Counter, now: float) -> int:
    """What Redis counts for ``counter`` (asked without leases)."""
    return store.inner.peek(Peek((counter,), now))[0].used


def period(limit: int, cost: int = 1, key: str = "") -> Counter:
    return Counter(key or f"{K}calls-month:{uuid.uuid4().hex}", limit, cost, resets_at=T0 + 86_400)


def buckets(limit: int, cost: int = 1, seconds: float = 60.0, key: str = "") -> Counter:
    assert limit > 1000  # a smaller limit is an exact log, never leased
    return Counter(key or f"{K}calls-{uuid.uuid4().hex}", limit, cost, window=seconds)


#: leases as large as the store grants: the fraction of the headroom, not the rate, bounds them
GREEDY = "lease_horizon=30&lease_ttl=2"


# Exactness: the property ------------------------------------------------------------------


def run_against_the_model(
    stores: list[ResilientStorage],
    clock: Clock,
    make: Callable[[int], Counter],
    limit: int,
    seconds: float,
    seed: int,
) -> list[list[float]]:
    """Requests from random processes at random times with random costs, some refunded,
    leases flushed now and then: what was admitted never exceeds the limit in any trailing
    window (``seconds``; 0: the period), counting each admitted unit from its use, at the
    time it was used. Answers the uses, ``[time, units]`` each."""
    rng = random.Random(seed)
    uses: list[list[float]] = []
    made: list[tuple[int, ResilientStorage, Reserve, tuple[int, ...]]] = []
    for n in range(400):
        clock.now += rng.choice([0.0, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 2.0])
        now = clock.now
        store = rng.choice(stores)
        op = Reserve((make(rng.randint(1, 40)),), now, reservation_id=f"r{n}")
        result = store.reserve(op)
        if result.admitted:
            uses.append([now, op.counters[0].cost])
            made.append((len(uses) - 1, store, op, result.slots))
            window = [u for t, u in uses if seconds == 0 or now - seconds < t <= now]
            assert sum(window) <= limit, (n, now - T0)
        if made and rng.random() < 0.2:  # a failed response: refunded, in part or whole
            i, owner, earlier, slots = made.pop(rng.randrange(len(made)))
            refund = -rng.randint(1, int(uses[i][1]))
            deltas = (refund,)
            assert owner.settle(
                Settle(earlier.reservation_id, earlier.counters, slots, deltas, now)
            )
            if seconds == 0 or now < uses[i][0] + seconds:  # past the window: nothing to take
                uses[i][1] += refund
        if rng.random() < 0.05:
            rng.choice(stores).flush_leases()
    assert (
        sum(s.leases.granted_units for s in stores if s.leases is not None) > 0
    )  # leases were used
    return uses


@pytest.mark.parametrize("seed", range(3))
def test_leased_periods_never_admit_past_the_limit_and_lose_nothing(processes, clock, seed):
    stores = [processes(GREEDY) for _ in range(3)]
    key = f"{K}calls-month:{uuid.uuid4().hex}"
    uses = run_against_the_model(
        stores, clock, lambda cost: period(1500, cost, key), 1500, 0.0, seed
    )
    for store in stores:
        store.flush_leases(everything=True)
    # every unit leased and not used went back, none twice: Redis counts exactly the uses
    assert counted(stores[0], period(1500, key=key), clock.now) == sum(u for _, u in uses)


@pytest.mark.parametrize("seed", range(3))
def test_leased_sliding_windows_never_admit_past_the_limit_in_any_window(processes, clock, seed):
    stores = [processes(GREEDY) for _ in range(3)]
    key = f"{K}calls-{uuid.uuid4().hex}"
    uses = run_against_the_model(
        stores, clock, lambda cost: buckets(1500, cost, 60.0, key), 1500, 60.0, seed
    )
    for store in stores:
        store.flush_leases(everything=True)
    # a unit counts at least as long as its use would: never less than the exact count
    now = clock.now
    exact = sum(u for t, u in uses if now - 60.0 < t <= now)
    assert counted(stores[0], buckets(1500, key=key), now) >= exact


def test_leased_units_within_one_window_are_counted_exactly_once(processes, clock):
    stores = [processes() for _ in range(2)]
    counter = buckets(100_000, 3, seconds=86_400.0)
    admitted = 0
    for n in range(300):
        clock.now += 0.002
        op = Reserve((counter,), clock.now, reservation_id=f"r{n}")
        admitted += stores[n % 2].reserve(op).admitted
    for store in stores:
        store.flush_leases(everything=True)
    assert admitted == 300
    assert counted(stores[0], counter, clock.now) == 900


# How many calls reach Redis --------------------------------------------------------------


def test_far_from_the_limit_most_requests_are_answered_from_memory(processes, clock):
    store = processes()
    counter = period(1_000_000)
    for _ in range(1000):
        clock.now += 0.0005  # 2,000 requests a second
        assert store.reserve(Reserve((counter,), clock.now)).admitted
    assert store.backend_calls <= 100  # ≤ 0.1 per request
    store.flush_leases(everything=True)
    assert counted(store, counter, clock.now) == 1000


def test_near_the_limit_every_request_asks_redis(processes, clock):
    store = processes()
    counter = period(2000)
    seed = Reserve((Counter(counter.key, None, 1900, resets_at=counter.resets_at),), T0)
    assert store.inner.reserve(seed).admitted  # 95 % used
    calls = store.backend_calls
    for _ in range(100):
        clock.now += 0.0005
        assert store.reserve(Reserve((counter,), clock.now)).admitted
    assert store.backend_calls - calls == 100
    assert store.leases is not None
    assert store.leases.granted_units == 0
    assert not store.reserve(Reserve((counter,), clock.now)).admitted


def test_a_lease_never_takes_more_than_a_tenth_of_what_is_left(processes, clock):
    store = processes()
    counter = period(1000 + 10)
    store.inner.reserve(Reserve((Counter(counter.key, None, 10, resets_at=T0 + 86_400),), T0))
    for _ in range(200):
        clock.now += 0.0001  # a rate that would want thousands
        store.reserve(Reserve((counter,), clock.now))
    # each lease: at most 10 % of what the limit had left after its request
    assert store.leases is not None
    held = store.leases._held[counter.key]
    assert held.left + held.used - 10 <= 1000


def test_exact_logs_and_credits_are_never_leased(processes, clock):
    store = processes()
    log = Counter(f"{K}calls-{uuid.uuid4().hex}", 1000, 1, window=60.0)
    for _ in range(50):
        clock.now += 0.0005
        store.reserve(Reserve((log,), clock.now))
    charge = CreditCharge(f"{K}credits:ai", "ai", on_error="deny")
    far = period(1_000_000)
    for _ in range(50):
        clock.now += 0.0005
        store.reserve(Reserve((far,), clock.now, credits=(charge,)))
    assert store.backend_calls == 100
    assert store.leases is not None
    assert store.leases.granted_units == 0


def test_leases_off_in_the_uri_asks_redis_for_every_request(processes, clock):
    store = processes("leases=off")
    assert store.leases is None
    counter = period(1_000_000)
    for _ in range(50):
        clock.now += 0.0005
        store.reserve(Reserve((counter,), clock.now))
    assert store.backend_calls == 50


# Refunds, adjustments, expiry, plan changes ----------------------------------------------


def warm(store: ResilientStorage, clock: Clock, counter: Counter, n: int = 30) -> list[Reserve]:
    """Requests fast enough that the store leases; their ops."""
    ops = []
    for i in range(n):
        clock.now += 0.001
        op = Reserve((counter,), clock.now, reservation_id=f"w{i}-{uuid.uuid4().hex}")
        assert store.reserve(op).admitted
        ops.append(op)
    assert store.leases is not None
    assert store.leases.granted_units > 0
    return ops


def test_a_refund_joins_the_lease_and_an_excess_comes_out_of_it(processes, clock):
    store = processes()
    counter = period(1_000_000)
    warm(store, clock, counter)
    refunded = Reserve((counter,), clock.now, reservation_id="refunded")
    first = store.reserve(refunded)
    more = Reserve((counter,), clock.now, reservation_id="more")
    second = store.reserve(more)
    calls = store.backend_calls
    assert store.settle(Settle("refunded", refunded.counters, first.slots, (-1,), clock.now))
    assert store.settle(Settle("more", more.counters, second.slots, (2,), clock.now))
    assert store.backend_calls == calls  # both from the lease
    store.flush_leases(everything=True)
    assert counted(store, counter, clock.now) == 30 + 3


def test_an_excess_past_the_lease_is_settled_in_redis(processes, clock):
    store = processes()
    counter = period(1_000_000)
    warm(store, clock, counter)
    op = Reserve((counter,), clock.now, reservation_id="big")
    result = store.reserve(op)
    calls = store.backend_calls
    assert store.settle(Settle("big", op.counters, result.slots, (100_000,), clock.now))
    assert store.backend_calls == calls + 1
    store.flush_leases(everything=True)
    assert counted(store, counter, clock.now) == 31 + 100_000


def test_an_ended_lease_is_given_back_with_the_next_request(processes, clock):
    store = processes()
    counter = period(1_000_000)
    warm(store, clock, counter)
    clock.now += 1.0  # past any lease
    calls = store.backend_calls
    assert store.reserve(Reserve((counter,), clock.now)).admitted
    assert store.backend_calls == calls + 1
    assert store.leases is not None
    held = store.leases._held.get(counter.key)
    unused = held.left if held is not None else 0
    # 31 used; what Redis counts beyond that is only the new lease, unused
    assert counted(store, counter, clock.now) == 31 + unused


def test_a_sliding_window_lease_ends_with_its_bucket(processes, clock):
    store = processes()
    counter = buckets(100_000, seconds=60.0)  # buckets of 3 s
    clock.now = T0 - T0 % 3 + 3 - 0.05  # 50 ms before a bucket ends
    warm(store, clock, counter, 20)
    assert store.leases is not None
    held = store.leases._held[counter.key]
    assert held.until <= (held.slot + 1) * 3.0
    clock.now = (held.slot + 1) * 3.0
    calls = store.backend_calls
    store.reserve(Reserve((counter,), clock.now))
    assert store.backend_calls == calls + 1  # the next bucket: a new lease


def test_a_lower_limit_is_not_admitted_from_a_lease_taken_under_a_higher_one(processes, clock):
    store = processes()
    counter = period(1_000_000)
    warm(store, clock, counter)
    # 30 used: a limit of 30 refuses, whatever this process holds
    lowered = Counter(counter.key, 30, 1, resets_at=counter.resets_at)
    assert not store.reserve(Reserve((lowered,), clock.now)).admitted


def test_headers_count_what_was_used_not_what_is_held(processes, clock):
    store = processes()
    counter = period(1_000_000)
    for n in range(1, 60):
        clock.now += 0.001
        result = store.reserve(Reserve((counter,), clock.now))
        assert result.states[0].used == n  # one process: exact


def test_two_requests_asking_at_once_both_give_back_what_they_do_not_use(processes, clock):
    store = processes()
    counter = period(1_000_000)
    warm(store, clock, counter)
    assert store.leases is not None
    held = store.leases._held[counter.key]
    assert held.left > 0
    # a second lease on the same counter, as two coroutines asking at once make (counted
    # elsewhere: a slot of its own)
    twin = type(held)(counter, held.slot + 1, 0, held.until, held.used, held.reset_at, held.at)
    store.leases._hold(twin)
    store.flush_leases(everything=True)
    assert counted(store, counter, clock.now) == 30


def test_close_gives_back_every_lease(processes, clock):
    store, other = processes(), processes()
    counter = period(1_000_000)
    warm(store, clock, counter)
    store.close()
    assert counted(other, counter, clock.now) == 30


def test_a_forked_child_holds_none_of_its_parents_leases(processes, clock):
    store = processes()
    counter = period(1_000_000)
    warm(store, clock, counter)
    pid = os.fork()
    if pid == 0:  # the child: its parent's units are not its to use
        os._exit(0 if store.leases is not None and not store.leases.holding else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.leases is not None
    assert store.leases.holding


def test_a_lease_call_that_never_reached_redis_gives_back_later(processes, clock):
    store = processes()
    counter = period(1_000_000)
    warm(store, clock, counter)
    clock.now += 1.0
    store.breaker.failed(OSError("down"))
    store.breaker.failed(OSError("down"))
    store.breaker.failed(OSError("down"))  # open: the next call never reaches Redis
    assert store.reserve(Reserve((counter,), clock.now)).admitted  # counted locally
    store.breaker.succeeded()
    store.flush_leases()
    # the ended lease's units came back, and the request admitted meanwhile was replayed
    assert counted(store, counter, clock.now) == 31


# The background flush --------------------------------------------------------------------


@pytest.mark.parametrize("server", ["redis_server"])
def test_the_background_flush_gives_back_an_idle_customers_units(server, request):
    redis = request.getfixturevalue(server)
    _flush(redis)
    store = open_storage(f"{redis.url}?lease_ttl=0.05")
    assert isinstance(store, ResilientStorage)
    assert store.leases is not None
    flushed = threading.Event()
    real = store.flush_leases

    def flush(*, everything: bool = False) -> None:
        real(everything=everything)
        if not store.leases.holding:
            flushed.set()

    store.flush_leases = flush  # type: ignore[method-assign]
    counter = Counter(
        f"{K}calls-month:{uuid.uuid4().hex}", 1_000_000, 1, resets_at=time.time() + 3600
    )
    for _ in range(30):
        assert store.reserve(Reserve((counter,), time.time())).admitted
    assert store.leases.granted_units > 0
    assert flushed.wait(10)
    assert store.inner.peek(Peek((counter,), time.time()))[0].used == 30
    store.close()


def test_lease_options_are_checked():
    with pytest.raises(ConfigError, match="'leases'"):
        open_storage("redis://127.0.0.1:1/0?leases=maybe")
    with pytest.raises(ConfigError, match=r"'lease_fraction'.*at most 1"):
        open_storage("redis://127.0.0.1:1/0?lease_fraction=2")
    with pytest.raises(ConfigError, match="'lease_ttl'"):
        open_storage("redis://127.0.0.1:1/0?lease_ttl=0")
    store = open_storage(
        "redis://127.0.0.1:1/0?lease_ttl=0.2&lease_horizon=0.1&lease_fraction=0.05"
    )
    assert isinstance(store, ResilientStorage)
    assert isinstance(store.leases, Leases)
    assert (store.leases.ttl, store.leases.horizon, store.leases.fraction) == (0.2, 0.1, 0.05)


# Usage aggregates, asyncio, outages ------------------------------------------------------


def test_hourly_usage_aggregates_hold_what_was_used_once_leases_are_given_back(processes, clock):
    store = processes()
    counter = Counter(
        f"{K}calls-month:{uuid.uuid4().hex}",
        1_000_000,
        2,
        resets_at=T0 + 86_400,
        usage="api_calls",
        usage_ttl=86_400,
    )
    ops = warm(store, clock, counter, 40)  # 80 units
    result = store.reserve(Reserve((counter,), clock.now, reservation_id="refunded"))
    assert store.settle(Settle("refunded", (counter,), result.slots, (-2,), clock.now))
    hour = int(T0 // 3600 * 3600)
    leased = store.inner.usage_hours("acme", hour, hour + 3600)[hour]["api_calls"]
    assert leased > 80  # the lease's units count as used until they go back
    store.flush_leases(everything=True)
    assert store.inner.usage_hours("acme", hour, hour + 3600)[hour]["api_calls"] == 80
    assert len(ops) == 40


def test_the_asyncio_path_leases_settles_and_gives_back_on_aclose(processes, clock):
    store, other = processes(), processes()
    counter = period(1_000_000)

    async def run() -> None:
        for i in range(40):
            clock.now += 0.001
            op = Reserve((counter,), clock.now, reservation_id=f"a{i}")
            result = await store.areserve(op)
            assert result.admitted
            if i == 39:
                assert await store.asettle(
                    Settle(f"a{i}", (counter,), result.slots, (-1,), clock.now)
                )
        assert store.backend_calls < 40
        await store.aclose()

    asyncio.run(run())
    assert counted(other, counter, clock.now) == 39


def test_units_leased_before_an_outage_still_admit_during_it(processes, clock):
    store = processes()
    counter = period(1_000_000)
    warm(store, clock, counter)
    assert store.leases is not None
    left = store.leases._held[counter.key].left
    assert left > 0
    for _ in range(3):
        store.breaker.failed(OSError("down"))  # open: nothing reaches Redis
    calls = store.backend_calls
    for _ in range(left):  # counted in Redis already: exact without it
        assert store.reserve(Reserve((counter,), clock.now)).admitted
    assert store.backend_calls == calls
    assert store.pending == 0  # nothing to replay: Redis counted them when they were leased


# What a review found: each would have admitted past a limit or lost units ------------------


def test_a_request_refused_for_its_credits_is_not_admitted_from_a_lease(processes, clock):
    store = processes()
    counter = period(1_000_000)
    warm(store, clock, counter, 100)  # a credit-free route of the meter holds a lease
    ai = CreditCharge(f"{K}credits:ai", "ai", cost=5, direct=True, on_error="deny")
    paid = store.reserve(Reserve((counter,), clock.now, reservation_id="paid", credits=(ai,)))
    assert not paid.admitted
    assert paid.short == (0,)


def test_units_given_back_after_their_hour_leave_that_hours_usage(processes, clock):
    store = processes()
    hour = int(T0 // 3600 * 3600) + 3600
    clock.now = hour - 0.2
    counter = Counter(
        f"{K}calls-month:{uuid.uuid4().hex}",
        1_000_000,
        1,
        resets_at=hour + 86_400,
        usage="api_calls",
        usage_ttl=86_400,
    )
    warm(store, clock, counter, 40)
    clock.now = hour + 0.1  # the lease ended with its hour; given back in the next
    assert store.reserve(Reserve((counter,), clock.now)).admitted
    store.flush_leases(everything=True)
    hours = store.inner.usage_hours("acme", hour - 3600, hour + 3600)
    assert hours == {hour - 3600: {"api_calls": 40}, hour: {"api_calls": 1}}


def test_a_lease_call_whose_reply_is_lost_gives_nothing_back_twice(request, clock, monkeypatch):
    # redis-py sends a call again on a connection broken after it was sent: the script ran,
    # its reply is lost, and the second run must not give the held units back again
    server = request.getfixturevalue("redis_server")
    _flush(server)
    monkeypatch.setattr(_Flusher, "start", lambda self: None)
    proxy = ReplyDropper(server.port)
    store = open_storage(f"redis://127.0.0.1:{proxy.port}/0")
    other = open_storage(f"{server.url}?leases=off")
    assert isinstance(store, ResilientStorage)
    assert store.leases is not None
    store.leases.clock = clock
    key = f"{K}calls-month:{uuid.uuid4().hex}"
    counter = period(2000, key=key)
    used = 0
    for _ in range(300):
        clock.now += 0.0005
        used += store.reserve(Reserve((counter,), clock.now)).admitted
    top = 1910 - counted(store, counter, clock.now)
    assert other.reserve(Reserve((period(2000, top, key),), clock.now)).admitted
    used += top
    clock.now += 1.0  # the lease ended: the next call gives its units back
    proxy.drop_next_reply()
    used += store.reserve(Reserve((counter,), clock.now)).admitted
    assert proxy.dropped == 1
    while True:
        admitted = store.reserve(Reserve((counter,), clock.now)).admitted
        admitted += other.reserve(Reserve((counter,), clock.now)).admitted
        if not admitted:
            break
        used += admitted
    assert used == 2000
    store.close()
    other.close()
    proxy.close()


def test_units_held_when_a_plan_makes_the_window_an_exact_log_go_back(processes, clock):
    store = processes()
    key = f"{K}calls-{uuid.uuid4().hex}"
    used = 0
    for _ in range(300):
        clock.now += 0.0005
        used += store.reserve(
            Reserve((buckets(5000, key=key, seconds=3600.0),), clock.now)
        ).admitted
    assert store.leases is not None
    assert store.leases._held[key].left > 0
    lowered = Counter(key, 1000, 1, window=3600.0)  # at most 1 000: an exact log now
    clock.now += 0.01
    used += store.reserve(Reserve((lowered,), clock.now)).admitted
    clock.now += 1.0
    store.flush_leases(everything=True)
    assert counted(store, lowered, clock.now) == used == 301


class ReplyDropper:
    """A TCP proxy to Redis that, once told, lets the next EVALSHA through and drops the
    client's connection instead of its reply: the script ran, the client never hears."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.armed = False
        self.dropped = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def drop_next_reply(self) -> None:
        self.armed = True

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            state = {"drop": False}
            threading.Thread(target=self._up, args=(client, upstream, state), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client, state), daemon=True).start()

    def _up(self, client: socket.socket, upstream: socket.socket, state: dict) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                with self.lock:
                    if self.armed and b"EVALSHA" in data.upper():
                        self.armed, state["drop"] = False, True
                upstream.sendall(data)
        with contextlib.suppress(OSError):
            upstream.close()

    def _down(self, upstream: socket.socket, client: socket.socket, state: dict) -> None:
        with contextlib.suppress(OSError):
            while data := upstream.recv(65536):
                if state["drop"]:
                    self.dropped += 1
                    client.shutdown(socket.SHUT_RDWR)
                    client.close()
                    upstream.close()
                    return
                client.sendall(data)


def test_a_process_that_exits_without_closing_its_store_gives_back_its_leases(redis_server):
    _flush(redis_server)
    key = f"{K}calls-month:{uuid.uuid4().hex}"
    script = f"""
import time
from plangate.storage import Counter, Reserve, open_storage
store = open_storage({redis_server.url!r})
counter = Counter({key!r}, 1_000_000, 1, resets_at=time.time() + 3600)
for _ in range(40):
    assert store.reserve(Reserve((counter,), time.time())).admitted
assert store.leases.holding
"""  # and exits, the store never closed (a WSGI worker's end)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    store = open_storage(f"{redis_server.url}?leases=off")
    assert isinstance(store, ResilientStorage)
    counter = Counter(key, 1_000_000, 1, resets_at=time.time() + 3600)
    assert store.inner.peek(Peek((counter,), time.time()))[0].used == 40
    store.close()


# What a second review found ---------------------------------------------------------------


def test_a_late_refund_of_a_bucket_gone_from_a_window_that_became_a_log_takes_nothing(
    processes, clock
):
    plain = processes("leases=off")
    key = f"{K}calls-{uuid.uuid4().hex}"
    old = Counter(key, 2000, 100, window=60.0)  # buckets
    early = plain.reserve(Reserve((old,), T0, reservation_id="early"))
    assert plain.reserve(Reserve((old,), T0 + 30)).admitted  # still in the window later
    new = Counter(key, 500, 1, window=60.0)  # a plan lowers the limit: an exact log
    at = T0 + 65  # the first bucket has left the window
    assert plain.reserve(Reserve((new,), at)).admitted
    assert plain.settle(Settle("early", (old,), early.slots, (-100,), at))
    assert counted(plain, new, at) == 101  # nothing taken: those units had left already
    admitted = 0
    while plain.reserve(Reserve((new,), at)).admitted:
        admitted += 1
    assert 101 + admitted == 500


def test_two_leases_asked_across_an_hour_keep_their_hours_usage(processes, clock):
    store = processes()
    leases = store.leases
    assert leases is not None
    hour = int(T0 // 3600 * 3600) + 3600
    counter = Counter(
        f"{K}calls-month:{uuid.uuid4().hex}",
        1_000_000,
        1,
        resets_at=hour + 86_400,
        usage="api_calls",
        usage_ttl=86_400,
    )
    clock.now = hour - 0.5
    warm(store, clock, counter, 40)
    store.flush_leases(everything=True)
    first, second = Reserve((counter,), hour - 0.05), Reserve((counter,), hour + 0.05)
    asked = leases.ask(first), leases.ask(second)  # the second asks before the first hears
    answers = [store.inner.reserve(op) for op in asked]
    for op, answer in zip(asked, answers, strict=True):
        assert answer.leased > 0
        leases.granted(op, answer)
    clock.now = hour + 5
    store.flush_leases(everything=True)
    hours = store.inner.usage_hours("acme", hour - 3600, hour + 3600)
    assert hours == {hour - 3600: {"api_calls": 41}, hour: {"api_calls": 1}}


def test_units_given_back_to_a_window_another_process_made_a_log_go_back(processes, clock):
    store, other = processes(), processes("leases=off")
    key = f"{K}calls-{uuid.uuid4().hex}"
    old, new = Counter(key, 5000, 1, window=3600.0), Counter(key, 1000, 1, window=3600.0)
    used = 0
    for _ in range(300):
        clock.now += 0.0005
        used += store.reserve(Reserve((old,), clock.now)).admitted
    clock.now += 0.01
    used += other.reserve(Reserve((new,), clock.now)).admitted  # the other plan: a log now
    clock.now += 1.0
    used += store.reserve(Reserve((old,), clock.now)).admitted  # gives its units back
    store.flush_leases(everything=True)
    assert counted(other, new, clock.now) == used == 302


def test_a_give_back_of_a_failed_call_is_dropped_once_the_store_may_have_forgotten_it(
    processes, clock
):
    store = processes()
    counter = period(1_000_000)
    warm(store, clock, counter)
    assert store.leases is not None
    held = store.leases._held[counter.key].left
    assert held > 0
    clock.now += 1.0
    for _ in range(3):
        store.breaker.failed(OSError("down"))  # the next call fails: its give-back is queued
    assert store.reserve(Reserve((counter,), clock.now)).admitted
    store.breaker.succeeded()
    clock.now += 301.0  # the call's marker may be gone by the time this settle arrives
    store.flush_leases()
    store.peek(Peek((counter,), clock.now))  # a call: the request admitted meanwhile replays
    # the units stay counted: never given back twice
    assert counted(store, counter, clock.now) == 30 + held + 1


def test_an_interrupted_flush_leaves_the_rest_for_the_next(processes, clock, monkeypatch):
    store = processes()
    counters = [period(1_000_000) for _ in range(2)]
    for counter in counters:
        warm(store, clock, Counter(counter.key, counter.limit, 1, resets_at=counter.resets_at))
    sent = store._settle_on_backend

    def interrupted(op):
        monkeypatch.setattr(store, "_settle_on_backend", sent)
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "_settle_on_backend", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.flush_leases(everything=True)
    assert store.leases is not None
    assert store.leases.holding
    store.flush_leases(everything=True)
    assert [counted(store, c, clock.now) for c in counters] == [30, 30]


def test_two_leases_asked_at_once_in_one_bucket_are_one_lease(processes, clock):
    store = processes()
    leases = store.leases
    assert leases is not None
    counter = period(1_000_000)
    warm(store, clock, counter, 40)
    store.flush_leases(everything=True)
    first, second = Reserve((counter,), clock.now), Reserve((counter,), clock.now + 0.001)
    asked = leases.ask(first), leases.ask(second)  # the second asks before the first hears
    answers = [store.inner.reserve(op) for op in asked]
    for op, answer in zip(asked, answers, strict=True):
        leases.granted(op, answer)
    merged = leases._held[counter.key]
    assert merged.left == sum(a.leased for a in answers)  # both, usable as one
    calls = store.backend_calls
    for _ in range(merged.left):
        assert store.reserve(Reserve((counter,), clock.now + 0.002)).admitted
    assert store.backend_calls == calls
    store.flush_leases(everything=True)
    assert counted(store, counter, clock.now) == 40 + 2 + sum(a.leased for a in answers)


def test_a_settle_of_two_counters_leaves_the_store_what_the_lease_cannot_take(processes, clock):
    store = processes()
    far, other = period(1_000_000), period(1_000_000)
    warm(store, clock, far)
    assert store.inner.reserve(Reserve((other,), clock.now)).admitted  # no lease here
    result = store.reserve(Reserve((far,), clock.now))  # from the lease
    calls = store.backend_calls
    settle = Settle("two", (far, other), (result.slots[0], 0), (-1, -1), clock.now)
    assert store.settle(settle)
    assert store.backend_calls == calls + 1  # `other`'s refund only: `far`'s joined the lease
    store.flush_leases(everything=True)
    assert [counted(store, c, clock.now) for c in (far, other)] == [30, 0]
