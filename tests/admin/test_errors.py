"""Every refusal of the admin API is an application/problem+json, never a 500."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import replace

import httpx
import pytest

from plangate import AsyncGate, CustomerRecord, MemoryStorage
from plangate.admin import AdminAPI
from plangate.engine import PROBLEM_BASE
from plangate.storage import open_storage
from tests.admin.support import AUTH, PROBLEM, TOKEN, admin, admin_config, mounted
from tests.servers import free_port

BIG = 10 * 1024 * 1024
CHUNK = 64 * 1024


def problem(response: httpx.Response, status: int, name: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["type"] == PROBLEM_BASE + name
    assert body["status"] == status
    assert body["title"]
    assert body["detail"]
    return body


# 401: the token -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("authorization", "token_given"),
    [
        (None, False),
        ("Bearer not-the-admin-token", True),
        (f"Bearer {TOKEN[:-1]}", True),  # shorter
        (f"Bearer {TOKEN}x", True),  # longer
        (f"Bearer {TOKEN * 100}", True),
        ("Bearer ", True),
        ("Bearer ünï".encode(), True),
        (f"Basic {TOKEN}", False),
        (TOKEN, False),
    ],
)
def test_without_the_admin_token_every_route_is_401_with_a_challenge(authorization, token_given):
    headers = {} if authorization is None else {"authorization": authorization}
    with admin(auth=False) as client:
        for method, path in [
            ("GET", "/admin/customers/acme"),
            ("PUT", "/admin/customers/acme"),
            ("GET", "/admin/customers"),
            ("POST", "/admin/plans/migrate"),
            ("GET", "/admin/elsewhere"),
        ]:
            response = client.request(method, path, headers=headers, json={"plan": "pro"})
            problem(response, 401, "admin-token-required")
            challenge = response.headers["www-authenticate"]
            assert challenge.startswith('Bearer realm="plangate-admin"')
            assert ('error="invalid_token"' in challenge) is token_given
            assert TOKEN not in response.text


def test_a_token_beyond_ascii_is_compared_as_utf_8_bytes():
    with admin(auth=False, admin={"token": "tökén-ünï"}) as client:
        response = client.get(
            "/admin/customers", headers={"authorization": "Bearer tökén-ünï".encode()}
        )
    assert response.status_code == 200


def test_the_scheme_is_case_insensitive():
    with admin(auth=False) as client:
        response = client.get("/admin/customers", headers={"authorization": f"bearer {TOKEN}"})
    assert response.status_code == 200


def test_two_authorization_headers_are_refused():
    with admin(auth=False) as client:
        response = client.get(
            "/admin/customers",
            headers=[("authorization", f"Bearer {TOKEN}"), ("authorization", f"Bearer {TOKEN}")],
        )
    problem(response, 401, "admin-token-required")


def test_nothing_is_written_without_the_token():
    with admin(auth=False) as client:
        client.put("/admin/customers/acme", json={"plan": "pro"})
        response = client.get("/admin/customers/acme", headers=AUTH)
    problem(response, 404, "customer-not-found")


# 404 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("configured", [None, ""])
@pytest.mark.parametrize("authorization", [None, "Bearer ", f"Bearer {TOKEN}"])
def test_without_a_configured_token_the_api_is_404_everywhere(configured, authorization):
    headers = {} if authorization is None else {"authorization": authorization}
    with admin(auth=False, admin={"token": configured}) as client:
        for method, path in [
            ("GET", "/admin/customers/acme"),
            ("PUT", "/admin/customers/acme"),
            ("GET", "/admin/customers"),
            ("POST", "/admin/plans/migrate"),
            ("DELETE", "/admin/plans/migrate"),
        ]:
            response = client.request(method, path, headers=headers, json={"plan": "pro"})
            problem(response, 404, "not-found")
            assert "www-authenticate" not in response.headers


def test_a_token_given_to_the_app_overrides_the_configs():
    gate = AsyncGate(admin_config(), storage=MemoryStorage())
    off = AdminAPI(gate, token=None)
    other = AdminAPI(gate, token="another-token")

    async def run() -> list[int]:
        statuses = []
        for api in (off, other):
            transport = httpx.ASGITransport(app=mounted(api))
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                for headers in (AUTH, {"authorization": "Bearer another-token"}):
                    statuses.append(
                        (await client.get("/admin/customers", headers=headers)).status_code
                    )
        return statuses

    assert asyncio.run(run()) == [404, 404, 401, 200]


def test_an_unknown_route_under_the_api_is_a_404_problem():
    with admin() as client:
        for path in ["/admin/", "/admin/plans", "/admin/customers/acme/credits/x", "/admin/x"]:
            problem(client.get(path), 404, "not-found")


# 405 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("POST", "/admin/customers", "GET"),
        ("DELETE", "/admin/customers", "GET"),
        ("POST", "/admin/customers/acme", "PATCH"),
        ("GET", "/admin/plans/migrate", "POST"),
        ("PUT", "/admin/plans/migrate", "POST"),
    ],
)
def test_a_wrong_method_is_405_naming_the_allowed_ones(method, path, allowed):
    with admin() as client:
        response = client.request(method, path)
    problem(response, 405, "method-not-allowed")
    assert allowed in response.headers["allow"]


# 400 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [b"{", b"", b"{'plan': 'pro'}", b"\xff\xfe", b"[" * 100 + b"]" * 100, b"NaN"],
    ids=["truncated", "empty", "single-quotes", "not-utf8", "too-deep", "nan"],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/admin/customers/acme"),
        ("PATCH", "/admin/customers/acme"),
        ("POST", "/admin/plans/migrate"),
    ],
)
def test_a_body_that_is_not_json_is_400(method, path, content):
    with admin() as client:
        response = client.request(
            method, path, content=content, headers={"content-type": "application/json"}
        )
    problem(response, 400, "malformed-request")


@pytest.mark.parametrize("body", [[], "pro", 7, None, [{"plan": "pro"}]], ids=repr)
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/admin/customers/acme"),
        ("PATCH", "/admin/customers/acme"),
        ("POST", "/admin/plans/migrate"),
    ],
)
def test_a_body_that_is_not_an_object_is_400(method, path, body):
    content = json.dumps(body).encode()
    with admin() as client:
        response = client.request(
            method, path, content=content, headers={"content-type": "application/json"}
        )
    assert problem(response, 400, "malformed-request")["detail"] == "the body must be a JSON object"


@pytest.mark.parametrize(
    "if_match", ["*", 'W/"1"', '"1", "2"', '"x"', "", '"-1"', '"' + "9" * 40 + '"']
)
def test_an_if_match_that_names_no_version_is_400(if_match):
    with admin() as client:
        client.put("/admin/customers/acme", json={"plan": "free"})
        response = client.put(
            "/admin/customers/acme", json={"plan": "pro"}, headers={"if-match": if_match}
        )
    assert problem(response, 400, "malformed-request")["parameter"] == "If-Match"


def test_an_allow_legacy_that_is_not_a_boolean_is_400():
    with admin() as client:
        response = client.put("/admin/customers/acme?allow_legacy=perhaps", json={"plan": "pro"})
    assert problem(response, 400, "malformed-request")["parameter"] == "allow_legacy"


# 413 ---------------------------------------------------------------------------------------


def test_a_body_declared_larger_than_64_kib_is_413():
    with admin() as client:
        response = client.put(
            "/admin/customers/acme",
            content=b" " * BIG,
            headers={"content-type": "application/json"},
        )
    problem(response, 413, "body-too-large")


def test_a_body_of_exactly_64_kib_is_read():
    body = b'{"plan": "pro"}'
    with admin() as client:
        response = client.put(
            "/admin/customers/acme",
            content=body + b" " * (CHUNK - len(body)),
            headers={"content-type": "application/json"},
        )
    assert response.status_code == 200


def test_a_streamed_body_is_refused_without_being_read_whole():
    sent: list[int] = []

    async def ten_megabytes() -> AsyncIterator[bytes]:
        for _ in range(BIG // CHUNK):
            sent.append(CHUNK)
            yield b" " * CHUNK

    async def run() -> httpx.Response:
        gate = AsyncGate(admin_config(), storage=MemoryStorage())
        transport = httpx.ASGITransport(app=mounted(AdminAPI(gate)))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.put(
                "/admin/customers/acme",
                content=ten_megabytes(),  # chunked: no Content-Length to refuse it by
                headers={**AUTH, "content-type": "application/json"},
            )

    response = asyncio.run(run())
    problem(response, 413, "body-too-large")
    assert sum(sent) <= 2 * CHUNK  # the API stopped reading at the limit


# 415 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "content_type"),
    [
        ("PUT", "/admin/customers/acme", "text/plain"),
        ("PUT", "/admin/customers/acme", None),
        ("PUT", "/admin/customers/acme", "application/merge-patch+json"),
        ("PATCH", "/admin/customers/acme", "application/x-www-form-urlencoded"),
        ("PATCH", "/admin/customers/acme", None),
        ("POST", "/admin/plans/migrate", "text/json"),
    ],
)
def test_a_body_that_is_not_json_by_its_content_type_is_415(method, path, content_type):
    headers = {} if content_type is None else {"content-type": content_type}
    with admin() as client:
        response = client.request(method, path, content=b'{"plan": "pro"}', headers=headers)
    problem(response, 415, "unsupported-media-type")
    if method == "PATCH":
        assert response.headers["accept-patch"] == "application/merge-patch+json, application/json"


def test_a_json_content_type_with_a_charset_is_json():
    with admin() as client:
        response = client.put(
            "/admin/customers/acme",
            content=b'{"plan": "pro"}',
            headers={"content-type": "Application/JSON; charset=utf-8"},
        )
    assert response.status_code == 200


# 503 ---------------------------------------------------------------------------------------


def test_a_store_that_cannot_be_reached_is_503_on_every_route():
    storage = open_storage(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    try:
        with admin(storage) as client:
            for method, path, body in [
                ("GET", "/admin/customers/acme", None),
                ("PUT", "/admin/customers/acme", {"plan": "pro"}),
                ("PATCH", "/admin/customers/acme", {"plan": "pro"}),
                ("DELETE", "/admin/customers/acme", None),
                ("GET", "/admin/customers", None),
                ("POST", "/admin/plans/migrate", {"from": "free", "to": "pro"}),
            ]:
                response = client.request(method, path, json=body)
                problem(response, 503, "storage-unavailable")
                assert response.headers["retry-after"] == "5"
    finally:
        storage.close()


# 409 write-contention: a write that loses to other writers every time ----------------------


class Contended(MemoryStorage):
    """Records another writer changes every time, just before this process writes."""

    def put_customer(self, record: CustomerRecord, *, expected_version: int | None = None) -> int:
        if expected_version is not None:
            super().put_customer(replace(record, plan="free"))  # the other writer
        return super().put_customer(record, expected_version=expected_version)


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
def test_a_write_that_always_loses_the_race_is_409_write_contention(method):
    with admin(Contended()) as client:
        response = client.request(method, "/admin/customers/acme", json={"plan": "pro"})
    problem(response, 409, "write-contention")
    assert response.headers["retry-after"] == "1"


# never a 500 -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"plan": None, "addons": None, "overrides": None},
        {"addons": [1, 2]},
        {"addons": {"token_pack": 10**30}},
        {"addons": {"token_pack": 1.5}},
        {"addons": {"token_pack": True}},
        {"overrides": []},
        {"overrides": {"api_calls": [{"limit": "x"}]}},
        {"overrides": {"api_calls": {"limit": 1e308, "window": "1m"}}},
        {"overrides": {"max_projects": {"nested": {"deeper": [1, {"x": None}]}}}},
        {"trial_ends_at": 12},
        {"trial_ends_at": "2027-13-45"},
        {"billing_anchor": ["2027-01-01"]},
        {"previous_plan": "platinum"},
        {"trial": "yes"},
        {"version": "x", "entitlements": [], "customer": "acme"},
        {"": 1},
    ],
)
@pytest.mark.parametrize("method", ["PUT", "PATCH"])
def test_a_hostile_body_is_answered_with_a_4xx_problem_or_stored(method, body):
    with admin() as client:
        response = client.request(method, "/admin/customers/acme", json=body)
    if response.status_code != 200:
        assert 400 <= response.status_code < 500
        assert response.headers["content-type"] == PROBLEM


@pytest.mark.parametrize(
    "content",
    [b'{"overrides": {"max_projects": NaN}}', b'{"overrides": {"max_projects": Infinity}}'],
)
def test_json_constants_that_are_not_json_are_refused(content):
    with admin() as client:
        response = client.put(
            "/admin/customers/acme", content=content, headers={"content-type": "application/json"}
        )
    assert 400 <= response.status_code < 500
    assert response.headers["content-type"] == PROBLEM
