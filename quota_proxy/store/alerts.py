"""Low-balance alerts in the store: settings, crossings found in the ledger, deliveries.

Crossings are found after the fact, by reading ledger rows past a persisted cursor (the
ledger's primary key, so one index range per scan), never on the request path. A crossing
is a ledger row that takes a balance from >= threshold to < threshold; its delivery row is
UNIQUE (account, threshold, ledger row), so a re-scan after a crash cannot queue it twice.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

from quota_proxy.keys import new_id
from quota_proxy.store.records import now_ms
from quota_proxy.store.sql import SqlConnection
from quota_proxy.store.sqlite import SqliteStore

SCOPES = ("account", "users")


@dataclass(frozen=True, slots=True)
class AlertSettings:
    account_id: int
    webhook_url: str
    signing_secret: str
    thresholds: tuple[int, ...]  # quota tokens, for the account's own balance
    user_thresholds: tuple[int, ...]  # quota tokens, for each app user's balance


@dataclass(frozen=True, slots=True)
class Crossing:
    account_id: int
    account_kind: str
    account_name: str
    developer_id: int
    developer_name: str
    threshold: int
    ledger_id: str
    balance_before: int
    balance_after: int
    created_at: int


@dataclass(frozen=True, slots=True)
class DueDelivery:
    id: int
    public_id: str
    developer_id: int
    payload: bytes
    attempts: int  # including the one just claimed
    webhook_url: str | None
    signing_secret: str | None


# Builds the JSON body an alert is delivered with.
PayloadBuilder = Callable[[str, Crossing], bytes]


class AlertStore:
    def __init__(self, store: SqliteStore) -> None:
        self.store = store

    @property
    def _db(self) -> SqlConnection:
        """Autocommit statements outside a transaction."""
        return self.store.db

    def _transaction(self) -> AbstractAsyncContextManager[SqlConnection]:
        return self.store._durable_tx()

    async def set(
        self,
        account_id: int,
        webhook_url: str,
        thresholds: tuple[int, ...],
        user_thresholds: tuple[int, ...],
    ) -> AlertSettings:
        """Replace the account's alert settings; the signing secret is made once and kept."""
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO alert_settings (account_id, webhook_url, signing_secret, updated_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (account_id) DO UPDATE SET "
                "webhook_url = excluded.webhook_url, updated_at = excluded.updated_at",
                (account_id, webhook_url, "qpsec_" + secrets.token_hex(24), now_ms()),
            )
            await db.execute("DELETE FROM alert_thresholds WHERE account_id = ?", (account_id,))
            await db.executemany(
                "INSERT INTO alert_thresholds (account_id, scope, threshold) VALUES (?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                [(account_id, "account", t) for t in thresholds]
                + [(account_id, "users", t) for t in user_thresholds],
            )
        settings = await self.get(account_id)
        assert settings is not None
        return settings

    async def get(self, account_id: int) -> AlertSettings | None:
        db = self._db
        rows = list(
            await db.execute_fetchall(
                "SELECT webhook_url, signing_secret FROM alert_settings WHERE account_id = ?",
                (account_id,),
            )
        )
        if not rows:
            return None
        levels = list(
            await db.execute_fetchall(
                "SELECT scope, threshold FROM alert_thresholds WHERE account_id = ? "
                "ORDER BY threshold DESC",
                (account_id,),
            )
        )
        return AlertSettings(
            account_id,
            rows[0][0],
            rows[0][1],
            tuple(t for s, t in levels if s == "account"),
            tuple(t for s, t in levels if s == "users"),
        )

    async def scan(self, build: PayloadBuilder, batch: int = 5000) -> int:
        """Queue a delivery for each crossing in the ledger rows past the cursor; returns how many.

        No transaction spans an await: the crossings are read, their deliveries inserted
        (INSERT OR IGNORE on the crossing's UNIQUE key), then the cursor moves forward with a
        conditional UPDATE. A crash in between re-reads the same rows and queues nothing twice.
        """
        db = self._db
        cursor = list(await db.execute_fetchall("SELECT ledger_row FROM alert_cursor WHERE id = 1"))
        start = int(cursor[0][0]) if cursor else 0
        last = list(
            await db.execute_fetchall(
                "SELECT max(id) FROM (SELECT id FROM ledger WHERE id > ? ORDER BY id LIMIT ?)",
                (start, batch),
            )
        )[0][0]
        if last is None:
            return 0
        rows = await db.execute_fetchall(
            """
            SELECT a.id, a.kind, a.name, d.id, d.name, t.threshold, l.public_id,
                   l.balance_after - l.amount, l.balance_after, l.created_at
            FROM ledger l
            JOIN accounts a ON a.id = l.account_id
            JOIN accounts d ON d.id = coalesce(a.parent_id, a.id)
            JOIN alert_thresholds t ON t.account_id = d.id
                 AND t.scope = CASE a.kind WHEN 'developer' THEN 'account' ELSE 'users' END
            WHERE l.id > ? AND l.id <= ? AND l.amount < 0
              AND t.threshold <= l.balance_after - l.amount AND t.threshold > l.balance_after
            ORDER BY l.id
            """,
            (start, last),
        )
        now = now_ms()
        queued = []
        for row in rows:
            crossing = Crossing(*row)
            public_id = new_id("alrt")
            queued.append(
                (public_id, crossing.account_id, crossing.developer_id, crossing.threshold,
                 crossing.ledger_id, crossing.balance_after, build(public_id, crossing), now, now)
            )
        if queued:
            await db.executemany(
                "INSERT OR IGNORE INTO alert_deliveries (public_id, account_id, developer_id, "
                "threshold, ledger_id, balance_after, payload, next_attempt_at, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                queued,
            )
        await db.execute(
            "UPDATE alert_cursor SET ledger_row = ? WHERE id = 1 AND ledger_row = ?", (last, start)
        )
        return len(queued)

    async def claim_due(self, lease_ms: int, limit: int = 20) -> list[DueDelivery]:
        """Pending deliveries whose time has come, each claimed by one conditional UPDATE
        (so two gateway processes never send the same attempt) and leased for lease_ms."""
        db = self._db
        now = now_ms()
        rows = list(
            await db.execute_fetchall(
                "SELECT id, next_attempt_at FROM alert_deliveries "
                "WHERE status = 'pending' AND next_attempt_at <= ? ORDER BY next_attempt_at LIMIT ?",
                (now, limit),
            )
        )
        due = []
        for delivery_id, planned in rows:
            claimed = list(
                await db.execute_fetchall(
                    "UPDATE alert_deliveries SET attempts = attempts + 1, next_attempt_at = ? "
                    "WHERE id = ? AND status = 'pending' AND next_attempt_at = ? "
                    "RETURNING public_id, developer_id, payload, attempts",
                    (now + lease_ms, delivery_id, planned),
                )
            )
            if not claimed:
                continue
            public_id, developer_id, payload, attempts = claimed[0]
            target = list(
                await db.execute_fetchall(
                    "SELECT webhook_url, signing_secret FROM alert_settings WHERE account_id = ?",
                    (developer_id,),
                )
            )
            url, secret = target[0] if target else (None, None)
            due.append(DueDelivery(delivery_id, public_id, developer_id, bytes(payload), attempts, url, secret))
        return due

    async def delivered(self, delivery_id: int) -> None:
        await self._db.execute(
            "UPDATE alert_deliveries SET status = 'delivered', delivered_at = ?, last_error = NULL "
            "WHERE id = ? AND status = 'pending'",
            (now_ms(), delivery_id),
        )

    async def failed(self, delivery_id: int, error: str, retry_at: int | None) -> None:
        """Schedule another attempt at retry_at, or give up (retry_at None)."""
        if retry_at is None:
            await self._db.execute(
                "UPDATE alert_deliveries SET status = 'failed', last_error = ? "
                "WHERE id = ? AND status = 'pending'",
                (error[:500], delivery_id),
            )
        else:
            await self._db.execute(
                "UPDATE alert_deliveries SET next_attempt_at = ?, last_error = ? "
                "WHERE id = ? AND status = 'pending'",
                (retry_at, error[:500], delivery_id),
            )

    async def deliveries(self, developer_id: int, limit: int = 100) -> list[dict[str, Any]]:
        rows = await self._db.execute_fetchall(
            "SELECT d.public_id, a.name, a.kind, d.threshold, d.ledger_id, d.balance_after, d.status, "
            "d.attempts, d.last_error, d.delivered_at, d.created_at FROM alert_deliveries d "
            "JOIN accounts a ON a.id = d.account_id WHERE d.developer_id = ? ORDER BY d.id DESC LIMIT ?",
            (developer_id, limit),
        )
        keys = ("id", "account", "account_kind", "threshold_quota_tokens", "ledger_id",
                "balance_after_quota_tokens", "status", "attempts", "last_error", "delivered_at",
                "created_at")
        return [dict(zip(keys, r, strict=True)) for r in rows]
