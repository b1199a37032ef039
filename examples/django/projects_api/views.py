"""The API. plangate_django.PlanGateMiddleware enforces plangate.yaml's routes: before these
views run, and puts its decision on ``request.plangate``."""

from __future__ import annotations

import math
from typing import Any

from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET, require_POST

from plangate_django import requires

PROJECTS = [{"id": 1, "name": "website"}, {"id": 2, "name": "mobile app"}]


def shown(value: Any) -> Any:
    """An unlimited value or quota as GET /.plangate/entitlements shows it (JSON has no inf)."""
    return "unlimited" if value == math.inf else value


@require_GET
def health(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


@require_GET
def list_projects(request: HttpRequest) -> JsonResponse:
    decision = request.plangate  # type: ignore[attr-defined]  # GET /projects is a rule
    return JsonResponse(
        {
            "customer": decision.customer,
            "plan": decision.plan,
            "projects": PROJECTS,
            "max_projects": shown(decision.value("max_projects")),
            "calls_left": shown(decision.remaining("api_calls")),
        }
    )


@require_POST
def export_report(request: HttpRequest, report_id: str) -> JsonResponse:
    return JsonResponse({"report": report_id, "status": "exporting"})


# Declared on the view instead of in plangate.yaml: same checks, same problem responses.
@require_POST
@requires("export_reports", meters={"api_calls": 1})
def schedule_report(request: HttpRequest, report_id: str) -> JsonResponse:
    plan = request.plangate.plan  # type: ignore[attr-defined]
    return JsonResponse({"report": report_id, "schedule": "weekly", "plan": plan})


@require_POST
async def summarize(request: HttpRequest) -> JsonResponse:
    """An async view, as one that awaits a model API would be."""
    words = request.body.decode().split()
    tokens = max(1, len(words))  # what the model call reported
    # charged instead of the 500 tokens plangate.yaml reserves for POST /summarize
    request.plangate.record("ai_tokens", tokens)  # type: ignore[attr-defined]
    return JsonResponse({"summary": " ".join(words[:5]), "tokens": tokens})
