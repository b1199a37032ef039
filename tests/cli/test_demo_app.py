"""``plangate demo`` shows the product at its best: no 500 for any input."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from plangate._demo.app import CONFIG, create_app
from plangate.testing import bearer


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(), raise_server_exceptions=False) as client:
        yield client


def test_an_unlimited_plan_reads_its_projects_as_unlimited(client):
    response = client.get("/v1/projects", headers=bearer(CONFIG, "megacorp", "enterprise"))
    assert response.status_code == 200
    assert response.json()["max_projects"] == "unlimited"
    assert response.json()["api_calls_left"] == "unlimited"


def test_a_completion_with_a_text_body_is_answered(client):
    headers = {**bearer(CONFIG, "acme", "free"), "content-type": "text/plain"}
    response = client.post("/v1/completions", content=b"write a poem", headers=headers)
    assert response.status_code == 200
    assert response.json()["usage"]["tokens"] == 80


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    method=st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS"]),
    path=st.sampled_from(
        ["/health", "/v1/projects", "/v1/completions", "/v1/reports/7/export", "/v1/x/y", "/z"]
    ),
    plan=st.sampled_from([None, "free", "pro", "enterprise"]),
    body=st.binary(max_size=64),
)
def test_no_request_gets_a_500(client, method, path, plan, body):
    headers = bearer(CONFIG, "acme", plan) if plan else {}
    response = client.request(method, path, content=body, headers=headers)
    assert response.status_code < 500
