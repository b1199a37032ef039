"""Six front ends, one client interface: a new front end is one ``Front`` row in ``FRONTS``.

``front.start(config, storage)`` puts plangate (``config``, a dict; counters in ``storage``) in
front of the views of ``views.py`` and returns a ``Client``. Every client is in process:
Starlette's TestClient for ASGI, a few lines of WSGI server for WSGI (so that a request path
like ``//x`` reaches the app as it was sent), and the gateway played by ``GatewayClient``.

A new front end: serve ``views.ROUTES`` in its framework (``apps.py``), write its
``start(config, storage)`` (an ASGI or WSGI app goes to ``ASGIClient``/``WSGIClient`` as it
is), and add its row to ``FRONTS``; every test of tests/fronts then runs on it.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote

import anyio
import httpx
import yaml
from starlette.testclient import TestClient
from werkzeug.test import EnvironBuilder

from plangate import Storage
from tests.fronts import apps
from tests.support import configure_django

BASE_URL = "http://testserver"
ENTITLEMENTS_PATH = "/.plangate/entitlements"
Headers = Mapping[str, str] | None


@dataclass
class Response:
    """What the client got. ``headers`` is case-insensitive and multi-valued (``get_list``)."""

    status: int
    headers: httpx.Headers
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Client(Protocol):
    #: the ways this front's server can learn that the client went away (see ``hang_up``)
    hang_up_ways: tuple[str, ...]

    def request(self, method: str, path: str, headers: Headers = None) -> Response: ...

    def hang_up(self, method: str, path: str, headers: Headers = None, *, way: str) -> Response:
        """Send the request; the client goes away once the first chunk of the body arrived."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Front:
    name: str
    start: Callable[[dict[str, Any], Storage], Client]
    #: the front learns how a request went only from the upstream's status, as a gateway does
    #: (not whether the handler raised, nor whether the body was cut off)
    sees_only_status: bool = False
    #: the front tells the views who the customer is, in X-Plangate-* request headers
    tells_the_views: bool = False


# ASGI: raw middleware over Starlette, FastAPI ----------------------------------------------


class ASGIClient:
    """Starlette's TestClient; ``hang_up`` speaks ASGI itself, as a server whose client left.

    ``disconnect``: uvicorn's way (ASGI spec 2.3): ``receive`` says ``http.disconnect`` and
    whatever is sent afterwards is dropped. ``send-raises``: spec 2.4: ``send`` raises
    ``OSError`` (uvicorn's ``ClientDisconnected`` is one).
    """

    hang_up_ways = ("disconnect", "send-raises")

    def __init__(self, app: Any) -> None:
        self.app = app
        self.http = TestClient(app, raise_server_exceptions=False)
        self.http.__enter__()

    def request(self, method: str, path: str, headers: Headers = None) -> Response:
        return _received(self.http.request(method, BASE_URL + path, headers=dict(headers or {})))

    def hang_up(self, method: str, path: str, headers: Headers = None, *, way: str) -> Response:
        assert self.http.portal is not None
        return self.http.portal.call(_asgi_hang_up, self.app, method, path, headers or {}, way)

    def close(self) -> None:
        self.http.__exit__(None, None, None)


async def _asgi_hang_up(
    app: Any, method: str, path: str, headers: Mapping[str, str], way: str
) -> Response:
    raw_path, _, query = path.partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4" if way == "send-raises" else "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": unquote(raw_path),
        "raw_path": raw_path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [
            (b"host", b"testserver"),
            *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()),
        ],
        "client": ("testclient", 50000),
        "server": ("testserver", 80),
    }
    gone = anyio.Event()
    asked = False
    start: dict[str, Any] = {}
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if gone.is_set():
            if way == "send-raises":
                raise OSError("the client went away")
            return
        if message["type"] == "http.response.start":
            start.update(message)
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if chunks[-1]:
                gone.set()

    # What the app raises now (the server's own OSError coming back) the server logs.
    with contextlib.suppress(Exception):
        await app(scope, receive, send)
    headers_out = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in start["headers"]]
    return Response(start["status"], httpx.Headers(headers_out), b"".join(chunks))


def start_asgi(config: dict[str, Any], storage: Storage) -> Client:
    from plangate.asgi import PlanGateMiddleware

    return ASGIClient(PlanGateMiddleware(apps.starlette_app(), config=config, storage=storage))


def start_fastapi(config: dict[str, Any], storage: Storage) -> Client:
    from fastapi import FastAPI

    from plangate_fastapi import PlanGate

    app = FastAPI()
    PlanGate(app, config=config, storage=storage)
    return ASGIClient(apps.fastapi_routes(app))


# WSGI: raw middleware over Flask, the Flask adapter, Django --------------------------------


class WSGIClient:
    """A WSGI server in a few lines: the request path reaches the app as sent (``//x``), and
    the body is read as a server reads it (``close()`` afterwards, also when cut off)."""

    hang_up_ways = ("close",)

    def __init__(self, app: Any, on_close: Callable[[], None] | None = None) -> None:
        self.app = app
        self._on_close = on_close

    def request(self, method: str, path: str, headers: Headers = None) -> Response:
        return self._serve(method, path, headers, hang_up=False)

    def hang_up(self, method: str, path: str, headers: Headers = None, *, way: str) -> Response:
        return self._serve(method, path, headers, hang_up=True)

    def close(self) -> None:
        if self._on_close is not None:
            self._on_close()

    def _serve(self, method: str, path: str, headers: Headers, *, hang_up: bool) -> Response:
        raw_path, _, query = path.partition("?")
        environ = EnvironBuilder(
            method=method, path="/", query_string=query, headers=list((headers or {}).items())
        ).get_environ()
        environ["PATH_INFO"] = unquote(raw_path).encode().decode("latin-1")
        environ["REQUEST_URI"] = environ["RAW_URI"] = path
        started: list[Any] = []

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None):
            started[:] = [int(status[:3]), headers]
            return lambda data: None

        try:
            result = self.app(environ, start_response)
        except Exception:  # the server answers 500 itself
            return Response(500, httpx.Headers(), b"")
        body: list[bytes] = []
        try:
            # A body that fails: the server logs it, the client gets it cut off.
            with contextlib.suppress(Exception):
                for chunk in result:
                    body.append(chunk)
                    if hang_up and chunk:
                        break  # the client went away: the server stops reading
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        status, headers_out = started
        return Response(status, httpx.Headers(headers_out), b"".join(body))


def start_wsgi(config: dict[str, Any], storage: Storage) -> Client:
    """SPEC §5's usage: ``app.wsgi_app = PlanGateMiddleware(app.wsgi_app, config=...)``."""
    from plangate.wsgi import PlanGateMiddleware

    app = apps.flask_app(apps.environ_customer)
    app.wsgi_app = PlanGateMiddleware(app.wsgi_app, config=config, storage=storage)
    return WSGIClient(app)


def start_flask(config: dict[str, Any], storage: Storage) -> Client:
    from plangate_flask import PlanGate

    app = apps.flask_app(apps.g_customer)
    PlanGate(app, config=config, storage=storage)
    return WSGIClient(app)


def start_django(config: dict[str, Any], storage: Storage) -> Client:
    """``settings.PLANGATE`` with a ``Storage`` as ``STORAGE``, served by Django's WSGI handler
    (what gunicorn runs) — it reads the settings when it loads its middleware."""
    configure_django()
    from django.core.handlers.wsgi import WSGIHandler
    from django.test.utils import override_settings

    override = override_settings(
        ROOT_URLCONF="tests.fronts.apps",
        MIDDLEWARE=["plangate_django.PlanGateMiddleware"],
        PLANGATE={"CONFIG": config, "STORAGE": storage},
    )
    override.enable()
    try:
        handler = WSGIHandler()
    except BaseException:
        override.disable()
        raise
    return WSGIClient(handler, on_close=override.disable)


# The gateway: /check, the upstream, /commit ------------------------------------------------

_SLASHES = re.compile(r"//+")
_FROM_CHECK = ("x-plangate-customer", "x-plangate-plan", "x-plangate-reservation")
_QUOTA = (
    "ratelimit-policy",
    "ratelimit",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
)


class GatewayClient:
    """The harness plays nginx in front of the views (adapters/gateways/nginx/nginx.conf):

    - ``/.plangate/entitlements`` (slashes merged, as nginx's ``merge_slashes``) goes to the
      service's ``/entitlements`` with the client's token only;
    - any other request is first a ``/check`` (``X-Original-Method``/``-URI``, the client's
      headers copied); its denial is what the client gets (nginx renders the same problem
      through ``/render``);
    - allowed, the request goes to the upstream (the Starlette views, without plangate) with
      the client's X-Plangate-* headers replaced by the check's; then ``/commit`` gets the
      reservation, the upstream's status and its response headers; the client gets the
      upstream's response without the usage headers that are not exposed
      (``proxy_hide_header``) and with the check's quota headers (``add_header``).
    """

    #: The client is on the other side of the gateway: nginx logs the upstream's status once
    #: the response is over, whether the client stayed or not. What a client that left is
    #: charged is what the gateway commits for that status, and that is all the row checks.
    hang_up_ways = ("after-upstream",)

    def __init__(self, config: dict[str, Any], storage: Storage) -> None:
        from plangate.gateway import GatewayService

        self.gateway = TestClient(GatewayService(config, storage=storage))
        self.gateway.__enter__()
        self.upstream = TestClient(
            apps.starlette_app(apps.header_customer), raise_server_exceptions=False
        )
        if isinstance(config, str):  # a config file
            config = yaml.safe_load(Path(config).read_text())
        self.hidden = {
            cost["response_header"].lower()
            for rule in config.get("routes", ())
            for cost in (rule.get("meters") or {}).values()
            if isinstance(cost, dict) and not cost.get("expose")
        }

    def request(self, method: str, path: str, headers: Headers = None) -> Response:
        sent = dict(headers or {})
        target = _SLASHES.sub("/", path)
        if target.partition("?")[0] == ENTITLEMENTS_PATH:
            token = {k: v for k, v in sent.items() if k.lower() == "authorization"}
            return _received(self.gateway.request(method, "/entitlements", headers=token))
        original = {"X-Original-Method": method, "X-Original-URI": "/" + path.lstrip("/")}
        check = self.gateway.get("/check", headers={**sent, **original})
        if check.status_code != 200:
            return _received(check)
        upstream_headers = {
            k: v for k, v in sent.items() if not k.lower().startswith("x-plangate-")
        }
        upstream_headers.update({n: check.headers[n] for n in _FROM_CHECK if n in check.headers})
        answer = self.upstream.request(method, BASE_URL + target, headers=upstream_headers)
        reservation = check.headers.get("x-plangate-reservation")
        if reservation is not None:
            self._commit(reservation, answer)
        kept = [(n, v) for n, v in answer.headers.multi_items() if n.lower() not in self.hidden]
        kept += [(n, check.headers[n]) for n in _QUOTA if n in check.headers]
        return Response(answer.status_code, httpx.Headers(kept), answer.content)

    def hang_up(self, method: str, path: str, headers: Headers = None, *, way: str) -> Response:
        return self.request(method, path, headers)

    def _commit(self, reservation: str, answer: Any) -> None:
        # One value per name: nginx (1.23+) joins repeated fields in $upstream_http_<name>.
        joined: dict[str, str] = {}
        for name, value in answer.headers.multi_items():
            joined[name] = f"{joined[name]}, {value}" if name in joined else value
        record = {"reservation": reservation, "status": answer.status_code, "headers": joined}
        committed = self.gateway.post("/commit", json=record)
        assert committed.status_code == 200, committed.text

    def close(self) -> None:
        self.upstream.close()
        self.gateway.__exit__(None, None, None)


def _received(answer: Any) -> Response:
    return Response(answer.status_code, httpx.Headers(answer.headers.multi_items()), answer.content)


FRONTS = [
    Front("asgi", start_asgi),
    Front("wsgi", start_wsgi),
    Front("fastapi", start_fastapi),
    Front("flask", start_flask),
    Front("django", start_django),
    Front("gateway", GatewayClient, sees_only_status=True, tells_the_views=True),
]
