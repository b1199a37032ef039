"""What the admin API tests share: a config with every kind of plan, add-on and feature, the
API mounted at /admin on a gate whose clock the test sets, and clients of it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient

from plangate import AsyncGate, MemoryStorage
from plangate.admin import AdminAPI
from plangate.storage import Storage
from tests.support import Clock, config

TOKEN = "an-admin-token-from-the-environment"
AUTH = {"authorization": f"Bearer {TOKEN}"}
PROBLEM = "application/problem+json"
START = 1_800_000_000.0  # 2027-01-15T08:00:00Z


def admin_config(**changes: Any) -> dict[str, Any]:
    """free < pro (a 14-day trial) and the legacy pro-2023 (a 30-day trial); add-ons that
    raise a metered limit and one that enables a boolean feature; the admin token set."""
    plans = {
        "free": {
            "features": {
                "max_projects": 3,
                "api_calls": {"limit": 5, "window": "1m"},
                "ai_tokens": {"limit": 10000, "period": "month"},
            }
        },
        "pro": {
            "extends": "free",
            "trial_days": 14,
            "features": {
                "export_reports": True,
                "max_projects": 50,
                "api_calls": {"limit": 1000, "window": "1m"},
            },
        },
        "pro-2023": {
            "extends": "pro",
            "legacy": True,
            "trial_days": 30,
            "features": {"api_calls": {"limit": 5000, "window": "1d"}},
        },
    }
    addons = {
        "token_pack": {"features": {"ai_tokens": {"add": 1000}}},
        "extra_calls": {"features": {"api_calls": {"add": 100}}},
        "reports": {"features": {"export_reports": True}},
    }
    return config(**{"plans": plans, "addons": addons, "admin": {"token": TOKEN}, **changes})


def mounted(api: AdminAPI) -> Starlette:
    """The admin API as an application mounts it."""
    return Starlette(routes=[Mount("/admin", app=api)])


@contextlib.contextmanager
def admin(
    storage: Storage | None = None,
    *,
    clock: Clock | None = None,
    auth: bool = True,
    **changes: Any,
) -> Iterator[TestClient]:
    """A client of the admin API on a gate of ``admin_config(**changes)``."""
    gate = AsyncGate(
        admin_config(**changes), storage=storage or MemoryStorage(), clock=clock or Clock(START)
    )
    with TestClient(mounted(AdminAPI(gate)), headers=AUTH if auth else None) as client:
        yield client


@contextlib.asynccontextmanager
async def async_admin(
    storage: Storage, *, clock: Clock | None = None, **changes: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """``admin`` for tests that run requests concurrently; the store's connections of this
    event loop are closed at the end."""
    gate = AsyncGate(admin_config(**changes), storage=storage, clock=clock or Clock(START))
    transport = httpx.ASGITransport(app=mounted(AdminAPI(gate)))
    try:
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", headers=AUTH
        ) as client:
            yield client
    finally:
        await storage.aclose()
