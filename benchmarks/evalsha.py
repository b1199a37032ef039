"""Is plangate's hand-written EVALSHA path worth it over redis-py's ``Script``?

    python benchmarks/evalsha.py [--batches 21] [--per-batch 2000]

Starts its own Redis on a free loopback port and times one reservation (plangate's reserve
script, one counter, the same keys and arguments every call) through each path, asyncio and
blocking: interleaved batches, the median per call. Prints a table; writes nothing.

- direct: what ``RedisStorage`` does, one packed ``EVALSHA`` on an idle connection of its own
  (``_Connections``), timed by plangate's deadline under asyncio;
- ``Script.__call__``: redis-py's ``Script`` on a redis-py client configured as plangate
  configures its own (blocking pool; asyncio with redis-py's 50 ms timeouts);
- ``Script.__call__`` over direct: redis-py's ``Script`` given a client whose ``evalsha`` is
  the direct path.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import platform
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis
import redis.asyncio
from compare import redis_server  # a redis-server of its own, on a free loopback port

from plangate.storage import Counter, Reserve, customer_prefix
from plangate.storage._redis import RedisStorage, _Connections
from plangate.storage._redis_codec import reserve_call, reserve_result, script_source


class Direct:
    """A client for ``Script.__call__`` whose commands take plangate's direct path."""

    def __init__(self, connections: _Connections) -> None:
        self.connections = connections

    def evalsha(self, sha: str, numkeys: int, *args: Any) -> Any:
        return self.connections.call("EVALSHA", sha, numkeys, *args)

    def script_load(self, script: str) -> Any:
        return self.connections.call("SCRIPT", "LOAD", script)


class AsyncDirect(Direct):
    async def evalsha(self, sha: str, numkeys: int, *args: Any) -> Any:  # type: ignore[override]
        return await self.connections.acall("EVALSHA", sha, numkeys, *args)

    async def script_load(self, script: str) -> Any:  # type: ignore[override]
        return await self.connections.acall("SCRIPT", "LOAD", script)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=21)
    parser.add_argument("--per-batch", type=int, default=2000)
    options = parser.parse_args()
    with redis_server() as port:
        rows = measure(port, options.batches, options.per_batch)
    print(f"Python {platform.python_version()}, redis-py {redis.__version__}, {platform.machine()}")
    print(f"median of {options.batches} batches of {options.per_batch} reservations, µs per call\n")
    print("| path | asyncio | blocking |")
    print("| --- | ---: | ---: |")
    for name, (aio, sync) in rows.items():
        print(f"| {name} | {aio:.1f} | {sync:.1f} |")


def measure(port: int, batches: int, per_batch: int) -> dict[str, tuple[float, float]]:
    url = f"redis://127.0.0.1:{port}/0"
    counter = Counter(customer_prefix("org_evalsha") + "api_calls-1d", None, 1, window=86400.0)
    op = Reserve((counter,), time.time(), reservation_id="evalsha")
    keys, args = reserve_call(op)
    source = script_source("reserve")
    store = RedisStorage(url)
    sync_client = store.client  # plangate's blocking client: a blocking pool
    sync_script = sync_client.register_script(source)
    sync_direct = _Connections(sync_client.connection_pool)
    sha = sync_client.script_load(source)

    loop = asyncio.new_event_loop()
    async_client = redis.asyncio.Redis(
        host="127.0.0.1", port=port, socket_timeout=0.05, socket_connect_timeout=0.05
    )
    async_script = async_client.register_script(source)
    async_pool = redis.asyncio.ConnectionPool(host="127.0.0.1", port=port)
    async_direct = _Connections(async_pool, 0.05, 0.05)

    def sync_case(call: Callable[[], Any]) -> Callable[[], float]:
        def batch() -> float:
            started = time.perf_counter()
            for _ in range(per_batch):
                reserve_result(call(), op)
            return (time.perf_counter() - started) / per_batch

        return batch

    def async_case(call: Callable[[], Awaitable[Any]]) -> Callable[[], float]:
        async def run() -> float:
            started = time.perf_counter()
            for _ in range(per_batch):
                reserve_result(await call(), op)
            return (time.perf_counter() - started) / per_batch

        return lambda: loop.run_until_complete(run())

    sync_over = Direct(sync_direct)
    async_over = AsyncDirect(async_direct)
    cases = {
        "direct (plangate today)": (
            async_case(lambda: async_direct.acall("EVALSHA", sha, len(keys), *keys, *args)),
            sync_case(lambda: sync_direct.call("EVALSHA", sha, len(keys), *keys, *args)),
        ),
        "redis-py Script.__call__": (
            async_case(lambda: async_script(keys=keys, args=args)),
            sync_case(lambda: sync_script(keys=keys, args=args)),
        ),
        "Script.__call__ over direct": (
            async_case(lambda: async_script(keys=keys, args=args, client=async_over)),
            sync_case(lambda: sync_script(keys=keys, args=args, client=sync_over)),
        ),
    }
    samples: dict[tuple[str, int], list[float]] = {}
    for round_ in range(batches + 1):  # the first round warms up, untimed
        for name, pair in cases.items():
            for i, run in enumerate(pair):
                gc.collect()
                value = run()
                if round_:
                    samples.setdefault((name, i), []).append(value)
    loop.run_until_complete(async_client.aclose())
    for conn in async_direct.give_back():
        loop.run_until_complete(conn.disconnect())
    loop.run_until_complete(async_pool.disconnect())
    loop.close()
    for conn in sync_direct.give_back():
        sync_client.connection_pool.release(conn)
    store.close()
    return {
        name: (
            statistics.median(samples[name, 0]) * 1e6,
            statistics.median(samples[name, 1]) * 1e6,
        )
        for name in cases
    }


if __name__ == "__main__":
    main()
