"""A dashboard on the billing tests' config (plans, a legacy plan, add-ons, credits), and a
client that signs in as a browser does: the login page's nonce, the same Origin."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient

from plangate import AsyncGate, MemoryStorage
from plangate.admin import AdminAPI
from tests.admin.support import TOKEN
from tests.billing.support import billing_config

ORIGIN = "http://testserver"


def dashboard_app(
    config: dict[str, Any] | str | None = None,
    *,
    clock: Any = time.time,
    storage_uri: bool = False,
    **kwargs: Any,
) -> tuple[Starlette, AsyncGate]:
    """``storage_uri``: the config's store (a replica on a shared Redis), else memory."""
    storage = None if storage_uri else MemoryStorage()
    gate = AsyncGate(config or billing_config(), storage=storage, clock=clock)
    return Starlette(routes=[Mount("/admin", app=AdminAPI(gate, **kwargs))]), gate


def field(html: str, name: str) -> str:
    found = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert found, f"no field {name!r} in the page"
    return found.group(1)


def sign_in(client: TestClient, token: str = TOKEN) -> Any:
    page = client.get("/admin/ui/login")
    return client.post(
        "/admin/ui/login",
        data={"nonce": field(page.text, "nonce"), "token": token, "next": "/admin/ui/customers"},
        headers={"origin": ORIGIN},
        follow_redirects=False,
    )


def post(client: TestClient, path: str, data: dict[str, str], **kwargs: Any) -> Any:
    """A form of the dashboard sent from its own page (its CSRF token, its Origin)."""
    page = client.get("/admin/ui/customers")
    headers = {"origin": ORIGIN, **kwargs.pop("headers", {})}
    return client.post(
        path, data={"csrf": field(page.text, "csrf"), **data}, headers=headers, **kwargs
    )


def put(gate: AsyncGate, customer: str, record: dict[str, Any]) -> None:
    asyncio.run(gate.customers.put(customer, record))
