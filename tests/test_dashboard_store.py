"""The dashboard's store methods on a real SQLite file, and its pure parts: passwords, CSRF,
the chart, the [dashboard] config, and where the gateway sends a path."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import anyio
import httpx
import pytest

from quota_proxy.app import create_app
from quota_proxy.config import ConfigError, DashboardSettings, Settings, parse_settings
from quota_proxy.dashboard.charts import daily_route_chart, last_days
from quota_proxy.dashboard.security import csrf_for, hash_password, token_digest, verify_password
from quota_proxy.store.dashboard_models import DayRouteCharge, Role, ThrottleScope
from quota_proxy.store.sqlite import SqliteStore

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _store(tmp_path: Path) -> SqliteStore:
    store = SqliteStore(tmp_path / "dash.db")
    await store.open()
    return store


def test_passwords_are_salted_scrypt_and_verify() -> None:
    first, second = hash_password("same password"), hash_password("same password")
    assert first != second and first.startswith("scrypt$16384$8$1$")
    assert verify_password("same password", first)
    assert not verify_password("same passwore", first)
    assert not verify_password("x", "not a hash")
    assert csrf_for("a") != csrf_for("b") and csrf_for("a") == csrf_for("a")


async def test_invitation_is_used_once_even_when_accepted_concurrently(tmp_path: Path) -> None:
    store = await _store(tmp_path)
    try:
        account = await store.create_account("acme")
        digest = token_digest("the-token")
        future = int(time.time() * 1000) + 60_000
        await store.create_invitation(account.id, "Dev@Example.com", Role.DEVELOPER, digest, future)
        assert (await store.pending_invitation(digest)) is not None
        results = []

        async def accept(password: str) -> None:
            results.append(await store.accept_invitation(digest, hash_password(password)))

        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(accept, f"password number {i}")
        logins = [r for r in results if r is not None]
        assert len(logins) == 1 and logins[0].email == "dev@example.com"
        assert await store.pending_invitation(digest) is None
        expired = token_digest("old")
        await store.create_invitation(account.id, "x@example.com", Role.OPERATOR, expired, 1)
        assert await store.accept_invitation(expired, "h") is None
        assert await store.login_by_email("x@example.com") is None
    finally:
        await store.close()


async def test_sessions_expire_when_idle_or_old_and_can_be_revoked(tmp_path: Path) -> None:
    store = await _store(tmp_path)
    try:
        account = await store.create_account("acme")
        digest = token_digest("inv")
        await store.create_invitation(account.id, "a@example.com", Role.DEVELOPER, digest, 2**50)
        login = await store.accept_invitation(digest, "h")
        assert login is not None
        await store.create_session(login.id, token_digest("idle"), 50, 3_600_000, "127.0.0.1")
        await store.create_session(login.id, token_digest("old"), 3_600_000, 50, "127.0.0.1")
        await store.create_session(login.id, token_digest("live"), 3_600_000, 3_600_000, "127.0.0.1")
        await store.create_session(login.id, token_digest("other"), 3_600_000, 3_600_000, "127.0.0.1")
        assert await store.live_session(token_digest("idle")) is not None
        await anyio.sleep(0.1)
        assert await store.live_session(token_digest("idle")) is None
        assert await store.live_session(token_digest("old")) is None
        live = await store.live_session(token_digest("live"))
        assert live is not None and live.account_name == "acme" and live.role is Role.DEVELOPER
        assert len(await store.list_sessions("A@example.com")) == 2
        assert await store.revoke_sessions(public_id=live.public_id) == 1
        assert await store.live_session(token_digest("live")) is None
        await store.end_session(token_digest("other"))
        assert await store.live_session(token_digest("other")) is None
        assert await store.revoke_sessions(everyone=True) == 2  # the idle and the old one, expired but not yet revoked
    finally:
        await store.close()


async def test_signin_failures_count_in_a_window(tmp_path: Path) -> None:
    store = await _store(tmp_path)
    try:
        scope = ThrottleScope.ACCOUNT
        for expected in (1, 2, 3):
            assert await store.record_signin_failure(scope, "a@x.io", 60_000) == expected
        assert await store.signin_failures(scope, "a@x.io", 60_000) == 3
        assert await store.signin_failures(ThrottleScope.ADDRESS, "a@x.io", 60_000) == 0
        await anyio.sleep(0.02)
        assert await store.signin_failures(scope, "a@x.io", 10) == 0  # the window has passed
        assert await store.record_signin_failure(scope, "a@x.io", 10) == 1  # and starts again
        await store.clear_signin_failures(scope, "a@x.io")
        assert await store.signin_failures(scope, "a@x.io", 60_000) == 0
    finally:
        await store.close()


async def test_a_key_is_revoked_only_by_its_own_account(tmp_path: Path) -> None:
    store = await _store(tmp_path)
    try:
        mine, theirs = await store.create_account("mine"), await store.create_account("theirs")
        key = await store.create_key(theirs.id, "live", "digest", "qta_live_abcd")
        assert not await store.revoke_account_key(mine.id, key.public_id)
        assert (await store.list_keys(theirs.id))[0].revoked_at is None
        assert await store.revoke_account_key(theirs.id, key.public_id)
        assert (await store.list_keys(theirs.id))[0].revoked_at is not None
    finally:
        await store.close()


def test_chart_stacks_routes_per_day_and_escapes_names() -> None:
    days = last_days(30)
    rows = [DayRouteCharge(days[-1], "quota/<fast>", 300), DayRouteCharge(days[-1], "quota/b", 100),
            DayRouteCharge(days[0], "quota/b", 400), DayRouteCharge("1999-01-01", "quota/b", 9)]
    svg, legend = daily_route_chart(rows, 30, str, "Charges")
    assert svg.count("<rect") == 3  # the day outside the 30 is left out
    assert "quota/&lt;fast&gt;" in svg and "<fast>" not in svg
    assert [item.name for item in legend] == ["quota/<fast>", "quota/b"]
    assert 'role="img"' in svg and "<title" in svg


def test_dashboard_config_is_validated() -> None:
    default = parse_settings({})
    assert default.dashboard == DashboardSettings() and default.server.public_url is None
    custom = parse_settings({"dashboard": {"path": "/ui/", "secure_cookies": "always"},
                             "server": {"public_url": "https://llm.example.com/"}})
    assert custom.dashboard.path == "/ui" and custom.dashboard.secure_cookies == "always"
    assert custom.server.public_url == "https://llm.example.com"
    with pytest.raises(ConfigError) as bad:
        parse_settings({"dashboard": {"path": "/v1/ui", "secure_cookies": "sometimes", "colour": 1},
                        "server": {"public_url": "llm.example.com"}})
    problems = "\n".join(bad.value.problems)
    for expected in ("dashboard.path:", "dashboard.secure_cookies:", "dashboard.colour: unknown key",
                     "server.public_url: must start with"):
        assert expected in problems


async def test_the_dashboard_can_be_moved_or_switched_off(tmp_path: Path) -> None:
    base = parse_settings({"store": {"path": str(tmp_path / "s.db")}})

    async def get(settings: Settings, path: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(settings))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get(path)

    moved = dataclasses.replace(base, dashboard=DashboardSettings(path="/ui"))
    assert (await get(moved, "/ui/signin")).status_code == 200
    assert "Sign in" in (await get(moved, "/ui/signin")).text
    assert (await get(moved, "/dashboard/signin")).json()["error"]["code"] == "invalid_api_key"
    off = dataclasses.replace(base, dashboard=DashboardSettings(enabled=False))
    response = await get(off, "/dashboard/signin")
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    secure = dataclasses.replace(base, dashboard=DashboardSettings(secure_cookies="always"))
    assert "Secure" in (await get(secure, "/dashboard/signin")).headers["set-cookie"]
