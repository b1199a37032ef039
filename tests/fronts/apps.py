"""The views of ``views.py`` as a Starlette, FastAPI, Flask and Django app.

This module is also the Django front's ``ROOT_URLCONF`` (``urlpatterns`` at the bottom).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from django.http import HttpRequest, HttpResponse, HttpResponseBase, StreamingHttpResponse
from django.urls import path as django_path
from fastapi import FastAPI
from flask import Flask, g
from flask import Response as FlaskResponse
from flask import request as flask_request
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from tests.fronts.views import ROUTES, Reply, Seen

View = Callable[[Seen], Reply]


def _customer(decision: Any) -> str | None:
    return getattr(decision, "customer", None)


def _angled(template: str) -> str:
    """``/v1/status/{code}`` as werkzeug and Django write it: ``/v1/status/<code>``."""
    return re.sub(r"\{(\w+)\}", r"<\1>", template)


# Starlette and FastAPI ----------------------------------------------------------------------

CustomerOf = Callable[[Request], str | None]


def decision_customer(request: Request) -> str | None:
    """The customer of ``request.state.plangate`` (SPEC §5)."""
    return _customer(getattr(request.state, "plangate", None))


def header_customer(request: Request) -> str | None:
    """The customer a gateway tells its upstream in ``X-Plangate-Customer``."""
    return request.headers.get("x-plangate-customer")


def _starlette_endpoint(view: View, customer_of: CustomerOf) -> Callable[..., Any]:
    async def endpoint(request: Request) -> Response:
        seen = Seen(
            params={k: str(v) for k, v in request.path_params.items()},
            query=list(request.query_params.multi_items()),
            headers=list(request.headers.items()),
            customer=customer_of(request),
        )
        reply = view(seen)
        response: Response
        if reply.stream is not None:
            response = StreamingResponse(reply.stream, status_code=reply.status)
        else:
            response = Response(reply.body, status_code=reply.status)
        for name, value in reply.headers:
            response.headers.append(name, value)
        return response

    return endpoint


def starlette_app(customer_of: CustomerOf = decision_customer) -> Starlette:
    return Starlette(
        routes=[Route(t, _starlette_endpoint(view, customer_of)) for t, view in ROUTES]
    )


def fastapi_routes(app: FastAPI) -> FastAPI:
    for template, view in ROUTES:
        app.add_api_route(template, _starlette_endpoint(view, decision_customer), methods=["GET"])
    return app


# Flask ------------------------------------------------------------------------------------


def environ_customer() -> str | None:
    """The customer of ``environ["plangate"]`` (SPEC §5, WSGI)."""
    return _customer(flask_request.environ.get("plangate"))


def g_customer() -> str | None:
    """The customer of ``g.plangate`` (the Flask adapter)."""
    return _customer(g.get("plangate"))


def flask_app(customer_of: Callable[[], str | None]) -> Flask:
    app = Flask(__name__)

    def translate(view: View) -> Callable[..., FlaskResponse]:
        def flask_view(**params: str) -> FlaskResponse:
            seen = Seen(
                params=params,
                query=list(flask_request.args.items(multi=True)),
                headers=list(flask_request.headers.items()),
                customer=customer_of(),
            )
            reply = view(seen)
            body = reply.stream if reply.stream is not None else reply.body
            return FlaskResponse(body, status=reply.status, headers=reply.headers)

        return flask_view

    for template, view in ROUTES:
        app.add_url_rule(_angled(template), template, translate(view), methods=["GET"])
    return app


# Django -----------------------------------------------------------------------------------


def _django_view(view: View) -> Callable[..., HttpResponseBase]:
    def django_view(request: HttpRequest, **params: str) -> HttpResponseBase:
        seen = Seen(
            params=params,
            query=[(k, v) for k, values in request.GET.lists() for v in values],
            headers=list(request.headers.items()),
            customer=_customer(getattr(request, "plangate", None)),
        )
        reply = view(seen)
        response: HttpResponseBase
        if reply.stream is not None:
            response = StreamingHttpResponse(reply.stream, status=reply.status)
        else:
            response = HttpResponse(reply.body, status=reply.status)
        fields: dict[str, list[str]] = {}
        for name, value in reply.headers:
            fields.setdefault(name, []).append(value)
        for name, values in fields.items():
            # Django's response headers are a mapping, one field per name: repeated fields
            # go out as one, comma-joined, which RFC 9110 §5.3 makes the same thing.
            response.headers[name] = ", ".join(values)
        return response

    return django_view


urlpatterns = [django_path(_angled(t).lstrip("/"), _django_view(view)) for t, view in ROUTES]
