"""What is not an outage: Redis up and answering while the client side is busy.

A wait for a free connection (more WSGI threads than ``max_connections``) and an event loop
that lags (a callback that holds it past the timeout while commands are in flight) must not
count as Redis failing: the circuit breaker stays closed and nothing is counted locally.
No timing is asserted, and nothing waits for time to pass: the loop is blocked on purpose.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from plangate.storage import Counter, Peek, Reserve, ResilientStorage, customer_prefix, open_storage

pytestmark = pytest.mark.redis

LAG = 0.15  # seconds the event loop is held at a time: three times the 50 ms timeout


def _counters(customers: int) -> list[Counter]:
    return [
        Counter(customer_prefix(f"busy-{i}") + "api_calls-1h", 1000, 1, window=3600.0)
        for i in range(customers)
    ]


def _counted_locally(store: ResilientStorage, counters: list[Counter]) -> list[int]:
    states = store.local.peek(Peek(tuple(counters), time.time()))
    return [state.used for state in states if state.used]


def test_threads_waiting_for_a_connection_are_not_a_redis_failure(redis_server):
    with redis_server.client() as client:
        client.flushall()
    # One connection for eight threads, each reply held by Redis for a while (CLIENT PAUSE,
    # well within socket_timeout): seven threads wait their turn, longer than `timeout`.
    store = open_storage(f"{redis_server.url}?max_connections=1&socket_timeout=5")
    assert isinstance(store, ResilientStorage)
    counters = _counters(8)
    store.reserve(Reserve((counters[0],), time.time()))  # connected, scripts loaded
    start = threading.Barrier(len(counters) + 1)
    results: list[bool] = []

    def reserve(counter: Counter) -> None:
        start.wait()
        results.append(store.reserve(Reserve((counter,), time.time())).admitted)

    threads = [threading.Thread(target=reserve, args=(c,)) for c in counters]
    for thread in threads:
        thread.start()
    with redis_server.client() as client:
        client.client_pause(300)
    start.wait()
    for thread in threads:
        thread.join(30)
    store.close()
    assert results == [True] * len(counters)
    assert store.breaker.state == "closed"
    assert _counted_locally(store, counters) == []
    with redis_server.client() as client:
        used = [client.exists(c.key) for c in counters]
    assert used == [1] * len(counters)  # every reservation reached Redis


async def _burst_on_a_lagging_loop(store: ResilientStorage, counters: list[Counter]) -> list[bool]:
    """A reservation of each counter at once, on an event loop held by a CPU-bound callback
    far past the timeout on every turn until they are all answered."""
    await store.areserve(Reserve((counters[0],), time.time()))  # connected, scripts loaded
    loop = asyncio.get_running_loop()
    tasks = [asyncio.ensure_future(store.areserve(Reserve((c,), time.time()))) for c in counters]

    def hold_the_loop() -> None:
        until = time.perf_counter() + LAG
        while time.perf_counter() < until:
            pass
        if not all(task.done() for task in tasks):
            loop.call_soon(hold_the_loop)  # each turn: whatever is in flight waits again

    loop.call_soon(hold_the_loop)
    results = await asyncio.gather(*tasks)
    again = await asyncio.gather(*(store.areserve(Reserve((c,), time.time())) for c in counters))
    await store.aclose()
    return [r.admitted for r in results + again]


@pytest.mark.parametrize(
    "topology",
    [
        pytest.param("redis_server", id="single"),
        pytest.param("redis_cluster", id="cluster", marks=pytest.mark.cluster),
        pytest.param("redis_sentinel", id="sentinel", marks=pytest.mark.sentinel),
    ],
)
def test_a_lagging_event_loop_is_not_a_redis_failure(topology, request):
    server = request.getfixturevalue(topology)
    store = open_storage(server.url)
    assert isinstance(store, ResilientStorage)
    counters = _counters(40)
    admitted = asyncio.run(_burst_on_a_lagging_loop(store, counters))
    assert admitted == [True] * (2 * len(counters))
    assert store.breaker.state == "closed"
    assert _counted_locally(store, counters) == []


async def _wait_for(ticks: int, answering: bool) -> bool:
    """A call that needs ``ticks`` turns of a ticker (each ~5 ms) under a 10 ms deadline,
    while Redis answers other calls (``answering``) or nobody; True if it was cut off."""
    from plangate.storage._redis import _Deadline

    answered = 0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal answered
        for _ in range(ticks):
            await asyncio.sleep(0.005)
            answered += answering
        done.set()

    asyncio.get_running_loop().create_task(ticker())
    deadline = _Deadline(0.01, lambda: answered)
    try:
        await done.wait()
    except asyncio.CancelledError:
        return deadline.clear()
    deadline.clear()
    return False


def test_a_slow_call_is_not_cut_off_while_redis_answers_other_calls():
    assert asyncio.run(_wait_for(ticks=20, answering=True)) is False


def test_a_call_is_cut_off_after_one_timeout_when_redis_answers_nobody():
    assert asyncio.run(_wait_for(ticks=20, answering=False)) is True
