"""Metrics under gunicorn with two workers and ``PROMETHEUS_MULTIPROC_DIR``: whichever
worker answers ``/metrics``, the decisions it shows are those of both workers, summed, and
they add up to the requests sent, by outcome (a real gunicorn; tests/observability/
multiprocess_app.py is the app)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.observability.test_metrics import samples
from tests.servers import free_port
from tests.support import bearer

ROOT = Path(__file__).parents[2]
WAIT = 30.0  # seconds gunicorn may take to serve, before the test fails
#: requests sent at least; more while one worker has answered none
REQUESTS = 40
AT_MOST = 2000

pytest.importorskip("gunicorn")


def worker_class() -> str:
    """uvicorn's gunicorn worker (deprecated in uvicorn, still shipped with it), or the
    package that replaces it."""
    try:
        import uvicorn_worker  # noqa: F401
    except ImportError:
        return "uvicorn.workers.UvicornWorker"
    return "uvicorn_worker.UvicornWorker"


@contextlib.contextmanager
def gunicorn(metrics_dir: Path, log: Path) -> Iterator[str]:
    """gunicorn with two workers serving multiprocess_app on a free loopback port; yields
    its URL once ``/metrics`` answers. Stopped (its process group) on exit."""
    port = free_port()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    command = [
        *(sys.executable, "-m", "gunicorn", "tests.observability.multiprocess_app:app"),
        *("--workers", "2", "--worker-class", worker_class()),
        *("--bind", f"127.0.0.1:{port}", "--graceful-timeout", "5"),
    ]
    with log.open("w") as out:
        proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=out, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + WAIT
        while True:
            try:
                if httpx.get(f"{url}/metrics", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"gunicorn did not serve:\n{log.read_text()}")
            with contextlib.suppress(subprocess.TimeoutExpired):  # the poll's pace
                proc.wait(0.05)
                raise RuntimeError(f"gunicorn exited:\n{log.read_text()}")
        yield url
    finally:
        proc.terminate()  # the arbiter stops its workers
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(20)


def decisions(page: str) -> dict[str, float]:
    """The decisions of ``/v1/{rest:path}`` (not the scrapes of ``/metrics``), by outcome."""
    found: Counter[str] = Counter()
    for labels, value in samples(page, "plangate_decisions_total").items():
        named = dict(labels)
        if named["rule"] == "/v1/{rest:path}":
            found[named["outcome"]] += value
    return dict(found)


def test_two_workers_decisions_are_summed_on_every_scrape(tmp_path: Path) -> None:
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    with gunicorn(metrics_dir, tmp_path / "gunicorn.log") as url:
        statuses: Counter[int] = Counter()
        workers: Counter[str] = Counter()
        # a connection of its own each: either worker may accept it
        with httpx.Client(limits=httpx.Limits(max_keepalive_connections=0)) as client:
            while sum(statuses.values()) < REQUESTS or len(workers) < 2:
                assert sum(statuses.values()) < AT_MOST, f"one worker answered all: {workers}"
                answer = client.get(f"{url}/v1/projects", headers=bearer("acme", "free"))
                statuses[answer.status_code] += 1
                workers[answer.headers["x-worker"]] += 1
            assert set(statuses) == {200, 429}  # 5 a minute in each worker, the rest refused
            expected = {"allow": statuses[200], "deny": statuses[429]}
            # scraped until each worker has answered /metrics (a few times in all)
            pages: list[httpx.Response] = []
            scrapers: set[str] = set()
            while len(pages) < 6 or len(scrapers) < 2:
                assert len(pages) < AT_MOST, "one worker answered every scrape"
                page = client.get(f"{url}/metrics")
                assert page.status_code == 200
                pages.append(page)
                scrapers.add(page.headers["x-worker"])
    assert scrapers == set(workers)
    for page in pages:  # whichever worker answered: both workers' decisions, summed
        assert decisions(page.text) == expected
        # the gauges of both workers as one series each: the most of the live workers
        assert samples(page.text, "plangate_config_last_reload_error") == {(): 0.0}
        assert samples(page.text, "plangate_config_info") == {(("version", ""),): 1.0}
