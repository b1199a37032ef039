"""SPEC §3.6 on every front end: what a request is charged once its response is known — a
view that raises, a body cut off or failing, the usage a response header reports."""

from __future__ import annotations

import logging

import pytest

from tests.fronts.conftest import USAGE_COST, bearer, config


@pytest.mark.parametrize("count", ["success", "always"])
def test_a_view_that_raises_is_refunded(front, start, used, count):
    settings = config(
        routes=[{"match": "/v1/{rest:path}", "meters": {"api_calls": 1}, "count": count}]
    )
    client = start(settings)
    for _ in range(3):  # the limit is 3
        assert client.request("GET", "/v1/raise", bearer()).status == 500
    after = client.request("GET", "/v1/ok", bearer())
    if front.sees_only_status and count == "always":
        # A gateway only sees the upstream's 500: it cannot tell a view that raised from a
        # view that answered 500, and `always` charges every status.
        assert after.status == 429
        assert used(settings, "acme", "api_calls") == 3
    else:
        assert after.status == 200
        assert used(settings, "acme", "api_calls") == 1


@pytest.mark.parametrize("count", ["success", "always"])
def test_a_status_the_view_answers_counts_as_the_rule_says(start, used, count):
    settings = config(
        routes=[{"match": "/v1/{rest:path}", "meters": {"api_calls": 1}, "count": count}]
    )
    client = start(settings)
    assert client.request("GET", "/v1/status/500", bearer()).status == 500
    assert client.request("GET", "/v1/status/404", bearer()).status == 404
    assert client.request("GET", "/v1/status/201", bearer()).status == 201
    assert used(settings, "acme", "api_calls") == (3 if count == "always" else 1)


def test_a_stream_the_client_leaves_is_charged_as_its_status_says(start, used):
    settings = config()
    client = start(settings)
    for way in client.hang_up_ways:
        customer = f"leaves-by-{way}"
        response = client.hang_up("GET", "/v1/stream", bearer(customer), way=way)
        assert response.status == 200, way
        assert response.body.startswith(b"first "), way
        # It started: the client got some of it. 42 from X-Usage-Tokens, not the estimate.
        assert used(settings, customer, "ai_tokens") == 42, way


def test_a_stream_whose_body_raises_is_refunded(front, start, used):
    settings = config()
    client = start(settings)
    response = client.request("GET", "/v1/stream?fail=1", bearer())
    assert response.status == 200  # it had started
    assert response.body.startswith(b"first ")
    assert not response.body.endswith(b"last")
    if front.sees_only_status:
        # The gateway sees a 200 from the upstream, cut short: a status that counts.
        assert used(settings, "acme", "ai_tokens") == 42
    else:
        assert used(settings, "acme", "ai_tokens") == 0  # a view that raised


def test_a_complete_stream_is_charged_its_usage_header(start, used):
    settings = config()
    response = start(settings).request("GET", "/v1/stream", bearer())
    assert response.body == b"first second last"
    assert used(settings, "acme", "ai_tokens") == 42


ESTIMATE = USAGE_COST["estimate"]


@pytest.mark.parametrize(
    ("values", "charged", "warned"),
    [
        pytest.param([], ESTIMATE, False, id="absent"),
        pytest.param(["0"], 0, False, id="zero"),
        pytest.param(["42"], 42, False, id="42"),
        pytest.param(["-5"], ESTIMATE, True, id="negative"),
        pytest.param([str(10**16)], ESTIMATE, True, id="huge"),
        pytest.param(["abc"], ESTIMATE, True, id="not-a-number"),
        # Two fields: ambiguous, refused. (Django's response headers and the gateway's
        # /commit carry one value per name: there the view's two fields are "7, 9".)
        pytest.param(["7", "9"], ESTIMATE, True, id="repeated"),
    ],
)
def test_the_usage_header_value(start, used, caplog, values, charged, warned):
    settings = config()
    client = start(settings)
    query = "&".join(f"value={v}" for v in values)
    with caplog.at_level(logging.WARNING, logger="plangate"):
        response = client.request("GET", f"/v1/usage?{query}", bearer())
    assert response.status == 200
    assert used(settings, "acme", "ai_tokens") == charged
    warnings = [
        r
        for r in caplog.records
        if r.levelno >= logging.WARNING
        and r.name.startswith("plangate")
        and "x-usage-tokens" in r.getMessage().lower()
    ]
    assert bool(warnings) == warned, [r.getMessage() for r in warnings]


def test_the_usage_header_is_removed_from_the_clients_response(start):
    response = start(config()).request("GET", "/v1/usage?value=42", bearer())
    assert response.status == 200
    assert "x-usage-tokens" not in response.headers


def test_the_usage_header_is_kept_with_expose(start, used):
    cost = {**USAGE_COST, "expose": True}
    settings = config(routes=[{"match": "GET /v1/usage", "meters": {"ai_tokens": cost}}])
    response = start(settings).request("GET", "/v1/usage?value=42", bearer())
    assert response.headers.get_list("x-usage-tokens") == ["42"]
    assert used(settings, "acme", "ai_tokens") == 42
