"""A FastAPI API behind plangate (adapters/plangate_fastapi).

Run (from the repository root): python examples/fastapi/app.py [--port 8002]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, Request

from plangate_fastapi import PlanGate, PlanGateDecision, requires

HERE = Path(__file__).parent

app = FastAPI(title="Projects API", summary="The plangate FastAPI example.")
# Enforces plangate.yaml's routes: before routing, and documents 401/402/429 in /docs.
PlanGate(app, config=HERE / "plangate.yaml")

PROJECTS = [{"id": 1, "name": "website"}, {"id": 2, "name": "mobile app"}]


def shown(value: Any) -> Any:
    """An unlimited value or quota as GET /.plangate/entitlements shows it (JSON has no inf)."""
    return "unlimited" if value == math.inf else value


@app.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/projects")
def list_projects(decision: PlanGateDecision) -> dict[str, Any]:
    assert decision is not None  # GET /projects is a rule of plangate.yaml
    return {
        "customer": decision.customer,
        "plan": decision.plan,
        "projects": PROJECTS,
        "max_projects": shown(decision.value("max_projects")),
        "calls_left": shown(decision.remaining("api_calls")),
    }


@app.post("/reports/{report_id}/export")
def export_report(report_id: str) -> dict[str, str]:
    return {"report": report_id, "status": "exporting"}


# Declared on the operation instead of in plangate.yaml: same checks, same problem responses.
@app.post(
    "/reports/{report_id}/schedule",
    dependencies=[Depends(requires("export_reports", meters={"api_calls": 1}))],
)
def schedule_report(report_id: str, decision: PlanGateDecision) -> dict[str, Any]:
    assert decision is not None  # set by the requires() dependency, which runs first
    return {"report": report_id, "schedule": "weekly", "plan": decision.plan}


@app.post("/summarize")
async def summarize(request: Request, decision: PlanGateDecision) -> dict[str, Any]:
    assert decision is not None  # POST /summarize is a rule of plangate.yaml
    words = (await request.body()).decode().split()
    tokens = max(1, len(words))  # what the model call reported
    decision.record("ai_tokens", tokens)  # charged instead of the 500 reserved in plangate.yaml
    return {"summary": " ".join(words[:5]), "tokens": tokens}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The plangate FastAPI example API.")
    parser.add_argument("--port", type=int, default=8002)
    args = parser.parse_args(argv)
    uvicorn.run(app, host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
