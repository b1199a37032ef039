"""RFC 9110 §15.5.2 on every front end: every 401 carries a ``WWW-Authenticate`` challenge,
with ``error="invalid_token"`` (RFC 6750 §3) only where a token was given."""

from __future__ import annotations

import pytest

from plangate.engine import PROBLEM_BASE
from tests.fronts.conftest import bearer, config

BARE = 'Bearer realm="api"'
INVALID = 'Bearer realm="api", error="invalid_token"'


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no-token"),
        pytest.param({"Authorization": "Basic YWxhZGRpbjpvcGVuc2VzYW1l"}, id="basic"),
        pytest.param({"Authorization": "Bearer"}, id="empty-bearer"),
    ],
)
def test_a_401_without_a_token_carries_a_bare_bearer_challenge(start, headers):
    response = start(config()).request("GET", "/v1/ok", headers)
    assert response.status == 401
    assert response.json()["type"] == PROBLEM_BASE + "unauthenticated"
    assert response.headers.get_list("www-authenticate") == [BARE]


def test_a_401_for_a_bad_token_says_invalid_token(start):
    response = start(config()).request("GET", "/v1/ok", {"Authorization": "Bearer not-a-jwt"})
    assert response.status == 401
    assert response.headers.get_list("www-authenticate") == [INVALID]


def test_the_entitlements_endpoint_challenges_too(start):
    response = start(config()).request("GET", "/.plangate/entitlements")
    assert response.status == 401
    assert response.headers.get_list("www-authenticate") == [BARE]


def test_other_denials_carry_no_challenge(start):
    denied = start(config()).request("GET", "/v1/reports", bearer("acme", "free"))
    assert denied.status == 402
    assert "www-authenticate" not in denied.headers
