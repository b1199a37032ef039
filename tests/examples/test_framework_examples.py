"""The FastAPI, Flask and Django examples (examples/<framework>) behave as their READMEs say,
run as their READMEs say: the same API, the same calls, through each framework's integration."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import http_sf
import httpx
import pytest

from plangate.cli import mint_token
from plangate.config import Config, load_config
from plangate.engine import PROBLEM_BASE
from tests.servers import free_port

ROOT = Path(__file__).parents[2]
PROBLEM = "application/problem+json"

Auth = Callable[..., dict[str, str]]


@dataclass(frozen=True)
class Example:
    name: str
    ready: str  # the line the server prints once it serves
    command: Callable[[int], list[str]]

    @property
    def path(self) -> Path:
        return ROOT / "examples" / self.name


EXAMPLES = {
    "fastapi": Example(
        "fastapi",
        "Uvicorn running on",
        lambda port: [sys.executable, str(ROOT / "examples/fastapi/app.py"), "--port", str(port)],
    ),
    "flask": Example(
        "flask",
        " * Running on http://",
        lambda port: [sys.executable, str(ROOT / "examples/flask/app.py"), "--port", str(port)],
    ),
    "django": Example(
        "django",
        "Quit the server with",
        lambda port: [
            *(sys.executable, str(ROOT / "examples/django/manage.py")),
            *("runserver", "--noreload", f"127.0.0.1:{port}"),
        ],
    ),
}


@pytest.fixture(scope="module", params=list(EXAMPLES))
def example(request: pytest.FixtureRequest) -> Example:
    return EXAMPLES[request.param]


@pytest.fixture(scope="module")
def config(example: Example) -> Config:
    with pytest.MonkeyPatch.context() as env:
        env.delenv("PLANGATE_JWT_SECRET", raising=False)
        env.delenv("PLANGATE_STORAGE", raising=False)
        return load_config(example.path / "plangate.yaml")


@pytest.fixture
def auth(config: Config) -> Auth:
    def headers(plan: str, customer: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {mint_token(config, customer, plan)}"}

    return headers


@pytest.fixture(scope="module")
def http(example: Example) -> Iterator[httpx.Client]:
    """The example, started as its README says on a free loopback port; one server per
    example, so each test uses customers of its own."""
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PLANGATE_JWT_SECRET", "PLANGATE_STORAGE", "DJANGO_SETTINGS_MODULE")
    }
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen(
        example.command(port),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()

    def pump(stream=proc.stdout) -> None:  # reads the log until the process exits
        with stream:
            for line in stream:
                lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        seen: list[str] = []
        while not seen or example.ready not in seen[-1]:
            line = lines.get(timeout=30)
            if line is None:
                pytest.fail(f"the example exited before {example.ready!r}:\n{''.join(seen)}")
            seen.append(line)
        assert f"http://127.0.0.1:{port}" in "".join(seen)
        hooks = {"response": [structured_fields_parse]}
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}", timeout=10, event_hooks=hooks
        ) as client:
            yield client
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        reader.join(timeout=10)


def structured_fields_parse(response: httpx.Response) -> None:
    """Every quota header an example sends is read by a real Structured Fields parser
    (RFC 9651), which drops a whole header it cannot read."""
    for name in ("ratelimit-policy", "ratelimit"):
        for value in response.headers.get_list(name):
            http_sf.parse(value.encode(), tltype="list")
    if "retry-after" in response.headers:
        value, _ = http_sf.parse(response.headers["retry-after"].encode(), tltype="item")
        assert type(value) is int


def test_health_is_public(http):
    response = http.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_a_gated_route_needs_a_token(http):
    response = http.get("/projects")
    assert response.status_code == 401
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["type"] == PROBLEM_BASE + "unauthenticated"


def test_the_boolean_feature_is_refused_on_free_with_a_problem(http, auth):
    response = http.post("/reports/1/export", headers=auth("free", "acme"))
    assert response.status_code == 402
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["type"] == PROBLEM_BASE + "feature-not-in-plan"
    assert problem["feature"] == "export_reports"
    assert problem["plan"] == "free"
    assert problem["upgrade_url"] == "https://example.com/pricing"


def test_the_boolean_feature_is_granted_on_pro(http, auth):
    response = http.post("/reports/1/export", headers=auth("pro", "globex"))
    assert response.status_code == 200
    assert response.json() == {"report": "1", "status": "exporting"}


def test_free_allows_five_calls_in_ten_seconds_then_429_with_retry_after(http, auth):
    free = auth("free", "initech")
    for left in (4, 3, 2, 1, 0):
        response = http.get("/projects", headers=free)
        assert response.status_code == 200
        body = response.json()
        assert (body["customer"], body["plan"], body["max_projects"]) == ("initech", "free", 3)
        assert body["calls_left"] == left
        assert response.headers["RateLimit"].startswith(f'"api_calls-10s";r={left};')
    refused = http.get("/projects", headers=free)
    assert refused.status_code == 429
    assert refused.headers["content-type"] == PROBLEM
    assert 1 <= int(refused.headers["Retry-After"]) <= 11
    problem = refused.json()
    assert problem["type"] == PROBLEM_BASE + "quota-exceeded"
    assert problem["violated-policies"] == ["api_calls-10s"]
    assert problem["plan"] == "free"


def test_a_requirement_declared_on_the_view(http, auth):
    assert http.post("/reports/1/schedule").status_code == 401
    denied = http.post("/reports/1/schedule", headers=auth("free", "hooli"))
    assert denied.status_code == 402
    assert denied.headers["content-type"] == PROBLEM
    assert denied.json()["feature"] == "export_reports"
    allowed = http.post("/reports/1/schedule", headers=auth("pro", "hooli"))
    assert allowed.status_code == 200
    assert allowed.json() == {"report": "1", "schedule": "weekly", "plan": "pro"}
    assert allowed.headers["RateLimit"].startswith('"api_calls-10s";r=999;')


def test_the_ai_endpoint_charges_what_the_handler_records(http, auth):
    free = auth("free", "umbrella")
    response = http.post("/summarize", headers=free, content="a long text to summarize")
    assert response.status_code == 200
    assert response.json() == {"summary": "a long text to summarize", "tokens": 5}
    usage = http.get("/.plangate/entitlements", headers=free).json()
    assert usage["meters"]["ai_tokens"]["limits"][0]["used"] == 5  # not the 500 reserved
    assert usage["meters"]["api_calls"]["limits"][0]["used"] == 0


def test_unlimited_values_are_shown_as_unlimited(http, auth):
    body = http.get("/projects", headers=auth("enterprise", "massive")).json()
    assert body["max_projects"] == "unlimited"
    assert body["calls_left"] == "unlimited"


@pytest.mark.parametrize("example", ["fastapi"], indirect=True)
def test_fastapi_documents_plangates_responses_in_openapi(example, http):
    paths = http.get("/openapi.json").json()["paths"]
    assert {"401", "402", "429"} <= set(paths["/reports/{report_id}/schedule"]["post"]["responses"])
    assert {"401", "402", "429"} <= set(paths["/projects"]["get"]["responses"])
    assert "402" not in paths["/health"]["get"]["responses"]
