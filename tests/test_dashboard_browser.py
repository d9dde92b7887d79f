"""The dashboard in real headless Chromium (Playwright driving the system's chromium), against
a real gateway and store, through the names people see (labels and button texts).

Screenshots of every page go to test-artifacts/dashboard/ (or $QUOTA_TEST_ARTIFACTS).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import openai
import pytest

from quota_proxy.dashboard.invites import invite
from tests.conftest import GatewayHarness

pytestmark = pytest.mark.anyio

CHROMIUM = Path(os.environ.get("QUOTA_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = Path(os.environ.get("QUOTA_TEST_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts"))
PASSWORD = "a long enough password"
MOBILE = {"width": 375, "height": 800}

if not CHROMIUM.exists():
    message = (f"{CHROMIUM} not found: install the distribution's Chromium (apt-get install chromium) "
               "or set QUOTA_CHROMIUM to its path; Playwright never downloads a browser here")
    if os.environ.get("CI") == "true":
        raise RuntimeError(message)
    pytest.skip(message, allow_module_level=True)

from playwright.async_api import Browser, Page, async_playwright  # noqa: E402


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                            args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            await chromium.close()


class Tab:
    """A page that records console errors and saves a screenshot of every page it shows."""

    def __init__(self, page: Page, name: str) -> None:
        self.page = page
        self.name = name
        self.errors: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        ARTIFACTS.joinpath("dashboard").mkdir(parents=True, exist_ok=True)

    async def shot(self, label: str) -> None:
        await self.page.screenshot(path=str(ARTIFACTS / "dashboard" / f"{self.name}-{label}.png"),
                                   full_page=True)
        width = await self.page.evaluate("document.documentElement.scrollWidth")
        viewport = self.page.viewport_size
        assert viewport is not None and width <= viewport["width"], f"{label}: {width}px wide"

    async def go(self, url: str, label: str) -> None:
        response = await self.page.goto(url)
        assert response is not None and response.ok, url
        await self.shot(label)

    async def nav(self, name: str) -> None:
        await self.page.get_by_role("navigation", name="Main").get_by_role("link", name=name, exact=True).click()
        await self.page.wait_for_load_state()
        await self.shot(name.lower().replace(" ", "-"))


async def open_tab(browser: Browser, name: str) -> Tab:
    context = await browser.new_context(viewport=MOBILE)
    return Tab(await context.new_page(), name)


async def accept_invitation(tab: Tab, link: str, email: str) -> None:
    await tab.go(link, "invitation")
    await tab.page.get_by_label("New password").fill(PASSWORD)
    await tab.page.get_by_label("Confirm password").fill(PASSWORD)
    await tab.page.get_by_role("button", name="Set password").click()
    await tab.page.wait_for_url("**/signin?welcome=1")
    await tab.shot("signin")
    await tab.page.get_by_label("Email").fill(email)
    await tab.page.get_by_label("Password").fill(PASSWORD)
    await tab.page.get_by_role("button", name="Sign in").click()
    await tab.page.get_by_role("heading", name="Overview").wait_for()


async def text_of(page: Page, selector: str) -> str:
    return (await page.locator(selector).inner_text()).strip()


async def test_newcomer_path_isolation_grants_exports_and_operator_credit(
    gateway: GatewayHarness, browser: Browser
) -> None:
    gw = gateway
    await gw.account("acme", 2_000_000)
    await gw.account("ops", 0)
    dev_link = (await invite(gw.store, gw.settings, "acme", "dev@acme.io", "developer", gw.url)).link
    dev = await open_tab(browser, "developer")
    await accept_invitation(dev, dev_link, "dev@acme.io")
    await dev.shot("overview")
    balance_before = await text_of(dev.page, "#balance")
    assert balance_before == "$2.00"
    assert await dev.page.locator("svg.chart rect").count() == 0

    # Create a key; it is shown once, in a read-only field.
    await dev.nav("Keys")
    await dev.page.get_by_role("button", name="Create key").click()
    await dev.page.get_by_label("Name").fill("laptop")
    await dev.page.get_by_label("Kind").select_option("live")
    await dev.page.get_by_label("Allowed routes").select_option(["quota/fast", "quota/sonnet"])
    await dev.shot("create-key")
    await dev.page.get_by_role("button", name="Create", exact=True).click()
    field = dev.page.get_by_label("Your new key")
    assert await field.get_attribute("readonly") is not None
    key = await field.input_value()
    assert key.startswith("qta_live_")
    await dev.shot("new-key")

    client = openai.AsyncOpenAI(base_url=gw.base_url, api_key=key, max_retries=0, timeout=10)
    try:
        reply = await client.chat.completions.create(
            model="quota/sonnet", messages=[{"role": "user", "content": "Hello there"}]
        )
        charged = reply.usage.model_extra["charged_quota_tokens"]  # type: ignore[union-attr]
        assert charged > 0
        await dev.nav("Overview")
        assert await text_of(dev.page, "#balance") == gw.settings.money.usd(2_000_000 - charged)
        assert await dev.page.locator("svg.chart rect").count() == 1

        # Revoke with confirmation; the SDK is refused within 5 s.
        await dev.nav("Keys")
        await dev.page.get_by_role("row").filter(has_text="laptop").get_by_role("button", name="Revoke").click()
        await dev.shot("revoke-confirm")
        await dev.page.get_by_role("button", name="Revoke key").click()
        await dev.page.get_by_role("status").wait_for()
        revoked_at = time.monotonic()
        while True:
            try:
                await client.chat.completions.create(
                    model="quota/fast", messages=[{"role": "user", "content": "again"}]
                )
            except openai.AuthenticationError:
                break
            assert time.monotonic() - revoked_at < 5, "the revoked key still works after 5 s"
            await anyio.sleep(0.2)
    finally:
        await client.close()

    # Grant to an app user with a double click: one grant.
    await dev.nav("App users")
    await dev.page.get_by_label("User ID").fill("alice")
    await dev.page.get_by_label("Amount (USD)").fill("0.25")
    await dev.page.get_by_role("button", name="Grant").dblclick()
    await dev.page.wait_for_url("**/users?granted=*")
    await dev.shot("granted")
    acme = await gw.store.account_by_name("acme")
    assert acme is not None
    alice = await gw.store.user(acme.id, "alice")
    assert alice is not None and alice.balance == 250_000
    assert [e.kind for e in await gw.store.ledger(alice.id)] == ["grant"]
    await dev.page.get_by_role("link", name="alice").click()
    await dev.shot("app-user")

    # The CSV export equals the API's numbers.
    await dev.nav("Usage")
    api_key = await gw.key("acme", kind="live")
    for group in ("route", "day", "key"):
        await dev.page.get_by_label("Group by").select_option(group)
        await dev.page.get_by_role("button", name="Show").click()
        await dev.page.wait_for_url(f"**group_by={group}**")
        async with dev.page.expect_download() as download_info:
            await dev.page.get_by_role("link", name="Download CSV").click()
        download = await download_info.value
        exported = Path(await download.path()).read_text()
        api = await gw.http().get("/v1/usage", params={"group_by": group, "format": "csv"},
                                  headers={"authorization": f"Bearer {api_key}"})
        assert exported == api.text
    await dev.shot("usage-by-key")
    await dev.nav("Ledger")
    assert "quota/sonnet" in await dev.page.locator("main").inner_text()
    await dev.nav("Packages")
    assert "Starter" in await dev.page.locator("main").inner_text()
    assert await dev.page.get_by_role("link", name="Accounts").count() == 0

    # An operator credits the account; the developer sees it.
    balance_before_credit = await gw.balance("acme")
    op_link = (await invite(gw.store, gw.settings, "ops", "op@ops.io", "operator", gw.url)).link
    op = await open_tab(browser, "operator")
    await accept_invitation(op, op_link, "op@ops.io")
    await op.nav("Accounts")
    await op.page.get_by_role("link", name="acme", exact=True).click()
    await op.shot("account")
    await op.page.get_by_label("Amount (USD)").fill("5")
    await op.page.get_by_label("Reason").fill("invoice 42")
    await op.page.get_by_role("button", name="Record").click()
    await op.page.get_by_role("status").wait_for()
    await op.page.get_by_role("link", name="Operations").click()
    await op.shot("operations")
    assert "Ledger OK" in await op.page.locator("main").inner_text()
    await op.page.get_by_role("link", name="Invitations").click()
    await op.shot("invitations")
    await dev.nav("Overview")
    expected = gw.settings.money.usd(balance_before_credit + 5_000_000)
    assert await text_of(dev.page, "#balance") == expected

    # A developer editing URLs reaches nothing of another account.
    ops_account = await gw.store.account_by_name("ops")
    assert ops_account is not None
    denied = await dev.page.goto(f"{gw.url}/dashboard/accounts/{ops_account.public_id}")
    assert denied is not None and denied.status == 403
    await dev.shot("forbidden")
    # … or by editing a form: the revoke form pointed at the other account's key is a 404.
    ops_key = await gw.key("ops")
    ops_key_id = (await gw.store.list_keys(ops_account.id))[0].public_id
    own = next(k for k in await gw.store.list_keys(acme.id) if k.revoked_at is None)
    await dev.page.goto(f"{gw.url}/dashboard/keys/{own.public_id}/revoke")
    await dev.page.evaluate(
        "id => { document.querySelector('main form').action = `/dashboard/keys/${id}/revoke`; }", ops_key_id
    )
    async with dev.page.expect_response(f"**/keys/{ops_key_id}/revoke") as edited:
        await dev.page.get_by_role("button", name="Revoke key").click()
    assert (await edited.value).status == 404
    assert (await gw.store.list_keys(ops_account.id))[0].revoked_at is None
    models = await gw.http().get("/v1/models", headers={"authorization": f"Bearer {ops_key}"})
    assert models.status_code == 200
    await dev.page.goto(f"{gw.url}/dashboard/")
    await dev.page.get_by_role("button", name="Sign out").click()
    await dev.page.get_by_role("heading", name="Sign in").wait_for()

    # Wrong passwords are throttled.
    for _ in range(6):
        await dev.page.get_by_label("Email").fill("dev@acme.io")
        await dev.page.get_by_label("Password").fill("wrong password")
        await dev.page.get_by_role("button", name="Sign in").click()
        await dev.page.get_by_role("alert").wait_for()
    assert "Too many failed sign-ins" in await text_of(dev.page, "[role=alert]")
    await dev.shot("throttled")

    # No console errors on any page, but for the refusals this test provoked on purpose.
    provoked = re.compile(r"Failed to load resource: the server responded with a status of (401|403|404|429)")
    unexpected: list[Any] = [e for e in dev.errors + op.errors if not provoked.match(e)]
    assert unexpected == []
    await gw.verify()
