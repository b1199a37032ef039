"""The app tests/observability/test_metrics_multiprocess.py serves under gunicorn: the test
config behind ``PlanGateMiddleware`` on memory storage (each worker its own counters),
``/metrics`` answering for every worker, and each response naming the worker that sent it
(``x-worker``). gunicorn imports it in each worker, with ``PROMETHEUS_MULTIPROC_DIR`` set
in its environment before ``prometheus_client`` is imported."""

from __future__ import annotations

import os
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from plangate.asgi import PlanGateMiddleware
from plangate.metrics import instrument, metrics_app
from tests.support import config

assert os.environ.get("PROMETHEUS_MULTIPROC_DIR"), "the metrics of every worker are the test"


async def projects(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def naming_the_worker(app: Any) -> Any:
    async def named(scope: Any, receive: Any, send: Any) -> None:
        async def send_named(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", ()), (b"x-worker", str(os.getpid()).encode())]
                message = {**message, "headers": headers}
            await send(message)

        await app(scope, receive, send_named)

    return named


settings = config()
settings["routes"] = [{"match": "GET /metrics", "public": True}, *settings["routes"]]
api = Starlette(routes=[Route("/metrics", metrics_app()), Route("/v1/projects", projects)])
gated = PlanGateMiddleware(api, settings, storage="memory://")
instrument(gated.gate)
app = naming_the_worker(gated)
