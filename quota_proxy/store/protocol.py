"""The one store interface the gateway, the admin actions and the CLI program against.

Two engines implement it (store/sqlite.py, store/postgres.py) and the same contract tests
run on both (tests/test_store_contract.py). Every method that moves money is atomic in
the engine: one statement or one transaction, with the invariants enforced by the schema.
Errors are the StoreError tree in store/models.py; an engine translates its driver's
errors into it at its own boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, Self, runtime_checkable

from quota_proxy.store.dashboard_models import UsageGroup, UsageLine
from quota_proxy.store.group_commit import GroupObserver
from quota_proxy.store.models import (
    Account,
    KeyRecord,
    LedgerEntry,
    LedgerPage,
    Settlement,
    UsageRow,
    UsageSummary,
    UsageTotal,
)


@runtime_checkable
class Store(Protocol):
    """Balances, holds, keys, rate windows and idempotency keys, shared by every gateway
    process that opens the same store."""

    # -- lifecycle ----------------------------------------------------------------------

    async def open(self) -> None:
        """Connect and bring the schema up to date (safe when several processes start at once)."""

    async def close(self) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, *exc: object) -> None: ...

    async def ping(self) -> None:
        """Raise unless the store answers now (readiness)."""

    async def sync(self) -> tuple[int, int]:
        """Put every commit so far on disk (the hold keeper calls it every tick); returns
        what the engine reports (SQLite: WAL frames, frames checkpointed)."""

    async def backup(self, target: Path) -> int:
        """A consistent copy into a new file; engines without one raise StoreError."""

    @property
    def description(self) -> str:
        """Where the store lives, for messages (a path, or a URL without its password)."""

    async def dump(self, table: str) -> list[dict[str, Any]]:
        """Every row of a copied table (accounts, api_keys, ledger, requests, holds,
        idempotency), oldest first: what `store copy` reads."""

    async def load(self, steps: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Insert (table, row) pairs in order, in one transaction, through the schema's
        triggers: what `store copy` writes."""

    # -- accounts -----------------------------------------------------------------------

    async def account_count(self) -> int: ...

    async def create_account(self, name: str) -> Account:
        """A developer account; ValueError if the name is taken."""

    async def account_by_name(self, name: str) -> Account | None: ...

    async def account(self, account_id: int) -> Account | None: ...

    async def list_accounts(self) -> list[Account]: ...

    async def user(self, developer_id: int, external_user_id: str) -> Account | None: ...

    async def list_users(self, developer_id: int) -> list[Account]: ...

    async def set_billing_mode(self, user_id: int, mode: str) -> None: ...

    # -- ledger -------------------------------------------------------------------------

    async def credit(self, account_id: int, amount: int, kind: str, description: str = "") -> LedgerEntry:
        """One ledger entry and the balance change it records, atomically."""

    async def ledger(self, account_id: int, limit: int = 100) -> list[LedgerEntry]:
        """The newest entries, each with its request's details."""

    async def ledger_page(
        self, account_id: int, limit: int | None = 50, before: int | None = None
    ) -> LedgerPage:
        """Entries older than `before` (a ledger id), newest first, at most `limit` (None:
        all), with the count of older entries and the cursor for the next page."""

    async def ledger_entry(self, public_id: str) -> LedgerEntry | None: ...

    async def verify_ledger(self) -> list[dict[str, Any]]:
        """Accounts where balance != Σ ledger or held != Σ open holds; empty when the books reconcile."""

    # -- keys ---------------------------------------------------------------------------

    async def create_key(
        self,
        account_id: int,
        kind: str,
        digest: str,
        prefix: str,
        name: str = "",
        routes: tuple[str, ...] | None = None,
        allow_community: bool = True,
        expires_at: int | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
        max_concurrent: int | None = None,
    ) -> KeyRecord: ...

    async def key_by_digest(self, digest: str) -> KeyRecord | None: ...

    async def list_keys(self, account_id: int | None = None) -> list[KeyRecord]: ...

    async def revoke_key(self, id_or_prefix: str) -> list[KeyRecord]:
        """Revoke by public id or display prefix; ValueError for an ambiguous prefix."""

    # -- holds, limits, settlement --------------------------------------------------------

    async def take_hold(
        self,
        account_id: int,
        amount: int,
        request_id: str,
        owner: str,
        ttl_ms: int,
        key_id: int | None = None,
        max_concurrent: int | None = None,
    ) -> int:
        """Reserve amount against balance - held in one atomic step; returns the hold id.
        InsufficientFunds if it does not fit, TooManyInFlight past max_concurrent."""

    async def count_request(self, key_id: int, rpm: int | None, tpm: int | None) -> bool:
        """Count one request in the key's current minute if it is under both limits."""

    async def purge_rate_windows(self) -> None: ...

    async def available(self, account_id: int) -> int: ...

    async def settle(self, s: Settlement) -> str | None:
        """Charge, release the hold, record usage, atomically; returns the charge's ledger id.
        Keyed by request id: settling the same request again charges nothing more."""

    def settle_later(self, s: Settlement) -> None:
        """The gateway's settlement: journaled when this returns, committed with the next
        group (store/group_commit.py), seen by every read of this store after it, and
        committed by the next process to open the store if this one dies first."""

    async def commit_pending(self) -> bool:
        """Return once this process's pending settlements have committed (the hot path's
        limits that count finished requests need them; reads wait for them anyway).
        True when there were any."""

    def quiet(self) -> None:
        """A hint: this process has just sent a request upstream and waits for the answer,
        so work held back for such a moment (the next settlement group) may run now."""

    def observe_settlement_groups(self, observe: GroupObserver) -> None:
        """Call observe(settlements, seconds) after each group commits (the gateway's metrics)."""

    async def release_hold(self, hold_id: int) -> None: ...

    async def refresh_holds(self, owner: str, ttl_ms: int) -> None:
        """Keep this process's holds alive; a dead process's holds then expire."""

    async def release_expired_holds(self) -> int:
        """Release holds nobody refreshed, after committing what dead processes journaled."""

    async def open_holds(self) -> int: ...

    # -- usage --------------------------------------------------------------------------

    async def usage(self, account_id: int, days: int = 30, user_id: int | None = None) -> list[UsageRow]: ...

    async def usage_by_session(self, account_id: int, days: int = 30, limit: int = 100) -> list[UsageTotal]:
        """Usage per agent session, most recently active first."""

    async def usage_summary(self, account_id: int, days: int = 30, top_users: int = 100) -> UsageSummary: ...

    async def usage_by(self, account_id: int, group: UsageGroup, days: int) -> list[UsageLine]:
        """Usage of the last `days` days summed by day, route, key, app user or agent session."""

    # -- funding ------------------------------------------------------------------------

    async def grant(
        self,
        developer_id: int,
        external_user_id: str,
        amount: int,
        description: str,
        idempotency_key: str | None,
        request_hash: str,
    ) -> tuple[dict[str, Any], bool]:
        """Move amount from the developer's pool to the user in one transaction; returns the
        facts and whether they replay an earlier grant with the same idempotency key."""

    async def purge_idempotency(self, older_than_ms: int) -> int: ...
