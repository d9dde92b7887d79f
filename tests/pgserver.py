"""The PostgreSQL the tests use: the server on 127.0.0.1:5432 (or $QUOTA_TEST_PG), a fresh
database per test module, a fresh schema per test. Without a server the tests skip and
say how to get one; with CI=true they fail instead."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest

ADMIN_URL = os.environ.get("QUOTA_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
HOW_TO = (
    "PostgreSQL is not reachable at {url} ({error}); start one (e.g. `apt-get install postgresql` "
    "with trust auth for 127.0.0.1, or set QUOTA_TEST_PG=postgresql://user@host:port/db) to run "
    "the PostgreSQL store tests"
)


def _with_database(url: str, database: str, **query: str) -> str:
    base, _, _ = url.rpartition("/")
    suffix = "&".join(f"{k}={v}" for k, v in query.items())
    return f"{base}/{database}" + (f"?{suffix}" if suffix else "")


async def require_server() -> None:
    """Skip (or, on CI, fail) unless the server answers."""
    try:
        conn = await asyncpg.connect(ADMIN_URL, timeout=3)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        message = HOW_TO.format(url=ADMIN_URL, error=f"{type(exc).__name__}: {exc}")
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    await conn.close()


@asynccontextmanager
async def fresh_database(label: str = "t") -> AsyncIterator[str]:
    """A new, uniquely named database; dropped (with its connections) afterwards."""
    await require_server()
    name = f"qp_{label}_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(ADMIN_URL, timeout=5)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield _with_database(ADMIN_URL, name)
    finally:
        admin = await asyncpg.connect(ADMIN_URL, timeout=5)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


def schema_url(database_url: str) -> str:
    """A URL whose connections use a new schema of the database (create it with create_schema)."""
    return f"{database_url}?search_path=s_{uuid.uuid4().hex[:10]}"


async def create_schema(url: str) -> None:
    name = url.rpartition("search_path=")[2]
    conn = await asyncpg.connect(url.partition("?")[0], timeout=5)
    try:
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{name}"')
    finally:
        await conn.close()


async def allow_connections(database: str, allow: bool) -> None:
    """Close a database to every connection (and end the open ones), as an outage would; or
    open it again."""
    conn = await asyncpg.connect(ADMIN_URL, timeout=5)
    try:
        await conn.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS {str(allow).lower()}')
        if not allow:
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", database
            )
    finally:
        await conn.close()
