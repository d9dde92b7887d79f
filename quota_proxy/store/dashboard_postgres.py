"""The dashboard's queries on PostgreSQL: the SQLite statements of store/dashboard_sqlite.py
(standard SQL but for `?` placeholders and one `AND 1`), run through asyncpg; the one
upsert PostgreSQL reads differently is written here again.

Written once, run on both engines: a statement here is the SQLite one with its placeholders
numbered. Writes run in a transaction with synchronous_commit on (revocations and
password changes must survive a crash), like the SQLite store's durable connection.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any, Protocol

import asyncpg

from quota_proxy.store.dashboard_models import ThrottleScope
from quota_proxy.store.dashboard_sqlite import DashboardQueries
from quota_proxy.store.models import StoreUnavailable


class _Runner(Protocol):
    """What this needs of the PostgresStore (named structurally: it imports this module)."""

    connect_timeout_s: float

    @property
    def pool(self) -> asyncpg.Pool: ...

    async def _one(self, sql: str, *args: Any, again: bool = True, durable: bool = False) -> Any: ...

    async def _all(self, sql: str, *args: Any) -> list[Any]: ...

_PLACEHOLDER = re.compile(r"\?")


def pg_sql(sql: str) -> str:
    """SQLite's `?` placeholders as PostgreSQL's `$1, $2, …`; `AND 1` as `AND true`."""
    numbers = iter(range(1, 1000))
    sql = sql.replace(" AND 1 ", " AND true ")
    return _PLACEHOLDER.sub(lambda _: f"${next(numbers)}", sql)


class _Tx:
    """The two calls of aiosqlite's connection the dashboard's queries make, on asyncpg."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def execute_fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        return list(await self.conn.fetch(pg_sql(sql), *params))

    async def execute(self, sql: str, params: Iterable[Any] = ()) -> None:
        await self.conn.execute(pg_sql(sql), *params)


class PostgresDashboardQueries(DashboardQueries):
    """DashboardQueries over a PostgresStore's pool."""

    def __init__(self, store: _Runner) -> None:
        self.store = store

    @asynccontextmanager
    async def _durable_tx(self) -> AsyncIterator[Any]:
        pool = self.store.pool
        try:
            async with pool.acquire(timeout=self.store.connect_timeout_s) as conn, conn.transaction():
                await conn.execute("SET LOCAL synchronous_commit = on")
                yield _Tx(conn)
        except (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def _one(self, sql: str, params: Iterable[Any] = ()) -> Any:
        return await self.store._one(pg_sql(sql), *params)

    async def _all(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        return await self.store._all(pg_sql(sql), *params)

    async def record_signin_failure(self, scope: ThrottleScope, subject: str, window_ms: int) -> int:
        """Count one failure; a window older than window_ms starts again at 1. (PostgreSQL
        wants the existing row's columns qualified in the upsert.)"""
        now = int(time.time() * 1000)
        row = await self.store._one(
            "INSERT INTO dashboard_signin_failures AS f (scope, subject, window_start, failures) "
            "VALUES ($1, $2, $3, 1) ON CONFLICT (scope, subject) DO UPDATE SET "
            "failures = CASE WHEN f.window_start <= $4 THEN 1 ELSE f.failures + 1 END, "
            "window_start = CASE WHEN f.window_start <= $4 THEN excluded.window_start "
            "ELSE f.window_start END RETURNING failures",
            scope.value, subject, now, now - window_ms,
        )
        return int(row[0])


# The dashboard's methods a PostgresStore answers by delegation (its own usage_by stays).
DASHBOARD_METHODS = tuple(
    name for name, value in vars(DashboardQueries).items()
    if not name.startswith("_") and callable(value) and name != "usage_by"
)
