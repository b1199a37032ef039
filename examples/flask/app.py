"""A Flask API behind plangate (adapters/plangate_flask).

Run (from the repository root): python examples/flask/app.py [--port 8003]
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flask import Blueprint, Flask, g, request

from plangate.config import Config
from plangate_flask import PlanGate

HERE = Path(__file__).parent

gate = PlanGate()  # bound to an app by create_app(), as Flask extensions are
api = Blueprint("api", __name__)

PROJECTS = [{"id": 1, "name": "website"}, {"id": 2, "name": "mobile app"}]


def shown(value: Any) -> Any:
    """An unlimited value or quota as GET /.plangate/entitlements shows it (JSON has no inf)."""
    return "unlimited" if value == math.inf else value


@api.get("/health")
def health() -> dict[str, Any]:
    return {"status": "ok"}


@api.get("/projects")
def list_projects() -> dict[str, Any]:
    decision = g.plangate  # GET /projects is a rule of plangate.yaml
    return {
        "customer": decision.customer,
        "plan": decision.plan,
        "projects": PROJECTS,
        "max_projects": shown(decision.value("max_projects")),
        "calls_left": shown(decision.remaining("api_calls")),
    }


@api.post("/reports/<report_id>/export")
def export_report(report_id: str) -> dict[str, Any]:
    return {"report": report_id, "status": "exporting"}


# Declared on the view instead of in plangate.yaml: same checks, same problem responses.
@api.post("/reports/<report_id>/schedule")
@gate.requires("export_reports", meters={"api_calls": 1})
def schedule_report(report_id: str) -> dict[str, Any]:
    return {"report": report_id, "schedule": "weekly", "plan": g.plangate.plan}


@api.post("/summarize")
def summarize() -> dict[str, Any]:
    words = request.get_data(as_text=True).split()
    tokens = max(1, len(words))  # what the model call reported
    g.plangate.record("ai_tokens", tokens)  # charged instead of the 500 reserved in plangate.yaml
    return {"summary": " ".join(words[:5]), "tokens": tokens}


def create_app(
    config: str | os.PathLike[str] | Mapping[str, Any] | Config = HERE / "plangate.yaml",
) -> Flask:
    app = Flask(__name__)
    app.config["PLANGATE_CONFIG"] = config
    gate.init_app(app)
    app.register_blueprint(api)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The plangate Flask example API.")
    parser.add_argument("--port", type=int, default=8003)
    args = parser.parse_args(argv)
    create_app().run(host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
