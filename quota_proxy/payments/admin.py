"""Operator actions for money coming in, behind the CLI: orders, redemption codes, alerts."""

from __future__ import annotations

from typing import Any

from quota_proxy import admin
from quota_proxy.config import Settings
from quota_proxy.errors import BadRequest
from quota_proxy.payments.codes import code_digest, generate_code
from quota_proxy.payments.views import alerts_view, order_view, parse_thresholds, parse_url
from quota_proxy.store import Store, alert_store, payment_store
from quota_proxy.views import iso_time

MAX_CODES = 10_000


async def list_orders(store: Store, settings: Settings, account_name: str, limit: int) -> list[dict[str, Any]]:
    account = await admin.developer(store, account_name)
    return [order_view(o, settings.money) for o in await payment_store(store).orders(account.id, limit)]


async def create_codes(
    store: Store, settings: Settings, package_id: str, count: int, expires: str | None
) -> dict[str, Any]:
    package = next((p for p in settings.packages if p.id == package_id), None)
    if package is None:
        known = ", ".join(p.id for p in settings.packages) or "none configured"
        raise admin.AdminError(f"no package {package_id!r} (packages: {known})")
    if not 1 <= count <= MAX_CODES:
        raise admin.AdminError(f"--count must be from 1 to {MAX_CODES}")
    expires_at = admin.parse_expiry(expires) if expires else None
    codes = [generate_code() for _ in range(count)]
    digests = [code_digest(c) for c in codes]
    assert all(d is not None for d in digests)
    ids = await payment_store(store).create_codes(
        [d for d in digests if d is not None], package.id, package.quota_tokens, expires_at
    )
    return {
        "codes": codes,
        "ids": ids,
        "package": package.id,
        "quota_tokens": package.quota_tokens,
        "expires_at": iso_time(expires_at),
    }


async def list_codes(store: Store) -> list[dict[str, Any]]:
    rows = await payment_store(store).codes()
    for row in rows:
        for key in ("expires_at", "claimed_at", "created_at"):
            row[key] = iso_time(row[key])
    return rows


async def set_alerts(
    store: Store,
    settings: Settings,
    account_name: str,
    url: str,
    thresholds: list[str],
    user_thresholds: list[str],
) -> dict[str, Any]:
    account = await admin.developer(store, account_name)
    try:
        saved = await alert_store(store).set(
            account.id,
            parse_url(url),
            parse_thresholds(thresholds, "thresholds", settings.money),
            parse_thresholds(user_thresholds, "user_thresholds", settings.money),
        )
    except BadRequest as exc:
        raise admin.AdminError(exc.message) from None
    return {"account": account.name, **alerts_view(saved, settings.money)}


async def show_alerts(store: Store, settings: Settings, account_name: str) -> dict[str, Any]:
    account = await admin.developer(store, account_name)
    alerts = alert_store(store)
    view = alerts_view(await alerts.get(account.id), settings.money)
    return {"account": account.name, **view, "deliveries": await alerts.deliveries(account.id, 50)}
