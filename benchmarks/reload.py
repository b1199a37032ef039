"""How long a config change takes to serve in every process, under steady load.

    python benchmarks/reload.py              # 20 file edits, 20 publishes; prints
    python benchmarks/reload.py --write      # the same, and rewrites docs/benchmarks.md
    python benchmarks/reload.py --edits 2    # the test suite's smoke run

Needs `redis-server` on the PATH; starts its own on a free loopback port. Two uvicorn
processes (each a "host" with a config file of its own, counters on the shared Redis) serve
a small Starlette app behind `plangate.asgi.PlanGateMiddleware`, with the admin API mounted
for `GET /admin/config`. Two load threads per process send `GET /v1/items` back to back on
kept-alive connections for the whole run; every answer that is not 200, and every request
that gets no answer, is a failed request.

- **File edits**: each host's file is replaced (written beside it, renamed over it, as an
  editor or a ConfigMap update does) with the meter's limit changed. A reload's time is from
  just before the rename to the `loaded_at` the process reports for the new version (the
  same clock: one machine).
- **Published on the store** (`plangate reload FILE`'s call, `Storage.publish_config`):
  from just before the publish to each process's `loaded_at`.

The processes are started twice: first with `reload: {}` (they watch their files), then with
`reload: {store: true}` (they follow the store).

Between changes a pause of 100 to 200 ms (seeded). Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from compare import _cpu, free_port, redis_server, write_section
from propagation import serving

from plangate._reload import version_of
from plangate.cli import mint_token
from plangate.config import load_config
from plangate.storage import open_storage

START, END = "<!-- reload -->", "<!-- /reload -->"
SECRET = "reload-benchmark-hs256-secret-0123456789abcdef"
ADMIN_TOKEN = "reload-benchmark-admin-token"
TARGET = 1.0  # seconds from the write to every process serving the new version
WAIT = 10.0

APP = """
import os
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from plangate.admin import AdminAPI
from plangate.asgi import PlanGateMiddleware

async def items(request):
    return JSONResponse({"items": []})

inner = Starlette(routes=[Route("/v1/items", items)])
app = PlanGateMiddleware(inner, os.environ["PLANGATE_CONFIG"])
inner.router.routes.append(Mount("/admin", app=AdminAPI(app.gate)))
"""


def config(limit: int, storage: str, reload: str) -> str:
    return f"""\
version: 1
storage: "{storage}"
identity:
  jwt: {{algorithms: [HS256], secret: {SECRET}, customer_claim: sub}}
features:
  api_calls: {{kind: metered, unit: call}}
plans:
  free:
    features:
      api_calls: {{limit: {limit}, window: 1h}}
default_plan: free
routes:
  - {{match: "GET /v1/items", meters: {{api_calls: 1}}}}
admin: {{token: {ADMIN_TOKEN}}}
reload: {reload}
"""


class Load(threading.Thread):
    """Requests back to back on one kept-alive connection until stopped."""

    def __init__(self, port: int, token: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.port, self.stop = port, stop
        self.headers = {"Authorization": f"Bearer {token}"}
        self.statuses: Counter[int] = Counter()
        self.failures: list[str] = []

    def run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self.stop.is_set():
            try:
                connection.request("GET", "/v1/items", headers=self.headers)
                answer = connection.getresponse()
                answer.read()
                self.statuses[answer.status] += 1
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append(repr(exc))
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        connection.close()


def status(port: int) -> dict[str, object]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(
            "GET", "/admin/config", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        answer = connection.getresponse()
        body: dict[str, object] = json.loads(answer.read())
        return body
    finally:
        connection.close()


def loaded_at(port: int, version: str) -> float:
    """When the process swapped ``version`` in (epoch seconds); waits for it."""
    deadline = time.monotonic() + WAIT
    while True:
        seen = status(port)
        if seen["version"] == version:
            text = str(seen["loaded_at"]).replace("Z", "+00:00")
            return dt.datetime.fromisoformat(text).timestamp()
        if time.monotonic() > deadline:
            raise RuntimeError(f"port {port}: {version} not serving within {WAIT} s: {seen}")
        time.sleep(0.005)


@dataclass
class Run:
    edits: int
    file: list[float] = field(default_factory=list)  # seconds, each process, each edit
    store: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    duration: float = 0.0


@contextlib.contextmanager
def apps(workdir: Path, files: list[Path]) -> Iterator[list[int]]:
    with contextlib.ExitStack() as stack:
        ports = []
        for i, file in enumerate(files, 1):
            port = free_port()
            command = [
                *(sys.executable, "-m", "uvicorn", "bench_app:app"),
                *("--host", "127.0.0.1", "--port", str(port)),
                *("--no-access-log", "--log-level", "warning"),
            ]
            env = {**os.environ, "PLANGATE_CONFIG": str(file)}
            ports.append(stack.enter_context(serving(command, port, workdir, env, f"app-{i}")))
        yield ports


@contextlib.contextmanager
def loaded(workdir: Path, files: list[Path], run: Run, token: str) -> Iterator[list[int]]:
    """Both processes serving their files, under load for as long as the block runs."""
    with apps(workdir, files) as ports:
        for port, file in zip(ports, files, strict=True):  # each serves, and follows
            loaded_at(port, version_of(file.read_bytes()))
        stop = threading.Event()
        loads = [Load(port, token, stop) for port in ports for _ in range(2)]
        began = time.monotonic()
        for load in loads:
            load.start()
        try:
            yield ports
        finally:
            stop.set()
            for load in loads:
                load.join(20)
            run.duration += time.monotonic() - began
            for load in loads:
                run.statuses.update(load.statuses)
                run.failures += load.failures


def measure(workdir: Path, storage: str, run: Run, rng: random.Random) -> None:
    files = [workdir / "host-a.yaml", workdir / "host-b.yaml"]
    for file in files:
        file.write_text(config(1_000_000, storage, "{}"))
    token = mint_token(load_config(files[0]), "org_reload", None, 3600)
    with loaded(workdir, files, run, token) as ports:  # following their files
        for i in range(run.edits):
            time.sleep(rng.uniform(0.1, 0.2))
            text = config(1_000_000 + i + 1, storage, "{}")
            version = version_of(text.encode())
            written = []
            for file in files:
                tmp = file.with_name(file.name + ".tmp")
                tmp.write_text(text)
                written.append(time.time())
                os.replace(tmp, file)
            for port, at in zip(ports, written, strict=True):
                run.file.append(loaded_at(port, version) - at)
    for file in files:
        file.write_text(config(1_000_000, storage, "{store: true}"))
    with loaded(workdir, files, run, token) as ports:  # following the store
        store = open_storage(storage)
        try:
            for i in range(run.edits):
                time.sleep(rng.uniform(0.1, 0.2))
                data = config(2_000_000 + i, storage, "{store: true}").encode()
                version = version_of(data)
                at = time.time()
                store.publish_config(data, version)
                for port in ports:
                    run.store.append(loaded_at(port, version) - at)
        finally:
            store.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))]


def report(run: Run) -> str:
    failed = sum(n for s, n in run.statuses.items() if s != 200) + len(run.failures)
    served = sum(run.statuses.values())
    worst = max(run.file + run.store)

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    def row(name: str, values: list[float]) -> str:
        ms = [v * 1000 for v in values]
        return (
            f"| {name} | {len(ms)} | {percentile(ms, 50):.0f} | {percentile(ms, 90):.0f} "
            f"| {max(ms):.0f} |"
        )

    versions = ", ".join(
        f"{pkg} {metadata.version(pkg)}"
        for pkg in ("plangate", "starlette", "uvicorn", "redis", "watchfiles")
    )
    redis_version = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True, check=False
    ).stdout.split()[2]
    return "\n".join(
        [
            f"Run {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}: 2 uvicorn processes, "
            f"each with a config file of its own, under steady load (2 connections each, "
            f"{served:,} requests in {run.duration:.1f} s); {run.edits} edits of both files, "
            f"then {run.edits} configs published on the store. Milliseconds from just before "
            "the write (the rename, or the publish) to the `loaded_at` the process reports; "
            "percentiles by nearest rank.",
            "",
            "| target | measured | |",
            "| --- | --- | --- |",
            f"| every process serves a change ≤ {TARGET:g} s after the write | "
            f"{worst * 1000:.0f} ms at worst | {verdict(worst <= TARGET)} |",
            f"| failed requests during the run: 0 | {failed} | {verdict(failed == 0)} |",
            "",
            "| how the change arrives | reloads | p50 ms | p90 ms | max ms |",
            "| --- | --- | --- | --- | --- |",
            row("the file, watched (watchfiles, inotify)", run.file),
            row("published on the store (Redis pub/sub)", run.store),
            "",
            "| machine | |",
            "| --- | --- |",
            f"| CPU | {_cpu()}, {os.cpu_count()} logical cores, shared by Redis, both uvicorn "
            "processes and the load |",
            f"| Python | {platform.python_implementation()} {platform.python_version()} |",
            f"| Redis | {redis_version}, on 127.0.0.1 |",
            f"| packages | {versions} |",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--edits", type=int, default=20, help="file edits, and publishes (20)")
    parser.add_argument("--write", action="store_true", help="rewrite docs/benchmarks.md")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="plangate-reload-"))
    run = Run(args.edits)
    try:
        (workdir / "bench_app.py").write_text(APP)
        with redis_server() as port:
            measure(workdir, f"redis://127.0.0.1:{port}/0", run, random.Random(15))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = report(run)
    print(text)
    if args.write:
        write_section(text, START, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
