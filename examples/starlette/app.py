"""A Starlette API behind plangate. Run: uvicorn app:app --port 8000 (from this folder)."""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from plangate.asgi import PlanGateMiddleware

HERE = Path(__file__).parent


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def projects(request: Request) -> JSONResponse:
    gate = request.state.plangate
    limit = gate.value("max_projects")
    return JSONResponse(
        {"plan": gate.plan, "max_projects": limit, "calls_left": gate.remaining("api_calls")}
    )


async def export_report(request: Request) -> JSONResponse:
    return JSONResponse({"report": request.path_params["report_id"], "status": "exporting"})


async def summarize(request: Request) -> JSONResponse:
    text = (await request.body()).decode()
    tokens = max(1, len(text.split()))  # what the model call reported
    summary = " ".join(text.split()[:5])
    # Either a response header (declared in plangate.yaml) or gate.record("ai_tokens", n).
    return JSONResponse({"summary": summary}, headers={"X-Usage-Tokens": str(tokens)})


app = Starlette(
    routes=[
        Route("/health", health),
        Route("/projects", projects),
        Route("/reports/{report_id}/export", export_report, methods=["POST"]),
        Route("/summarize", summarize, methods=["POST"]),
    ]
)
app.add_middleware(PlanGateMiddleware, config=HERE / "plangate.yaml")
