"""What the hourly usage aggregates cost the request path, and Redis's memory.

    python benchmarks/usage.py [--batches 21] [--per-batch 2000] [--smoke]

A request's reservation (one meter with one limit, as a metered route makes it), with the
meter's usage also added to its hour's aggregates (the engine's counters) and without (the
same counters, ``usage`` unset: what plangate did before), on memory and on a Redis of its
own (blocking client), and how much of it Redis itself spends (``INFO commandstats``).
Interleaved batches, the median per request. Then the
memory one customer-hour of aggregates takes in Redis (``MEMORY USAGE``), with two meters,
before and after its export marks. Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import replace

from compare import redis_server  # a redis-server of its own, on a free loopback port

from plangate.engine import Counter, Reserve, customer_prefix, usage_hour, usage_key
from plangate.storage import MemoryStorage, Storage
from plangate.storage._redis import RedisStorage

RETENTION = 35 * 86400


def counters(customer: str, usage: bool) -> tuple[Counter, ...]:
    counter = Counter(
        f"{customer_prefix(customer)}api_calls-1m", 1_000_000_000, 1, window=60.0,
        usage="api_calls" if usage else "", usage_ttl=RETENTION if usage else 0,
    )  # fmt: skip
    return (counter,)


def request_path(storage: Storage, plain: tuple[Counter, ...]) -> Callable[[int], None]:
    """``n`` reservations of ``plain``, as a metered route makes them (a response that
    reports no usage settles nothing)."""

    def run(n: int) -> None:
        for _ in range(n):
            storage.reserve(Reserve(plain, time.time(), reservation_id=uuid.uuid4().hex))

    return run


def timed(
    batches: int,
    per_batch: int,
    runs: dict[str, Callable[[int], None]],
    inside: Callable[[], float] | None = None,
) -> dict[str, tuple[float, float]]:
    """Per run: the median µs per call, and (``inside``: Redis's own µs per script call
    since the last call of it) the median of that."""
    samples: dict[str, list[float]] = {name: [] for name in runs}
    server: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run(min(per_batch, 200))  # warm up: scripts loaded, connections made
    gc.disable()
    try:
        for batch in range(batches):
            order = list(runs.items())
            for name, run in order if batch % 2 else reversed(order):  # neither always first
                if inside is not None:
                    inside()
                start = time.perf_counter()
                run(per_batch)
                samples[name].append((time.perf_counter() - start) / per_batch * 1e6)
                if inside is not None:
                    server[name].append(inside())
    finally:
        gc.enable()
    return {
        name: (statistics.median(values), statistics.median(server[name] or [0.0]))
        for name, values in samples.items()
    }


def redis_inside(store: RedisStorage) -> Callable[[], float]:
    """Redis's µs per EVALSHA since the last call (``INFO commandstats``, then reset)."""

    def read() -> float:
        stats = store.client.info("commandstats").get("cmdstat_evalsha", {})
        store.client.config_resetstat()
        return float(stats.get("usec_per_call", 0.0))

    return read


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=21)
    parser.add_argument("--per-batch", type=int, default=2000)
    parser.add_argument("--smoke", action="store_true", help="a few calls: checks, no figures")
    options = parser.parse_args()
    batches, per_batch = (2, 20) if options.smoke else (options.batches, options.per_batch)
    memory = MemoryStorage()
    rows = {}
    rows["memory"] = timed(
        batches,
        per_batch,
        {
            "without": request_path(memory, counters("m-plain", False)),
            "with": request_path(memory, counters("m-usage", True)),
        },
    )
    assert memory.usage_hours("m-usage", usage_hour(time.time()) - 3600, 2**40)
    with redis_server() as port:
        store = RedisStorage(f"redis://127.0.0.1:{port}/0")
        try:
            rows["Redis"] = timed(
                batches,
                per_batch,
                {
                    "without": request_path(store, counters("r-plain", False)),
                    "with": request_path(store, counters("r-usage", True)),
                },
                redis_inside(store),
            )
            memory_rows = hour_memory(store)
        finally:
            store.close()
    print(f"Python {platform.python_version()}, {platform.machine()}")
    print(f"median of {batches} batches of {per_batch} reservations, µs each\n")
    print("| store | without aggregates | with aggregates | added | of it inside Redis |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, f in rows.items():
        added = f["with"][0] - f["without"][0]
        inside = f["with"][1] - f["without"][1]
        redis = f"{inside:+.1f}" if name == "Redis" else ""
        print(f"| {name} | {f['without'][0]:.1f} | {f['with'][0]:.1f} | {added:+.1f} | {redis} |")
    print("\n| one customer-hour in Redis (2 meters) | bytes |")
    print("| --- | ---: |")
    for name, size in memory_rows.items():
        print(f"| {name} | {size} |")


def hour_memory(store: RedisStorage) -> dict[str, int]:
    now = time.time()
    tokens = replace(counters("r-memory", True)[0], key=f"{customer_prefix('r-memory')}t-1m")
    plain = (counters("r-memory", True)[0], replace(tokens, usage="ai_tokens"))
    store.reserve(Reserve(plain, now, reservation_id=uuid.uuid4().hex))  # as requests do
    key = usage_key(customer_prefix("r-memory"), usage_hour(now))
    before = int(store.client.memory_usage(key, samples=0))
    store.mark_usage(
        "r-memory",
        {usage_hour(now): {"exported:stripe:api_calls": 1, "exported:stripe:ai_tokens": 1}},
    )
    after = int(store.client.memory_usage(key, samples=0))
    return {"as written by requests": before, "after an export to one destination": after}


if __name__ == "__main__":
    main()
