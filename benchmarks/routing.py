"""Route matching time against the number of rules, on paths never seen before.

    python benchmarks/routing.py            # prints the table and writes it to docs/benchmarks.md
    python benchmarks/routing.py --quick    # a short run that prints and writes nothing

The rule sets look like a large API: per resource, a collection, an item, an action on an item
and a catch-all for files under an item, in that order; a final rule covers the rest of
``/v1/``. Each request path is unique (a fresh id), so no cache keyed on the path helps. Three
kinds of request: one for a rule near the start, one near the end, and one that no rule
matches. ``Router.match`` is the matcher alone; ``Engine.route`` adds the engine's cache and
the decision object. Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from itertools import count
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from plangate.config import Config, load_config  # noqa: E402
from plangate.engine import Engine  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- routing -->", "<!-- /routing -->"
SIZES = (200, 1_000, 5_000)


def templates(n: int) -> list[str]:
    shapes = (
        "GET /v1/res{i}",
        "GET /v1/res{i}/{{id}}",
        "POST /v1/res{i}/{{id}}/act{i}",
        "/v1/res{i}/{{id}}/files/{{rest:path}}",
    )
    rules = [shapes[k % 4].format(i=k // 4) for k in range(n - 1)]
    return [*rules, "/v1/{rest:path}"]


def requests(n: int, where: str) -> Iterator[tuple[str, str]]:
    resource = {"first": 0, "last": (n - 2) // 4, "none": None}[where]
    for unique in count():
        if resource is None:
            yield "GET", f"/v2/missing/{unique}"
        else:
            yield "POST", f"/v1/res{resource}/{unique}/act{resource}"


def timed(
    call: Callable[[str, str], object], paths: Iterator[tuple[str, str]], rounds: int
) -> float:
    """The median over batches of the mean time per call, in µs."""
    batch = 2_000
    means = []
    for _ in range(rounds + 1):
        work = [next(paths) for _ in range(batch)]
        start = time.perf_counter()
        for method, path in work:
            call(method, path)
        means.append((time.perf_counter() - start) / batch * 1e6)
    return statistics.median(means[1:])  # the first batch warms up


def config(n: int) -> Config:
    return load_config(
        {
            "version": 1,
            "identity": {
                "jwt": {"algorithms": ["HS256"], "secret": "x" * 32, "customer_claim": "sub"}
            },
            "routes": [{"match": text, "public": True} for text in templates(n)],
        }
    )


def run(rounds: int) -> list[str]:
    rows = [
        "| rules | config load | `Router.match`, first rule | last rule | no rule | "
        "`Engine.route`, last rule |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for n in SIZES:
        start = time.perf_counter()
        loaded = config(n)
        build = (time.perf_counter() - start) * 1e3
        engine = Engine(loaded, new_id=lambda: "id")
        router = engine.catalog.router
        cells = [
            timed(router.match, requests(n, where), rounds) for where in ("first", "last", "none")
        ]
        routed = timed(engine.route, requests(n, "last"), rounds)
        row = [f"{n:,}", f"{build:.0f} ms", *(f"{c:.1f} µs" for c in cells), f"{routed:.1f} µs"]
        rows.append("| " + " | ".join(row) + " |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds; write nothing")
    args = parser.parse_args()
    rows = run(3 if args.quick else 9)
    if args.quick:
        return
    stamp = dt.date.today().isoformat()
    machine = f"Python {platform.python_version()}, {platform.machine()}, {stamp}"
    block = "\n".join(
        [START, "", f"{machine}; median of 9 batches of 2 000 unique paths.", "", *rows, "", END]
    )
    text = DOCS.read_text(encoding="utf-8")
    before, found, rest = text.partition(START)
    if not found or END not in rest:
        raise SystemExit(f"{DOCS} has no {START} … {END} block")
    after = rest.partition(END)[2]
    DOCS.write_text(before + block + after, encoding="utf-8")


if __name__ == "__main__":
    main()
