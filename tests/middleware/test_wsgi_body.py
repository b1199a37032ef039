"""How the WSGI middleware settles when a server stops reading the body early."""

from __future__ import annotations

from plangate import MemoryStorage
from plangate.wsgi import PlanGateMiddleware
from tests.middleware.apps import wsgi_app
from tests.support import bearer, config


def _environ(path: str, method: str = "POST") -> dict:
    return {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "QUERY_STRING": "tokens=1234",
        "SERVER_NAME": "test",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.url_scheme": "http",
        "HTTP_AUTHORIZATION": bearer()["authorization"],
    }


def _used(gate: PlanGateMiddleware) -> int:
    body = gate.gate.entitlements(bearer()["authorization"].split()[1])
    assert isinstance(body, dict)
    return body["meters"]["ai_tokens"]["limits"][0]["used"]


def test_a_client_gone_mid_body_is_charged_what_the_handler_reported():
    gate = PlanGateMiddleware(wsgi_app, config(), storage=MemoryStorage())
    body = gate(_environ("/v1/stream"), lambda status, headers, exc_info=None: None)
    chunks = iter(body)
    assert next(chunks) == b"once "
    chunks.close()  # the server saw the client go away
    body.close()
    assert _used(gate) == 100  # the reservation stands: the handler ran, nothing was refunded


def test_a_body_that_is_never_iterated_is_settled_on_close():
    gate = PlanGateMiddleware(wsgi_app, config(), storage=MemoryStorage())
    body = gate(_environ("/v1/chat"), lambda status, headers, exc_info=None: None)
    body.close()
    assert _used(gate) == 1234
