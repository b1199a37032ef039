"""Debian's chromium, headless, driven by Selenium through Debian's chromedriver — nothing
is downloaded (the paths are given, so Selenium Manager never runs) — and the app the
dashboard tests and the screenshots use: an API behind plangate and the admin API (with its
dashboard) on one gate, served by uvicorn on a loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import Iterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from plangate import AsyncGate, MemoryStorage
from plangate.admin import AdminAPI
from plangate.asgi import PlanGateMiddleware
from tests.billing.support import billing_config
from tests.support import serve_asgi

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def available() -> bool:
    return os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)


@contextlib.contextmanager
def browser(width: int = 1280, height: int = 900) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager: never the network
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root in a container
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={width},{height}",
        "--force-prefers-reduced-motion",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


async def _projects(request: Request) -> JSONResponse:
    return JSONResponse({"projects": []})


@contextlib.contextmanager
def served(config: dict[str, Any] | None = None) -> Iterator[tuple[str, AsyncGate]]:
    """The app on a loopback port: ``/v1/...`` behind plangate, ``/admin`` beside it."""
    settings = config or billing_config()
    inner = Starlette(routes=[Route("/v1/{rest:path}", _projects)])
    app = PlanGateMiddleware(inner, settings, storage=MemoryStorage())
    inner.router.routes.append(Mount("/admin", app=AdminAPI(app.gate)))
    with serve_asgi(app) as url:
        yield url, app.gate


def put(gate: AsyncGate, customer: str, record: dict[str, Any]) -> None:
    """A record written from the test's thread (the server's loop is another thread)."""
    asyncio.run(gate.customers.put(customer, record))
