"""A request that could be read as two customers is read as none (issue: duplicate cookies).

Starlette and Django take the last of two cookies of one name, werkzeug the first: were
plangate to read one and the app the other, B's requests would be served on A's plan."""

from __future__ import annotations

from plangate.engine import PROBLEM_BASE
from plangate.testing import token
from tests.fronts.conftest import config

COOKIE = {"token_from": "cookie:session"}


def _cookie_config():
    base = config()
    return config(identity={**base["identity"], **COOKIE})


def test_the_token_cookie_reads_the_customer(start):
    cfg = _cookie_config()
    response = start(cfg).request("GET", "/v1/ok", {"Cookie": f"session={token(cfg, 'acme')}"})
    assert response.status == 200
    assert response.json()["customer"] == "acme"


def test_the_token_cookie_sent_twice_is_a_401(start, used):
    cfg = _cookie_config()
    a, b = token(cfg, "acme"), token(cfg, "globex")
    response = start(cfg).request(
        "GET", "/v1/ok", {"Cookie": f"session={a}; theme=dark; session={b}"}
    )
    assert response.status == 401
    assert response.json()["type"] == PROBLEM_BASE + "unauthenticated"
    assert "more than once" in response.json()["detail"]
    assert used(cfg, "acme", "api_calls") == 0
    assert used(cfg, "globex", "api_calls") == 0
