"""A plain WSGI API (werkzeug, no framework) behind plangate.

Run: python examples/wsgi/app.py [--host 127.0.0.1] [--port 8001]
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map, Rule
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from plangate.config import Config
from plangate.storage import Storage
from plangate.wsgi import PlanGateMiddleware

HERE = Path(__file__).parent

urls = Map(
    [
        Rule("/health", endpoint="health", methods=["GET"]),
        Rule("/projects", endpoint="projects", methods=["GET"]),
        Rule("/reports/<report_id>/export", endpoint="export_report", methods=["POST"]),
        Rule("/summarize", endpoint="summarize", methods=["POST"]),
    ]
)


def json_response(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, content_type="application/json")


def health(request: Request) -> Response:
    return json_response({"status": "ok"})


def projects(request: Request) -> Response:
    gate = request.environ["plangate"]
    return json_response(
        {
            "plan": gate.plan,
            "max_projects": gate.value("max_projects"),
            "calls_left": gate.remaining("api_calls"),
        }
    )


def export_report(request: Request, report_id: str) -> Response:
    return json_response({"report": report_id, "status": "exporting"})


def summarize(request: Request) -> Response:
    gate = request.environ["plangate"]
    words = request.get_data(as_text=True).split()
    tokens = max(1, len(words))  # what the model call reported
    gate.record("ai_tokens", tokens)  # charged instead of the 500 reserved in plangate.yaml
    return json_response({"summary": " ".join(words[:5]), "tokens": tokens})


HANDLERS: dict[str, Callable[..., Response]] = {
    "health": health,
    "projects": projects,
    "export_report": export_report,
    "summarize": summarize,
}


def api(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    request = Request(environ)
    response: Response
    try:
        endpoint, args = urls.bind_to_environ(environ).match()
        response = HANDLERS[endpoint](request, **args)
    except HTTPException as exc:
        response = exc.get_response(environ)
    return response(environ, start_response)


def create_app(
    config: str | os.PathLike[str] | Mapping[str, Any] | Config = HERE / "plangate.yaml",
    storage: str | Storage | None = None,
) -> PlanGateMiddleware:
    """The API wrapped in plangate: ``config`` is a path or a loaded config, ``storage`` a
    URI or store that overrides the config's."""
    return PlanGateMiddleware(api, config=config, storage=storage)


app = create_app()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The plangate WSGI example API.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args(argv)
    server = make_server(args.host, args.port, app)
    print(f"Serving on http://{args.host}:{server.server_port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
