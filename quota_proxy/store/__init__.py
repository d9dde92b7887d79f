"""Persistence behind one interface; SQLite now, a server database later."""

from quota_proxy.store.models import (
    Account,
    IdempotencyMismatch,
    InsufficientFunds,
    KeyRecord,
    LedgerEntry,
    Outcome,
    Settlement,
    StoreError,
    TooManyInFlight,
    UsageRow,
)
from quota_proxy.store.sqlite import SqliteStore

__all__ = [
    "Account",
    "IdempotencyMismatch",
    "InsufficientFunds",
    "KeyRecord",
    "LedgerEntry",
    "Outcome",
    "Settlement",
    "SqliteStore",
    "StoreError",
    "TooManyInFlight",
    "UsageRow",
]
