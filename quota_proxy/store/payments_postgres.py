"""Orders, provider events and redemption codes on PostgreSQL: store/payments.py's statements
and logic over asyncpg (pg_schema_v3.sql). What differs is said here:

* the ledger insert casts its parameters (PostgreSQL types a bare `$n` in a SELECT list as
  text); the ledger's own trigger computes balance_after;
* an event's transaction locks the order row it read (FOR UPDATE): SQLite's write transaction
  is exclusive, PostgreSQL's is not, so two events about one order queue on the row rather
  than both reading it before either writes.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager

from quota_proxy.store.payments import PaymentStore
from quota_proxy.store.pg_connection import PgAutocommit, durable_transaction
from quota_proxy.store.postgres import PostgresStore
from quota_proxy.store.sql import SqlConnection

_PG_LEDGER_INSERT = (
    "INSERT INTO ledger (public_id, account_id, amount, balance_after, kind, idempotency_key, "
    "related_id, description, created_at) SELECT ?::text, id, ?::bigint, balance + ?::bigint, "
    "?::text, ?::text, ?::text, ?::text, ?::bigint FROM accounts WHERE id = ? RETURNING balance_after"
)


class PostgresPaymentStore(PaymentStore):
    ledger_insert = _PG_LEDGER_INSERT
    order_lock = " FOR UPDATE OF o"

    def __init__(self, store: PostgresStore) -> None:  # noqa: D107 - no SqliteStore here
        self.pg = store
        self._autocommit = PgAutocommit(store)

    @property
    def _db(self) -> SqlConnection:
        return self._autocommit

    def _transaction(self) -> AbstractAsyncContextManager[SqlConnection]:
        return durable_transaction(self.pg)
