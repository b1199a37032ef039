"""The example API that ``plangate demo`` serves, with the admin API under ``/admin``."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from .._gate import AsyncGate
from ..admin import AdminAPI
from ..asgi import PlanGateMiddleware

CONFIG = Path(__file__).with_name("plangate.yaml")


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def export_report(request: Request) -> JSONResponse:
    report_id = request.path_params["report_id"]
    return JSONResponse({"report": report_id, "export": f"/downloads/{report_id}.csv"})


async def completions(request: Request) -> JSONResponse:
    raw = await request.body()
    try:
        body: Any = json.loads(raw) if raw else {}
    except ValueError:  # any body is a prompt: a text one is taken as it is
        body = {"prompt": raw.decode("utf-8", errors="replace")}
    prompt = str(body.get("prompt", "hello")) if isinstance(body, dict) else "hello"
    tokens = 10 * len(prompt.split()) + 50  # what a model call would report
    return JSONResponse(
        {"completion": "…", "usage": {"tokens": tokens}}, headers={"X-Usage-Tokens": str(tokens)}
    )


async def images(request: Request) -> JSONResponse:
    """An AI image, paid in credits: what it cost and what is left."""
    gate = request.state.plangate
    return JSONResponse(
        {"image": "/downloads/image.png", "credits_left": gate.balance("ai_credits")}
    )


async def projects(request: Request) -> JSONResponse:
    gate = request.state.plangate
    return JSONResponse(
        {
            "customer": gate.customer,
            "plan": gate.plan,
            "max_projects": _number(gate.value("max_projects")),
            "api_calls_left": _number(gate.remaining("api_calls")),
        }
    )


def _number(value: Any) -> Any:
    """JSON has no infinity: an unlimited value is written "unlimited"."""
    return "unlimited" if value == math.inf else value


def create_app(config: str | Path = CONFIG, storage: str | None = None) -> Starlette:
    """The API behind plangate, and the admin API beside it (outside the middleware: its
    requests are not metered) on the same gate, so the same store: a customer changed
    through ``/admin`` is decided on by the API's next request."""
    gate = AsyncGate(config, storage=storage)
    api = Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/reports/{report_id}/export", export_report, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/images", images, methods=["POST"]),
            Route("/v1/projects", projects),
        ]
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # what the middleware does when it is the outermost app: Starlette does not pass
        # the lifespan on to mounted apps
        await gate.check_storage()
        try:
            yield
        finally:
            await gate.storage.aclose()

    return Starlette(
        routes=[
            Mount("/admin", app=AdminAPI(gate)),
            Mount("", app=PlanGateMiddleware(api, gate.config, gate=gate)),
        ],
        lifespan=lifespan,
    )
