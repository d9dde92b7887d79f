"""The operator's pages: accounts (create, credit or adjust with a reason), every key,
ledger verification, open holds, upstream health, invitations. Operators only (403)."""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from quota_proxy import admin
from quota_proxy.dashboard.developer import chart
from quota_proxy.dashboard.invites import InviteError, invite, server_url
from quota_proxy.dashboard.web import Ctx, PageError, posted, redirect, render, signed_in
from quota_proxy.store import Account
from quota_proxy.store.dashboard_models import Role

HEALTH_WINDOW_MS = 3600 * 1000
MAX_REASON = 500


async def _accounts_page(ctx: Ctx, status: int = 200, **values: Any) -> Response:
    accounts = await ctx.dash.store.list_accounts()
    values.setdefault("form", {})
    return render(ctx.request, "accounts.html", ctx, status=status, accounts=accounts, **values)


async def accounts(request: Request) -> Response:
    ctx = await signed_in(request, operator=True)
    return await _accounts_page(ctx, created=request.query_params.get("created", ""))


async def create_account(request: Request) -> Response:
    ctx = await signed_in(request, operator=True)
    form = await posted(ctx)
    values = {"name": form.get("name"), "amount": form.get("amount")}
    settings = ctx.dash.services.settings
    try:
        name = values["name"]
        if not name or len(name) > 100:
            raise admin.AdminError("The account name must be 1-100 characters.")
        amount = None
        if values["amount"]:
            try:
                amount = settings.money.quota_tokens_from_usd(values["amount"])
            except ValueError as exc:
                raise admin.AdminError(f"The initial credit {exc}.") from None
            if amount < 0:
                raise admin.AdminError("The initial credit must not be negative.")
        await admin.create_account(ctx.dash.store, settings, name, amount)
    except admin.AdminError as exc:
        return await _accounts_page(ctx, status=400, error=str(exc), form=values)
    return redirect(ctx.dash, f"accounts?created={name}")


async def _target(ctx: Ctx, public_id: str) -> Account:
    for account in await ctx.dash.store.list_accounts():
        if account.public_id == public_id:
            return account
    raise PageError(404, "There is no such account.")


async def _account_page(ctx: Ctx, account: Account, status: int = 200, **values: Any) -> Response:
    store = ctx.dash.store
    values.setdefault("form", {})
    return render(
        ctx.request, "account.html", ctx, status=status, account=account,
        keys=await store.list_keys(account.id), ledger=(await store.ledger_page(account.id, 20)).entries,
        **await chart(ctx, account.id), **values,
    )


async def account_page(request: Request) -> Response:
    ctx = await signed_in(request, operator=True)
    account = await _target(ctx, request.path_params["account_id"])
    return await _account_page(ctx, account, credited="credited" in request.query_params)


async def credit(request: Request) -> Response:
    ctx = await signed_in(request, operator=True)
    form = await posted(ctx)
    account = await _target(ctx, request.path_params["account_id"])
    values = {"amount": form.get("amount"), "reason": form.get("reason")}
    money = ctx.dash.money
    try:
        amount = money.quota_tokens_from_usd(values["amount"])
    except ValueError as exc:
        return await _account_page(ctx, account, 400, error=f"The amount {exc}.", form=values)
    if amount == 0:
        return await _account_page(ctx, account, 400, error="The amount must not be zero.", form=values)
    if not values["reason"] or len(values["reason"]) > MAX_REASON:
        return await _account_page(ctx, account, 400, form=values,
                                   error=f"Give a reason (1-{MAX_REASON} characters): it goes in the ledger.")
    await admin.credit(ctx.dash.store, ctx.dash.services.settings, account.name, amount, None,
                       f"{values['reason']} (by {ctx.session.email})")
    return redirect(ctx.dash, f"accounts/{account.public_id}?credited=1")


async def operations(request: Request) -> Response:
    ctx = await signed_in(request, operator=True)
    store = ctx.dash.store
    routes = ctx.dash.services.settings.routes
    return render(
        request, "operations.html", ctx,
        problems=await store.verify_ledger(), account_count=await store.account_count(),
        holds=await store.open_hold_list(), keys=await store.list_keys(),
        errors=await store.upstream_errors(int(time.time() * 1000) - HEALTH_WINDOW_MS),
        routes=list(routes.values()), cooling=ctx.dash.cooldowns(),
    )


async def _invitations_page(ctx: Ctx, status: int = 200, **values: Any) -> Response:
    store = ctx.dash.store
    values.setdefault("form", {"role": "developer"})
    return render(
        ctx.request, "invitations.html", ctx, status=status, accounts=await store.list_accounts(),
        invitations=await store.list_invitations(), logins=await store.list_logins(),
        sessions=await store.list_sessions(), roles=[r.value for r in Role],
        now=int(time.time() * 1000), **values,
    )


async def invitations(request: Request) -> Response:
    ctx = await signed_in(request, operator=True)
    return await _invitations_page(ctx)


async def create_invitation(request: Request) -> Response:
    ctx = await signed_in(request, operator=True)
    form = await posted(ctx)
    values = {"account": form.get("account"), "email": form.get("email"), "role": form.get("role")}
    settings = ctx.dash.services.settings
    base = settings.server.public_url or str(request.base_url).rstrip("/") or server_url(settings)
    try:
        created = await invite(ctx.dash.store, settings, values["account"], values["email"],
                               values["role"], base)
    except InviteError as exc:
        return await _invitations_page(ctx, 400, error=str(exc), form=values)
    return await _invitations_page(ctx, created=created)


async def revoke_session(request: Request) -> Response:
    ctx = await signed_in(request, operator=True)
    await posted(ctx)
    if not await ctx.dash.store.revoke_sessions(public_id=request.path_params["session_id"]):
        raise PageError(404, "There is no such live session.")
    return redirect(ctx.dash, "accounts/invitations")
