"""What every live gateway test needs: an upstream, ``plangate gateway``, and a way to read usage.

Each gateway test (tests/gateways/test_<gateway>.py) starts its gateway in front of the
``upstream`` and asks the ``plangate`` service, both started here on free loopback ports.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.servers import free_port, ready_process
from tests.support import bearer, config

ROOT = Path(__file__).parents[2]
GATEWAYS = ROOT / "adapters" / "gateways"


def gateway_config() -> dict[str, Any]:
    """The test config: free has 5 api_calls a minute; pro has export_reports."""
    routes = [
        {"match": "GET /health", "public": True},
        {
            "match": "POST /v1/reports/{report_id}/export",
            "feature": "export_reports",
            "meters": {"api_calls": 1},
        },
        {
            "match": "POST /v1/completions",
            "meters": {"ai_tokens": {"response_header": "X-Usage-Tokens", "estimate": 100}},
        },
        {"match": "/v1/{rest:path}", "meters": {"api_calls": 1}},
    ]
    return config(routes=routes)


@dataclass
class Upstream:
    """The API behind the gateway: it echoes what it received, as JSON.

    ``/v1/status/<code>`` answers with that status; ``?tokens=N`` sets ``X-Usage-Tokens: N``.
    ``requests`` lists the headers of every request that reached it.
    """

    url: str
    port: int
    requests: list[dict[str, str]]


@contextlib.contextmanager
def upstream() -> Iterator[Upstream]:
    seen: list[dict[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            if length:
                self.rfile.read(length)
            headers = {k.lower(): v for k, v in self.headers.items()}
            seen.append({"path": self.path, "method": self.command, **headers})
            path, _, query = self.path.partition("?")
            status = 200
            if path.startswith("/v1/status/"):
                status = int(path.rsplit("/", 1)[1])
            body = json.dumps({"path": path, "headers": headers}).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            for part in query.split("&"):
                if part.startswith("tokens="):
                    self.send_header("X-Usage-Tokens", part.split("=", 1)[1])
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _answer

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_port
        yield Upstream(f"http://127.0.0.1:{port}", port, seen)
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Plangate:
    """A running ``plangate gateway``: its HTTP port and its access-log UDP port."""

    url: str
    port: int
    log_port: int
    config_file: Path

    def used(self, meter: str, customer: str = "acme", plan: str | None = None) -> int:
        """What ``customer`` has used of ``meter`` (its first limit), from the service."""
        body = httpx.get(f"{self.url}/entitlements", headers=bearer(customer, plan)).json()
        return int(body["meters"][meter]["limits"][0]["used"])

    def settled(self) -> int:
        """Reservations the service has settled so far."""
        return int(httpx.get(f"{self.url}/healthz").json()["settled"])

    def wait_settled(self, count: int) -> int:
        """Wait (an event in the service, no polling) until ``count`` reservations are settled;
        commits from access logs arrive after the response. Returns the settled count."""
        url = f"{self.url}/healthz?settled={count}&wait=20"
        return int(httpx.get(url, timeout=30).json()["settled"])


@contextlib.contextmanager
def plangate(tmp_path: Path, *extra: str, env: dict[str, str] | None = None) -> Iterator[Plangate]:
    """``plangate gateway`` in a process of its own, on free loopback ports."""
    config_file = tmp_path / "plangate.yaml"
    config_file.write_text(yaml.safe_dump(gateway_config()))
    port, log_port = free_port(), free_port()
    command = [
        *(sys.executable, "-m", "plangate.cli", "gateway", "--config", str(config_file)),
        *("--port", str(port), "--log-listen", f"127.0.0.1:{log_port}", *extra),
    ]
    env = {**os.environ, **(env or {})}
    with ready_process(command, "Uvicorn running on", name="plangate gateway", cwd=ROOT, env=env):
        yield Plangate(f"http://127.0.0.1:{port}", port, log_port, config_file)


def substituted(text: str, replacements: dict[str, str], *, where: str = "") -> str:
    """``text`` with each literal replaced, all in one pass: a port just written in (55149)
    is never taken for the start of a literal replaced after it (127.0.0.1:5514)."""
    for literal in replacements:
        assert literal in text, f"{where} has no {literal}"
    pattern = "|".join(re.escape(k) for k in sorted(replacements, key=len, reverse=True))
    return re.sub(pattern, lambda m: replacements[m.group(0)], text)
