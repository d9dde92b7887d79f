"""Low-balance alerts on PostgreSQL: store/alerts.py over asyncpg, but for how crossings are
found and deliveries claimed.

Finding crossings: the SQLite scanner reads the ledger past an id cursor, which is sound
there (one writer: ids commit in order). Here a sequence hands out ids before their
transactions commit, so a row with a lower id can become visible after the cursor passed it,
and its crossing would be missed. Instead the ledger's insert trigger (pg_schema_v3.sql)
records each crossing in alert_crossings in the ledger entry's own transaction; scan() takes
those rows (FOR UPDATE SKIP LOCKED, so two gateways split them), builds each delivery and
deletes the crossing in one transaction. Nothing is missed, nothing is queued twice (the
delivery is also UNIQUE per crossing).

Claiming: one UPDATE over a FOR UPDATE SKIP LOCKED selection, so two gateway processes never
claim the same attempt and neither waits for the other.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager

from quota_proxy.keys import new_id
from quota_proxy.store.alerts import AlertStore, Crossing, DueDelivery, PayloadBuilder
from quota_proxy.store.pg_connection import PgAutocommit, durable_transaction
from quota_proxy.store.postgres import PostgresStore
from quota_proxy.store.records import now_ms
from quota_proxy.store.sql import SqlConnection


class PostgresAlertStore(AlertStore):
    def __init__(self, store: PostgresStore) -> None:  # noqa: D107 - no SqliteStore here
        self.pg = store
        self._autocommit = PgAutocommit(store)

    @property
    def _db(self) -> SqlConnection:
        return self._autocommit

    def _transaction(self) -> AbstractAsyncContextManager[SqlConnection]:
        return durable_transaction(self.pg)

    async def scan(self, build: PayloadBuilder, batch: int = 5000) -> int:
        """Queue a delivery for each recorded crossing; returns how many were queued."""
        async with self._transaction() as tx:
            rows = await tx.execute_fetchall(
                """
                WITH taken AS (
                    DELETE FROM alert_crossings WHERE id IN (
                        SELECT id FROM alert_crossings ORDER BY id LIMIT ? FOR UPDATE SKIP LOCKED)
                    RETURNING *)
                SELECT a.id, a.kind, a.name, d.id, d.name, t.threshold, t.ledger_id,
                       t.balance_before, t.balance_after, t.created_at
                FROM taken t
                JOIN accounts a ON a.id = t.account_id
                JOIN accounts d ON d.id = t.developer_id
                ORDER BY t.id
                """,
                (batch,),
            )
            now = now_ms()
            queued = 0
            for row in rows:
                crossing = Crossing(*row)
                public_id = new_id("alrt")
                inserted = await tx.execute_fetchall(
                    "INSERT INTO alert_deliveries (public_id, account_id, developer_id, threshold, "
                    "ledger_id, balance_after, payload, next_attempt_at, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (account_id, threshold, ledger_id) DO NOTHING RETURNING id",
                    (public_id, crossing.account_id, crossing.developer_id, crossing.threshold,
                     crossing.ledger_id, crossing.balance_after, build(public_id, crossing), now, now),
                )
                queued += len(list(inserted))
        return queued

    async def claim_due(self, lease_ms: int, limit: int = 20) -> list[DueDelivery]:
        now = now_ms()
        rows = await self._db.execute_fetchall(
            """
            WITH claimed AS (
                UPDATE alert_deliveries SET attempts = attempts + 1, next_attempt_at = ?
                WHERE id IN (
                    SELECT id FROM alert_deliveries
                    WHERE status = 'pending' AND next_attempt_at <= ?
                    ORDER BY next_attempt_at LIMIT ? FOR UPDATE SKIP LOCKED)
                RETURNING id, public_id, developer_id, payload, attempts, next_attempt_at)
            SELECT c.id, c.public_id, c.developer_id, c.payload, c.attempts, s.webhook_url,
                   s.signing_secret
            FROM claimed c LEFT JOIN alert_settings s ON s.account_id = c.developer_id
            ORDER BY c.id
            """,
            (now + lease_ms, now, limit),
        )
        return [
            DueDelivery(r[0], r[1], r[2], bytes(r[3]), r[4], r[5], r[6]) for r in rows
        ]
