"""Persistence behind one interface; SQLite now, a server database later."""

from quota_proxy.store.models import (
    Account,
    ChargeDetails,
    IdempotencyMismatch,
    InsufficientFunds,
    KeyRecord,
    LedgerEntry,
    LedgerPage,
    Outcome,
    Settlement,
    StoreError,
    TooManyInFlight,
    UsageRow,
    UsageSummary,
    UsageTotal,
    billed_tokens,
)
from quota_proxy.store.sqlite import SqliteStore

__all__ = [
    "Account",
    "ChargeDetails",
    "IdempotencyMismatch",
    "InsufficientFunds",
    "KeyRecord",
    "LedgerEntry",
    "LedgerPage",
    "Outcome",
    "Settlement",
    "SqliteStore",
    "StoreError",
    "TooManyInFlight",
    "UsageRow",
    "UsageSummary",
    "UsageTotal",
    "billed_tokens",
]
