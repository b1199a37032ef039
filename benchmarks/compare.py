"""plangate against the bare app, slowapi and flask-limiter, and against Redis's own floor.

    python benchmarks/compare.py            # the full run (a few minutes); writes docs/benchmarks.md
    python benchmarks/compare.py --quick    # a short run that prints and writes nothing
    python benchmarks/compare.py --credits [--quick] [--write]   # only the credits rows (6.)

``--write`` writes docs/benchmarks.md after a ``--quick`` run too; ``--smoke`` is the tests'
tiny run (prints only).

Needs `pip install -e ".[bench]"` (slowapi, flask-limiter) and `redis-server` and `wrk` on
the PATH (Debian: `apt-get install redis-server wrk`). It starts its own Redis on a free
loopback port.

In one process run, on the same machine and the same Redis:

1. ASGI, in process (scope, receive and send built here, one event loop, no server): a bare
   Starlette app; plangate on memory; plangate on Redis; slowapi on Redis — what a user writes
   for the same quota: a per-customer key taken from the verified JWT (PyJWT, HS256), the
   sliding-window-counter strategy, headers on.
2. WSGI, in process: a bare Flask app; plangate on memory and on Redis; flask-limiter on Redis,
   written the same way.
3. Over HTTP: two uvicorn processes per app, under wrk: bare, plangate on memory, plangate on
   Redis.
4. The floor: one EVALSHA round trip to the same Redis, with redis-py's asyncio and blocking
   clients.
5. Redis commands per request, per scenario, counted with MONITOR outside the timed runs
   (1,000 requests; a refused customer's 50, within the second a refusal is trusted).
6. Credits (issue 13), ASGI on memory and on Redis: the plain metered route beside a route that
   spends credits and an overage route (a metered route past its limit, charged in credits),
   as ratios within each round; their Redis commands; the reserve script's cost for each inside
   Redis (INFO commandstats); Redis memory per customer with 10 grants. Needs neither slowapi,
   flask-limiter nor wrk.

Every case is checked first (status, headers). Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import io
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import jwt
import redis
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- results -->", "<!-- /results -->"

SECRET = "benchmark-hs256-secret-0123456789abcdef"
ISSUER, AUDIENCE = "https://auth.example.com/", "example-api"
QUOTA = 1_000_000_000  # a day: large enough that no run is ever refused
PAYLOAD = {"projects": [{"id": "p1", "name": "alpha"}, {"id": "p2", "name": "beta"}]}


def plangate_config() -> dict[str, Any]:
    return {
        "version": 1,
        "identity": {
            "jwt": {
                "algorithms": ["HS256"],
                "secret": SECRET,
                "issuer": ISSUER,
                "audience": AUDIENCE,
                "customer_claim": "org_id",
                "plan_claim": "plan",
            }
        },
        "features": {
            "export_reports": {"kind": "boolean"},
            "api_calls": {"kind": "metered", "unit": "call"},
        },
        "plans": {
            "bench": {
                "features": {
                    "export_reports": True,
                    "api_calls": {"limit": QUOTA, "window": "1d"},
                }
            },
            "tiny": {"features": {"api_calls": {"limit": 1, "window": "1d"}}},
        },
        "routes": [
            {"match": "GET /v1/reports", "feature": "export_reports"},
            {"match": "GET /v1/projects", "meters": {"api_calls": 1}},
        ],
    }


def token(customer: str, plan: str = "bench") -> str:
    now = int(time.time())
    claims = {"org_id": customer, "plan": plan, "iss": ISSUER, "aud": AUDIENCE}
    return jwt.encode({**claims, "iat": now, "exp": now + 86400}, SECRET, algorithm="HS256")


def customer_from_jwt(authorization: str | None) -> str:
    """What a slowapi / flask-limiter user writes for a per-customer key: verify, read."""
    _, _, raw = (authorization or "").partition(" ")
    claims = jwt.decode(raw, SECRET, algorithms=["HS256"], audience=AUDIENCE, issuer=ISSUER)
    return str(claims["org_id"])


# Redis ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def redis_server() -> Iterator[int]:
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="plangate-bench-")
    proc = subprocess.Popen(
        [
            *("redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""),
            *("--appendonly", "no", "--dir", workdir, "--logfile", ""),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if "Ready to accept connections" in line:
            break
    threading.Thread(target=lambda: [None for _ in proc.stdout or ()], daemon=True).start()
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


class Monitor:
    """Counts the commands clients send Redis (MONITOR; commands scripts run are left out)."""

    def __init__(self, port: int) -> None:
        self.client = redis.Redis(port=port)
        self.seen: list[str] = []
        self.cond = threading.Condition()
        self.monitor = redis.Redis(port=port).monitor()
        self.monitor.__enter__()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        with contextlib.suppress(Exception):
            for line in self.monitor.listen():
                if line["client_type"] != "lua":
                    with self.cond:
                        self.seen.append(line["command"])
                        self.cond.notify_all()

    def _mark(self) -> str:
        marker = f"ECHO bench-{uuid.uuid4().hex}"
        self.client.echo(marker[5:])
        with self.cond:
            self.cond.wait_for(lambda: marker in self.seen, timeout=10)
        return marker

    def count(self, action: Callable[[], None]) -> list[str]:
        start = self._mark()
        action()
        end = self._mark()
        with self.cond:
            return self.seen[self.seen.index(start) + 1 : self.seen.index(end)]

    def close(self) -> None:
        self.monitor.__exit__(None, None, None)
        self.client.close()


# The apps ------------------------------------------------------------------------------------


def starlette_apps(redis_url: str) -> dict[str, Any]:
    from slowapi import Limiter, _rate_limit_exceeded_handler
    from slowapi.errors import RateLimitExceeded
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from plangate.asgi import PlanGateMiddleware
    from plangate.config import load_config

    async def endpoint(request: Request) -> JSONResponse:
        return JSONResponse(PAYLOAD)

    def bare() -> Starlette:
        return Starlette(routes=[Route(p, endpoint) for p in ("/v1/projects", "/v1/reports")])

    config = load_config(plangate_config())
    limiter = Limiter(
        key_func=lambda request: customer_from_jwt(request.headers.get("authorization")),
        storage_uri=redis_url,
        strategy="sliding-window-counter",
        headers_enabled=True,
    )

    @limiter.limit(f"{QUOTA}/day")
    async def limited(request: Request) -> JSONResponse:
        return JSONResponse(PAYLOAD)

    slow = Starlette(routes=[Route("/v1/projects", limited)])
    slow.state.limiter = limiter
    slow.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)  # type: ignore[arg-type]
    return {
        "bare": bare(),
        "memory": PlanGateMiddleware(bare(), config, storage="memory://"),
        "redis": PlanGateMiddleware(bare(), config, storage=redis_url),
        "redis, leases off": PlanGateMiddleware(bare(), config, storage=f"{redis_url}?leases=off"),
        "slowapi": slow,
    }


def flask_apps(redis_url: str) -> dict[str, Any]:
    from flask import Flask, jsonify, request
    from flask_limiter import Limiter

    from plangate.config import load_config
    from plangate.wsgi import PlanGateMiddleware

    def bare() -> Flask:
        app = Flask(f"bench-{uuid.uuid4().hex[:6]}")
        app.add_url_rule("/v1/projects", "projects", lambda: jsonify(PAYLOAD))
        return app

    config = load_config(plangate_config())
    limited = bare()
    limiter = Limiter(
        key_func=lambda: customer_from_jwt(request.headers.get("authorization")),
        app=limited,
        storage_uri=redis_url,
        strategy="sliding-window-counter",
        headers_enabled=True,
    )
    limited.view_functions["projects"] = limiter.limit(f"{QUOTA}/day")(
        limited.view_functions["projects"]
    )
    memory, on_redis = bare(), bare()
    memory.wsgi_app = PlanGateMiddleware(memory.wsgi_app, config, storage="memory://")  # type: ignore[method-assign]
    on_redis.wsgi_app = PlanGateMiddleware(on_redis.wsgi_app, config, storage=redis_url)  # type: ignore[method-assign]
    return {"bare": bare(), "memory": memory, "redis": on_redis, "flask-limiter": limited}


# In-process drivers ----------------------------------------------------------------------------

#: One event loop for every asyncio call of the run: plangate's asyncio Redis client belongs to
#: the loop it was made on, and a new loop would make (and time) a new client.
LOOP = asyncio.new_event_loop()


def asgi_scope(path: str, authorization: str | None) -> dict[str, Any]:
    headers = [(b"host", b"api.example.com"), (b"accept", b"application/json")]
    if authorization:
        headers.append((b"authorization", authorization.encode("latin-1")))
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


async def asgi_call(app: Any, scope: dict[str, Any]) -> tuple[int, dict[bytes, bytes]]:
    result: dict[str, Any] = {}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            result["status"] = message["status"]
            result["headers"] = dict(message["headers"])

    await app(dict(scope), receive, send)
    return result["status"], result["headers"]


async def asgi_batch(app: Any, scope: dict[str, Any], count: int) -> float:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        return None

    started = time.perf_counter()
    for _ in range(count):
        await app(dict(scope), receive, send)
    return (time.perf_counter() - started) / count


def wsgi_environ(path: str, authorization: str | None) -> dict[str, Any]:
    environ = {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "api.example.com",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_HOST": "api.example.com",
        "HTTP_ACCEPT": "application/json",
        "REMOTE_ADDR": "127.0.0.1",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    if authorization:
        environ["HTTP_AUTHORIZATION"] = authorization
    return environ


def wsgi_call(app: Any, environ: dict[str, Any]) -> tuple[int, dict[str, str]]:
    seen: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        seen["status"], seen["headers"] = int(status[:3]), {k.lower(): v for k, v in headers}
        return lambda data: None

    body = app({**environ, "wsgi.input": io.BytesIO(b"")}, start_response)
    b"".join(body)
    if hasattr(body, "close"):
        body.close()
    return seen["status"], seen["headers"]


def wsgi_batch(app: Any, environ: dict[str, Any], count: int) -> float:
    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        return None

    started = time.perf_counter()
    for _ in range(count):
        body = app({**environ, "wsgi.input": io.BytesIO(b"")}, start_response)
        for _ in body:
            pass
        if hasattr(body, "close"):
            body.close()
    return (time.perf_counter() - started) / count


# Cases -----------------------------------------------------------------------------------------


@dataclass
class Case:
    group: str  # "asgi" or "wsgi"
    name: str
    app: Any
    path: str
    authorization: str | None
    note: str = ""

    def request(self) -> Any:
        if self.group == "asgi":
            return asgi_scope(self.path, self.authorization)
        return wsgi_environ(self.path, self.authorization)


def floor_cases(port: int) -> dict[str, Callable[[int], float]]:
    script = "return 1"
    sync = redis.Redis(port=port)
    sha = sync.script_load(script)

    def sync_batch(count: int) -> float:
        started = time.perf_counter()
        for _ in range(count):
            sync.evalsha(sha, 0)
        return (time.perf_counter() - started) / count

    loop = LOOP
    aclient = redis.asyncio.Redis(port=port)

    async def abatch(count: int) -> float:
        started = time.perf_counter()
        for _ in range(count):
            await aclient.evalsha(sha, 0)
        return (time.perf_counter() - started) / count

    # The same round trip with plangate's own reservation script and arguments: the floor
    # for any client that reserves with it.
    from plangate.storage import Counter, Reserve, customer_prefix
    from plangate.storage._redis_codec import reserve_call, script_source

    counter = Counter(customer_prefix("org_floor") + "api_calls-1d", QUOTA, 1, window=86400.0)
    keys, args = reserve_call(Reserve((counter,), time.time(), reservation_id="floor"))
    reserve_sha = sync.script_load(script_source("reserve_plain"))  # what a metered route runs

    async def areserve(count: int) -> float:
        started = time.perf_counter()
        for _ in range(count):
            await aclient.evalsha(reserve_sha, len(keys), *keys, *args)
        return (time.perf_counter() - started) / count

    return {
        "EVALSHA, asyncio client": lambda n: loop.run_until_complete(abatch(n)),
        "EVALSHA, blocking client": sync_batch,
        "EVALSHA of plangate's reserve script, asyncio client": lambda n: loop.run_until_complete(
            areserve(n)
        ),
    }


def measure(
    cases: list[Case], floors: dict[str, Callable[[int], float]], batches: int, per_batch: int
) -> dict[str, list[float]]:
    """Interleaved batches (each case once per round), so that drift hits every case alike.
    A first, untimed round warms every case up."""
    loop = LOOP
    samples: dict[str, list[float]] = {}
    requests = {id(case): case.request() for case in cases}
    for case in cases:
        if case.group == "asgi":
            loop.run_until_complete(asgi_batch(case.app, requests[id(case)], per_batch))
        else:
            wsgi_batch(case.app, requests[id(case)], per_batch)
    for _ in range(batches):
        for case in cases:
            gc.collect()
            if case.group == "asgi":
                value = loop.run_until_complete(asgi_batch(case.app, requests[id(case)], per_batch))
            else:
                value = wsgi_batch(case.app, requests[id(case)], per_batch)
            samples.setdefault(f"{case.group}:{case.name}", []).append(value)
        for name, run in floors.items():
            samples.setdefault(f"floor:{name}", []).append(run(per_batch))
    return samples


def check(cases: list[Case]) -> None:
    """Every case answers as it should before anything is timed."""
    loop = LOOP
    for case in cases:
        if case.group == "asgi":
            status, raw = loop.run_until_complete(asgi_call(case.app, case.request()))
            headers = {k.decode().lower(): v.decode() for k, v in raw.items()}
        else:
            status, headers = wsgi_call(case.app, case.request())
        expected = 429 if "refused" in case.name else 200
        assert status == expected, (case.name, status, headers)
        plangate = not case.name.startswith("bare")
        if (plangate and "metered" in case.name) or case.name in ("slowapi", "flask-limiter"):
            assert any(h.startswith(("ratelimit", "x-ratelimit")) for h in headers), (
                case.name,
                headers,
            )


def commands_sent(monitor: Monitor, case: Case, requests: int) -> list[str]:
    """The commands clients sent Redis while ``case`` served ``requests`` requests."""
    loop = LOOP
    request = case.request()

    def run() -> None:
        for _ in range(requests):
            if case.group == "asgi":
                loop.run_until_complete(asgi_call(case.app, request))
            else:
                wsgi_call(case.app, request)

    return monitor.count(run)


#: requests whose Redis commands are counted per case: enough for leases to reach their
#: steady state (their first calls ask Redis while the rate is measured); a refused customer's
#: within one ``refusal_ttl`` (1 s), the time a refusal is trusted without asking again
COUNTED = 1000
COUNTED_REFUSED = 50


def count_commands(monitor: Monitor, cases: list[Case]) -> dict[str, float]:
    counts = {}
    for case in cases:
        requests = COUNTED_REFUSED if "refused" in case.name else COUNTED
        counts[f"{case.group}:{case.name}"] = len(commands_sent(monitor, case, requests)) / requests
    return counts


# Over HTTP ---------------------------------------------------------------------------------------

HTTP_WORKERS = 2  # uvicorn worker processes: leases are per process

HTTP_APP = """
import os
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from plangate.asgi import PlanGateMiddleware

PAYLOAD = {payload!r}

async def endpoint(request):
    return JSONResponse(PAYLOAD)

app = Starlette(routes=[Route("/v1/projects", endpoint)])
if os.environ.get("BENCH_STORAGE"):
    app = PlanGateMiddleware(app, os.environ["BENCH_CONFIG"], storage=os.environ["BENCH_STORAGE"])
"""


def wrk(url: str, authorization: str, seconds: int, connections: int) -> dict[str, float]:
    return wrk_all([url], authorization, seconds, connections)


def wrk_all(
    urls: list[str], authorization: str, seconds: int, connections: int
) -> dict[str, float]:
    """One wrk per URL, all at once, ``connections`` spread evenly over them: requests per
    second summed, latency percentiles the worst of them."""
    runs = [
        subprocess.Popen(
            [
                *("wrk", "-t1", f"-c{connections // len(urls)}", f"-d{seconds}s", "--latency"),
                *("-H", f"Authorization: {authorization}", url),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for url in urls
    ]
    results = []
    for run in runs:
        out, _ = run.communicate()
        assert run.returncode == 0, out
        results.append(wrk_result(out))
    return {
        "rps": sum(r["rps"] for r in results),
        "p50": max(r["p50"] for r in results),
        "p99": max(r["p99"] for r in results),
        "non2xx": sum(r["non2xx"] for r in results),
    }


def wrk_result(out: str) -> dict[str, float]:

    def latency(label: str) -> float:
        match = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
        assert match, out
        value = float(match.group(1))
        return (
            value / 1000
            if match.group(2) == "us"
            else value * 1000
            if match.group(2) == "s"
            else value
        )

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    assert rps, out
    return {
        "rps": float(rps.group(1)),
        "p50": latency("50%"),
        "p99": latency("99%"),
        "non2xx": float(non2xx.group(1)) if non2xx else 0.0,
    }


def over_http(redis_url: str, seconds: int) -> dict[str, dict[str, float]]:
    """Each app served by ``HTTP_WORKERS`` uvicorn processes (one worker each, on a port of
    its own, as behind a load balancer), all timed by wrk at once (half the connections
    each), in interleaved rounds of 2 s (``seconds`` in all per app): each app's figure is
    the median of its rounds, so drift on a small machine hits the three alike. (Workers
    sharing one socket — ``uvicorn --workers``, gunicorn — share wrk's connections as their
    accepts race, sometimes all to one worker: a twofold swing between runs here.)"""
    workdir = Path(tempfile.mkdtemp(prefix="plangate-http-"))
    (workdir / "bench_app.py").write_text(HTTP_APP.format(payload=PAYLOAD))
    config_file = workdir / "plangate.yaml"
    config_file.write_text(yaml.safe_dump(plangate_config()))
    apps = (("bare", ""), ("plangate, memory", "memory://"), ("plangate, Redis", redis_url))
    auth = f"Bearer {token('org_http')}"
    urls: dict[str, list[str]] = {}
    procs: list[subprocess.Popen[str]] = []
    try:
        for name, storage in apps:
            env = {**os.environ, "BENCH_STORAGE": storage, "BENCH_CONFIG": str(config_file)}
            for _ in range(HTTP_WORKERS):
                port = free_port()
                procs.append(
                    subprocess.Popen(
                        [
                            *(sys.executable, "-m", "uvicorn", "bench_app:app"),
                            *("--port", str(port), "--no-access-log", "--log-level", "warning"),
                        ],
                        cwd=workdir,
                        env=env,
                        stderr=subprocess.PIPE,
                        text=True,
                    )
                )
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:  # uvicorn at warning level prints nothing
                    with (
                        contextlib.suppress(OSError),
                        socket.create_connection(("127.0.0.1", port), 0.2),
                    ):
                        break
                    time.sleep(0.05)
                urls.setdefault(name, []).append(f"http://127.0.0.1:{port}/v1/projects")
        for group in urls.values():
            wrk_all(group, auth, 1, 32)  # warm-up: connected, the customer cached
        step = 2 if seconds >= 2 else 1
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in urls}
        for _ in range(max(1, seconds // step)):
            for name, group in urls.items():
                rounds[name].append(wrk_all(group, auth, step, 32))
        return {
            name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
            for name, runs in rounds.items()
        }
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
            if proc.stderr:
                proc.stderr.close()
        shutil.rmtree(workdir, ignore_errors=True)


# Memory ------------------------------------------------------------------------------------------


def redis_bytes_per_customer(port: int, customers: int = 5_000) -> dict[str, float]:
    """Redis memory per active customer of the reference config, after one request."""
    from plangate._gate import new_reservation_id
    from plangate.config import load_config
    from plangate.engine import Engine
    from plangate.storage import Reserve
    from plangate.storage._redis import RedisStorage

    config = load_config(ROOT / "tests" / "config" / "reference" / "plangate.yaml", env={})
    engine = Engine(config, new_id=new_reservation_id)
    client = redis.Redis(port=port)
    store = RedisStorage(f"redis://127.0.0.1:{port}/0")
    now = time.time()
    results = {}
    for plan, route in (("free", "GET /v1/projects"), ("pro", "POST /v1/completions")):
        client.flushall()
        before = client.info("memory")["used_memory"]
        rule = engine.route(*route.split()).rule
        assert rule is not None
        costs = [(m.meter, m.cost) for m in rule.meters]
        for i in range(customers):
            charge = engine.build_charge(
                costs, f"cust-{i:06d}", config.catalog.plans[plan], None, now
            )
            store.reserve(Reserve(charge.counters, now, reservation_id=f"r{i}"))
        keys = len(charge.counters)
        results[f"{plan} plan, {route} ({keys} counters)"] = (
            client.info("memory")["used_memory"] - before
        ) / customers
    store.close()
    client.close()
    return results


# Credits (issue 13) ------------------------------------------------------------------------------

CREDITS_START, CREDITS_END = "<!-- credits -->", "<!-- /credits -->"
#: the overage route reports OVERAGE_COST tokens a request against a limit of OVERAGE_LIMIT a
#: day (over 1 000, so kept in buckets like the plain metered route's counter): two requests
#: use it up, and every later one is charged OVERAGE_COST * OVERAGE_RATE = 1 credit
OVERAGE_LIMIT, OVERAGE_COST, OVERAGE_RATE = 2_000, 1_000, 0.001
BALANCE = 10**12  # credits granted to each timed customer: no run comes near spending them
GRANTS = 10  # the grants of the "10 grants" customer and of each customer whose memory is measured
RESERVATIONS = 3  # credits-route requests of each customer whose memory is measured
CREDIT_ROUTES = {
    "metered": "/v1/projects",  # the plain metered route of the comparison above
    "credits route": "/v1/generate",
    "overage route": "/v1/completions",
    # the overage route's plain twin: a meter of the same shape (OVERAGE_COST a request, a
    # day's sliding window kept in buckets), without overage and never near its limit, so
    # that what overage adds is measured apart from what a different meter costs
    "metered twin": "/v1/tokens",
}
#: the plain metered route each route is compared with
BASELINE = {"overage route": "metered twin"}


def credits_config() -> dict[str, Any]:
    """The compared config plus a credits feature, a route that spends it and a metered
    feature charged to it past its limit."""
    config = plangate_config()
    config["features"]["ai_tokens"] = {"kind": "metered", "unit": "token"}
    config["features"]["ai_tokens_twin"] = {"kind": "metered", "unit": "token"}
    config["features"]["ai_credits"] = {"kind": "credits", "unit": "credit"}
    config["plans"]["bench"]["features"].update(
        {
            "ai_tokens": {
                "limit": OVERAGE_LIMIT,
                "window": "1d",
                "overage": "ai_credits",
                "rate": OVERAGE_RATE,
            },
            # listed so that the plan's routes may spend it; balances come from admin grants
            "ai_credits": {"grant": 0, "period": "month"},
            "ai_tokens_twin": {"limit": 10**12, "window": "1d"},
        }
    )
    config["routes"] += [
        {"match": f"GET {CREDIT_ROUTES['credits route']}", "meters": {"ai_credits": 1}},
        {"match": f"GET {CREDIT_ROUTES['overage route']}", "meters": {"ai_tokens": OVERAGE_COST}},
        {
            "match": f"GET {CREDIT_ROUTES['metered twin']}",
            "meters": {"ai_tokens_twin": OVERAGE_COST},
        },
    ]
    return config


def credits_apps(redis_url: str) -> dict[str, Any]:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from plangate.asgi import PlanGateMiddleware
    from plangate.config import load_config

    async def endpoint(request: Request) -> JSONResponse:
        return JSONResponse(PAYLOAD)

    def bare() -> Starlette:
        return Starlette(routes=[Route(p, endpoint) for p in CREDIT_ROUTES.values()])

    config = load_config(credits_config())
    return {
        "bare": bare(),
        "memory": PlanGateMiddleware(bare(), config, storage="memory://"),
        # Credits are never leased (storage/_leases.py): the routes compare on the path every
        # request of a credits route takes, one round trip each; the leased metered route is
        # in the table of the whole comparison
        "Redis": PlanGateMiddleware(bare(), config, storage=f"{redis_url}?leases=off"),
    }


async def grant_several(customers: Any, customer: str, amount: int) -> None:
    """GRANTS grants of ``amount`` each, of every shape: priorities, categories, half of them
    expiring in 30 days (the burn order sorts them all on every charge)."""
    expires = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=30)
    for i in range(GRANTS):
        await customers.grant_credits(
            customer,
            "ai_credits",
            amount,
            expires_at=expires if i % 2 else None,
            priority=95 + i,
            category=("paid", "promotional")[i % 2],
        )


def credits_cases(apps: dict[str, Any]) -> list[Case]:
    one, several = f"Bearer {token('org_credits')}", f"Bearer {token('org_credits_10')}"
    # The bare app on each route's path: Starlette matches its routes in order, so a later
    # route costs the bare app itself a little more; plangate's added cost on a route is
    # measured against the bare app on the same path.
    cases = [Case("asgi", "bare Starlette", apps["bare"], CREDIT_ROUTES["metered"], one)]
    for route in ("credits route", "overage route", "metered twin"):
        cases.append(
            Case("asgi", f"bare Starlette, {route}", apps["bare"], CREDIT_ROUTES[route], one)
        )
    for store in ("memory", "Redis"):
        for route, path in CREDIT_ROUTES.items():
            cases.append(Case("asgi", f"plangate, {store}, {route}", apps[store], path, one))
        cases.append(
            Case(
                "asgi",
                f"plangate, {store}, credits route, {GRANTS} grants",
                apps[store],
                CREDIT_ROUTES["credits route"],
                several,
            )
        )
    return cases


def prepare_credits(apps: dict[str, Any], cases: list[Case]) -> None:
    """Balances granted, the overage route's limit used up and every ledger full (its steady
    state: each new entry drops the oldest); then each route is checked to charge what it
    should: nothing, 1 credit, 1 credit."""
    from plangate.engine._credits import LEDGER_CAP

    loop = LOOP
    for store in ("memory", "Redis"):
        customers = apps[store].gate.customers
        loop.run_until_complete(customers.grant_credits("org_credits", "ai_credits", BALANCE))
        loop.run_until_complete(grant_several(customers, "org_credits_10", BALANCE // GRANTS))
    timed = [case for case in cases if case.app is not apps["bare"]]
    for case in timed:
        loop.run_until_complete(asgi_batch(case.app, case.request(), LEDGER_CAP + 10))
    for case in timed:
        customer = "org_credits_10" if "grants" in case.name else "org_credits"
        balance = case.app.gate.customers.balance
        before = loop.run_until_complete(balance(customer, "ai_credits"))
        loop.run_until_complete(asgi_batch(case.app, case.request(), 10))
        spent = before - loop.run_until_complete(balance(customer, "ai_credits"))
        metered = case.name.endswith(("metered", "metered twin"))
        assert spent == (0 if metered else 10), (case.name, spent)


def count_round_trips(monitor: Monitor, cases: list[Case], requests: int = 50) -> dict[str, str]:
    """Per case: the commands clients sent Redis per request, e.g. ``1 (EVALSHA)``."""
    counts = {}
    for case in cases:
        seen = [c.split(" ", 1)[0].upper() for c in commands_sent(monitor, case, requests)]
        names = ", ".join(sorted(set(seen)))
        counts[case.name] = f"{len(seen) / requests:g}" + (f" ({names})" if names else "")
    return counts


#: one EVALSHA of the reserve script: a fresh argument list (a new reservation id) per call
ScriptCall = Callable[[], list[Any]]


def credits_script_calls(apps: dict[str, Any], port: int) -> dict[str, ScriptCall]:
    """Per route, the EVALSHA of plangate's reserve script with that route's real keys and
    arguments (a customer of its own, its balance granted and its ledger full), each call
    with a reservation id of its own as plangate's are."""
    from dataclasses import replace

    from plangate._gate import new_reservation_id
    from plangate.engine._credits import LEDGER_CAP
    from plangate.storage import Reserve
    from plangate.storage._redis_codec import reserve_call, reserve_script, script_source

    gate = apps["Redis"].gate
    plan = gate.engine.catalog.plans["bench"]
    sync = redis.Redis(port=port)
    charges: dict[str, tuple[list[tuple[str, int]], list[tuple[str, int]] | None]] = {
        "metered": ([("api_calls", 1)], None),
        "credits route": ([], [("ai_credits", 1)]),
        "overage route": ([("ai_tokens", OVERAGE_COST)], None),
    }
    calls: dict[str, ScriptCall] = {}
    for route, (costs, spends) in charges.items():
        customer = f"org_floor_{route.split()[0]}"
        LOOP.run_until_complete(gate.customers.grant_credits(customer, "ai_credits", BALANCE))
        now = time.time()  # after the grant: it is usable from the moment it was made
        charge = gate.engine.build_charge(costs, customer, plan, None, now, spends)
        op = Reserve(charge.counters, now, credits=charge.credits)
        sha = sync.script_load(script_source(reserve_script(op)))  # the script plangate runs

        def call(op: Reserve = op, sha: str = sha) -> list[Any]:
            keys, args = reserve_call(replace(op, reservation_id=new_reservation_id()))
            return [sha, len(keys), *keys, *args]

        calls[route] = call
        for _ in range(LEDGER_CAP + 10):
            reply = sync.evalsha(*call())
        assert reply.startswith(b"1 "), (route, reply)  # admitted
    sync.close()
    return calls


def credits_floors(port: int, calls: dict[str, ScriptCall]) -> dict[str, Callable[[int], float]]:
    aclient = redis.asyncio.Redis(port=port)

    def timed(call: ScriptCall) -> Callable[[int], float]:
        async def batch(count: int) -> float:
            arguments = [call() for _ in range(count)]  # built before the clock starts
            started = time.perf_counter()
            for each in arguments:
                await aclient.evalsha(*each)
            return (time.perf_counter() - started) / count

        return lambda count: LOOP.run_until_complete(batch(count))

    return {f"reserve script, {route}": timed(call) for route, call in calls.items()}


def script_cost(
    port: int, calls: dict[str, ScriptCall], count: int
) -> dict[str, tuple[float, str]]:
    """Per route: µs the reserve script runs inside Redis (INFO commandstats' usec_per_call of
    EVALSHA, the commands the script calls included) and the commands it calls per run."""
    client = redis.Redis(port=port)
    costs = {}
    for route, call in calls.items():
        arguments = [call() for _ in range(count)]
        client.config_resetstat()
        for each in arguments:
            client.evalsha(*each)
        stats = {
            name.removeprefix("cmdstat_"): value
            for name, value in client.info("commandstats").items()
        }
        inner = {
            name.upper(): (value["calls"] / count, value["usec"] / count)
            for name, value in sorted(stats.items())
            if name != "evalsha" and not name.startswith(("config", "info"))
        }
        costs[route] = (stats["evalsha"]["usec"] / count, inner)
    client.close()
    return costs


def credits_bytes_per_customer(app: Any, port: int, customers: int) -> dict[str, Any]:
    """Redis memory of customers with GRANTS grants and RESERVATIONS credits-route requests
    each: MEMORY USAGE of every key they left, by kind (the part of the key after the
    customer's tag, ids written ``<id>``), and INFO used_memory's growth."""
    from plangate.engine import credits_key
    from plangate.engine._credits import LEDGER_CAP, LEDGER_SLACK

    client = redis.Redis(port=port)
    # First the timed customer, whose one grant has been charged ever since its ledger filled
    timed = credits_key("org_credits", "ai_credits")
    assert LEDGER_CAP <= client.llen(f"{timed}:ledger") <= LEDGER_CAP + LEDGER_SLACK
    full = (
        client.memory_usage(timed, samples=0) or 0,
        client.memory_usage(f"{timed}:ledger", samples=0) or 0,
    )
    client.flushall()
    names = [f"cust-{i:06d}" for i in range(customers)]

    async def fill() -> None:
        for name in names:
            await grant_several(app.gate.customers, name, 1_000)
            scope = asgi_scope(CREDIT_ROUTES["credits route"], f"Bearer {token(name)}")
            for _ in range(RESERVATIONS):
                status, _ = await asgi_call(app, scope)
                assert status == 200, status

    before = client.info("memory")["used_memory"]
    LOOP.run_until_complete(fill())
    after = client.info("memory")["used_memory"]
    kinds: dict[str, list[int]] = {}  # kind of key → [keys, bytes, the longest TTL seen (s)]
    for key in client.scan_iter(count=1_000):
        kind = re.sub(r"[0-9a-f]{16,}", "<id>", key.decode().split("}:", 1)[1])
        entry = kinds.setdefault(kind, [0, 0, -1])
        entry[0] += 1
        entry[1] += client.memory_usage(key, samples=0) or 0
        entry[2] = max(entry[2], client.ttl(key))
    balance = credits_key(names[0], "ai_credits")
    fields = client.hgetall(balance)
    assert sum(f.startswith(b"g:") for f in fields) == GRANTS, fields
    assert client.llen(f"{balance}:ledger") == GRANTS + RESERVATIONS
    result = {
        "kinds": {
            kind: (n / customers, size / customers, ttl) for kind, (n, size, ttl) in kinds.items()
        },
        "used_memory": (after - before) / customers,
        "encoding": client.object("encoding", balance).decode(),
        "grant_field": max(len(v) for f, v in fields.items() if f.startswith(b"g:")),
        "customers": customers,
        "full": full,
    }
    client.close()
    return result


def credits_report(
    samples: dict[str, list[float]],
    commands: dict[str, str],
    script: dict[str, tuple[float, dict[str, tuple[float, float]]]],
    memory: dict[str, Any],
    batches: int,
    per_batch: int,
    mode: str,
) -> str:
    rounds = {name.split(":", 1)[1]: values for name, values in samples.items()}
    med = {name: median_us(values) for name, values in rounds.items()}
    spread = {name: (min(v) * 1e6, max(v) * 1e6) for name, v in rounds.items()}

    def route_of(case: str) -> str:
        for route in ("credits route", "overage route", "metered twin"):
            if case.endswith(f", {route}") or f", {route}," in case:
                return route
        return "metered"

    def plain(case: str, route: str | None = None) -> str:
        """The plain metered route ``case`` is compared with (``route``: that one)."""
        twin = route or BASELINE.get(route_of(case), "metered")
        return f"plangate, {case.split(', ')[1]}, {twin}"

    def bare_of(case: str) -> str:
        """The bare app on the same path as ``case``."""
        route = route_of(case)
        return "bare Starlette" if route == "metered" else f"bare Starlette, {route}"

    def added_us(case: str) -> float:
        return med[case] - med[bare_of(case)]

    def ratios(case: str, route: str | None = None) -> tuple[float, float]:
        """(the whole request, plangate's added cost) against its plain metered route's:
        taken within each round (every case timed once, back to back), then the median of
        the rounds' ratios, which a slow stretch of a shared machine moves less. The added
        cost of each is over the bare app on its own path."""
        whole, added = [], []
        base_case = plain(case, route)
        for this, floor, base, base_floor in zip(
            rounds[case],
            rounds[bare_of(case)],
            rounds[base_case],
            rounds[bare_of(base_case)],
            strict=True,
        ):
            whole.append(this / base)
            added.append((this - floor) / (base - base_floor))
        return statistics.median(whole), statistics.median(added)

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    targets = ["| target | measured | |", "| --- | --- | --- |"]
    for store in ("memory", "Redis"):
        for route in ("credits route", "overage route"):
            case = f"plangate, {store}, {route}"
            whole, added = ratios(case)
            twin = BASELINE.get(route)
            against = "the plain metered route's" if twin is None else f"its {twin}'s"
            also = ""
            if twin is not None:
                _, to_metered = ratios(case, "metered")
                also = f"; {to_metered:.2f}× the metered route's (another meter)"
            targets.append(
                f"| {store}: the {route}'s added cost ≤ 1.2× {against} | "
                f"**{added:.2f}×** (+{added_us(case):.1f} µs vs +{added_us(plain(case)):.1f}"
                f" µs); the whole request {whole:.2f}×{also} | {verdict(added <= 1.2)} |"
            )
    trips = [commands[f"plangate, Redis, {route}"] for route in ("credits route", "overage route")]
    targets.append(
        "| Redis: one round trip per request on the credits and the overage route | "
        f"{trips[0]}; {trips[1]} | {verdict(all(t.split()[0] == '1' for t in trips))} |"
    )
    rows = []
    for case in med:
        if case.startswith("reserve script"):
            continue
        if case.startswith("bare Starlette"):
            rows.append(
                f"| {case} | {med[case]:.1f} | {spread[case][0]:.1f} - {spread[case][1]:.1f} "
                f"| — | — | — | {commands[case]} |"
            )
            continue
        whole, added = ratios(case)
        rows.append(
            f"| {case} | {med[case]:.1f} | {spread[case][0]:.1f} - {spread[case][1]:.1f} | "
            f"+{added_us(case):.1f} | {whole:.2f}× | {added:.2f}× | {commands[case]} |"
        )
    base_script = med["reserve script, metered"]
    script_rows = []
    for route, (inside, inner) in script.items():
        called = sum(us for _, us in inner.values())
        script_rows.append(
            f"| {route} | {med[f'reserve script, {route}']:.1f} | "
            f"{med[f'reserve script, {route}'] / base_script:.2f}× | {inside:.1f} | "
            f"{inside - called:.1f} | "
            + ", ".join(f"{name} ×{n:g}: {us:.1f}" for name, (n, us) in inner.items())
            + " |"
        )
    described = {
        "credits:ai_credits": f"the balance hash ({GRANTS} grants; {memory['encoding']} "
        f"encoding, the longest grant field {memory['grant_field']} bytes)",
        "credits:ai_credits:ledger": f"its ledger list ({GRANTS + RESERVATIONS} entries)",
    }
    memory_rows = []
    for kind, (n, size, ttl) in sorted(memory["kinds"].items()):
        what = described.get(kind, "a reservation's marker" if ":reserved:" in kind else "a key")
        if ttl > 0:
            what += f", expiring {ttl:,} s after it was written"
        memory_rows.append(f"| `{kind}`: {what} | {n:g} | {size:,.0f} |")
    total = sum(size for _, size, _ in memory["kinds"].values())
    redis_version = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True
    ).stdout.split()[2]
    packages = ", ".join(
        f"{pkg} {metadata.version(pkg)}"
        for pkg in ("plangate", "starlette", "redis", "hiredis", "PyJWT")
        if _installed(pkg)
    )
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    how = {
        "full": "",
        "quick": " with `--quick`",
        "smoke": " with `--smoke` (a smoke test's run: too short to read anything into)",
    }[mode]
    return "\n".join(
        [
            f"Run {now}{how}: ASGI in process, {batches} rounds, each timing a batch of "
            f"{per_batch:,} sequential requests of every case back to back; µs are the median "
            "of the batches' mean time per request, ratios the median of the rounds' ratios. "
            "Every balance's ledger was full (its steady state) before the first round. The "
            "absolute µs belong to this run's machine (below) and its load at the time; compare "
            "the ratios.",
            "",
            "### Targets",
            "",
            *targets,
            "",
            "### Per request",
            "",
            "Ratios against the plain metered route of the same store: of the whole request, "
            "and of what plangate adds to the bare app. Redis with leases off: credits are "
            "never leased, so every route here makes its round trip (the leased metered "
            "route is in the comparison above).",
            "",
            "| case | median µs / request | batches min - max | added vs bare µs "
            "| vs metered, whole request | vs metered, added cost | Redis commands / request |",
            "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
            *rows,
            "",
            "### The reserve script alone (EVALSHA, asyncio client, the routes' real arguments)",
            "",
            "| route | round trip µs | vs metered | inside Redis µs | of which Lua itself µs "
            "| commands the script calls per run: µs |",
            "| --- | ---: | ---: | ---: | ---: | --- |",
            *script_rows,
            "",
            f"### Redis memory per customer: {GRANTS} grants, {RESERVATIONS} credits-route "
            f"requests ({memory['customers']:,} customers)",
            "",
            "| key (after `plangate:{<customer>}:`) | keys per customer | bytes per customer |",
            "| --- | ---: | ---: |",
            *memory_rows,
            f"| all of them (`MEMORY USAGE … SAMPLES 0`) | | {total:,.0f} |",
            f"| INFO `used_memory` growth / customers | | {memory['used_memory']:,.0f} |",
            "",
            "A customer whose ledger is full (the timed customer above: one grant, 1 000 "
            f"ledger entries): the balance hash {memory['full'][0]:,} bytes, the ledger "
            f"{memory['full'][1]:,} bytes.",
            "",
            "| machine | |",
            "| --- | --- |",
            f"| CPU | {_cpu()}, {os.cpu_count()} logical cores |",
            f"| load average at the end | {load} (1 / 5 / 15 min) |",
            f"| Python | {platform.python_implementation()} {platform.python_version()} |",
            f"| Redis | {redis_version}, on 127.0.0.1 |",
            f"| packages | {packages} |",
        ]
    )


def _installed(package: str) -> bool:
    try:
        metadata.version(package)
    except metadata.PackageNotFoundError:
        return False
    return True


def run_credits(port: int, batches: int, per_batch: int, customers: int, mode: str) -> str:
    """The credits rows: prepared and checked, round trips counted (MONITOR), timed, the
    script's own cost read, memory measured; the section's text."""
    apps = credits_apps(f"redis://127.0.0.1:{port}/0")
    cases = credits_cases(apps)
    prepare_credits(apps, cases)
    check(cases)
    monitor = Monitor(port)
    commands = count_round_trips(monitor, cases)
    monitor.close()
    calls = credits_script_calls(apps, port)
    samples = measure(cases, credits_floors(port, calls), batches, per_batch)
    script = script_cost(port, calls, max(per_batch, 200))
    memory = credits_bytes_per_customer(apps["Redis"], port, customers)
    LOOP.run_until_complete(apps["Redis"].gate.storage.aclose())
    return credits_report(samples, commands, script, memory, batches, per_batch, mode)


# The report --------------------------------------------------------------------------------------


def median_us(values: list[float]) -> float:
    return statistics.median(values) * 1e6


def report(
    samples: dict[str, list[float]],
    commands: dict[str, float],
    http: dict[str, dict[str, float]],
    memory_rows: dict[str, float],
    batches: int,
    per_batch: int,
) -> str:
    med = {name: median_us(values) for name, values in samples.items()}
    spread = {name: (min(v) * 1e6, max(v) * 1e6) for name, v in samples.items()}
    rows = []
    for group, bare in (("asgi", "asgi:bare Starlette"), ("wsgi", "wsgi:bare Flask")):
        for name in [n for n in med if n.startswith(group + ":")]:
            added = med[name] - med[bare]
            ratio = med[name] / med[bare]
            rows.append(
                f"| {group.upper()} | {name.split(':', 1)[1]} | {med[name]:.1f} | "
                f"{spread[name][0]:.1f} - {spread[name][1]:.1f} | "
                f"{'—' if name == bare else f'+{added:.1f}'} | {ratio:.2f}× | "
                f"{commands.get(name, 0):g} |"
            )
    floor_rows = [
        f"| floor | {name.split(':', 1)[1]} | {med[name]:.1f} | {spread[name][0]:.1f} - {spread[name][1]:.1f} | — | — | 1 |"
        for name in med
        if name.startswith("floor:")
    ]

    def added(name: str, bare: str) -> float:
        return med[name] - med[bare]

    memory = added("asgi:plangate, memory, metered", "asgi:bare Starlette")
    on_redis = added("asgi:plangate, Redis, metered", "asgi:bare Starlette")
    slowapi = added("asgi:slowapi, Redis", "asgi:bare Starlette")
    floor = med["floor:EVALSHA, asyncio client"]
    script_floor = med["floor:EVALSHA of plangate's reserve script, asyncio client"]
    w_redis = added("wsgi:plangate, Redis, metered", "wsgi:bare Flask")
    w_limiter = added("wsgi:flask-limiter, Redis", "wsgi:bare Flask")
    per_request = added("asgi:plangate, Redis, leases off, metered", "asgi:bare Starlette")
    near = added("asgi:plangate, Redis, metered, 96 % used", "asgi:bare Starlette")
    leased_commands = commands["asgi:plangate, Redis, metered"]
    near_commands = commands["asgi:plangate, Redis, metered, 96 % used"]
    http_ratio = http["plangate, Redis"]["rps"] / http["plangate, memory"]["rps"]
    boolean = commands["asgi:plangate, Redis, boolean feature"]
    refused = commands["asgi:plangate, Redis, refused customer"]

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    targets = [
        "| target | measured | |",
        "| --- | --- | --- |",
        f"| memory storage: ≤ 40 µs added per metered request (ASGI) | +{memory:.1f} µs | {verdict(memory <= 40)} |",
        f"| Redis, leases, far from the limit: ≤ 1.5× memory storage's added cost | +{on_redis:.1f} µs vs +{memory:.1f} µs ({on_redis / memory:.2f}×); leases off: +{per_request:.1f} µs | {verdict(on_redis <= 1.5 * memory)} |",
        f"| Redis, leases, far from the limit: ≤ 0.1 Redis commands per request | {leased_commands:g} per request (leases off: {commands['asgi:plangate, Redis, leases off, metered']:g}) | {verdict(leased_commands <= 0.1)} |",
        f"| Redis, 96 % of the limit used: today's path, ≤ 1 command per request | {near_commands:g} per request, +{near:.1f} µs | {verdict(near_commands <= 1)} |",
        f"| HTTP ({HTTP_WORKERS} uvicorn processes, wrk): Redis ≥ 0.8× memory storage's throughput | {http_ratio:.2f}× | {verdict(http_ratio >= 0.8)} |",
        f"| Redis: ≤ ½ of slowapi's added cost | +{on_redis:.1f} µs vs +{slowapi:.1f} µs ({on_redis / slowapi:.2f}×) | {verdict(on_redis <= slowapi / 2)} |",
        f"| Redis: ≤ 1.3× one asyncio EVALSHA round trip | +{on_redis:.1f} µs vs {floor:.1f} µs ({on_redis / floor:.2f}×); the reserve script alone: {script_floor:.1f} µs | {verdict(on_redis <= 1.3 * floor)} |",
        f"| a boolean-feature route: 0 Redis commands once the customer is cached | {boolean:g} per request | {verdict(boolean == 0)} |",
        f"| a customer refused for a window: 0 Redis commands until it can admit again | {refused:g} per request | {verdict(refused == 0)} |",
        f"| WSGI: ≤ ½ of flask-limiter's added cost | +{w_redis:.1f} µs vs +{w_limiter:.1f} µs ({w_redis / w_limiter:.2f}×) | {verdict(w_redis <= w_limiter / 2)} |",
    ]
    http_rows = [
        f"| {name} | {r['rps']:,.0f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['rps'] / http['bare']['rps']:.2f}× |"
        for name, r in http.items()
    ]
    versions = ", ".join(
        f"{pkg} {metadata.version(pkg)}"
        for pkg in (
            "plangate",
            "starlette",
            "flask",
            "slowapi",
            "flask-limiter",
            "limits",
            "redis",
            "PyJWT",
        )
    )
    redis_version = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True
    ).stdout.split()[2]
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join(
        [
            f"Run {now}; in process: {batches} interleaved batches of {per_batch:,} sequential requests per case, "
            "median of the batches' mean time per request.",
            "",
            "### Targets",
            "",
            *targets,
            "",
            "### In process",
            "",
            "| | case | median µs / request | batches min - max | added vs bare µs | vs bare | Redis commands / request |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
            *rows,
            *floor_rows,
            "",
            f"### Over HTTP ({HTTP_WORKERS} uvicorn processes per app; wrk, 32 connections; the median of interleaved 2 s rounds)",
            "",
            "| app | requests/s | p50 ms | p99 ms | throughput vs bare |",
            "| --- | ---: | ---: | ---: | ---: |",
            *http_rows,
            "",
            "### Redis memory per active customer (the reference config, after one request)",
            "",
            "| customer and request | bytes |",
            "| --- | ---: |",
            *(f"| {name} | {value:,.0f} |" for name, value in memory_rows.items()),
            "",
            "| machine | |",
            "| --- | --- |",
            f"| CPU | {_cpu()} |",
            f"| cores | {os.cpu_count()} logical |",
            f"| Python | {platform.python_implementation()} {platform.python_version()} ({platform.system()} {platform.release()}) |",
            f"| Redis | {redis_version}, on 127.0.0.1 |",
            f"| packages | {versions} |",
        ]
    )


def _cpu() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run; print only")
    parser.add_argument(
        "--credits",
        action="store_true",
        help="only the credits rows (needs neither slowapi, flask-limiter nor wrk)",
    )
    parser.add_argument(
        "--write", action="store_true", help="write docs/benchmarks.md, even with --quick"
    )
    parser.add_argument("--smoke", action="store_true", help="a tiny run for the tests; print only")
    args = parser.parse_args()
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    batches, per_batch, http_seconds, customers = {
        "smoke": (1, 20, 1, 5),
        "quick": (3, 300, 2, 1_000),
        "full": (9, 2_000, 8, 5_000),
    }[mode]
    # the credits rows compare close figures: more, shorter rounds for their ratios
    credit_batches, credit_per_batch = {"smoke": (1, 20), "quick": (5, 300), "full": (25, 800)}[
        mode
    ]
    text = ""
    with redis_server() as port:
        if not args.credits:
            text = compare(port, batches, per_batch, http_seconds, customers)
            print(text)
        credits_text = run_credits(port, credit_batches, credit_per_batch, customers, mode)
        print(f"\n## Credits\n\n{credits_text}")
    if mode == "full" or (args.write and mode == "quick"):
        if text:
            write_section(text, START, END)
        write_section(credits_text, CREDITS_START, CREDITS_END)
    return 0


def compare(port: int, batches: int, per_batch: int, http_seconds: int, customers: int) -> str:
    """plangate against the bare apps, its peers and Redis's floor: the results' text."""
    redis_url = f"redis://127.0.0.1:{port}/0"
    asgi, flask = starlette_apps(redis_url), flask_apps(redis_url)
    bearer = f"Bearer {token('org_bench')}"
    refused = f"Bearer {token('org_tiny', 'tiny')}"
    near = f"Bearer {token('org_near')}"
    seed_near_the_limit(redis_url, "org_near")
    cases = [
        Case("asgi", "bare Starlette", asgi["bare"], "/v1/projects", bearer),
        Case("asgi", "plangate, memory, metered", asgi["memory"], "/v1/projects", bearer),
        Case("asgi", "plangate, Redis, metered", asgi["redis"], "/v1/projects", bearer),
        Case(
            "asgi",
            "plangate, Redis, leases off, metered",
            asgi["redis, leases off"],
            "/v1/projects",
            bearer,
        ),
        Case("asgi", "plangate, Redis, metered, 96 % used", asgi["redis"], "/v1/projects", near),
        Case("asgi", "plangate, Redis, boolean feature", asgi["redis"], "/v1/reports", bearer),
        Case("asgi", "plangate, Redis, refused customer", asgi["redis"], "/v1/projects", refused),
        Case("asgi", "slowapi, Redis", asgi["slowapi"], "/v1/projects", bearer),
        Case("wsgi", "bare Flask", flask["bare"], "/v1/projects", bearer),
        Case("wsgi", "plangate, memory, metered", flask["memory"], "/v1/projects", bearer),
        Case("wsgi", "plangate, Redis, metered", flask["redis"], "/v1/projects", bearer),
        Case("wsgi", "flask-limiter, Redis", flask["flask-limiter"], "/v1/projects", bearer),
    ]
    # The tiny plan allows one call a day: the first is admitted, every later one refused.
    LOOP.run_until_complete(asgi_call(asgi["redis"], asgi_scope("/v1/projects", refused)))
    check(cases)
    monitor = Monitor(port)
    commands = count_commands(monitor, cases)
    monitor.close()
    floors = floor_cases(port)
    samples = measure(cases, floors, batches, per_batch)
    http = over_http(redis_url, http_seconds)
    memory_rows = redis_bytes_per_customer(port, customers)
    return report(samples, commands, http, memory_rows, batches, per_batch)


def seed_near_the_limit(redis_url: str, customer: str) -> None:
    """``customer`` at 96 % of the bench plan's daily limit: no lease is granted there, every
    request asks Redis (with room for every run's requests)."""
    from plangate.storage import Counter, Record, customer_prefix
    from plangate.storage._redis import RedisStorage

    store = RedisStorage(redis_url)
    counter = Counter(customer_prefix(customer) + "api_calls-1d", QUOTA, 1, window=86_400.0)
    store.record(Record("seed", (counter,), (QUOTA * 96 // 100,), time.time()))
    store.close()


def write_section(text: str, start: str, end: str) -> None:
    """Replace what docs/benchmarks.md holds between the markers ``start`` and ``end``."""
    doc = DOCS.read_text()
    head, tail = doc.index(start) + len(start), doc.index(end)
    DOCS.write_text(doc[:head] + "\n" + text + "\n" + doc[tail:])
    print(f"\nwrote {DOCS}")


if __name__ == "__main__":
    sys.exit(main())
