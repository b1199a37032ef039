"""Screenshots of the dashboard's main pages for the docs (docs/img/dashboard-*.png).

    python scripts/screenshots.py

Debian's chromium, headless (tests/dashboard/browser.py: nothing is downloaded), on the
dashboard tests' app with a few customers, credits and some usage.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from tests.admin.support import TOKEN  # noqa: E402
from tests.dashboard.browser import browser, put, served  # noqa: E402
from tests.support import bearer  # noqa: E402

OUT = ROOT / "docs" / "img"


def main() -> int:
    import tempfile

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from tests.billing.support import billing_config

    OUT.mkdir(parents=True, exist_ok=True)
    log = Path(tempfile.mkdtemp()) / "decisions.jsonl"  # refusals to show on a customer
    config = billing_config(decision_log={"to": str(log)})
    with served(config) as (url, gate), browser(1280, 860) as driver:
        for name, plan, addons in (
            ("acme", "pro", {"token_pack": 2}),
            ("globex", "free", {}),
            ("hooli", "free", {}),
            ("initech", "free", {}),
            ("umbrella", "pro", {}),
        ):
            put(gate, name, {"plan": plan, "addons": addons})
        asyncio.run(gate.customers.grant_credits("acme", "ai_credits", 1200))
        for _ in range(4):
            httpx.get(f"{url}/v1/projects", headers=bearer("acme", "pro"))
        for _ in range(7):  # globex, on free: 5 a minute
            httpx.get(f"{url}/v1/projects", headers=bearer("globex", "free"))
        httpx.post(f"{url}/v1/reports/7/export", headers=bearer("globex", "free"))
        driver.get(f"{url}/admin/ui/login")
        driver.save_screenshot(str(OUT / "dashboard-login.png"))
        field = driver.find_element(By.ID, "token")
        field.send_keys(TOKEN)
        field.submit()
        WebDriverWait(driver, 10).until(lambda d: d.title.startswith("Customers"))
        for page, path in (
            ("customers", "/admin/ui/customers"),
            ("customer", "/admin/ui/customers/acme"),
            ("refusals", "/admin/ui/customers/globex"),
            ("plans", "/admin/ui/plans"),
            ("config", "/admin/ui/config"),
        ):
            driver.get(f"{url}{path}")
            if page == "refusals":
                driver.execute_script("document.getElementById('h-refusals').scrollIntoView()")
            driver.save_screenshot(str(OUT / f"dashboard-{page}.png"))
            print(f"wrote docs/img/dashboard-{page}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
