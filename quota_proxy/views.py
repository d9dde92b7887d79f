"""The JSON shapes of accounts, app users, keys, ledger entries and grants.

One module so that the HTTP API, the CLI's `--json` and the dashboard describe a record
the same way: dollars as "$5.00" strings beside exact integer quota tokens, times as
ISO 8601 UTC. Pure functions of store records; no I/O.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from quota_proxy.money import Money
from quota_proxy.store.models import Account, ChargeDetails, KeyRecord, LedgerEntry


def _balance(account: Account, money: Money) -> dict[str, Any]:
    return {"balance": money.usd(account.balance), "balance_quota_tokens": account.balance}


def account_view(account: Account, money: Money) -> dict[str, Any]:
    """A developer account as the CLI lists it."""
    return {
        "id": account.public_id,
        "name": account.name,
        **_balance(account, money),
        "held_quota_tokens": account.held,
        "available_quota_tokens": account.available,
    }


def account_summary(account: Account, money: Money) -> dict[str, Any]:
    """The account part of `GET /v1/me`."""
    return {
        "id": account.public_id,
        "name": account.name,
        **_balance(account, money),
        "available_quota_tokens": account.available,
    }


def balance_view(account: Account, money: Money) -> dict[str, Any]:
    """`GET /v1/balance` for the key's own account."""
    return {
        "object": "balance",
        "account": account.name,
        **_balance(account, money),
        "held_quota_tokens": account.held,
        "available": money.usd(account.available),
        "available_quota_tokens": account.available,
    }


def user_view(user: Account, money: Money) -> dict[str, Any]:
    """An app user, for the Funding API, `GET /v1/balance?external_user_id=` and `users show`."""
    return {
        "object": "user",
        "external_user_id": user.name,
        **_balance(user, money),
        "available_quota_tokens": user.available,
        "billing_mode": user.billing_mode,
    }


def key_view(key: KeyRecord) -> dict[str, Any]:
    """A key's settings (never its secret) as `keys list` shows them."""
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
        "expires_at": iso_time(key.expires_at),
        "revoked_at": iso_time(key.revoked_at),
        "created_at": iso_time(key.created_at),
    }


_KEY_SUMMARY = ("id", "prefix", "kind", "name", "routes", "allow_community")


def key_summary(key: KeyRecord) -> dict[str, Any]:
    """The key part of `GET /v1/me`: what the caller may see about the key it used."""
    full = key_view(key)
    return {name: full[name] for name in _KEY_SUMMARY}


def ledger_view(entry: LedgerEntry, money: Money) -> dict[str, Any]:
    return {
        "id": entry.public_id,
        "kind": entry.kind,
        "amount": money.usd(entry.amount),
        "amount_quota_tokens": entry.amount,
        "balance_after": money.usd(entry.balance_after),
        "balance_after_quota_tokens": entry.balance_after,
        "request_id": entry.request_id,
        "idempotency_key": entry.idempotency_key,
        "related_id": entry.related_id,
        "description": entry.description,
        "created_at": iso_time(entry.created_at),
        "charge": charge_view(entry.charge, money) if entry.charge is not None else None,
    }


def charge_view(charge: ChargeDetails, money: Money) -> dict[str, Any]:
    """What a charge was for (SPEC §4), in the field names of the usage views."""
    return {
        "request_id": charge.request_id,
        "key_id": charge.key_id,
        "key_prefix": charge.key_prefix,
        "external_user_id": charge.user,
        "route": charge.route,
        "upstream_model": charge.upstream_model,
        "input_tokens": charge.input_tokens,
        "output_tokens": charge.output_tokens,
        "cache_read_tokens": charge.cache_read_tokens,
        "cache_write_tokens": charge.cache_write_tokens,
        "cache_write_1h_tokens": charge.cache_write_1h_tokens,
        "reasoning_tokens": charge.reasoning_tokens,
        "multiplier": charge.multiplier,
        "charged": money.usd(charge.charged),
        "charged_quota_tokens": charge.charged,
        "estimated": charge.estimated,
        "outcome": charge.outcome.value,
        "status": charge.status,
        "session_id": charge.session_id,
    }


def grant_view(facts: dict[str, Any], duplicate: bool, money: Money) -> dict[str, Any]:
    """A grant's answer, from the API and from `quota-proxy grant` alike (a replay says duplicate)."""
    usd = money.usd
    return {
        "object": "funding.grant",
        "external_user_id": facts["external_user_id"],
        "amount_granted": usd(facts["amount"]),
        "amount_granted_quota_tokens": facts["amount"],
        "balance_before": usd(facts["balance_before"]),
        "balance_before_quota_tokens": facts["balance_before"],
        "balance_after": usd(facts["balance_after"]),
        "balance_after_quota_tokens": facts["balance_after"],
        "ledger_id": facts["ledger_id"],
        "developer_ledger_id": facts["developer_ledger_id"],
        "developer_balance_after": usd(facts["developer_balance_after"]),
        "developer_balance_after_quota_tokens": facts["developer_balance_after"],
        "description": facts["description"],
        "duplicate": duplicate,
    }


def iso_time(ms: int | None) -> str | None:
    """Unix milliseconds as '2026-01-31T12:00:00Z' (whole seconds)."""
    if ms is None:
        return None
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
