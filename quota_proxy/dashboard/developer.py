"""A developer's own pages: Overview, Keys, Usage, Ledger, Packages.

Every query takes the account from the session (ctx.account_id), never from the URL or the
form, so editing either can only ever reach the signed-in account's own data.
"""

from __future__ import annotations

import csv
import io
import time
from decimal import Decimal
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from quota_proxy import admin
from quota_proxy.api.usage import MAX_DAYS, usage_csv
from quota_proxy.config import Limits
from quota_proxy.dashboard.charts import daily_route_chart, last_days
from quota_proxy.dashboard.web import Ctx, Form, PageError, posted, redirect, render, signed_in, when
from quota_proxy.errors import BadRequest
from quota_proxy.money import format_usd
from quota_proxy.payments.checkout import PaymentsDisabled
from quota_proxy.payments.stripe_checkout import PaymentProviderError
from quota_proxy.payments.views import alerts_view, parse_thresholds, parse_url
from quota_proxy.store import Account, alert_store, supports_payments
from quota_proxy.store.dashboard_models import UsageGroup
from quota_proxy.store.payments import Order

CHART_DAYS = 30
LEDGER_PAGE = 50
KIND_LABELS = {"live": "Live (inference only)", "secret": "Secret (inference + Funding API)"}
GROUP_LABELS = {
    UsageGroup.DAY: "Day",
    UsageGroup.ROUTE: "Route",
    UsageGroup.KEY: "Key",
    UsageGroup.USER: "App user",
    UsageGroup.SESSION: "Agent session",
}


async def own_account(ctx: Ctx) -> Account:
    account = await ctx.dash.store.account(ctx.account_id)
    if account is None:
        raise PageError(404, "Your account no longer exists.")
    return account


async def chart(ctx: Ctx, account_id: int) -> dict[str, Any]:
    rows = await ctx.dash.store.daily_route_charges(account_id, CHART_DAYS)
    svg, legend = daily_route_chart(
        rows, CHART_DAYS, ctx.dash.money.usd, f"Charges per day and route, last {CHART_DAYS} days"
    )
    return {"chart": svg, "legend": legend, "chart_rows": rows}


async def overview(request: Request, status: int = 200, **values: Any) -> Response:
    ctx = await signed_in(request)
    store = ctx.dash.store
    account = await own_account(ctx)
    by_day = {line.label: line.charged for line in await store.usage_by(account.id, UsageGroup.DAY, 30)}
    days = last_days(30)  # oldest first, today last
    spend = {
        "today": by_day.get(days[-1], 0),
        "7 days": sum(by_day.get(d, 0) for d in days[-7:]),
        "30 days": sum(by_day.get(d, 0) for d in days),
    }
    # Both engines keep alerts; a library user's store without them shows none set.
    configured = await alert_store(store).get(account.id) if supports_payments(store) else None
    alerts = alerts_view(configured, ctx.dash.money)
    values.setdefault("alerts_form", {
        "webhook_url": alerts["webhook_url"] or "",
        "thresholds": ", ".join(t["amount"].lstrip("$") for t in alerts["thresholds"]),
        "user_thresholds": ", ".join(t["amount"].lstrip("$") for t in alerts["user_thresholds"]),
    })
    return render(request, "overview.html", ctx, status=status, account=account, spend=spend,
                  alerts=alerts, saved=request.query_params.get("alerts") == "saved",
                  **values, **await chart(ctx, account.id))


async def save_alerts(request: Request) -> Response:
    """Low-balance alert settings from the Overview page's form (the same rules as PUT /v1/alerts)."""
    ctx = await signed_in(request)
    form = await posted(ctx)
    values = {name: form.get(name) for name in ("webhook_url", "thresholds", "user_thresholds")}

    def dollars(text: str) -> list[str]:
        return [part.strip() for part in text.split(",") if part.strip()]

    money = ctx.dash.money
    try:
        url = parse_url(values["webhook_url"])
        thresholds = parse_thresholds(dollars(values["thresholds"]), "thresholds", money)
        user_thresholds = parse_thresholds(dollars(values["user_thresholds"]), "user_thresholds", money)
    except BadRequest as exc:
        return await overview(request, status=400, alerts_error=exc.message, alerts_form=values)
    await alert_store(ctx.dash.store).set(ctx.account_id, url, thresholds, user_thresholds)
    return redirect(ctx.dash, "?alerts=saved")


# -- keys -------------------------------------------------------------------------------


async def _keys_page(ctx: Ctx, status: int = 200, **values: Any) -> Response:
    store = ctx.dash.store
    keys = await store.list_keys(ctx.account_id)
    last_used = await store.keys_last_used([k.id for k in keys])
    return render(ctx.request, "keys.html", ctx, status=status, keys=keys, last_used=last_used,
                  routes=list(ctx.dash.services.settings.routes.values()), kinds=KIND_LABELS,
                  now=int(time.time() * 1000), **values)


async def keys(request: Request) -> Response:
    ctx = await signed_in(request)
    revoked = request.query_params.get("revoked", "")
    return await _keys_page(ctx, revoked=revoked, creating=False, values={})


async def new_key_form(request: Request) -> Response:
    ctx = await signed_in(request)
    return await _keys_page(ctx, creating=True, values={"kind": "live", "allow_community": "on"})


def _limit(form: Form, name: str, label: str) -> int | None:
    text = form.get(name)
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{label} must be a whole number of at least 1, or empty for no limit.")
    return int(text)


async def create_key(request: Request) -> Response:
    ctx = await signed_in(request)
    form = await posted(ctx)
    settings = ctx.dash.services.settings
    values = {name: form.get(name) for name in ("name", "kind", "expires", "rpm", "tpm", "max_concurrent")}
    values["allow_community"] = form.get("allow_community")
    values["routes"] = form.getlist("routes")  # type: ignore[assignment]
    try:
        kind = form.get("kind")
        if kind not in KIND_LABELS:
            raise ValueError("Choose the kind of key: live or secret.")
        name = form.get("name")
        if len(name) > 100:
            raise ValueError("The name must be at most 100 characters.")
        routes = tuple(form.getlist("routes")) or None
        unknown = [r for r in routes or () if r not in settings.routes]
        if unknown:
            raise ValueError(f"Unknown route: {', '.join(unknown)}.")
        limits = Limits(
            _limit(form, "rpm", "Requests per minute"),
            _limit(form, "tpm", "Tokens per minute"),
            _limit(form, "max_concurrent", "Concurrent requests"),
        )
        expires = form.get("expires") or None
        if expires is not None and len(expires) != 10:
            raise ValueError("The expiry must be a date (YYYY-MM-DD).")
        account = await own_account(ctx)
        created = await admin.create_key(
            ctx.dash.store, settings, account.name, kind, name, routes,
            form.get("allow_community") == "on", expires, limits,
        )
    except (ValueError, admin.AdminError) as exc:
        message = str(exc).replace("--expires: ", "The expiry ")
        return await _keys_page(ctx, status=400, creating=True, error=message, values=values)
    return await _keys_page(ctx, creating=False, new_key=created, values={})


async def revoke_key_confirm(request: Request) -> Response:
    ctx = await signed_in(request)
    key_id = request.path_params["key_id"]
    key = next((k for k in await ctx.dash.store.list_keys(ctx.account_id) if k.public_id == key_id), None)
    if key is None:
        raise PageError(404, "There is no such key in your account.")
    return render(request, "revoke.html", ctx, key=key)


async def revoke_key(request: Request) -> Response:
    ctx = await signed_in(request)
    await posted(ctx)
    key_id = request.path_params["key_id"]
    if not await ctx.dash.store.revoke_account_key(ctx.account_id, key_id):
        raise PageError(404, "There is no such key in your account.")
    return redirect(ctx.dash, f"keys?revoked={key_id}")


# -- usage ------------------------------------------------------------------------------


def _usage_params(request: Request) -> tuple[UsageGroup, int]:
    try:
        group = UsageGroup(request.query_params.get("group_by", "day"))
    except ValueError:
        raise PageError(400, "Group usage by day, route, key, user or session.") from None
    days_text = request.query_params.get("days", "30")
    if not days_text.isdigit() or not 1 <= int(days_text) <= MAX_DAYS:
        raise PageError(400, f"The number of days must be from 1 to {MAX_DAYS}.")
    return group, int(days_text)


async def usage(request: Request) -> Response:
    ctx = await signed_in(request)
    group, days = _usage_params(request)
    lines = await ctx.dash.store.usage_by(ctx.account_id, group, days)
    return render(request, "usage.html", ctx, group=group, days=days, lines=lines,
                  groups=GROUP_LABELS, **await chart(ctx, ctx.account_id))


async def usage_export(request: Request) -> Response:
    ctx = await signed_in(request)
    group, days = _usage_params(request)
    lines = await ctx.dash.store.usage_by(ctx.account_id, group, days)
    return _csv(usage_csv(group, lines, ctx.dash.money), f"usage-by-{group.value}.csv")


def _csv(text: str, filename: str) -> Response:
    return Response(
        text, media_type="text/csv; charset=utf-8",
        headers={"content-disposition": f'attachment; filename="{filename}"', "cache-control": "no-store"},
    )


# -- ledger -----------------------------------------------------------------------------


def _before(request: Request) -> int | None:
    text = request.query_params.get("before", "")
    if not text:
        return None
    if not text.isdigit():
        raise PageError(400, "This page of the ledger does not exist.")
    return int(text)


async def ledger(request: Request) -> Response:
    ctx = await signed_in(request)
    before = _before(request)
    page = await ctx.dash.store.ledger_page(ctx.account_id, LEDGER_PAGE, before)
    return render(request, "ledger.html", ctx, lines=page.entries, older=page.next_before,
                  more=page.more, first=before is None)


async def ledger_export(request: Request) -> Response:
    ctx = await signed_in(request)
    return _csv(await ledger_csv(ctx, ctx.account_id), "ledger.csv")


async def ledger_csv(ctx: Ctx, account_id: int) -> str:
    entries = (await ctx.dash.store.ledger_page(account_id, None)).entries
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(("id", "created_at", "kind", "amount_quota_tokens", "balance_after_quota_tokens",
                     "description", "request_id", "route", "upstream_model", "input_tokens",
                     "cache_read_tokens", "cache_write_tokens", "output_tokens", "multiplier",
                     "estimated", "outcome", "key_prefix", "user"))
    for e in entries:
        c = e.charge
        writer.writerow((
            e.public_id, when(e.created_at), e.kind, e.amount, e.balance_after, e.description,
            e.request_id or "",
            *((c.route, c.upstream_model, c.input_tokens, c.cache_read_tokens,
               c.cache_write_tokens + c.cache_write_1h_tokens, c.output_tokens, c.multiplier,
               int(c.estimated), c.outcome.value, c.key_prefix or "", c.user or "")
              if c is not None else ("",) * 11),
        ))
    return out.getvalue()


# -- packages ---------------------------------------------------------------------------


async def packages(request: Request) -> Response:
    ctx = await signed_in(request)
    money = ctx.dash.money
    rows = [
        {
            "package": p,
            "price": format_usd(p.price_usd),
            "per_usd": money.rate_per_usd(p.quota_tokens, p.price_usd),
            "per_million": format_usd((p.price_usd * 1_000_000 / p.quota_tokens).quantize(Decimal("0.0001"))),
        }
        for p in ctx.dash.services.settings.packages
    ]
    account = await own_account(ctx)
    checkout = ctx.dash.checkout
    orders = await checkout.orders.orders(account.id, 20) if checkout else []
    return render(request, "packages.html", ctx, rows=rows, account=account, orders=orders, price=_price,
                  buyable=checkout is not None and checkout.enabled)


# -- buying packs -----------------------------------------------------------------------
# The Buy button posts here (with the session's CSRF token); the order page then links to
# Stripe's checkout. A redirect straight from the POST would be blocked by the dashboard's
# CSP (form-action 'self' covers the redirect target too), and a link needs no exception.


def _price(order: Order) -> str:
    return format_usd(Decimal(order.amount_cents) / 100)


async def buy(request: Request) -> Response:
    ctx = await signed_in(request)
    form = await posted(ctx)
    checkout = ctx.dash.checkout
    if checkout is None or not checkout.enabled:
        raise PageError(404, "Card payments are not enabled on this gateway; ask your operator for a code.")
    package = next((p for p in ctx.dash.services.settings.packages if p.id == form.get("package")), None)
    if package is None:
        raise PageError(404, "There is no such package.")
    try:
        order = await checkout.open(ctx.account_id, package)
    except (PaymentProviderError, PaymentsDisabled):
        raise PageError(502, "The payment provider could not open a checkout. Nothing was charged; "
                             "please try again in a moment.") from None
    return redirect(ctx.dash, f"orders/{order.public_id}")


async def order_page(request: Request) -> Response:
    ctx = await signed_in(request)
    checkout = ctx.dash.checkout
    order = await checkout.orders.order(request.path_params["order_id"]) if checkout else None
    if order is None or order.account_id != ctx.account_id:
        raise PageError(404, "There is no such order in your account.")
    returned = request.query_params.get("checkout", "")
    return render(request, "order.html", ctx, order=order, price=_price(order), returned=returned,
                  account=await own_account(ctx))
