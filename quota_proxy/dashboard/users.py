"""App users: list and search, grant balance, billing mode, one user's ledger and usage.

The grant form carries an idempotency key generated when the form is drawn, so a double
submit (a double click, a resent POST) grants once: the store answers the second with the
first grant's result.
"""

from __future__ import annotations

import secrets
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from quota_proxy.api.funding import MAX_DESCRIPTION
from quota_proxy.dashboard.web import Ctx, PageError, posted, redirect, render, signed_in
from quota_proxy.grants import EXTERNAL_USER_ID, grant_request_hash
from quota_proxy.store import Account, IdempotencyMismatch, InsufficientFunds

IDEMPOTENCY_PREFIX = "dashboard-"
USER_PAGE_DAYS = 30


async def _users_page(ctx: Ctx, status: int = 200, **values: Any) -> Response:
    q = ctx.request.query_params.get("q", "").strip()[:128]
    store = ctx.dash.store
    if q:
        users = await store.search_users(ctx.account_id, q)
    else:
        users = await store.list_users(ctx.account_id)
    values.setdefault("form", {"idempotency_key": secrets.token_urlsafe(18)})
    account = await store.account(ctx.account_id)
    return render(ctx.request, "users.html", ctx, status=status, users=users, q=q, account=account,
                  **values)


async def users(request: Request) -> Response:
    ctx = await signed_in(request)
    granted = request.query_params.get("granted", "")
    return await _users_page(ctx, granted=granted)


async def grant(request: Request) -> Response:
    ctx = await signed_in(request)
    form = await posted(ctx)
    store, money = ctx.dash.store, ctx.dash.money
    values = {n: form.get(n) for n in ("external_user_id", "amount", "description", "idempotency_key")}

    async def again(status: int, error: str) -> Response:
        return await _users_page(ctx, status=status, error=error, form=values)

    user_id = values["external_user_id"]
    if EXTERNAL_USER_ID.fullmatch(user_id) is None:
        return await again(400, "The user ID must be 1-128 characters of A-Z, a-z, 0-9 and . _ : @ -")
    try:
        amount = money.quota_tokens_from_usd(values["amount"])
    except ValueError as exc:
        return await again(400, f"The amount {exc}.")
    max_grant = money.quota_tokens_from_usd(ctx.dash.services.settings.funding.max_grant_usd)
    if amount <= 0 or amount > max_grant:
        return await again(400, f"The amount must be more than $0 and at most {money.usd(max_grant)}.")
    if len(values["description"]) > MAX_DESCRIPTION:
        return await again(400, f"The description must be at most {MAX_DESCRIPTION} characters.")
    idem = values["idempotency_key"]
    if not 16 <= len(idem) <= 64:
        return await again(400, "This form is incomplete. Reload the page and try again.")
    try:
        facts, _duplicate = await store.grant(
            ctx.account_id, user_id, amount, values["description"], IDEMPOTENCY_PREFIX + idem,
            grant_request_hash(user_id, amount, values["description"]),
        )
    except InsufficientFunds as short:
        return await again(402, f"Your balance is too low for this grant: {money.usd(short.available)} "
                                "available.")
    except IdempotencyMismatch:
        values["idempotency_key"] = secrets.token_urlsafe(18)
        return await again(409, "This form was already used for a different grant. "
                                "Check the values and submit again.")
    return redirect(ctx.dash, f"users?granted={facts['ledger_id']}")


async def _own_user(ctx: Ctx, external_id: str) -> Account:
    user = await ctx.dash.store.user(ctx.account_id, external_id)
    if user is None:
        raise PageError(404, "There is no such app user in your account.")
    return user


async def user_page(request: Request) -> Response:
    ctx = await signed_in(request)
    user = await _own_user(ctx, request.path_params["external_id"])
    store = ctx.dash.store
    ledger = (await store.ledger_page(user.id, 50)).entries
    usage = await store.usage(ctx.account_id, USER_PAGE_DAYS, user.id)
    return render(request, "user.html", ctx, user=user, ledger=ledger, usage=usage,
                  days=USER_PAGE_DAYS, updated="updated" in request.query_params)


async def set_billing_mode(request: Request) -> Response:
    ctx = await signed_in(request)
    form = await posted(ctx)
    user = await _own_user(ctx, request.path_params["external_id"])
    mode = form.get("billing_mode")
    if mode not in ("user", "developer"):
        raise PageError(400, "Choose whose balance pays: the user's or yours.")
    await ctx.dash.store.set_billing_mode(user.id, mode)
    return redirect(ctx.dash, f"users/{user.name}?updated=1")
