"""``plangate gateway`` serves the admin API under /admin/, on the gate its /check decides
with: a change made through it is what the very next check decides."""

from __future__ import annotations

from starlette.testclient import TestClient

from plangate.engine import PROBLEM_BASE
from plangate.gateway import GatewayService
from tests.admin.support import AUTH, PROBLEM, TOKEN
from tests.gateways.support import gateway_config
from tests.support import bearer


def service(token: str | None = TOKEN) -> GatewayService:
    return GatewayService({**gateway_config(), "admin": {"token": token}})


def export(client: TestClient) -> int:
    """/check of an export by acme, whose token names no plan: the store's record decides."""
    headers = {"X-Original-Method": "POST", "X-Original-URI": "/v1/reports/7/export"}
    return client.get("/check", headers={**headers, **bearer("acme")}).status_code


def test_the_gateway_serves_the_admin_api_under_admin():
    with TestClient(service()) as client:
        put = client.put("/admin/customers/acme", json={"plan": "pro"}, headers=AUTH)
        got = client.get("/admin/customers/acme", headers=AUTH)
        listed = client.get("/admin/customers?plan=pro", headers=AUTH)
        refused = client.get("/admin/customers/acme")
    assert put.status_code == got.status_code == listed.status_code == 200
    assert got.headers["etag"] == '"1"'
    assert [record["customer"] for record in listed.json()["customers"]] == ["acme"]
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"].startswith('Bearer realm="plangate-admin"')


def test_a_plan_change_is_what_the_very_next_check_decides():
    with TestClient(service()) as client:
        before = export(client)
        client.put("/admin/customers/acme", json={"plan": "pro"}, headers=AUTH)
        upgraded = export(client)
        client.patch("/admin/customers/acme", json={"plan": "free"}, headers=AUTH)
        downgraded = export(client)
        client.patch(
            "/admin/customers/acme", json={"overrides": {"export_reports": True}}, headers=AUTH
        )
        overridden = export(client)
        client.delete("/admin/customers/acme", headers=AUTH)
        deleted = export(client)
    assert (before, upgraded, downgraded, overridden, deleted) == (402, 200, 402, 200, 402)


def test_the_check_names_the_plan_the_admin_api_assigned():
    with TestClient(service()) as client:
        client.put("/admin/customers/acme", json={"plan": "enterprise"}, headers=AUTH)
        checked = client.get("/check/v1/projects", headers=bearer("acme"))
    assert checked.headers["x-plangate-plan"] == "enterprise"


def test_without_an_admin_token_the_gateways_admin_routes_are_404():
    with TestClient(service(token=None)) as client:
        admin = client.get("/admin/customers/acme", headers=AUTH)
        checked = client.get("/check/v1/projects", headers=bearer("acme"))
    assert admin.status_code == 404
    assert admin.headers["content-type"] == PROBLEM
    assert admin.json()["type"] == PROBLEM_BASE + "not-found"
    assert checked.status_code == 200
