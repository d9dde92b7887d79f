"""Operator actions behind the CLI: each takes the open store and returns plain data.

cli.py only parses arguments and prints what these return, as a table or as JSON.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from quota_proxy import keys as keymod
from quota_proxy.config import Limits, Settings
from quota_proxy.grants import EXTERNAL_USER_ID, grant_request_hash
from quota_proxy.store import (
    Account,
    IdempotencyMismatch,
    InsufficientFunds,
    Store,
)
from quota_proxy.views import account_view, grant_view, ledger_view


class AdminError(Exception):
    """A mistake in the operator's request: printed as one line, exit status 1."""


async def ledger_page(
    store: Store,
    settings: Settings,
    account_name: str,
    external_id: str | None,
    limit: int | None,
    before: str | None,
) -> dict[str, Any]:
    """One page of a ledger, newest first, saying how many older entries it leaves out.

    `before` is an entry's ledg_ id: the page starts just below it.
    """
    account = await developer(store, account_name)
    target = await app_user(store, account, external_id) if external_id else account
    before_id = None
    if before is not None:
        anchor = await store.ledger_entry(before)
        if anchor is None or anchor.account_id != target.id:
            raise AdminError(f"--before: no ledger entry {before!r} in this ledger")
        before_id = anchor.id
    page = await store.ledger_page(target.id, limit, before_id)
    return {
        "account": account.name,
        "external_user_id": external_id,
        "entries": [ledger_view(e, settings.money) for e in page.entries],
        "more": page.more,
        "next_before": page.entries[-1].public_id if page.next_before is not None else None,
    }


def parse_expiry(text: str) -> int:
    """'2027-01-31' (end of that day, UTC) or an ISO datetime, to unix ms."""
    try:
        if len(text) == 10:
            day = dt.date.fromisoformat(text)
            moment = dt.datetime.combine(day, dt.time(23, 59, 59, 999_000), dt.UTC)
        else:
            moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=dt.UTC)
    except ValueError:
        raise AdminError(f"--expires: {text!r} is not a date (YYYY-MM-DD) or ISO datetime") from None
    # Whole seconds and milliseconds apart: a float product would round far-off dates up.
    return int(moment.timestamp()) * 1000 + moment.microsecond // 1000


def quota_tokens(settings: Settings, usd: str | None, tokens: int | None) -> int | None:
    if usd is not None:
        try:
            return settings.money.quota_tokens_from_usd(usd)
        except ValueError as exc:
            raise AdminError(f"--usd {usd}: {exc}") from None
    return tokens


async def developer(store: Store, name: str) -> Account:
    account = await store.account_by_name(name)
    if account is None:
        raise AdminError(f"no account named {name!r} (see `quota-proxy accounts list`)")
    return account


async def app_user(store: Store, account: Account, external_id: str) -> Account:
    user = await store.user(account.id, external_id)
    if user is None:
        raise AdminError(f"account {account.name!r} has no user {external_id!r}")
    return user


async def create_account(
    store: Store, settings: Settings, name: str, amount: int | None
) -> dict[str, Any]:
    if not name.strip():
        raise AdminError("an account name must not be empty")
    try:
        account = await store.create_account(name)
    except ValueError as exc:
        raise AdminError(str(exc)) from None
    if amount:
        await store.credit(account.id, amount, "credit", "initial funding")
        account = await developer(store, name)
    return account_view(account, settings.money)


async def credit(
    store: Store,
    settings: Settings,
    name: str,
    amount: int | None,
    package_id: str | None,
    description: str | None,
) -> dict[str, Any]:
    account = await developer(store, name)
    kind = "credit"
    if package_id is not None:
        package = next((p for p in settings.packages if p.id == package_id), None)
        if package is None:
            known = ", ".join(p.id for p in settings.packages) or "none configured"
            raise AdminError(f"no package {package_id!r} (packages: {known})")
        amount, kind = package.quota_tokens, "purchase"
        description = description or f"package {package.id} ({package.name}, ${package.price_usd})"
    if not amount:
        raise AdminError("the amount must not be zero")
    if amount < 0:
        kind = "adjustment"
    entry = await store.credit(account.id, amount, kind, description or "")
    return {"account": account.name, "entry": ledger_view(entry, settings.money)}


async def create_key(
    store: Store,
    settings: Settings,
    account_name: str,
    kind: str,
    label: str,
    routes: tuple[str, ...] | None,
    allow_community: bool,
    expires: str | None,
    limits: Limits | None = None,
) -> dict[str, Any]:
    limits = limits or Limits()
    account = await developer(store, account_name)
    if routes is not None:
        unknown = [r for r in routes if r not in settings.routes]
        if unknown:
            raise AdminError(
                f"--routes: unknown route(s) {', '.join(unknown)} "
                f"(configured: {', '.join(settings.routes) or 'none'})"
            )
    expires_at = parse_expiry(expires) if expires else None
    plaintext = keymod.generate_key(kind)
    record = await store.create_key(
        account.id,
        kind,
        keymod.digest(plaintext),
        keymod.display_prefix(plaintext),
        name=label,
        routes=routes,
        allow_community=allow_community,
        expires_at=expires_at,
        rpm=limits.rpm,
        tpm=limits.tpm,
        max_concurrent=limits.max_concurrent,
    )
    return {
        "id": record.public_id,
        "key": plaintext,
        "prefix": record.prefix,
        "account": account.name,
        "kind": kind,
    }


async def grant(
    store: Store,
    settings: Settings,
    account_name: str,
    external_id: str,
    usd: str,
    idempotency_key: str | None,
    description: str,
) -> dict[str, Any]:
    if EXTERNAL_USER_ID.fullmatch(external_id) is None:
        raise AdminError("--user must be 1-128 characters of A-Z, a-z, 0-9 and . _ : @ -")
    account = await developer(store, account_name)
    amount = quota_tokens(settings, usd, None)
    if amount is None or amount <= 0:
        raise AdminError("--usd must be greater than 0")
    request_hash = grant_request_hash(external_id, amount, description)
    try:
        facts, duplicate = await store.grant(
            account.id, external_id, amount, description, idempotency_key, request_hash
        )
    except IdempotencyMismatch:
        raise AdminError("this idempotency key was used with a different grant") from None
    except InsufficientFunds as short:
        raise AdminError(
            f"the grant pool of {account.name!r} is too low: "
            f"{settings.money.usd(short.available)} available"
        ) from None
    return grant_view(facts, duplicate, settings.money)
