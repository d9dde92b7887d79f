"""asyncpg in the shape of store/sql.py's SqlConnection, so the payment and alert stores run
their SQLite statements on PostgreSQL: `?` placeholders numbered (dashboard_postgres.pg_sql)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import asyncpg

from quota_proxy.store.dashboard_postgres import pg_sql
from quota_proxy.store.models import StoreUnavailable

if TYPE_CHECKING:
    from quota_proxy.store.postgres import PostgresStore

_LOST = (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError, TimeoutError)


class PgTransaction:
    """One connection inside a transaction."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def execute(self, sql: str, parameters: Iterable[Any] = (), /) -> None:
        await self.conn.execute(pg_sql(sql), *parameters)

    async def execute_fetchall(self, sql: str, parameters: Iterable[Any] = (), /) -> list[Any]:
        return list(await self.conn.fetch(pg_sql(sql), *parameters))

    async def executemany(self, sql: str, parameters: Iterable[Iterable[Any]], /) -> None:
        await self.conn.executemany(pg_sql(sql), [tuple(p) for p in parameters])


class PgAutocommit:
    """Single statements on the store's pool, through its error boundary (PostgresStore._run:
    lost connections become StoreUnavailable). Writes commit durably and are not repeated on
    a lost connection (a repeat could do them twice)."""

    def __init__(self, store: PostgresStore) -> None:
        self.store = store

    async def execute(self, sql: str, parameters: Iterable[Any] = (), /) -> None:
        args = tuple(parameters)
        await self.store._run(lambda c: c.execute(pg_sql(sql), *args), durable=True, again=False)

    async def execute_fetchall(self, sql: str, parameters: Iterable[Any] = (), /) -> list[Any]:
        args = tuple(parameters)
        writes = not sql.lstrip().upper().startswith("SELECT")
        rows = await self.store._run(
            lambda c: c.fetch(pg_sql(sql), *args), durable=writes, again=not writes
        )
        return list(rows)

    async def executemany(self, sql: str, parameters: Iterable[Iterable[Any]], /) -> None:
        rows = [tuple(p) for p in parameters]
        await self.store._run(lambda c: c.executemany(pg_sql(sql), rows), durable=True, again=False)


@asynccontextmanager
async def durable_transaction(store: PostgresStore) -> AsyncIterator[PgTransaction]:
    """A transaction committed with synchronous_commit on: money moved is on disk before the
    caller (and so the payment provider) hears back."""
    try:
        async with store.pool.acquire(timeout=store.connect_timeout_s) as conn, conn.transaction():
            await conn.execute("SET LOCAL synchronous_commit = on")
            yield PgTransaction(conn)
    except _LOST as exc:
        raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc
