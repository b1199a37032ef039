"""One small API, written for ASGI (Starlette) and for WSGI (werkzeug), to put plangate in front of."""

from __future__ import annotations

import math
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route
from werkzeug.exceptions import HTTPException, NotFound
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request as WRequest
from werkzeug.wrappers import Response as WResponse


class Boom(Exception):
    """What the /v1/boom handler raises."""


def describe(gate: Any) -> dict[str, Any]:
    remaining = gate.remaining("api_calls")
    return {
        "customer": gate.customer,
        "plan": gate.plan,
        "export_reports": gate.has("export_reports"),
        "max_projects": "unlimited"
        if gate.value("max_projects") == math.inf
        else gate.value("max_projects"),
        "api_calls_left": "unlimited" if remaining == math.inf else remaining,
    }


def _left(gate: Any) -> Any:
    left = gate.remaining("api_calls")
    return "unlimited" if left == math.inf else left


# ASGI ------------------------------------------------------------------------------------


async def a_health(request: Request) -> PlainTextResponse:
    return PlainTextResponse("up")


async def a_export(request: Request) -> JSONResponse:
    gate = request.state.plangate
    return JSONResponse({"report": request.path_params["report_id"], "customer": gate.customer})


async def a_completions(request: Request) -> PlainTextResponse:
    return PlainTextResponse("done", headers={"X-Usage-Tokens": request.query_params["tokens"]})


async def a_chat(request: Request) -> PlainTextResponse:
    request.state.plangate.record("ai_tokens", int(request.query_params["tokens"]))
    return PlainTextResponse("done")


async def a_projects(request: Request) -> JSONResponse:
    return JSONResponse(describe(request.state.plangate))


async def a_status(request: Request) -> PlainTextResponse:
    return PlainTextResponse("status", status_code=int(request.path_params["code"]))


async def a_stream(request: Request) -> StreamingResponse:
    gate = request.state.plangate
    tokens = int(request.query_params["tokens"])

    async def chunks():  # an AI answer streamed out; its size is known at the end
        for word in ("once ", "upon ", "a time"):
            yield word.encode()
        gate.record("ai_tokens", tokens)

    return StreamingResponse(chunks())


async def a_whoami(request: Request) -> JSONResponse:
    gate = request.state.plangate
    return JSONResponse({"customer": gate.customer, "left": _left(gate)})


async def a_headers(request: Request) -> JSONResponse:
    return JSONResponse({k: v for k, v in request.headers.items() if k.startswith("x-plangate")})


async def a_boom(request: Request) -> PlainTextResponse:
    raise Boom("the handler failed")


def asgi_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/health", a_health),
            Route("/v1/reports/{report_id}/export", a_export, methods=["POST"]),
            Route("/v1/completions", a_completions, methods=["POST"]),
            Route("/v1/chat", a_chat, methods=["POST"]),
            Route("/v1/projects", a_projects),
            Route("/v1/status/{code}", a_status),
            Route("/v1/boom", a_boom),
            Route("/v1/stream", a_stream, methods=["POST"]),
            Route("/v1/whoami", a_whoami),
            Route("/v1/headers", a_headers),
        ]
    )


# WSGI ------------------------------------------------------------------------------------

_urls = Map(
    [
        Rule("/health", endpoint="health"),
        Rule("/v1/reports/<report_id>/export", endpoint="export", methods=["POST"]),
        Rule("/v1/completions", endpoint="completions", methods=["POST"]),
        Rule("/v1/chat", endpoint="chat", methods=["POST"]),
        Rule("/v1/projects", endpoint="projects"),
        Rule("/v1/status/<int:code>", endpoint="status"),
        Rule("/v1/boom", endpoint="boom"),
        Rule("/v1/stream", endpoint="stream", methods=["POST"]),
        Rule("/v1/whoami", endpoint="whoami"),
        Rule("/v1/headers", endpoint="headers"),
    ]
)


def _dispatch(request: WRequest) -> WResponse:
    gate = request.environ.get("plangate")
    endpoint, args = _urls.bind_to_environ(request.environ).match()
    if endpoint == "health":
        return WResponse("up")
    if endpoint == "export":
        body = {"report": args["report_id"], "customer": gate.customer}
        return WResponse(_json(body), content_type="application/json")
    if endpoint == "completions":
        return WResponse("done", headers={"X-Usage-Tokens": request.args["tokens"]})
    if endpoint == "chat":
        gate.record("ai_tokens", int(request.args["tokens"]))
        return WResponse("done")
    if endpoint == "projects":
        return WResponse(_json(describe(gate)), content_type="application/json")
    if endpoint == "status":
        return WResponse("status", status=args["code"])
    if endpoint == "boom":
        raise Boom("the handler failed")
    if endpoint == "stream":
        tokens = int(request.args["tokens"])

        def chunks():
            yield from (b"once ", b"upon ", b"a time")
            gate.record("ai_tokens", tokens)

        return WResponse(chunks())
    if endpoint == "headers":
        seen = {
            k.lower(): v for k, v in request.headers.items() if k.lower().startswith("x-plangate")
        }
        return WResponse(_json(seen), content_type="application/json")
    if endpoint == "whoami":
        body = {"customer": gate.customer, "left": _left(gate)}
        return WResponse(_json(body), content_type="application/json")
    raise NotFound()  # pragma: no cover


def _json(body: Any) -> str:
    import json

    return json.dumps(body)


def wsgi_app(environ: dict[str, Any], start_response: Any) -> Any:
    request = WRequest(environ)
    try:
        response = _dispatch(request)
    except HTTPException as exc:
        response = exc.get_response()
    return response(environ, start_response)
