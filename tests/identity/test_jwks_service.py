"""Tokens checked against a JWKS endpoint, through the ASGI middleware on a real server."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import jwt
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from plangate import asgi
from plangate.engine import PROBLEM_BASE
from tests.identity.keys import pem_pair
from tests.middleware.apps import asgi_app
from tests.support import AUDIENCE, ISSUER, config, serve_asgi

PRIVATE, PUBLIC = pem_pair("rsa")


def _jwks_config(url: str) -> dict:
    identity = {
        "jwt": {
            "algorithms": ["RS256"],
            "jwks_url": url,
            "issuer": ISSUER,
            "audience": AUDIENCE,
            "customer_claim": "org_id",
            "plan_claim": "plan",
        }
    }
    return config(identity=identity)


def _token(customer: str = "acme") -> str:
    claims = {"org_id": customer, "iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 600}
    return jwt.encode(claims, PRIVATE, algorithm="RS256", headers={"kid": "key-1"})


@contextlib.contextmanager
def held_jwks() -> Iterator[tuple[str, threading.Event, threading.Event]]:
    """A JWKS endpoint that answers only once ``release`` is set; ``asked`` says it was asked."""
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(load_pem_public_key(PUBLIC)))
    jwk.update(kid="key-1", use="sig", alg="RS256")
    body = json.dumps({"keys": [jwk]}).encode()
    asked, release = threading.Event(), threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            asked.set()
            release.wait(30)
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/jwks.json", asked, release
    finally:
        release.set()
        server.shutdown()
        server.server_close()


def test_a_jwks_fetch_does_not_stop_other_requests():
    with held_jwks() as (url, asked, release):
        app = asgi.PlanGateMiddleware(asgi_app(), _jwks_config(url))
        with serve_asgi(app) as base, httpx.Client(base_url=base, timeout=20) as client:
            result: dict[str, httpx.Response] = {}

            def first() -> None:
                headers = {"authorization": f"Bearer {_token()}"}
                result["first"] = client.get("/v1/projects", headers=headers)

            waiting = threading.Thread(target=first)
            waiting.start()
            assert asked.wait(10)  # the first request now waits on the key fetch
            # If that fetch blocked the event loop, this request could not be answered, and
            # the fetch would time out (2 s) before the keys are released below.
            assert client.get("/health").status_code == 200
            release.set()
            waiting.join()
    assert result["first"].status_code == 200


def test_an_unreachable_jwks_endpoint_is_503_not_401():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/jwks.json"
    app = asgi.PlanGateMiddleware(asgi_app(), _jwks_config(url))
    with serve_asgi(app) as base, httpx.Client(base_url=base, timeout=20) as client:
        response = client.get("/v1/projects", headers={"authorization": f"Bearer {_token()}"})
    assert response.status_code == 503
    assert response.json()["type"] == PROBLEM_BASE + "entitlements-unavailable"
    assert "www-authenticate" not in response.headers
    assert int(response.headers["retry-after"]) >= 1
