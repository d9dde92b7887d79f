"""Multi-statement transactions on the store's transaction connection.

The store's `_db` connection runs single statements from every request at once, so a
BEGIN there would sweep other requests' statements into it; multi-statement work goes
through here instead: the `_tx` connection, under the store's lock, BEGIN IMMEDIATE.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiosqlite
import anyio

from quota_proxy.store.models import StoreError
from quota_proxy.store.sqlite import SqliteStore


@asynccontextmanager
async def transaction(store: SqliteStore, *, durable: bool = False) -> AsyncIterator[aiosqlite.Connection]:
    """BEGIN IMMEDIATE … COMMIT (ROLLBACK on any exception, cancellation included).

    durable: commit with synchronous = FULL, for money coming in — a payment acknowledged
    to its provider must survive a power cut, not only a process crash.
    """
    tx = store._tx
    if tx is None:
        raise StoreError("the store is not open")
    async with store._tx_lock:
        if durable:
            await tx.execute("PRAGMA synchronous = FULL")
        try:
            await tx.execute("BEGIN IMMEDIATE")
            try:
                yield tx
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await tx.execute("ROLLBACK")
                raise
            with anyio.CancelScope(shield=True):
                await tx.execute("COMMIT")
        finally:
            if durable:
                with anyio.CancelScope(shield=True):
                    await tx.execute("PRAGMA synchronous = NORMAL")
