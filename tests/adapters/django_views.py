"""The Django views and URLs that tests/adapters/test_django.py runs plangate in front of."""

from __future__ import annotations

import json

from django.http import HttpRequest, JsonResponse, StreamingHttpResponse
from django.urls import path

from plangate_django import requires


def health(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


def export(request: HttpRequest, report_id: str) -> JsonResponse:
    return JsonResponse({"report": report_id, "customer": request.plangate.customer})


def projects(request: HttpRequest) -> JsonResponse:
    gate = request.plangate
    return JsonResponse({"plan": gate.plan, "left": gate.remaining("api_calls")})


async def async_projects(request: HttpRequest) -> JsonResponse:
    gate = request.plangate
    return JsonResponse({"plan": gate.plan, "left": gate.remaining("api_calls")})


# Views that no rule of the config matches: their requirements are declared here.
@requires("export_reports")
def view_export(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"exported": True, "plan": request.plangate.plan})


@requires(meters={"ai_tokens": 100})
def summarize(request: HttpRequest) -> JsonResponse:
    tokens = 10 * len(request.body.split())
    request.plangate.record("ai_tokens", tokens)
    return JsonResponse({"tokens": tokens})


@requires(meters={"ai_tokens": 100})
async def async_summarize(request: HttpRequest) -> JsonResponse:
    tokens = 10 * len(json.loads(request.body or b"{}").get("prompt", "").split())
    request.plangate.record("ai_tokens", tokens)
    return JsonResponse({"tokens": tokens})


@requires(meters={"ai_tokens": 100})
def stream(request: HttpRequest) -> StreamingHttpResponse:
    def words():  # an answer streamed out; its size is known at the end
        yield from (b"once ", b"upon ", b"a time")
        request.plangate.record("ai_tokens", 1234)

    return StreamingHttpResponse(words())


def plangate_headers(request: HttpRequest) -> JsonResponse:
    seen = {k: v for k, v in request.headers.items() if k.lower().startswith("x-plangate")}
    return JsonResponse(seen)


urlpatterns = [
    path("v1/headers", plangate_headers),
    path("views/stream", stream),
    path("health", health),
    path("v1/reports/<str:report_id>/export", export),
    path("v1/projects", projects),
    path("v1/async-projects", async_projects),
    path("views/export", view_export),
    path("views/summarize", summarize),
    path("views/async-summarize", async_summarize),
]
