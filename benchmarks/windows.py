"""What an exact sliding window costs: a reservation on a log counter against a bucket counter.

    python benchmarks/windows.py [--batches 21] [--per-batch 2000]

Starts its own Redis on a free loopback port. Times one reservation (one counter, the clock
passed in) on ``MemoryStorage`` and on ``RedisStorage`` (blocking client, direct path), for:

- an exact log, limit 5 (a burst limit: a handful of entries);
- an exact log, limit 1 000 and full: 1 000 entries, each reservation evicts the oldest and
  adds one (the costliest steady state of a log);
- buckets, limit 1 000 000 (20 buckets in use).

Interleaved batches, the median per call. Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import time
from collections.abc import Callable

from compare import redis_server  # a redis-server of its own, on a free loopback port

from plangate.storage import Counter, MemoryStorage, Reserve, Storage, customer_prefix
from plangate.storage._redis import RedisStorage

T0 = 1_800_000_000.0


class Case:
    """Reservations on one counter, each a little later than the last, admitted each time."""

    def __init__(self, store: Storage, name: str, limit: int, window: float) -> None:
        self.store = store
        self.name = name
        self.counter = Counter(
            customer_prefix(f"bench-{name}") + "api_calls", limit, 1, window=window
        )
        self.step = window / limit  # exactly one unit leaves for each one taken
        self.now = T0
        for _ in range(min(limit, 1000)):  # fill the window
            self.reserve()

    def reserve(self) -> None:
        self.now += self.step
        assert self.store.reserve(Reserve((self.counter,), self.now)).admitted

    def batch(self, count: int) -> float:
        reserve = self.reserve
        started = time.perf_counter()
        for _ in range(count):
            reserve()
        return (time.perf_counter() - started) / count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=21)
    parser.add_argument("--per-batch", type=int, default=2000)
    options = parser.parse_args()
    with redis_server() as port:
        redis_store = RedisStorage(f"redis://127.0.0.1:{port}/0")
        shapes = [
            ("log, limit 5", 5, 10.0),
            ("log, limit 1 000, full", 1000, 1000.0),  # steps of exactly 1 s
            ("buckets, limit 1 000 000", 1_000_000, 86_400.0),
        ]
        cases: dict[str, Callable[[int], float]] = {}
        for backend in ("memory", "redis"):
            for shape, limit, window in shapes:
                # a memory store per case: its clock is the latest time of any of its counters
                store = MemoryStorage() if backend == "memory" else redis_store
                case = Case(store, f"{backend}-{limit}", limit, window)
                cases[f"{backend} | {shape}"] = case.batch
        samples: dict[str, list[float]] = {name: [] for name in cases}
        for run in cases.values():  # warm up
            run(options.per_batch // 10)
        for _ in range(options.batches):
            for name, run in cases.items():
                gc.collect()
                samples[name].append(run(options.per_batch))
        redis_store.close()
    print(f"Python {platform.python_version()}, {platform.machine()}; median of")
    print(f"{options.batches} batches of {options.per_batch} reservations\n")
    print("| store | counter | µs per reservation |")
    print("| --- | --- | --- |")
    for name, values in samples.items():
        backend, shape = name.split(" | ")
        print(f"| {backend} | {shape} | {statistics.median(values) * 1e6:.1f} |")


if __name__ == "__main__":
    main()
