"""The quota headers every front end sends, read by a real Structured Fields parser (http-sf,
RFC 9651): a parser drops a whole header it cannot read, so each must parse, with numbers
within Structured Fields' 15-digit integers. On a 429, ``RateLimit`` names a violated policy
and ``Retry-After`` is never earlier than its ``t``."""

from __future__ import annotations

from typing import Any

import http_sf

from tests.fronts.conftest import bearer, config
from tests.fronts.harness import Response

LARGEST = 999_999_999_999_999  # the largest integer Structured Fields can say

PLANS = {
    "free": {
        "features": {
            "api_calls": [
                {"limit": 3, "window": "1h"},
                {"limit": LARGEST, "window": "1d"},
                {"limit": LARGEST, "period": "year"},
            ],
            "ai_tokens": {"limit": 11, "period": "month"},
        }
    },
}
ROUTES = [
    {"match": "GET /v1/reports", "meters": {"ai_tokens": 8}},
    {"match": "GET /v1/ok", "meters": {"api_calls": 2, "ai_tokens": 1}},
]


def parsed(response: Response) -> dict[str, Any]:
    """Every quota header and Retry-After of ``response``, parsed."""
    fields: dict[str, Any] = {}
    for name in ("ratelimit-policy", "ratelimit"):
        if name in response.headers:
            fields[name] = http_sf.parse(response.headers[name].encode(), tltype="list")
    for name in ("retry-after", "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"):
        if name in response.headers:
            value, _ = http_sf.parse(response.headers[name].encode(), tltype="item")
            assert type(value) is int, (name, value)
            fields[name] = value
    return fields


def assert_integers_in_range(fields: dict[str, Any]) -> None:
    for name in ("ratelimit-policy", "ratelimit"):
        for _, params in fields.get(name, []):
            for value in params.values():
                assert type(value) is int, (name, params)
                assert 0 <= value <= LARGEST, (name, params)


def test_every_quota_header_parses_as_structured_fields(start):
    settings = config(plans=PLANS, routes=ROUTES, responses={"legacy_headers": True})
    client = start(settings)
    answers = [
        client.request("GET", "/v1/reports", bearer()),  # ai_tokens: 8 of 11
        client.request("GET", "/v1/ok", bearer()),  # api_calls-1h: 2 of 3; ai_tokens: 9
        client.request("GET", "/v1/ok", bearer()),  # 2 more calls: refused by api_calls-1h
    ]
    assert [a.status for a in answers] == [200, 200, 429]
    for answer in answers:
        fields = parsed(answer)
        assert {"ratelimit-policy", "ratelimit", "x-ratelimit-reset"} <= fields.keys()
        assert_integers_in_range(fields)
    policies = dict(parsed(answers[1])["ratelimit-policy"])
    # a bucketed window advertises the window plus the bucket a unit may outlive it by
    assert policies["api_calls-1d"] == {"q": LARGEST, "w": 90720}

    refused = parsed(answers[2])
    # ai_tokens-month (2 of 11 left) is closer to exhaustion than api_calls-1h (1 of 3), but
    # it did not refuse the request: RateLimit names the policy that did
    [(name, params)] = refused["ratelimit"]
    assert name == "api_calls-1h"
    assert params["r"] == 1
    assert refused["retry-after"] >= params["t"]
