"""What counting a request in Prometheus costs (``plangate.metrics.instrument``).

    python benchmarks/observability.py [--batches 21] [--per-batch 2000]

A metered route's decision on memory storage (``Gate.check``, the WSGI path), with the
gate instrumented into a registry of its own and without; interleaved batches, the median
per request. Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests.support: the test config and tokens

from tests.support import config, token

from plangate import Gate, MemoryStorage
from plangate.metrics import instrument


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=21)
    parser.add_argument("--per-batch", type=int, default=2000)
    options = parser.parse_args()
    settings = config()
    settings["plans"]["free"]["features"]["api_calls"] = {"limit": 10**9, "window": "1d"}
    gates = {"without metrics": Gate(settings, storage=MemoryStorage())}
    gates["with metrics"] = Gate(settings, storage=MemoryStorage())
    instrument(gates["with metrics"], CollectorRegistry())
    bearer = token("acme", "free", ttl=3600)

    def run(gate: Gate, n: int) -> None:
        for _ in range(n):
            gate.check("GET", "/v1/projects", bearer)

    for gate in gates.values():
        run(gate, options.per_batch)
    times: dict[str, list[float]] = {name: [] for name in gates}
    gc.disable()
    try:
        for batch in range(options.batches):
            order = list(gates.items())
            for name, gate in order if batch % 2 else reversed(order):
                start = time.perf_counter()
                run(gate, options.per_batch)
                times[name].append((time.perf_counter() - start) / options.per_batch * 1e6)
    finally:
        gc.enable()
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"Python {platform.python_version()}, {platform.machine()}")
    print(f"median of {options.batches} batches of {options.per_batch} decisions, µs each\n")
    print("| gate | µs / decision | added |")
    print("| --- | ---: | ---: |")
    base = medians["without metrics"]
    for name, value in medians.items():
        print(f"| {name} | {value:.1f} | {value - base:+.1f} |")


if __name__ == "__main__":
    main()
