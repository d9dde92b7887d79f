"""Moving a deployment between stores (SQLite <-> PostgreSQL), verified after the copy.

The copy goes through the target's own triggers, so the target proves its books as it
fills: accounts start at zero and every balance is rebuilt from the ledger, entry by entry
in the source's order; a charge is re-created by inserting its request (whose settlement
trigger writes the charge entry with its original ledger id and rebuilds the usage
roll-ups). Keys (digests only), users, holds and idempotency keys are copied as they are.
Rate-limit windows are not: they last a minute.

Stop the gateways first: a copy of a store that is still charging is a copy of a moment
that has already passed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from quota_proxy.store.models import StoreError
from quota_proxy.store.protocol import Store

Row = dict[str, Any]
# Columns the target computes itself (its own row ids, balances that follow the ledger).
_DERIVED = {"accounts": ("balance", "held"), "ledger": ("id",), "requests": ("id",)}


@dataclass(frozen=True, slots=True)
class CopyReport:
    accounts: int
    keys: int
    ledger_entries: int
    requests: int
    holds: int
    idempotency_keys: int
    ledger_sum: int


async def copy_store(source: Store, target: Store) -> CopyReport:
    """Copy every account, key, ledger entry, request, hold and idempotency key from source
    into the empty target, then verify: same balances and held amounts per account, same
    count and sum of ledger entries, and the target's own ledger verification clean."""
    if await target.account_count() > 0:
        raise StoreError(f"{target.description} is not empty; copy only into a new store")
    accounts = await source.dump("accounts")
    keys = await source.dump("api_keys")
    ledger = await source.dump("ledger")
    requests = await source.dump("requests")
    holds = await source.dump("holds")
    idempotency = await source.dump("idempotency")

    by_request = {r["request_id"]: r for r in requests}
    charged_by_ledger = {r["ledger_id"] for r in requests if r["ledger_id"] is not None}
    steps: list[tuple[str, Row]] = [("accounts", _strip("accounts", a)) for a in accounts]
    steps += [("api_keys", k) for k in keys]
    for entry in ledger:
        request = by_request.get(entry["request_id"]) if entry["public_id"] in charged_by_ledger else None
        if request is not None and request["ledger_id"] == entry["public_id"]:
            steps.append(("requests", _strip("requests", {**request, "hold_id": None})))
        else:
            steps.append(("ledger", _strip("ledger", entry)))
    steps += [
        ("requests", _strip("requests", {**r, "hold_id": None}))
        for r in requests
        if r["ledger_id"] is None
    ]
    # A copied hold is not re-checked against a key's concurrency limit: it is already open.
    steps += [("holds", {**h, "max_concurrent": None}) for h in holds]
    steps += [("idempotency", i) for i in idempotency]
    await target.load(steps)

    await _verify(source, target, len(ledger))
    return CopyReport(
        accounts=len(accounts), keys=len(keys), ledger_entries=len(ledger), requests=len(requests),
        holds=len(holds), idempotency_keys=len(idempotency), ledger_sum=sum(e["amount"] for e in ledger),
    )


def _strip(table: str, row: Row) -> Row:
    return {k: v for k, v in row.items() if k not in _DERIVED.get(table, ())}


async def _verify(source: Store, target: Store, ledger_entries: int) -> None:
    def books(accounts: list[Row]) -> dict[str, tuple[int, int]]:
        return {a["public_id"]: (int(a["balance"]), int(a["held"])) for a in accounts}

    before, after = books(await source.dump("accounts")), books(await target.dump("accounts"))
    problems = []
    if before != after:
        differing = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        problems.append(f"balances or held differ for {len(differing)} accounts: {differing[:5]}")
    copied = await target.dump("ledger")
    if len(copied) != ledger_entries:
        problems.append(f"{ledger_entries} ledger entries in the source, {len(copied)} in the copy")
    if problems_in_target := await target.verify_ledger():
        problems.append(f"ledger verify on the copy: {problems_in_target[:3]}")
    if problems:
        raise StoreError("the copy does not match its source: " + "; ".join(problems))
