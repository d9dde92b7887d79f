"""Operator actions behind the CLI: each takes the open store and returns plain data.

cli.py only parses arguments and prints what these return, as a table or as JSON.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from quota_proxy import keys as keymod
from quota_proxy.api.common import EXTERNAL_USER_ID
from quota_proxy.api.funding import grant_request_hash, grant_view
from quota_proxy.config import Limits, Settings
from quota_proxy.store import (
    Account,
    IdempotencyMismatch,
    InsufficientFunds,
    KeyRecord,
    LedgerEntry,
    Store,
)


class AdminError(Exception):
    """A mistake in the operator's request: printed as one line, exit status 1."""


def account_view(account: Account, settings: Settings) -> dict[str, Any]:
    usd = settings.money.usd
    return {
        "id": account.public_id,
        "name": account.name,
        "balance": usd(account.balance),
        "balance_quota_tokens": account.balance,
        "held_quota_tokens": account.held,
        "available_quota_tokens": account.available,
    }


def key_view(key: KeyRecord) -> dict[str, Any]:
    return {
        "id": key.public_id,
        "prefix": key.prefix,
        "account": key.account_name,
        "kind": key.kind,
        "name": key.name,
        "routes": list(key.routes) if key.routes is not None else None,
        "allow_community": key.allow_community,
        "rpm": key.rpm,
        "tpm": key.tpm,
        "max_concurrent": key.max_concurrent,
        "expires_at": _iso(key.expires_at),
        "revoked_at": _iso(key.revoked_at),
        "created_at": _iso(key.created_at),
    }


def ledger_view(entry: LedgerEntry, settings: Settings) -> dict[str, Any]:
    usd = settings.money.usd
    return {
        "id": entry.public_id,
        "kind": entry.kind,
        "amount": usd(entry.amount),
        "amount_quota_tokens": entry.amount,
        "balance_after": usd(entry.balance_after),
        "balance_after_quota_tokens": entry.balance_after,
        "request_id": entry.request_id,
        "idempotency_key": entry.idempotency_key,
        "related_id": entry.related_id,
        "description": entry.description,
        "created_at": _iso(entry.created_at),
    }


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


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
    return account_view(account, settings)


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
    return {"account": account.name, "entry": ledger_view(entry, settings)}


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
