"""Soak: an ASGI app behind plangate on Redis, under load, with Redis killed and restarted.

    python benchmarks/soak.py              # 60 s, 64 connections; writes docs/operations.md
    python benchmarks/soak.py --quick      # 15 s, prints only
    python benchmarks/soak.py --burst      # the overload burst; writes docs/operations.md

A uvicorn process (one worker) serves a small Starlette API behind plangate on a Redis of its
own (AOF on, so a restart keeps what Redis acknowledged). 64 concurrent clients, one customer
each, call a metered route as fast as they can. A third of the way in, Redis is killed
(SIGKILL); it is restarted from its AOF ten seconds later. The script reports: every status
seen (there must be no 5xx), the latency of each phase, the app's memory (RSS) over time, and
the usage Redis holds at the end against the requests that were admitted: usage admitted
during the outage is replayed when Redis is back, so nothing admitted is missing.

The burst case (``--burst``) asks whether a busy but healthy Redis costs exactness: two uvicorn
processes on one Redis at the default timeouts, a CPU hog on every core, and three rounds of 8
fresh customers each sending 90 requests at once (limit 50) spread over both processes. It
reports what each customer was admitted (it must be exactly 50), the statuses and the latency.

Bounded: every request has a timeout, the run a fixed duration; servers bind 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from plangate.cli import mint_token  # noqa: E402
from plangate.config import load_config  # noqa: E402

DOCS = ROOT / "docs" / "operations.md"
START, END = "<!-- soak -->", "<!-- /soak -->"
BURST_START, BURST_END = "<!-- burst -->", "<!-- /burst -->"
SECRET = "soak-test-secret-that-is-long-enough-0123456789"

CONFIG: dict[str, Any] = {
    "version": 1,
    "identity": {"jwt": {"algorithms": ["HS256"], "secret": SECRET, "customer_claim": "org_id"}},
    "features": {"api_calls": {"kind": "metered", "unit": "call"}},
    "plans": {"soak": {"features": {"api_calls": {"limit": 1_000_000_000, "window": "1d"}}}},
    "default_plan": "soak",
    "routes": [{"match": "/v1/{rest:path}", "meters": {"api_calls": 1}}],
}

APP = """
import os
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from plangate.asgi import PlanGateMiddleware

async def projects(request):
    return JSONResponse({"customer": request.state.plangate.customer})

app = PlanGateMiddleware(
    Starlette(routes=[Route("/v1/projects", projects)]), os.environ["SOAK_CONFIG"]
)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_line(proc: subprocess.Popen[str], needle: str) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        if needle in line:
            threading.Thread(target=lambda: [None for _ in proc.stdout or ()], daemon=True).start()
            return
    raise RuntimeError(f"the process exited before printing {needle!r}")


class Redis:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.dir = workdir / "redis"
        self.dir.mkdir()
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--dir", str(self.dir), "--save", "", "--logfile", ""),
                *("--appendonly", "yes", "--appendfsync", "always"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        wait_for_line(self.proc, "Ready to accept connections")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@dataclass
class Results:
    statuses: Counter[int] = field(default_factory=Counter)
    admitted: Counter[str] = field(default_factory=Counter)  # 200s per customer
    latency: dict[str, list[float]] = field(default_factory=dict)  # phase → seconds
    errors: Counter[str] = field(default_factory=Counter)
    rss: list[tuple[float, int]] = field(default_factory=list)  # (elapsed s, KiB)


def rss_kib(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", text)
    return int(match.group(1)) if match else 0


async def load(
    url: str, tokens: dict[str, str], seconds: float, phase_of: Any, results: Results
) -> None:
    limits = httpx.Limits(max_connections=len(tokens), max_keepalive_connections=len(tokens))
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=5, limits=limits) as client:

        async def worker(customer: str, token: str) -> None:
            headers = {"authorization": f"Bearer {token}"}
            while time.monotonic() < deadline:
                started = time.perf_counter()
                phase = phase_of()
                try:
                    response = await client.get("/v1/projects", headers=headers)
                except httpx.HTTPError as exc:
                    results.errors[type(exc).__name__] += 1
                    continue
                results.latency.setdefault(phase, []).append(time.perf_counter() - started)
                results.statuses[response.status_code] += 1
                if response.status_code == 200:
                    results.admitted[customer] += 1

        await asyncio.gather(*(worker(c, t) for c, t in tokens.items()))


def used_in_redis(port: int, customers: list[str]) -> Counter[str]:
    """Units in each customer's api_calls-1d window, summed over its buckets."""
    client = redis.Redis(port=port, decode_responses=True)
    used: Counter[str] = Counter()
    for customer in customers:
        fields = client.hgetall(f"plangate:{{{customer}}}:api_calls-1d")
        used[customer] = sum(int(v) for k, v in fields.items() if k != "t")
    client.close()
    return used


def run(seconds: float, connections: int) -> tuple[Results, dict[str, Any]]:
    workdir = Path(tempfile.mkdtemp(prefix="plangate-soak-"))
    store = Redis(workdir)
    store.start()
    (workdir / "soak_app.py").write_text(APP)
    config_file = workdir / "plangate.yaml"
    config_file.write_text(yaml.safe_dump(CONFIG))
    port = free_port()
    uri = f"redis://127.0.0.1:{store.port}/0?breaker_reset=0.5"
    app = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "soak_app:app", "--port", str(port), "--no-access-log"],
        cwd=workdir,
        env={**os.environ, "PLANGATE_STORAGE": uri, "SOAK_CONFIG": str(config_file)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    info: dict[str, Any] = {}
    try:
        wait_for_line(app, "Uvicorn running on")
        config = load_config(config_file)
        customers = [f"soak-{i:03d}" for i in range(connections)]
        tokens = {c: mint_token(config, c, ttl=3600) for c in customers}
        kill_at = seconds / 3
        restart_at = kill_at + min(10.0, seconds / 4)
        started = time.monotonic()
        phase = {"name": "before"}
        results = Results()

        def chaos() -> None:
            while (elapsed := time.monotonic() - started) < seconds:
                if phase["name"] == "before" and elapsed >= kill_at:
                    store.kill()
                    phase["name"] = "outage"
                elif phase["name"] == "outage" and elapsed >= restart_at:
                    store.start()
                    phase["name"] = "after"
                results.rss.append((round(elapsed, 1), rss_kib(app.pid)))
                time.sleep(1)

        thread = threading.Thread(target=chaos, daemon=True)
        thread.start()
        asyncio.run(
            load(f"http://127.0.0.1:{port}", tokens, seconds, lambda: phase["name"], results)
        )
        thread.join()
        # Let the last replays through: one call per customer reserves after its backlog.
        asyncio.run(
            load(
                f"http://127.0.0.1:{port}",
                {c: tokens[c] for c in customers},
                2,
                lambda: "drain",
                results,
            )
        )
        used = used_in_redis(store.port, customers)
        info = {
            "admitted": sum(results.admitted.values()),
            "in_redis": sum(used.values()),
            "customers_short": sum(1 for c in customers if used[c] < results.admitted[c]),
            "customers_over": sum(1 for c in customers if used[c] > results.admitted[c]),
            "over_by": sum(max(0, used[c] - results.admitted[c]) for c in customers),
            "seconds": seconds,
            "connections": connections,
        }
    finally:
        app.terminate()
        app.wait(10)
        store.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return results, info


def table(results: Results, info: dict[str, Any]) -> str:
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"Run {now}; {info['seconds']:.0f} s, {info['connections']} concurrent connections (one customer each), "
        "one uvicorn worker, Redis killed at one third and restarted from its AOF 10 s later "
        "(a quarter of the run, if shorter).",
        "",
        "| phase | requests | p50 ms | p99 ms | max ms |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for phase in ("before", "outage", "after", "drain"):
        samples = sorted(results.latency.get(phase, []))
        if not samples:
            continue
        q = statistics.quantiles(samples, n=100) if len(samples) > 1 else samples * 99
        lines.append(
            f"| {phase} | {len(samples):,} | {q[49] * 1000:.1f} | {q[98] * 1000:.1f} | {samples[-1] * 1000:.1f} |"
        )
    statuses = ", ".join(f"{code}: {n:,}" for code, n in sorted(results.statuses.items()))
    five = sum(n for code, n in results.statuses.items() if code >= 500)
    rss = [kib for _, kib in results.rss]
    warm = rss[min(5, len(rss) - 1)] if rss else 0
    lines += [
        "",
        f"- Statuses: {statuses}. **5xx: {five}.** Client errors: {dict(results.errors) or 'none'}.",
        f"- Admitted (200): {info['admitted']:,}; units in Redis at the end: {info['in_redis']:,}. "
        f"Customers with less in Redis than admitted: **{info['customers_short']}**; with more: "
        f"{info['customers_over']} (by {info['over_by']} units in all: reservations Redis executed "
        "as it was killed, whose replies were lost, so the request was counted again in process).",
        f"- App memory (RSS): {warm / 1024:.1f} MiB after warm-up, {rss[-1] / 1024 if rss else 0:.1f} MiB at the end, "
        f"peak {max(rss, default=0) / 1024:.1f} MiB.",
        f"- Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, "
        f"CPython {platform.python_version()}, redis-server "
        f"{subprocess.run(['redis-server', '--version'], capture_output=True, text=True).stdout.split()[2]}.",
    ]
    return "\n".join(lines)


# The burst: exact under overload -----------------------------------------------------------

BURST_LIMIT, BURST_CUSTOMERS, BURST_REQUESTS, BURST_ROUNDS = 50, 8, 90, 3


def burst_round(
    urls: list[str], tokens: dict[str, str]
) -> tuple[Counter[tuple[str, int]], list[float], float]:
    """Every customer's requests at once, alternating between ``urls``."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)

    async def go() -> tuple[Counter[tuple[str, int]], list[float]]:
        async with httpx.AsyncClient(timeout=30, limits=limits) as client:

            async def one(url: str, customer: str) -> tuple[str, int, float]:
                headers = {"authorization": f"Bearer {tokens[customer]}"}
                started = time.perf_counter()
                response = await client.get(f"{url}/v1/projects", headers=headers)
                return customer, response.status_code, time.perf_counter() - started

            jobs = [
                one(urls[i % len(urls)], customer)
                for i in range(BURST_REQUESTS)
                for customer in tokens
            ]
            answers = await asyncio.gather(*jobs)
        return Counter((c, s) for c, s, _ in answers), [t for _, _, t in answers]

    started = time.perf_counter()
    statuses, latency = asyncio.run(go())
    return statuses, latency, time.perf_counter() - started


def run_burst() -> list[tuple[Counter[tuple[str, int]], list[float], float]]:
    workdir = Path(tempfile.mkdtemp(prefix="plangate-burst-"))
    store = Redis(workdir)
    store.start()
    (workdir / "soak_app.py").write_text(APP)
    config_file = workdir / "plangate.yaml"
    plans = {"soak": {"features": {"api_calls": {"limit": BURST_LIMIT, "window": "1h"}}}}
    config_file.write_text(yaml.safe_dump({**CONFIG, "plans": plans}))
    env = {
        **os.environ,
        "PLANGATE_STORAGE": f"redis://127.0.0.1:{store.port}/0",  # the default timeouts
        "SOAK_CONFIG": str(config_file),
    }
    apps, urls = [], []
    rounds = []
    try:
        for _ in range(2):
            port = free_port()
            command = [sys.executable, "-m", "uvicorn", "soak_app:app", "--port", str(port)]
            apps.append(
                subprocess.Popen(
                    [*command, "--no-access-log"],
                    cwd=workdir,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
            wait_for_line(apps[-1], "Uvicorn running on")
            urls.append(f"http://127.0.0.1:{port}")
        config = load_config(config_file)
        for round_ in range(BURST_ROUNDS):
            customers = [f"burst{round_}-{i}" for i in range(BURST_CUSTOMERS)]
            tokens = {c: mint_token(config, c, ttl=3600) for c in customers}
            hogs = [
                subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(os.cpu_count() or 1)
            ]
            try:
                rounds.append(burst_round(urls, tokens))
            finally:
                for hog in hogs:
                    hog.kill()
                    hog.wait(10)
    finally:
        for app in apps:
            app.terminate()
            app.wait(10)
        store.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return rounds


def burst_table(rounds: list[tuple[Counter[tuple[str, int]], list[float], float]]) -> str:
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"Run {now}; two uvicorn processes on one Redis at the default timeouts (50 ms), a CPU "
        f"hog on each of the {os.cpu_count()} cores; each round {BURST_CUSTOMERS} fresh "
        f"customers send {BURST_REQUESTS} requests each at once (limit {BURST_LIMIT}).",
        "",
        "| round | admitted per customer | other statuses | p50 ms | p99 ms | max ms | round s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for number, (statuses, latency, seconds) in enumerate(rounds, 1):
        customers = sorted({c for c, _ in statuses})
        admitted = ", ".join(str(statuses[c, 200]) for c in customers)
        other = Counter()
        for (_, status), n in statuses.items():
            if status not in (200, 429):
                other[status] += n
        q = statistics.quantiles(sorted(latency), n=100)
        lines.append(
            f"| {number} | {admitted} | {dict(other) or 'none'} | {q[49] * 1000:.0f} "
            f"| {q[98] * 1000:.0f} | {max(latency) * 1000:.0f} | {seconds:.1f} |"
        )
    return "\n".join(lines)


def burst_exact(rounds: list[tuple[Counter[tuple[str, int]], list[float], float]]) -> bool:
    return all(
        statuses[c, 200] == BURST_LIMIT and statuses[c, 429] == BURST_REQUESTS - BURST_LIMIT
        for statuses, _, _ in rounds
        for c in {c for c, _ in statuses}
    )


def write_between(start_marker: str, end_marker: str, text: str) -> None:
    doc = DOCS.read_text()
    start, end = doc.index(start_marker) + len(start_marker), doc.index(end_marker)
    DOCS.write_text(doc[:start] + "\n" + text + "\n" + doc[end:])
    print(f"\nwrote {DOCS}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="15 s, print only")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--burst", action="store_true", help="the overload burst instead")
    args = parser.parse_args()
    if args.burst:
        rounds = run_burst()
        text = burst_table(rounds)
        print(text)
        if not args.quick:
            write_between(BURST_START, BURST_END, text)
        return 0 if burst_exact(rounds) else 1
    seconds = 15 if args.quick else args.seconds
    results, info = run(seconds, args.connections)
    text = table(results, info)
    print(text)
    if not args.quick:
        write_between(START, END, text)
    five = sum(n for code, n in results.statuses.items() if code >= 500)
    return 1 if five or info["customers_short"] else 0


if __name__ == "__main__":
    sys.exit(main())
