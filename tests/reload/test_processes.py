"""Hot reload in real uvicorn processes: an edit under steady load, a broken edit, SIGHUP,
and two processes reloading together through a real Redis."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from plangate._reload import version_of
from plangate.testing import token
from tests.reload.support import BROKEN, config_text, write
from tests.servers import RedisServer, free_port, ready_process

ROOT = Path(__file__).resolve().parents[2]
ADMIN = {"Authorization": "Bearer an-admin-token"}
#: what the edit adds: a feature the free plan lacks, on a route every request could take
PREMIUM = """\
  - {match: "GET /v1/premium", feature: reports}
"""


def _config(limit: int, storage: str, *, premium: bool = False, reload: str = "{}") -> str:
    text = config_text(limit, storage=storage, reload=reload)
    text = text.replace("  reports: x\n", "")
    text = text.replace(
        "  api_calls: {kind: metered, unit: call}\n",
        "  api_calls: {kind: metered, unit: call}\n  reports: {kind: boolean}\n",
    )
    if premium:
        text = text.replace("routes:\n", "routes:\n" + PREMIUM)
        text = text.replace(
            "default_plan: free\n",
            "  tiny:\n    features:\n      api_calls: {limit: 2, window: 1h}\ndefault_plan: free\n",
        )
    return text


@contextlib.contextmanager
def _app(config: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "tests.reload.app:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "info",
    ]
    env = {**os.environ, "PLANGATE_CONFIG": str(config), "PYTHONPATH": str(ROOT)}
    with ready_process(command, "Application startup complete", cwd=ROOT, env=env) as proc:
        yield f"http://127.0.0.1:{port}", proc


def _status(url: str) -> dict[str, Any]:
    answer = httpx.get(f"{url}/admin/config", headers=ADMIN, timeout=10)
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def _until(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Wait for a state another process reaches: asked again every 20 ms."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.02)


def _version_is(urls: list[str], version: str) -> Callable[[], bool]:
    return lambda: all(_status(url)["version"] == version for url in urls)


class Load:
    """Steady requests against every process, from a thread each, until stopped: every
    answer's status counted, every failure to get one kept."""

    def __init__(self, urls: list[str], headers: dict[str, str]) -> None:
        self.statuses: Counter[int] = Counter()
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(url, headers), daemon=True) for url in urls
        ]

    def _run(self, url: str, headers: dict[str, str]) -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=10) as client:
            while not self._stop.is_set():
                try:
                    self.statuses[client.get("/v1/items").status_code] += 1
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(20)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis_server.client().flushall()
    return redis_server.url


def _jwt(config: Path, customer: str = "acme") -> str:
    return token(str(config), customer)


def test_an_edit_under_load_is_enforced_by_every_process_with_no_failed_request(
    tmp_path: Path, redis_url: str
) -> None:
    files = [tmp_path / "a.yaml", tmp_path / "b.yaml"]  # a file on each "host"
    for file in files:
        file.write_text(_config(100_000, redis_url))
    headers = {"Authorization": f"Bearer {_jwt(files[0])}"}
    with _app(files[0]) as (one, _), _app(files[1]) as (two, _):
        urls = [one, two]
        assert httpx.get(f"{one}/v1/premium", headers=headers).status_code == 200
        with Load(urls, headers) as load:
            _until(lambda: sum(load.statuses.values()) >= 50, "requests under way")
            new = _config(200_000, redis_url, premium=True)
            for file in files:
                write(file, new)
            _until(_version_is(urls, version_of(new.encode())), "both processes reloaded")
            seen = sum(load.statuses.values())
            _until(lambda: sum(load.statuses.values()) >= seen + 50, "requests after it")
        assert load.failures == []
        assert set(load.statuses) == {200}, load.statuses
        for n, url in enumerate(urls):
            answer = httpx.get(f"{url}/v1/items", headers=headers)
            assert ";q=200000;" in answer.headers["ratelimit-policy"]
            assert httpx.get(f"{url}/v1/premium", headers=headers).status_code == 402
            assert _status(url)["last_error"] is None
            # the new plan's limit, enforced by each process
            tiny = {"Authorization": f"Bearer {token(str(files[0]), f'new-{n}', 'tiny')}"}
            statuses = [httpx.get(f"{url}/v1/items", headers=tiny).status_code for _ in range(3)]
            assert statuses == [200, 200, 429]


def test_a_broken_edit_keeps_the_process_serving_its_config(tmp_path: Path) -> None:
    file = tmp_path / "plangate.yaml"
    file.write_text(_config(3, "memory://"))
    serving = version_of(file.read_bytes())
    headers = {"Authorization": f"Bearer {_jwt(file)}"}
    with _app(file) as (url, _):
        write(file, BROKEN)
        _until(lambda: _status(url)["reload_errors"] >= 1, "the broken edit seen")
        status = _status(url)
        assert status["version"] == serving
        error = status["last_error"]
        assert error["issues"][0]["file"] == str(file)
        assert error["issues"][0]["line"] == 12
        statuses = [httpx.get(f"{url}/v1/items", headers=headers).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]  # the old limit of 3, still enforced
        refused = httpx.post(f"{url}/admin/config/reload", headers=ADMIN)
        assert refused.status_code == 422
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["errors"][0]["line"] == 12


def test_sighup_reloads_a_process_that_does_not_watch_its_file(tmp_path: Path) -> None:
    file = tmp_path / "plangate.yaml"
    file.write_text(_config(3, "memory://", reload="{watch: false}"))
    with _app(file) as (url, proc):
        new = _config(9, "memory://", reload="{watch: false}")
        write(file, new)
        # not watched: nothing changes until the signal
        assert _status(url)["version"] == version_of(
            _config(3, "memory://", reload="{watch: false}").encode()
        )
        proc.send_signal(signal.SIGHUP)
        _until(_version_is([url], version_of(new.encode())), "reloaded on SIGHUP")
        assert proc.poll() is None  # and still serving


def test_two_processes_reload_together_through_the_store(tmp_path: Path, redis_url: str) -> None:
    files = [tmp_path / "a.yaml", tmp_path / "b.yaml"]
    for file in files:
        file.write_text(_config(3, redis_url, reload="{store: true}"))
    new = tmp_path / "published.yaml"
    new.write_text(_config(40, redis_url, premium=True, reload="{store: true}"))
    headers = {"Authorization": f"Bearer {_jwt(files[0])}"}
    with _app(files[0]) as (one, _), _app(files[1]) as (two, _):
        _until(lambda: _subscribers(redis_url) >= 2, "both processes subscribed")
        done = subprocess.run(
            [str(Path(sys.executable).parent / "plangate"), "reload", str(new)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        version = version_of(new.read_bytes())
        _until(_version_is([one, two], version), "both processes on the published version")
        for url in (one, two):
            assert _status(url)["origin"] == "store"
            assert httpx.get(f"{url}/v1/premium", headers=headers).status_code == 402
        # a process started now starts on it too, whatever its file says
        with _app(files[1]) as (three, _):
            _until(_version_is([three], version), "a late process on the published version")


def _subscribers(url: str) -> int:
    import redis

    from plangate.storage._redis_changes import CHANNEL

    client = redis.Redis.from_url(url)
    try:
        return int(client.pubsub_numsub(CHANNEL)[0][1])
    finally:
        client.close()
