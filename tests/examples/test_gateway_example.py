"""The gateway example (examples/gateway): one command starts nginx, plangate and the demo API."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx

from plangate.cli import mint_token
from plangate.config import load_config
from plangate.engine import PROBLEM_BASE
from tests.servers import drain, free_port

EXAMPLE = Path(__file__).parents[2] / "examples" / "gateway"


def bearer(customer: str, plan: str) -> dict[str, str]:
    config = load_config(EXAMPLE / "plangate.yaml")
    return {"Authorization": f"Bearer {mint_token(config, customer, plan)}"}


def test_one_command_starts_the_gateway_the_service_and_the_api(monkeypatch):
    monkeypatch.delenv("PLANGATE_JWT_SECRET", raising=False)
    monkeypatch.delenv("PLANGATE_STORAGE", raising=False)
    port, plangate_port, upstream_port, log_port = (free_port() for _ in range(4))
    command = [
        *(sys.executable, str(EXAMPLE / "run.py"), "--port", str(port)),
        *("--plangate-port", str(plangate_port), "--upstream-port", str(upstream_port)),
        *("--log-port", str(log_port)),
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    try:
        lines = []
        for line in proc.stdout:  # blocks until the launcher says everything is up
            lines.append(line)
            if line.startswith("Gateway ready on "):
                break
        else:
            proc.stdout.close()
            raise AssertionError("the example exited:\n" + "".join(lines))
        drain(proc)  # closes stdout once the launcher has exited
        url = f"http://127.0.0.1:{port}"
        assert lines[-1].startswith(f"Gateway ready on {url} ")
        output = "".join(lines)
        assert "export FREE=ey" in output
        assert f"curl -i -X POST {url}/v1/reports/7/export" in output
        with httpx.Client(base_url=url, timeout=10) as client:
            allowed = client.get("/v1/projects", headers=bearer("acme", "free"))
            refused = client.post("/v1/reports/7/export", headers=bearer("acme", "free"))
        assert allowed.status_code == 200
        assert allowed.headers["server"] == "nginx"
        assert allowed.json()["customer"] == "acme"  # what the demo API got from the gateway
        assert allowed.json()["plan"] == "free"
        assert allowed.headers["RateLimit"].startswith('"api_calls-10s";r=4;')
        assert refused.status_code == 402
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["type"] == PROBLEM_BASE + "feature-not-in-plan"
    finally:
        proc.terminate()  # SIGTERM: the launcher stops nginx and plangate, then exits
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(20)
    assert proc.returncode == 0
    with httpx.Client() as client:  # nothing is left listening
        for stopped in (port, plangate_port, upstream_port):
            try:
                client.get(f"http://127.0.0.1:{stopped}/health", timeout=2)
            except httpx.ConnectError:
                continue
            raise AssertionError(f"port {stopped} still answers after the example stopped")
