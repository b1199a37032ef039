"""The entitlements endpoint (SPEC §5) on every front end, and the paths that are not it.

On the gateway the endpoint is the service's ``/entitlements``; the harness routes the
client's ``/.plangate/entitlements`` there as adapters/gateways/nginx/nginx.conf does."""

from __future__ import annotations

from tests.fronts.conftest import PROBLEM, bearer, config


def test_get_answers_the_plan_and_the_meters(start):
    client = start(config())
    assert client.request("GET", "/v1/ok", bearer()).status == 200
    response = client.request("GET", "/.plangate/entitlements", bearer())
    assert response.status == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["customer"] == "acme"
    assert body["plan"] == "free"
    assert body["meters"]["api_calls"]["limits"][0]["used"] == 1
    assert body["meters"]["api_calls"]["limits"][0]["limit"] == 3


def test_get_without_a_token_is_a_401_problem(start):
    response = start(config()).request("GET", "/.plangate/entitlements")
    assert response.status == 401
    assert response.headers["content-type"] == PROBLEM


def test_head_answers_200_without_a_body(start):
    response = start(config()).request("HEAD", "/.plangate/entitlements", bearer())
    assert response.status == 200
    assert response.body == b""


def test_runs_of_slashes_are_merged_as_for_rules(start):
    response = start(config()).request("GET", "//.plangate/entitlements", bearer())
    assert response.status == 200
    assert response.json()["plan"] == "free"


def test_a_trailing_slash_is_not_the_endpoint(start):
    response = start(config()).request("GET", "/.plangate/entitlements/", bearer())
    assert response.status == 404  # the app's own answer: no rule matches, no view either
    assert b"meters" not in response.body
