"""Local quota leases on every front end, against a real Redis: what a client sees is what it
saw without them — every request admitted while far from the limit, `RateLimit` `r` counting
down one by one, refunds and usage headers charged exactly — with most requests answered
without a Redis call (storage/_leases.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from plangate.storage import ResilientStorage, Storage, open_storage
from tests.fronts.conftest import USAGE_COST, bearer, config

pytestmark = pytest.mark.redis

#: far from its limits, and limits large enough to be leased (more than 1 000)
PLANS = {
    "free": {
        "features": {
            "api_calls": {"limit": 100_000, "window": "1d"},
            "ai_tokens": {"limit": 10_000_000, "period": "month"},
        }
    }
}


@pytest.fixture
def storage(redis_server) -> Iterator[Storage]:  # the fronts' store, on Redis this time
    with redis_server.client() as client:
        client.flushall()
    store = open_storage(redis_server.url)
    assert isinstance(store, ResilientStorage)
    assert store.leases is not None
    yield store
    store.close()


def remaining(response) -> int:
    header = response.headers["ratelimit"]
    return int(header.split(";r=")[1].split(";")[0])


def test_far_from_the_limit_requests_are_admitted_from_leases(start, storage):
    settings = config(plans=PLANS)
    client = start(settings)
    seen = []
    for _ in range(60):
        response = client.request("GET", "/v1/ok", bearer())
        assert response.status == 200
        seen.append(remaining(response))
    # one process: the headers count down exactly, as they do without leases
    assert seen == list(range(100_000 - 1, 100_000 - 61, -1))
    assert storage.leases is not None
    assert storage.leases.granted_units > 0
    assert storage.backend_calls < 60


def test_refunds_and_reported_usage_are_charged_exactly_with_leases(front, start, storage, used):
    settings = config(plans=PLANS)
    client = start(settings)
    for _ in range(30):  # fast enough to lease
        assert client.request("GET", "/v1/ok", bearer()).status == 200
    failed = client.request("GET", "/v1/raise", bearer())
    assert failed.status == 500
    for value in ("120", "7", "900"):
        response = client.request("GET", f"/v1/usage?value={value}", bearer())
        assert response.status == 200
    storage.flush_leases(everything=True)
    # a gateway cannot tell a view that raised from one that answered 500: it refunds it too
    assert used(settings, "acme", "api_calls") == 30
    assert used(settings, "acme", "ai_tokens") == 120 + 7 + 900
    assert USAGE_COST["estimate"] == 500  # each reserved 500 and settled to its header
