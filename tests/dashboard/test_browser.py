"""The dashboard in a real browser (Debian's chromium, headless): sign in, find a customer,
change its plan, grant credits, see its usage bar move after requests to the app, sign out;
a wrong token; a forged form from another origin."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from tests.admin.support import TOKEN
from tests.dashboard.browser import available, browser, put, served
from tests.support import bearer

# CI runs scripts/test.sh, which installs them: there, a missing browser fails the tests
pytestmark = pytest.mark.skipif(
    not available() and not os.environ.get("CI"),
    reason="chromium and chromedriver (scripts/test.sh installs them)",
)


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    with browser() as driver:
        yield driver


def _sign_in(driver: Any, url: str, token: str = TOKEN) -> None:
    from selenium.webdriver.common.by import By

    driver.delete_all_cookies()
    driver.get(f"{url}/admin/ui/")
    assert driver.title.startswith("Sign in")
    field = driver.find_element(By.ID, "token")
    field.send_keys(token)
    field.submit()
    if token == TOKEN:
        _titled(driver, "Customers")


def _arrived(driver: Any, what: str) -> None:
    """Wait for the page a click or a submit navigates to: its notice says ``what``."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 10).until(
        ec.text_to_be_present_in_element((By.CSS_SELECTOR, ".notice"), what)
    )


def _titled(driver: Any, title: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 10).until(lambda d: d.title.startswith(title))


def _text(driver: Any, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.ID, element_id).text)


def test_sign_in_find_change_grant_see_usage_sign_out(driver: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    with served() as (url, gate):
        put(gate, "acme", {"plan": "pro"})
        _sign_in(driver, url)
        assert driver.title.startswith("Customers")
        search = driver.find_element(By.ID, "q")
        search.send_keys("acme")
        search.submit()
        _titled(driver, "acme")
        assert driver.find_element(By.TAG_NAME, "h1").text == "acme"
        assert _text(driver, "current-plan") == "pro"

        Select(driver.find_element(By.ID, "new-plan")).select_by_value("free")
        driver.find_element(By.CSS_SELECTOR, "form[action$='/plan'] button").click()
        _arrived(driver, "Plan changed.")
        assert _text(driver, "current-plan") == "free"
        assert asyncio.run(gate.customers.show("acme"))["plan"] == "free"

        driver.find_element(By.ID, "g-amount").send_keys("75")
        driver.find_element(By.CSS_SELECTOR, "form[action$='/credits'] button").click()
        _arrived(driver, "Credits granted.")
        assert _text(driver, "balance-ai_credits") == "75"

        usage = driver.find_element(By.ID, "m-api_calls-1")
        assert usage.get_attribute("value") == "0"
        for _ in range(3):
            answer = httpx.get(f"{url}/v1/projects", headers=bearer("acme", "free"))
            assert answer.status_code == 200
        driver.refresh()
        usage = driver.find_element(By.ID, "m-api_calls-1")
        assert usage.get_attribute("value") == "3"
        assert usage.get_attribute("max") == "5"
        assert "3 of 5 used (call)" in driver.page_source

        driver.find_element(By.CSS_SELECTOR, "form.logout button").click()
        _titled(driver, "Sign in")
        driver.get(f"{url}/admin/ui/customers")
        assert driver.title.startswith("Sign in")


def test_a_wrong_token_is_refused(driver: Any) -> None:
    with served() as (url, _):
        _sign_in(driver, url, "not-the-admin-token")
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(driver, 10).until(ec.presence_of_element_located((By.ID, "login-error")))
        assert _text(driver, "login-error") == "That is not the admin token."
        driver.get(f"{url}/admin/ui/customers")
        assert driver.title.startswith("Sign in")


class _Forger(BaseHTTPRequestHandler):
    """Another origin's page: a form that posts itself to the dashboard."""

    target = ""

    def do_GET(self) -> None:
        page = (
            f'<form id="f" method="post" action="{self.target}">'
            '<input name="plan" value="free"></form>'
            "<script>document.getElementById('f').submit()</script>"
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)

    def log_message(self, *args: Any) -> None:
        pass


def test_a_form_posted_from_another_origin_is_refused(driver: Any) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    with served() as (url, gate):
        put(gate, "acme", {"plan": "pro"})
        _sign_in(driver, url)
        assert driver.title.startswith("Customers")  # signed in: the cookie is set
        _Forger.target = f"{url}/admin/ui/customers/acme/plan"
        forger = ThreadingHTTPServer(("127.0.0.1", 0), _Forger)
        thread = threading.Thread(target=forger.serve_forever, daemon=True)
        thread.start()
        try:
            driver.get(f"http://127.0.0.1:{forger.server_address[1]}/")
            WebDriverWait(driver, 10).until(lambda d: d.title.startswith("Refused"))
        finally:
            forger.shutdown()
            forger.server_close()
        assert "Nothing was changed." in driver.page_source
        assert asyncio.run(gate.customers.show("acme"))["plan"] == "pro"


def test_the_keyboard_alone_signs_in_and_changes_a_plan(driver: Any) -> None:
    """Tab to the controls, type, Enter: no mouse, and a visible skip link first."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    with served() as (url, gate):
        put(gate, "acme", {"plan": "pro"})
        driver.delete_all_cookies()
        driver.get(f"{url}/admin/ui/login")
        body = driver.find_element(By.TAG_NAME, "body")
        body.send_keys(Keys.TAB)
        assert driver.switch_to.active_element.text == "Skip to content"
        for _ in range(10):  # to the token field
            if driver.switch_to.active_element.get_attribute("id") == "token":
                break
            driver.switch_to.active_element.send_keys(Keys.TAB)
        assert driver.switch_to.active_element.get_attribute("id") == "token"
        driver.switch_to.active_element.send_keys(TOKEN, Keys.ENTER)
        _titled(driver, "Customers")
        driver.get(f"{url}/admin/ui/customers/acme")
        for _ in range(30):  # to the plan selector
            if driver.switch_to.active_element.get_attribute("id") == "new-plan":
                break
            driver.switch_to.active_element.send_keys(Keys.TAB)
        select = driver.switch_to.active_element
        assert select.get_attribute("id") == "new-plan"
        Select(select).select_by_value("free")
        for _ in range(3):  # past the legacy box, to the button
            driver.switch_to.active_element.send_keys(Keys.TAB)
            if driver.switch_to.active_element.tag_name == "button":
                break
        driver.switch_to.active_element.send_keys(Keys.ENTER)
        _arrived(driver, "Plan changed.")
        assert asyncio.run(gate.customers.show("acme"))["plan"] == "free"
