"""The dashboard over plain HTTP against a real gateway and store: sign-in, every form's bad
input (a clear message, nothing changed), CSRF, isolation between accounts, throttling."""

from __future__ import annotations

import re
from typing import Any

import httpx
import openai
import pytest

from quota_proxy.dashboard.invites import invite
from quota_proxy.dashboard.security import hash_password, token_digest
from tests.conftest import GatewayHarness

pytestmark = pytest.mark.anyio

PASSWORD = "correct horse battery"
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


class Browser:
    """An HTTP client that keeps cookies and reads CSRF tokens from pages, like a browser."""

    def __init__(self, gw: GatewayHarness) -> None:
        self.gw = gw
        self.http = httpx.AsyncClient(base_url=gw.url + "/dashboard", timeout=30)
        gw._clients.append(self.http)

    async def get(self, path: str, **kw: Any) -> httpx.Response:
        return await self.http.get(path, **kw)

    async def csrf(self, path: str) -> str:
        page = await self.get(path)
        assert page.status_code == 200, page.text
        match = CSRF.search(page.text)
        assert match, page.text
        return match.group(1)

    async def post(self, path: str, data: dict[str, Any], csrf_from: str | None = None) -> httpx.Response:
        if csrf_from is not None and "csrf_token" not in data:
            data = {**data, "csrf_token": await self.csrf(csrf_from)}
        return await self.http.post(path, data=data)

    async def signin(self, email: str, password: str = PASSWORD) -> httpx.Response:
        return await self.post("/signin", {"email": email, "password": password}, csrf_from="/signin")


async def login(gw: GatewayHarness, account: str, email: str, role: str = "developer") -> Browser:
    """A login made through an invitation accepted in the store, then signed in over HTTP."""
    created = await invite(gw.store, gw.settings, account, email, role, gw.url)
    token = created.link.split("token=")[1]
    assert await gw.store.accept_invitation(token_digest(token), hash_password(PASSWORD))
    browser = Browser(gw)
    response = await browser.signin(email)
    assert response.status_code == 303, response.text
    return browser


async def test_invitation_sign_in_cookies_and_headers(gateway: GatewayHarness) -> None:
    await gateway.account("acme")
    created = await invite(gateway.store, gateway.settings, "acme", "Dev@Example.com", "developer",
                           gateway.url)
    assert created.link.startswith(f"{gateway.url}/dashboard/invitation?token=")
    browser = Browser(gateway)
    path = created.link[len(gateway.url) + len("/dashboard"):]
    page = await browser.get(path)
    assert page.status_code == 200
    for label in ("New password", "Confirm password", "Set password"):
        assert label in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "<script>" not in page.text and " style=" not in page.text
    token = path.split("token=")[1]
    csrf = CSRF.search(page.text).group(1)  # type: ignore[union-attr]

    for new, confirm, message in [
        ("short", "short", "at least 10 characters"),
        (PASSWORD, PASSWORD + "x", "not the same"),
    ]:
        bad = await browser.post("/invitation", {"csrf_token": csrf, "token": token,
                                                 "new_password": new, "confirm_password": confirm})
        assert bad.status_code == 400 and message in bad.text
    assert await gateway.store.login_by_email("dev@example.com") is None
    no_csrf = await browser.post("/invitation", {"token": token, "new_password": PASSWORD,
                                                 "confirm_password": PASSWORD})
    assert no_csrf.status_code == 403
    ok = await browser.post("/invitation", {"csrf_token": csrf, "token": token,
                                            "new_password": PASSWORD, "confirm_password": PASSWORD})
    assert ok.status_code == 303 and ok.headers["location"] == "/dashboard/signin?welcome=1"
    again = await browser.post("/invitation", {"csrf_token": csrf, "token": token,
                                               "new_password": PASSWORD, "confirm_password": PASSWORD})
    assert again.status_code == 410 and "used already" in again.text

    wrong = await browser.signin("dev@example.com", "not the password")
    assert wrong.status_code == 401 and "not right" in wrong.text
    assert (await browser.get("/")).status_code == 303  # still signed out
    first = await browser.signin("DEV@example.com")
    assert first.status_code == 303
    cookie = first.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Path=/dashboard" in cookie
    assert "Secure" not in cookie  # plain http, secure_cookies = "auto"
    old_session = browser.http.cookies["qp_session"]
    overview = await browser.get("/")
    assert overview.status_code == 200 and "Sign out" in overview.text
    # Signing in again rotates the session id and ends the old one.
    assert (await browser.signin("dev@example.com")).status_code == 303
    assert browser.http.cookies["qp_session"] != old_session
    stale = httpx.AsyncClient(base_url=gateway.url + "/dashboard", cookies={"qp_session": old_session})
    gateway._clients.append(stale)
    assert (await stale.get("/")).status_code == 303

    out = await browser.post("/signout", {}, csrf_from="/")
    assert out.status_code == 303
    assert (await browser.get("/keys")).status_code == 303


async def test_csrf_missing_or_wrong_is_refused_and_changes_nothing(gateway: GatewayHarness) -> None:
    await gateway.account("acme")
    browser = await login(gateway, "acme", "a@example.com")
    for data in ({"kind": "live"}, {"kind": "live", "csrf_token": "forged"}):
        response = await browser.post("/keys", data)
        assert response.status_code == 403 and "did not come from this dashboard" in response.text
    assert await gateway.store.list_keys() == []
    assert (await browser.post("/signout", {})).status_code == 403
    assert (await browser.get("/")).status_code == 200  # still signed in
    grant = await browser.post("/users/grant", {"external_user_id": "u1", "amount": "1",
                                                "idempotency_key": "k" * 20})
    assert grant.status_code == 403
    assert await gateway.balance("acme") == 1_000_000


async def test_key_form_bad_input_then_a_key_shown_once_that_works(gateway: GatewayHarness) -> None:
    await gateway.account("acme")
    browser = await login(gateway, "acme", "a@example.com")
    form = await browser.get("/keys/new")
    for label in ("Name", "Kind", "Allowed routes", ">Create<"):
        assert label in form.text
    cases = [
        ({"kind": "admin"}, "Choose the kind"),
        ({"kind": "live", "routes": "quota/nope"}, "Unknown route: quota/nope"),
        ({"kind": "live", "rpm": "ten"}, "Requests per minute must be a whole number"),
        ({"kind": "live", "max_concurrent": "0"}, "Concurrent requests must be"),
        ({"kind": "live", "expires": "tomorrow"}, "The expiry must be a date"),
        ({"kind": "live", "expires": "2027-13-45"}, "is not a date"),
        ({"kind": "live", "name": "x" * 101}, "at most 100 characters"),
    ]
    for data, message in cases:
        response = await browser.post("/keys", data, csrf_from="/keys")
        assert response.status_code == 400, data
        assert message in response.text, (data, response.text)
    assert await gateway.store.list_keys() == []

    created = await browser.post("/keys", {"kind": "live", "name": "backend", "routes": "quota/fast",
                                           "allow_community": "on"}, csrf_from="/keys")
    assert created.status_code == 200 and "Your new key" in created.text
    key = re.search(r'id="new-key" type="text" readonly value="(qta_live_\w+)"', created.text).group(1)  # type: ignore[union-attr]
    listing = await browser.get("/keys")
    assert key not in listing.text and key[:13] in listing.text
    models = await gateway.http().get("/v1/models", headers={"authorization": f"Bearer {key}"})
    assert [m["id"] for m in models.json()["data"]] == ["quota/fast"]


async def test_grant_form_bad_input_and_double_submit(gateway: GatewayHarness) -> None:
    await gateway.account("acme", 2_000_000)
    browser = await login(gateway, "acme", "a@example.com")
    idem = "form-key-0123456789"
    base = {"external_user_id": "user-1", "amount": "0.50", "description": "", "idempotency_key": idem}
    cases = [
        ({"external_user_id": "no spaces"}, "1-128 characters"),
        ({"amount": "abc"}, "must be a number"),
        ({"amount": "0"}, "more than $0"),
        ({"amount": "-1"}, "more than $0"),
        ({"amount": "0.0000001"}, "whole number of quota tokens"),
        ({"amount": "5"}, "too low for this grant"),
        ({"description": "d" * 501}, "at most 500 characters"),
        ({"idempotency_key": "short"}, "Reload the page"),
    ]
    for change, message in cases:
        response = await browser.post("/users/grant", {**base, **change}, csrf_from="/users")
        assert response.status_code in (400, 402), change
        assert message in response.text, (change, response.text)
    assert await gateway.balance("acme") == 2_000_000
    assert await gateway.store.list_users((await gateway.store.account_by_name("acme")).id) == []  # type: ignore[union-attr]

    first = await browser.post("/users/grant", base, csrf_from="/users")
    second = await browser.post("/users/grant", base, csrf_from="/users")
    assert first.status_code == second.status_code == 303
    assert await gateway.balance("acme", user="user-1") == 500_000
    assert await gateway.balance("acme") == 1_500_000
    changed = await browser.post("/users/grant", {**base, "amount": "0.75"}, csrf_from="/users")
    assert changed.status_code == 409 and "already used for a different grant" in changed.text
    assert await gateway.balance("acme", user="user-1") == 500_000
    page = await browser.get("/users", params={"q": "user"})
    assert "user-1" in page.text and "$0.50" in page.text
    mode = await browser.post("/users/user-1/billing-mode", {"billing_mode": "sideways"},
                              csrf_from="/users/user-1")
    assert mode.status_code == 400
    ok = await browser.post("/users/user-1/billing-mode", {"billing_mode": "developer"},
                            csrf_from="/users/user-1")
    assert ok.status_code == 303
    user = await gateway.store.user((await gateway.store.account_by_name("acme")).id, "user-1")  # type: ignore[union-attr]
    assert user is not None and user.billing_mode == "developer"
    await gateway.verify()


async def test_a_developer_cannot_reach_another_account(gateway: GatewayHarness) -> None:
    await gateway.account("alpha")
    bravo = await gateway.account("bravo", 3_000_000)
    bravo_key = await gateway.key("bravo")
    await gateway.store.grant(bravo.id, "bravo-user", 100, "", None, "h")
    bravo_key_id = (await gateway.store.list_keys(bravo.id))[0].public_id
    alpha = await login(gateway, "alpha", "alpha@example.com")

    revoke = await alpha.post(f"/keys/{bravo_key_id}/revoke", {}, csrf_from="/keys")
    assert revoke.status_code == 404
    assert (await alpha.get(f"/keys/{bravo_key_id}/revoke")).status_code == 404
    assert (await alpha.get("/users/bravo-user")).status_code == 404
    mode = await alpha.post("/users/bravo-user/billing-mode", {"billing_mode": "developer"},
                            csrf_from="/keys")
    assert mode.status_code == 404
    assert (await alpha.get("/accounts")).status_code == 403
    assert (await alpha.get(f"/accounts/{bravo.public_id}")).status_code == 403
    credit = await alpha.post(f"/accounts/{bravo.public_id}/credit", {"amount": "100", "reason": "x"},
                              csrf_from="/keys")
    assert credit.status_code == 403
    invite_other = await alpha.post("/accounts/invitations", {"account": "bravo", "email": "x@y.io",
                                                              "role": "operator"}, csrf_from="/keys")
    assert invite_other.status_code == 403
    keys_page = await alpha.get("/keys")
    assert bravo_key[:13] not in keys_page.text
    models = await gateway.http().get("/v1/models", headers={"authorization": f"Bearer {bravo_key}"})
    assert models.status_code == 200
    assert await gateway.balance("bravo") == 3_000_000 - 100
    assert (await gateway.store.user(bravo.id, "bravo-user")).billing_mode == "user"  # type: ignore[union-attr]


async def test_sign_in_is_throttled_per_account_and_per_address(gateway: GatewayHarness) -> None:
    await gateway.account("acme")
    await login(gateway, "acme", "a@example.com")
    await login(gateway, "acme", "b@example.com")
    browser = Browser(gateway)
    for _ in range(5):
        assert (await browser.signin("a@example.com", "wrong password")).status_code == 401
    blocked = await browser.signin("a@example.com")  # the right password, but too late
    assert blocked.status_code == 429 and "Too many failed sign-ins" in blocked.text
    assert (await browser.signin("b@example.com")).status_code == 303  # another account is fine
    for i in range(14):  # 5 + 14 + 1 = 20 failures from this address
        assert (await browser.signin(f"nobody{i}@example.com", "wrong password")).status_code == 401
    assert (await browser.signin("b@example.com", "wrong password")).status_code == 401
    assert (await browser.signin("b@example.com")).status_code == 429


async def test_operator_forms_refuse_bad_input_and_credit_with_a_reason(gateway: GatewayHarness) -> None:
    acme = await gateway.account("acme", 0)
    await gateway.account("ops", 0)
    op = await login(gateway, "ops", "op@example.com", role="operator")
    assert (await op.post("/accounts", {"name": "acme"}, csrf_from="/accounts")).status_code == 400
    bad_amount = await op.post("/accounts", {"name": "new", "amount": "x"}, csrf_from="/accounts")
    assert bad_amount.status_code == 400 and "must be a number" in bad_amount.text
    assert await gateway.store.account_by_name("new") is None
    page = f"/accounts/{acme.public_id}"
    for data, message in [
        ({"amount": "0", "reason": "r"}, "must not be zero"),
        ({"amount": "ten", "reason": "r"}, "must be a number"),
        ({"amount": "10", "reason": ""}, "Give a reason"),
    ]:
        response = await op.post(f"{page}/credit", data, csrf_from=page)
        assert response.status_code == 400 and message in response.text
    assert await gateway.balance("acme") == 0
    ok = await op.post(f"{page}/credit", {"amount": "12.5", "reason": "wire 1234"}, csrf_from=page)
    assert ok.status_code == 303
    entry = (await gateway.store.ledger(acme.id))[0]
    assert entry.amount == 12_500_000 and entry.kind == "credit" and "wire 1234" in entry.description
    bad_invite = await op.post("/accounts/invitations", {"account": "acme", "email": "nope",
                                                         "role": "developer"},
                               csrf_from="/accounts/invitations")
    assert bad_invite.status_code == 400 and "is not an email address" in bad_invite.text
    good = await op.post("/accounts/invitations", {"account": "acme", "email": "dev@acme.io",
                                                   "role": "developer"}, csrf_from="/accounts/invitations")
    assert good.status_code == 200 and "/dashboard/invitation?token=" in good.text
    for path in ("/accounts", "/accounts/operations", "/accounts/invitations", page):
        assert (await op.get(path)).status_code == 200, path
    assert "Ledger OK" in (await op.get("/accounts/operations")).text


async def test_usage_api_and_csv_export_agree(gateway: GatewayHarness) -> None:
    await gateway.account("acme")
    key = await gateway.key("acme", name="k1")
    client = gateway.openai(key)
    for model in ("quota/fast", "quota/sonnet", "quota/sonnet"):
        await client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    browser = await login(gateway, "acme", "a@example.com")
    http = gateway.http()
    auth = {"authorization": f"Bearer {key}"}
    for group in ("day", "route", "key", "user", "session"):
        api = await http.get("/v1/usage", params={"group_by": group, "format": "csv"}, headers=auth)
        page = await browser.get("/usage.csv", params={"group_by": group, "days": "30"})
        assert api.status_code == page.status_code == 200
        assert api.text == page.text and api.text.startswith(f"{group},requests,")
    data = (await http.get("/v1/usage", params={"group_by": "route"}, headers=auth)).json()
    sonnet = next(row for row in data["data"] if row["route"] == "quota/sonnet")
    assert sonnet["requests"] == 2 and sonnet["charged_quota_tokens"] > 0
    bad = await http.get("/v1/usage", params={"group_by": "planet"}, headers=auth)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_request"
    assert (await browser.get("/usage", params={"days": "0"})).status_code == 400
    for path in ("/", "/usage", "/ledger", "/packages", "/users", "/keys"):
        assert (await browser.get(path)).status_code == 200, path


async def test_cli_invites_and_revokes_sessions(gateway: GatewayHarness) -> None:
    await gateway.account("acme")
    out = gateway.cli("dashboard", "invite", "--account", "acme", "--email", "c@example.com")
    link = out.stdout.splitlines()[0]
    assert link.startswith("http://127.0.0.1:8080/dashboard/invitation?token=")
    bad = gateway.cli("dashboard", "invite", "--account", "nope", "--email", "c@example.com", check=False)
    assert bad.returncode == 1 and "no account named" in bad.stderr
    browser = await login(gateway, "acme", "a@example.com")
    listed = gateway.cli("dashboard", "sessions", "list", "--json")
    assert '"a@example.com"' in listed.stdout
    revoked = gateway.cli("dashboard", "sessions", "revoke", "--email", "a@example.com")
    assert "revoked 1 session" in revoked.stdout
    assert (await browser.get("/")).status_code == 303
    assert (await browser.signin("a@example.com")).status_code == 303
    gateway.cli("dashboard", "logins", "disable", "A@example.com")
    assert (await browser.get("/")).status_code == 303
    assert (await browser.signin("a@example.com")).status_code == 401
    assert '"disabled_at": "20' in gateway.cli("dashboard", "logins", "list", "--json").stdout


async def test_operations_page_shows_upstream_failures_and_cooldowns(make_gateway: Any) -> None:
    gateway: GatewayHarness = await make_gateway(routes="\n".join([
        '[routes."quota/fallback"]', 'upstreams = ["down", "fake"]', 'model = "fake-fast"',
        "multiplier = 1", "max_output_tokens = 64",
    ]))
    await gateway.account("acme")
    await gateway.account("ops", 0)
    client = gateway.openai(await gateway.key("acme"))
    reply = await client.chat.completions.create(model="quota/fallback",
                                                 messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content
    with pytest.raises(openai.APIStatusError):
        await client.chat.completions.create(model="quota/down", messages=[{"role": "user", "content": "hi"}])
    op = await login(gateway, "ops", "op@example.com", role="operator")
    page = (await op.get("/accounts/operations")).text
    assert re.search(r"down \(cooling down, \d+ s left\) → fake", page), page
    row = re.search(r'<th scope="row">quota/down</th>.*?</tr>', page, re.S)
    assert row is not None and "1 × upstream error" in row.group(0)
