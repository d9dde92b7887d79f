"""Persistence behind one interface (store.protocol.Store): SQLite by default, PostgreSQL
when several gateway machines share one set of balances. open_store() picks the engine
from the config; nothing outside this package names one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from quota_proxy.config import StoreSettings
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
    StoreUnavailable,
    TooManyInFlight,
    UsageRow,
    UsageSummary,
    UsageTotal,
    billed_tokens,
)
from quota_proxy.store.protocol import Store

if TYPE_CHECKING:  # both engines satisfy the protocol, checked by mypy
    from quota_proxy.store.alerts import AlertStore
    from quota_proxy.store.payments import PaymentStore
    from quota_proxy.store.postgres import PostgresStore
    from quota_proxy.store.sqlite import SqliteStore

    _engines: tuple[type[Store], ...] = (SqliteStore, PostgresStore)
    # A store with the dashboard's queries (sign-in, invitations, sessions, reports): both
    # engines have them (PostgreSQL by delegation, which mypy does not see), typed as SQLite's.
    DashboardStore = SqliteStore
else:
    DashboardStore = Store


def supports_payments(store: Store) -> bool:
    """Whether orders, redemption codes and alerts can run on this store: both engines have
    them (store/payments*.py, store/alerts*.py); a store passed in by a library user might not."""
    return _engine(store) is not None


def _engine(store: Store) -> str | None:
    from quota_proxy.store.sqlite import SqliteStore

    if isinstance(store, SqliteStore):
        return "sqlite"
    from quota_proxy.store.postgres import PostgresStore

    return "postgres" if isinstance(store, PostgresStore) else None


def payment_store(store: Store) -> PaymentStore:
    """Orders, provider events and redemption codes on this store's engine."""
    from quota_proxy.store.payments import PaymentStore

    if _engine(store) == "postgres":
        from quota_proxy.store.payments_postgres import PostgresPaymentStore

        return PostgresPaymentStore(store)  # type: ignore[arg-type]
    # SQLite, or a library user's store (which then fails on use: supports_payments says so).
    return PaymentStore(store)  # type: ignore[arg-type]


def alert_store(store: Store) -> AlertStore:
    """Low-balance alert settings, crossings and deliveries on this store's engine."""
    from quota_proxy.store.alerts import AlertStore

    if _engine(store) == "postgres":
        from quota_proxy.store.alerts_postgres import PostgresAlertStore

        return PostgresAlertStore(store)  # type: ignore[arg-type]
    return AlertStore(store)  # type: ignore[arg-type]


def supports_dashboard(store: Store) -> bool:
    """Whether this store has the dashboard's queries (both engines do; a store passed in
    by a library user might not)."""
    return hasattr(store, "create_session")


def open_store(settings: StoreSettings) -> Store:
    """The store the settings name, not yet opened (`await store.open()` or `async with`)."""
    if settings.url is not None:
        from quota_proxy.store.postgres import PostgresStore

        return PostgresStore(
            settings.url,
            password=settings.password,
            pool_size=settings.pool_size,
            connect_timeout_s=settings.connect_timeout_s,
            command_timeout_s=settings.command_timeout_s,
            journal=settings.journal,
            settle_delay_ms=settings.settle_delay_ms,
            settle_gather_ms=settings.settle_gather_ms,
        )
    from quota_proxy.store.sqlite import SqliteStore

    return SqliteStore(
        settings.path,
        journal=settings.journal,
        settle_delay_ms=settings.settle_delay_ms,
        settle_gather_ms=settings.settle_gather_ms,
    )


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
    "DashboardStore",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "TooManyInFlight",
    "UsageRow",
    "UsageSummary",
    "UsageTotal",
    "alert_store",
    "billed_tokens",
    "open_store",
    "payment_store",
    "supports_dashboard",
    "supports_payments",
]
