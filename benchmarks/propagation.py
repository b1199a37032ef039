"""How long a change to a customer takes to reach another process's next request.

    python benchmarks/propagation.py              # 100 plan changes, then the control; prints
    python benchmarks/propagation.py --write      # the same, and rewrites docs/benchmarks.md
    python benchmarks/propagation.py --quick      # 20 changes, no control
    python benchmarks/propagation.py --changes 2 --no-control   # the test suite's smoke run

Needs `redis-server` on the PATH; starts its own on a free loopback port, and on the same
Redis: two uvicorn processes serving a small Starlette app behind
`plangate.asgi.PlanGateMiddleware` (storage URI with `customer_cache_ttl=60`, so that only the
published change, not the TTL, can make a change visible in time), and `plangate gateway`
(the admin API under /admin/, its token from PLANGATE_ADMIN_TOKEN). Everything binds
127.0.0.1.

One customer's plan alternates free ↔ pro through `PATCH /admin/customers/{id}` (a JSON
merge patch). One poller per uvicorn process, a thread on a kept-alive connection, asks
`GET /.plangate/entitlements` back to back, from before the write until the answer shows the
new plan. A change's propagation to a process is the time from just before the admin request
is sent to the first response of that process that shows the new plan. Before every change
each process has the customer cached (its poller has seen the current plan): the point is
that a cached record is dropped by the published change. Between changes, a pause of 20 to
50 ms (seeded), so that writes do not fall in step with the polls.

The control (skipped with --quick or --no-control): the same with the subscription refused
(the uvicorn processes connect as a Redis user without pub/sub channels, ACL) and
`customer_cache_ttl=1`: changes arrive only when the cached record expires. Its pauses run
from 20 ms to the TTL and more, so that writes land anywhere in a cached record's life (each
change is seen just after a read, which a fixed short pause would always follow).

Redis commands are counted with MONITOR outside the timed changes: a cached customer's
requests (the entitlements endpoint, a boolean-feature route) and one whole change.
Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import http.client
import json
import math
import os
import platform
import random
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import redis
import yaml
from compare import Monitor, _cpu, free_port, redis_server, write_section

from plangate.cli import mint_token
from plangate.config import load_config
from plangate.storage._redis_changes import CHANNEL

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- propagation -->", "<!-- /propagation -->"

SECRET = "propagation-hs256-secret-0123456789abcdef"
CUSTOMER = "org_propagation"
ENTITLEMENTS = "/.plangate/entitlements"
PLANS = ("free", "pro")
TARGET_P50, TARGET_P99 = 20.0, 100.0  # ms
WAIT = 10.0  # seconds a change may take before the run fails
CONTROL_CHANGES = 20
CONTROL_USER, CONTROL_PASSWORD = "nosub", "nosub-password-0123456789"

CONFIG: dict[str, Any] = {
    "version": 1,
    "storage": "memory://",  # each process is given its store in PLANGATE_STORAGE
    "identity": {"jwt": {"algorithms": ["HS256"], "secret": SECRET, "customer_claim": "org_id"}},
    "features": {"export_reports": {"kind": "boolean"}},
    "plans": {"free": {"features": {}}, "pro": {"features": {"export_reports": True}}},
    "default_plan": "free",
    "routes": [{"match": "GET /v1/reports", "feature": "export_reports"}],
    "admin": {"token": "${PLANGATE_ADMIN_TOKEN}"},
}

APP = """
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from plangate.asgi import PlanGateMiddleware

async def reports(request):
    return JSONResponse({"reports": []})

app = PlanGateMiddleware(Starlette(routes=[Route("/v1/reports", reports)]), "plangate.yaml")
"""


# Processes -------------------------------------------------------------------------------------


@contextlib.contextmanager
def serving(
    command: list[str], port: int, cwd: Path, env: dict[str, str], name: str
) -> Iterator[int]:
    """A server process, its output in ``cwd/name.log``; yields its port once it accepts."""
    log_path = cwd / f"{name}.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start:\n{log_path.read_text()}")
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@dataclass
class Servers:
    apps: list[int]  # the uvicorn processes' ports
    gateway: int
    admin_token: str


@contextlib.contextmanager
def servers(workdir: Path, app_storage: str, gateway_storage: str) -> Iterator[Servers]:
    admin_token = secrets.token_urlsafe(24)
    base_env = {**os.environ, "PLANGATE_ADMIN_TOKEN": admin_token}
    with contextlib.ExitStack() as stack:
        apps = []
        for i in (1, 2):
            port = free_port()
            command = [
                *(sys.executable, "-m", "uvicorn", "bench_app:app"),
                *("--host", "127.0.0.1", "--port", str(port)),
                *("--no-access-log", "--log-level", "warning"),
            ]
            env = {**base_env, "PLANGATE_STORAGE": app_storage}
            apps.append(stack.enter_context(serving(command, port, workdir, env, f"uvicorn-{i}")))
        port = free_port()
        command = [
            *(str(Path(sys.executable).parent / "plangate"), "gateway"),
            *("--config", "plangate.yaml"),
            *("--host", "127.0.0.1", "--port", str(port)),
        ]
        env = {**base_env, "PLANGATE_STORAGE": gateway_storage}
        gateway = stack.enter_context(serving(command, port, workdir, env, "gateway"))
        yield Servers(apps, gateway, admin_token)


# Clients ---------------------------------------------------------------------------------------


class Poller(threading.Thread):
    """Asks one process for the customer's entitlements back to back, on one connection, and
    notes when an answer first shows the plan it is told to wait for."""

    def __init__(self, port: int, authorization: str) -> None:
        super().__init__(daemon=True)
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
        self.headers = {"authorization": authorization}
        self.lock = threading.Lock()
        self.want: str | None = None
        self.seen_at: float | None = None
        self.done = threading.Event()
        self.last_plan: str | None = None
        self.polls = 0
        self.error: BaseException | None = None
        self.stopping = threading.Event()

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                plan = entitlements_plan(self.connection, self.headers)
                now = time.perf_counter()
                self.polls += 1
                self.last_plan = plan
                with self.lock:
                    if plan == self.want and self.seen_at is None:
                        self.seen_at = now
                        self.done.set()
        except BaseException as exc:
            self.error = exc
            self.done.set()
        finally:
            self.connection.close()

    def expect(self, plan: str) -> None:
        with self.lock:
            self.want, self.seen_at = plan, None
            self.done.clear()

    def stop(self) -> None:
        self.stopping.set()
        self.join(WAIT)


def entitlements_plan(connection: http.client.HTTPConnection, headers: dict[str, str]) -> str:
    connection.request("GET", ENTITLEMENTS, headers=headers)
    response = connection.getresponse()
    body = response.read()
    if response.status != 200:
        raise RuntimeError(f"{ENTITLEMENTS}: {response.status} {body!r}")
    return str(json.loads(body)["plan"])


class Admin:
    """The gateway's admin API on one kept-alive connection."""

    def __init__(self, port: int, token: str) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
        self.token = token

    def send(self, method: str, body: dict[str, Any], media_type: str) -> dict[str, Any]:
        self.connection.request(
            method,
            f"/admin/customers/{CUSTOMER}",
            body=json.dumps(body),
            headers={"authorization": f"Bearer {self.token}", "content-type": media_type},
        )
        response = self.connection.getresponse()
        answer = response.read()
        if response.status != 200:
            raise RuntimeError(
                f"{method} /admin/customers/{CUSTOMER}: {response.status} {answer!r}"
            )
        return dict(json.loads(answer))

    def put(self, plan: str) -> dict[str, Any]:
        return self.send("PUT", {"plan": plan}, "application/json")

    def check(self, authorization: str) -> None:
        """One forward-auth decision for the customer: the gateway caches it (and its gate
        subscribes, as a gateway serving traffic has)."""
        self.connection.request(
            "GET", "/check/v1/reports", headers={"authorization": authorization}
        )
        response = self.connection.getresponse()
        response.read()
        if response.status not in (200, 402):
            raise RuntimeError(f"GET /check/v1/reports: {response.status}")

    def patch(self, plan: str) -> dict[str, Any]:
        return self.send("PATCH", {"plan": plan}, "application/merge-patch+json")

    def close(self) -> None:
        self.connection.close()


# The run ---------------------------------------------------------------------------------------


@dataclass
class Run:
    changes: int
    ttl: float  # the uvicorn processes' customer_cache_ttl
    subscribed: bool  # whether the uvicorn processes may subscribe to the changes
    subscribers: int = 0  # PUBSUB NUMSUB of the channel during the run
    #: ms from just before the admin request to each process's first answer with the new plan
    seen: list[list[float]] = field(default_factory=list)
    admin: list[float] = field(default_factory=list)  # ms: the admin request's own round trip
    polls: int = 0
    commands: dict[str, Any] = field(default_factory=dict)


def until(condition: Any, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.01)


def measure(port: int, workdir: Path, run: Run, *, count: bool) -> None:
    user = "" if run.subscribed else f"{CONTROL_USER}:{CONTROL_PASSWORD}@"
    app_storage = f"redis://{user}127.0.0.1:{port}/0?customer_cache_ttl={run.ttl:g}"
    gateway_storage = f"redis://127.0.0.1:{port}/0?customer_cache_ttl=60"
    config = load_config(workdir / "plangate.yaml", env={"PLANGATE_ADMIN_TOKEN": "unused"})
    authorization = f"Bearer {mint_token(config, CUSTOMER, ttl=86400)}"
    client = redis.Redis(port=port)
    client.flushall()
    with servers(workdir, app_storage, gateway_storage) as running:
        admin = Admin(running.gateway, running.admin_token)
        admin.put(PLANS[0])
        admin.check(authorization)
        pollers = [Poller(app, authorization) for app in running.apps]
        for poller in pollers:
            poller.start()
        try:
            # every process has read the customer (and its gate subscribed, where it may)
            until(lambda: all(p.last_plan == PLANS[0] for p in pollers), "the first answers")
            expected = 1 + (len(pollers) if run.subscribed else 0)  # 1: the gateway
            until(
                lambda: client.pubsub_numsub(CHANNEL)[0][1] >= expected,
                f"{expected} subscribers of {CHANNEL}",
            )
            run.subscribers = int(client.pubsub_numsub(CHANNEL)[0][1])
            pace = random.Random(12)
            run.seen = [[] for _ in pollers]
            for i in range(run.changes):
                old, new = PLANS[i % 2], PLANS[(i + 1) % 2]
                until(lambda old=old: all(p.last_plan == old for p in pollers), "the old plan")
                time.sleep(pace.uniform(0.02, 0.05 if run.subscribed else 0.02 + run.ttl))
                for poller in pollers:
                    poller.expect(new)
                started = time.perf_counter()
                answer = admin.patch(new)
                run.admin.append((time.perf_counter() - started) * 1000)
                assert answer["plan"] == new, answer
                for n, poller in enumerate(pollers):
                    if not poller.done.wait(WAIT) or poller.seen_at is None:
                        raise RuntimeError(
                            f"uvicorn {n + 1}: no answer with {new!r}: {poller.error!r}"
                        )
                    run.seen[n].append((poller.seen_at - started) * 1000)
        finally:
            for poller in pollers:
                poller.stop()
        run.polls = sum(p.polls for p in pollers)
        if count:
            run.commands = count_commands(port, running, admin, authorization, run.changes)
        admin.close()
    client.close()


def count_commands(
    port: int, running: Servers, admin: Admin, authorization: str, done: int, requests: int = 50
) -> dict[str, Any]:
    """Redis commands of a cached customer's requests, and of one change (MONITOR)."""
    headers = {"authorization": authorization}
    connections = [
        http.client.HTTPConnection("127.0.0.1", app, timeout=WAIT) for app in running.apps
    ]
    current = PLANS[done % 2]
    monitor = Monitor(port)
    try:
        for connection in connections:  # cached: read once after the last change
            assert entitlements_plan(connection, headers) == current

        def cached() -> None:
            for connection in connections:
                for _ in range(requests):
                    assert entitlements_plan(connection, headers) == current
                    connection.request("GET", "/v1/reports", headers=headers)
                    response = connection.getresponse()
                    response.read()
                    assert response.status in (200, 402), response.status

        per_request = len(monitor.count(cached)) / (2 * requests * len(connections))
        new = PLANS[(done + 1) % 2]

        def change() -> None:
            admin.patch(new)
            for connection in connections:
                until(lambda c=connection: entitlements_plan(c, headers) == new, "the change")

        names = collections.Counter(c.split()[0].upper() for c in monitor.count(change))
    finally:
        monitor.close()
        for connection in connections:
            connection.close()
    return {"cached": per_request, "change": names}


# The report --------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile: the smallest value with at least q % of them at or below."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def row(name: str, values: list[float]) -> str:
    figures = " | ".join(f"{percentile(values, q):.1f}" for q in (50, 90, 99, 100))
    return f"| {name} | {len(values)} | {figures} |"


def table(run: Run) -> list[str]:
    both = [v for seen in run.seen for v in seen]
    return [
        "| | changes | p50 ms | p90 ms | p99 ms | max ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *(row(f"uvicorn {n + 1}", seen) for n, seen in enumerate(run.seen)),
        row("both processes", both),
        row("the admin request (PATCH, until its response)", run.admin),
    ]


def report(main: Run, control: Run | None) -> str:
    both = [v for seen in main.seen for v in seen]
    p50, p99 = percentile(both, 50), percentile(both, 99)
    cached = main.commands.get("cached")

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    targets = [
        "| target | measured | |",
        "| --- | --- | --- |",
        f"| propagation p50 ≤ {TARGET_P50:g} ms | {p50:.1f} ms | {verdict(p50 <= TARGET_P50)} |",
        f"| propagation p99 ≤ {TARGET_P99:g} ms | {p99:.1f} ms | {verdict(p99 <= TARGET_P99)} |",
    ]
    if cached is not None:
        targets.append(
            f"| a cached customer's request: no Redis command | {cached:g} per request "
            f"| {verdict(cached == 0)} |"
        )
    lines = [
        f"Run {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}: {main.changes} plan changes "
        f"(free ↔ pro) through `PATCH /admin/customers/{{id}}`; {main.subscribers} processes "
        f"subscribed to `{CHANNEL}` (the gateway and both uvicorn processes); "
        f"`customer_cache_ttl={main.ttl:g}`; {main.polls:,} polls in all. Milliseconds from "
        "just before the admin request is sent to the process's first answer with the new "
        "plan; percentiles by nearest rank.",
        "",
        "### Targets",
        "",
        *targets,
        "",
        "### Published changes",
        "",
        *table(main),
    ]
    if control is not None:
        lines += [
            "",
            f"### Control: no subscription (ACL: no channels), `customer_cache_ttl={control.ttl:g}`",
            "",
            f"{control.changes} changes; {control.subscribers} process subscribed (the gateway). "
            "A change shows when the cached record expires.",
            "",
            *table(control),
        ]
    if main.commands:
        change = ", ".join(f"{name} ×{n}" for name, n in sorted(main.commands["change"].items()))
        lines += [
            "",
            "### Redis commands (MONITOR, outside the timed changes)",
            "",
            "| | commands |",
            "| --- | --- |",
            f"| a cached customer's request (`GET {ENTITLEMENTS}`, `GET /v1/reports`; 50 of each "
            f"per process) | {cached:g} per request |",
            f"| one change: the admin PATCH, then each process's next request | {change} |",
        ]
    versions = ", ".join(
        f"{pkg} {metadata.version(pkg)}" for pkg in ("plangate", "starlette", "uvicorn", "redis")
    )
    redis_version = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True
    ).stdout.split()[2]
    lines += [
        "",
        "| machine | |",
        "| --- | --- |",
        f"| CPU | {_cpu()}, {os.cpu_count()} logical cores, shared by Redis, both uvicorn "
        "processes, the gateway and the pollers |",
        f"| load average at the end | {' / '.join(f'{v:.2f}' for v in os.getloadavg())} (1 / 5 / 15 min) |",
        f"| Python | {platform.python_implementation()} {platform.python_version()} |",
        f"| Redis | {redis_version}, on 127.0.0.1 |",
        f"| packages | {versions} |",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 changes, no control")
    parser.add_argument("--changes", type=int, help="plan changes (100; --quick: 20)")
    parser.add_argument("--no-control", action="store_true", help="skip the TTL-only control")
    parser.add_argument("--write", action="store_true", help="rewrite docs/benchmarks.md")
    args = parser.parse_args()
    changes = args.changes or (20 if args.quick else 100)
    workdir = Path(tempfile.mkdtemp(prefix="plangate-propagation-"))
    try:
        (workdir / "bench_app.py").write_text(APP)
        (workdir / "plangate.yaml").write_text(yaml.safe_dump(CONFIG, sort_keys=False))
        with redis_server() as port:
            main_run = Run(changes, ttl=60, subscribed=True)
            measure(port, workdir, main_run, count=True)
            control = None
            if not (args.quick or args.no_control):
                with redis.Redis(port=port) as client:
                    client.acl_setuser(
                        CONTROL_USER,
                        enabled=True,
                        passwords=[f"+{CONTROL_PASSWORD}"],
                        keys=["*"],
                        channels=[],
                        reset_channels=True,
                        commands=["+@all"],
                    )
                control = Run(min(changes, CONTROL_CHANGES), ttl=1, subscribed=False)
                measure(port, workdir, control, count=False)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = report(main_run, control)
    print(text)
    if args.write:
        write_section(text, START, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
