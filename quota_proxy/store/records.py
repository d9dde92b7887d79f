"""What both engines read the same way: the column lists of accounts, keys and ledger
entries, the ledger's one join with its charges' details, and rows into records.

SQLite and PostgreSQL differ in placeholders, locking and types at the edges (SQLite keeps
booleans as 0/1), not in these shapes; keeping them here keeps the engines from drifting.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from quota_proxy.store.models import Account, ChargeDetails, KeyRecord, LedgerEntry, Outcome, Settlement

ACCOUNT_COLUMNS = "id, public_id, kind, name, parent_id, billing_mode, balance, held, created_at"
KEY_COLUMNS = (
    "k.id, k.public_id, k.account_id, a.name, a.public_id, k.kind, k.name, k.prefix, k.routes, "
    "k.allow_community, k.expires_at, k.revoked_at, k.created_at, k.rpm, k.tpm, k.max_concurrent"
)
KEY_FROM = "FROM api_keys k JOIN accounts a ON a.id = k.account_id"
LEDGER_COLUMNS = (
    "id, public_id, account_id, amount, balance_after, kind, request_id, idempotency_key, "
    "related_id, description, created_at"
)
# A ledger entry with its request's details, one join: charges carry what they were for.
LEDGER_SELECT = """
SELECT l.id, l.public_id, l.account_id, l.amount, l.balance_after, l.kind, l.request_id,
       l.idempotency_key, l.related_id, l.description, l.created_at,
       r.request_id, k.public_id, k.prefix, usr.name, r.route, r.upstream_model,
       r.input_tokens, r.output_tokens, r.cache_read_tokens, r.cache_write_tokens,
       r.cache_write_1h_tokens, r.reasoning_tokens, r.multiplier, r.charged, r.estimated,
       r.outcome, r.status, r.session_id
FROM ledger l
LEFT JOIN requests r ON r.request_id = l.request_id
LEFT JOIN api_keys k ON k.id = r.key_id
LEFT JOIN accounts usr ON usr.id = r.user_id AND usr.kind = 'user'
"""
BUCKET_COLUMNS = (
    "requests", "input_tokens", "output_tokens", "charged", "cache_read_tokens",
    "cache_write_tokens", "cache_write_1h_tokens", "reasoning_tokens",
)  # fmt: skip
# One line of GET /v1/usage (requests, input, cache read, cache write, output, charged),
# summed from the roll-up tables or from the request rows (aliased r) of a period.
USAGE_LINE_SUMS = (
    "sum(requests), sum(input_tokens), sum(cache_read_tokens), "
    "sum(cache_write_tokens + cache_write_1h_tokens), sum(output_tokens), sum(charged)"
)
REQUEST_USAGE_LINE_SUMS = (
    "count(*), sum(r.input_tokens), sum(r.cache_read_tokens), "
    "sum(r.cache_write_tokens + r.cache_write_1h_tokens), sum(r.output_tokens), sum(r.charged)"
)
# A settlement is one INSERT into requests; its triggers charge, release and roll up.
REQUEST_COLUMNS = (
    "request_id, account_id, user_id, charged_account_id, key_id, hold_id, route, "
    "upstream_model, input_tokens, output_tokens, multiplier, charged, estimated, outcome, "
    "status, ledger_id, created_at, cache_read_tokens, cache_write_tokens, "
    "cache_write_1h_tokens, reasoning_tokens, session_id"
)
REQUEST_COLUMN_COUNT = REQUEST_COLUMNS.count(",") + 1


def request_row(s: Settlement, ledger_id: str | None, created_at: int | None) -> tuple[Any, ...]:
    """A settlement's values in REQUEST_COLUMNS order."""
    return (
        s.request_id, s.account_id, s.user_id, s.charged_account_id, s.key_id, s.hold_id,
        s.route, s.upstream_model, s.input_tokens, s.output_tokens, s.multiplier, s.charged,
        s.estimated, str(s.outcome), s.status, ledger_id, created_at, s.cache_read_tokens,
        s.cache_write_tokens, s.cache_write_1h_tokens, s.reasoning_tokens, s.session_id,
    )  # fmt: skip


def now_ms() -> int:
    return int(time.time() * 1000)


def account_record(row: Any) -> Account:
    return Account(*row)


def key_record(row: Any) -> KeyRecord:
    values = list(row)
    values[8] = tuple(orjson.loads(values[8])) if values[8] is not None else None  # routes, JSON
    values[9] = bool(values[9])  # allow_community
    return KeyRecord(*values)


def ledger_record(row: Any) -> LedgerEntry:
    """A row of LEDGER_SELECT (or of the bare LEDGER_COLUMNS: no request details)."""
    values = tuple(row)
    request = values[11:]
    charge = None
    if request and request[0] is not None:
        details = list(request)
        details[14] = bool(details[14])  # estimated
        details[15] = Outcome(details[15])
        charge = ChargeDetails(*details)
    (id_, public_id, account_id, amount, balance_after, kind, request_id, idempotency_key,
     related_id, description, created_at) = values[:11]  # fmt: skip
    return LedgerEntry(id_, public_id, account_id, amount, balance_after, kind, request_id,
                       idempotency_key, related_id, description, created_at, charge)  # fmt: skip
