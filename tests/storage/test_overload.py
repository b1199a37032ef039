"""Exact under overload: a busy machine and a cold connection burst never make plangate count
locally while Redis is up and answering.

Two uvicorn processes share one Redis at the default timeouts (50 ms). Each round, fresh
customers each send a burst of concurrent requests, spread over both processes, while a CPU
hog runs on every core: the event loops lag far past the timeout. Every customer is admitted
exactly its limit, read from the responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections import Counter as Tally
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.servers import RedisServer, free_port, ready_process
from tests.support import config, token

pytestmark = pytest.mark.redis

ROOT = Path(__file__).parents[2]
LIMIT = 50
CUSTOMERS = 8
REQUESTS = 90  # per customer, all at once
ROUNDS = 3


@contextlib.contextmanager
def uvicorn_process(storage: str, config_file: Path, log: list[str]) -> Iterator[str]:
    """The test API behind plangate in a uvicorn process of its own; its log goes to ``log``."""
    port = free_port()
    env = {**os.environ, "PLANGATE_STORAGE": storage, "PLANGATE_TEST_CONFIG": str(config_file)}
    command = [
        *(sys.executable, "-m", "uvicorn", "tests.storage.app:app"),
        *("--host", "127.0.0.1", "--port", str(port), "--no-access-log"),
    ]
    with ready_process(command, "Uvicorn running on", cwd=ROOT, env=env, log=log):
        yield f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def cpu_hogs() -> Iterator[None]:
    """A busy loop on every core, killed on exit."""
    hogs = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(os.cpu_count() or 1)
    ]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait(10)


async def burst(urls: list[str], customers: list[str], per_customer: int) -> Tally[tuple[str, int]]:
    """``per_customer`` concurrent requests of each customer, alternating between ``urls``;
    each (customer, status) counted. Every request is bounded by the client's timeout."""
    tokens = {customer: token(customer) for customer in customers}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:

        async def one(url: str, customer: str) -> tuple[str, int]:
            headers = {"authorization": f"Bearer {tokens[customer]}"}
            response = await client.get(f"{url}/v1/projects", headers=headers)
            return customer, response.status_code

        jobs = [
            one(urls[i % len(urls)], customer)
            for i in range(per_customer)
            for customer in customers
        ]
        return Tally(await asyncio.gather(*jobs))


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    """A Redis of this test's own: the processes' connections start cold."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.mark.parametrize(
    "shape",
    # with leases on (the default): a sliding window, and a period
    [pytest.param({"window": "1h"}, id="window"), pytest.param({"period": "month"}, id="period")],
)
def test_a_burst_on_a_busy_machine_admits_every_customer_exactly_its_limit(redis, tmp_path, shape):
    plans = {"free": {"features": {"api_calls": {"limit": LIMIT, **shape}}}}
    routes = [{"match": "/v1/{rest:path}", "meters": {"api_calls": 1}}]
    path = tmp_path / "plangate.yaml"
    path.write_text(yaml.safe_dump(config(plans=plans, routes=routes, default_plan="free")))
    log: list[str] = []
    expected = {(200, LIMIT), (429, REQUESTS - LIMIT)}
    with uvicorn_process(redis.url, path, log) as a, uvicorn_process(redis.url, path, log) as b:
        for round_ in range(ROUNDS):
            customers = [f"round{round_}-customer{i}" for i in range(CUSTOMERS)]
            with cpu_hogs():
                seen = asyncio.run(burst([a, b], customers, REQUESTS))
            for customer in customers:
                got = {(status, seen[customer, status]) for status in (200, 429)}
                assert got == expected, (round_, customer, dict(seen), "".join(log))
            assert sum(seen.values()) == CUSTOMERS * REQUESTS
