"""Helpers shared by the tests: configs, tokens, a real uvicorn server on a free port."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import jwt
import uvicorn

#: A copy of ../shared/examples/plangate.yaml, the reference config the core must load;
#: tests/config/test_load.py checks that the copy matches it wherever ../shared exists.
REFERENCE = Path(__file__).parent / "config" / "reference" / "plangate.yaml"
SHARED_REFERENCE = Path(__file__).parents[2] / "shared" / "examples" / "plangate.yaml"

SECRET = "a-test-secret-that-is-long-enough-for-hs256"
ISSUER = "https://auth.test/"
AUDIENCE = "test-api"

BASE_CONFIG: dict[str, Any] = {
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
        "max_projects": {"kind": "config"},
        "api_calls": {"kind": "metered", "unit": "call"},
        "ai_tokens": {"kind": "metered", "unit": "token"},
    },
    "plans": {
        "free": {
            "features": {
                "max_projects": 3,
                "api_calls": {"limit": 5, "window": "1m"},
                "ai_tokens": {"limit": 10000, "period": "month"},
            }
        },
        "pro": {
            "extends": "free",
            "features": {
                "export_reports": True,
                "max_projects": 50,
                "api_calls": {"limit": 1000, "window": "1m"},
            },
        },
        "enterprise": {
            "extends": "pro",
            "features": {
                "max_projects": "unlimited",
                "api_calls": "unlimited",
                "ai_tokens": "unlimited",
            },
        },
    },
    "default_plan": "free",
    "routes": [
        {"match": "GET /health", "public": True},
        {
            "match": "POST /v1/reports/{report_id}/export",
            "feature": "export_reports",
            "meters": {"api_calls": 1},
        },
        {
            "match": "POST /v1/completions",
            "meters": {
                "api_calls": 1,
                "ai_tokens": {"response_header": "X-Usage-Tokens", "estimate": 100},
            },
        },
        {"match": "POST /v1/chat", "meters": {"api_calls": 1, "ai_tokens": 100}},
        {"match": "POST /v1/stream", "meters": {"ai_tokens": 100}},
        {"match": "/v1/{rest:path}", "meters": {"api_calls": 1}},
    ],
    "responses": {"upgrade_url": "https://example.test/pricing"},
}


class Clock:
    """A clock the test moves instead of waiting: ``clock.now`` is the time."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def config(**changes: Any) -> dict[str, Any]:
    """A deep copy of BASE_CONFIG with top-level keys replaced."""
    result = copy.deepcopy(BASE_CONFIG)
    result.update(changes)
    return result


def token(
    customer: str | None = "acme",
    plan: str | None = None,
    *,
    secret: str = SECRET,
    algorithm: str = "HS256",
    ttl: float = 600,
    **claims: Any,
) -> str:
    now = time.time()
    body: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "iat": int(now), "exp": int(now + ttl)}
    if customer is not None:
        body["org_id"] = customer
    if plan is not None:
        body["plan"] = plan
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode(body, secret, algorithm=algorithm)


def bearer(customer: str | None = "acme", plan: str | None = None, **kwargs: Any) -> dict[str, str]:
    return {"authorization": f"Bearer {token(customer, plan, **kwargs)}"}


@contextlib.contextmanager
def serve_asgi(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port; yields the base URL.

    The socket is bound and listening before the server thread starts, so the first
    request queues in the backlog instead of racing the server's start-up.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@contextlib.contextmanager
def serve_wsgi(app: Any) -> Iterator[str]:
    """Serve a WSGI ``app`` with werkzeug's threaded server on a free loopback port."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()


def load_module(path: Path, name: str) -> ModuleType:
    """The module in ``path`` (an example's app.py), loaded under ``name``."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def configure_django() -> None:
    """Django is configured once per process, by whichever test module comes first: these
    settings serve tests/adapters/test_django.py, and each Django front of tests/fronts
    overrides ``PLANGATE`` per test."""
    import django
    from django.conf import settings

    if settings.configured:
        return
    settings.configure(
        DEBUG=False,
        SECRET_KEY="plangate-tests",
        ALLOWED_HOSTS=["*"],
        ROOT_URLCONF="tests.adapters.django_views",
        INSTALLED_APPS=["plangate_django"],
        MIDDLEWARE=["plangate_django.PlanGateMiddleware"],
        PLANGATE={"CONFIG": config()},
    )
    django.setup()


#: the members of a credit grant as the admin API, the CLI and the Python API show it
GRANT_KEYS = {
    "id",
    "feature",
    "amount",
    "remaining",
    "category",
    "priority",
    "source",
    "effective_at",
    "expires_at",
    "created_at",
    "idempotency_key",
}
