from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from hypothesis import settings

from plangate import asgi, wsgi
from tests.middleware.apps import asgi_app, wsgi_app
from tests.servers import RedisCluster, RedisSentinel, RedisServer, running
from tests.support import serve_asgi, serve_wsgi

Serve = Callable[..., httpx.Client]


@pytest.fixture(params=["asgi", "wsgi"])
def serve(request: pytest.FixtureRequest) -> Iterator[Serve]:
    """``serve(config, **middleware_kwargs)`` → an httpx client for the test API behind
    plangate, served by uvicorn (ASGI) or werkzeug (WSGI)."""
    stack = contextlib.ExitStack()

    def start(config: Any, **kwargs: Any) -> httpx.Client:
        if request.param == "asgi":
            url = stack.enter_context(
                serve_asgi(asgi.PlanGateMiddleware(asgi_app(), config, **kwargs))
            )
        else:
            url = stack.enter_context(
                serve_wsgi(wsgi.PlanGateMiddleware(wsgi_app, config, **kwargs))
            )
        return stack.enter_context(httpx.Client(base_url=url, timeout=10))

    with stack:
        yield start


# Real Redis servers, started once per test session on free loopback ports -----------------


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    with running(server):
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    cluster = RedisCluster()
    with running(cluster):
        yield cluster


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[RedisSentinel]:
    sentinel = RedisSentinel()
    with running(sentinel):
        yield sentinel


# Hypothesis explores new examples on every developer run; CI replays a fixed set, so that a
# green build stays green (anything hypothesis finds locally is fixed, then kept as a test).
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
