"""The app the reload tests run under uvicorn, in processes of its own: the config is the file
``$PLANGATE_CONFIG``; ``/admin/config`` tells which version serves (admin token
``an-admin-token``)."""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from plangate.admin import AdminAPI
from plangate.asgi import PlanGateMiddleware


async def ok(request: Request) -> JSONResponse:
    return JSONResponse({"pid": os.getpid()})


inner = Starlette(routes=[Route("/v1/{rest:path}", ok)])
app = PlanGateMiddleware(inner, os.environ["PLANGATE_CONFIG"])
inner.router.routes.append(Mount("/admin", app=AdminAPI(app.gate)))
