"""How the SQLite store keeps its WAL off the request path, on real files: small pages for
a new store, the WAL restart that hot writes wait for on an event, the file cut back only
when it grew past the trim size, and the kernel write-out started between checkpoints."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from quota_proxy.keys import new_id
from quota_proxy.store import Account, Outcome, Settlement
from quota_proxy.store import sqlite as sqlite_store
from quota_proxy.store.sqlite import SqliteStore
from quota_proxy.store.writeback import Writeback

pytestmark = pytest.mark.anyio


@pytest.fixture
async def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[SqliteStore]:
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_INTERVAL_S", 3600)  # only the tests' own checkpoints
    async with SqliteStore(tmp_path / "quota.db") as s:
        yield s


async def funded(store: SqliteStore, amount: int = 10_000_000) -> Account:
    account = await store.create_account("acme")
    await store.credit(account.id, amount, "credit", "initial")
    return account


async def charge(store: SqliteStore, account: Account, tokens: int = 30) -> None:
    """One request's two hot writes: the hold, then its settlement through a group."""
    request_id = new_id("req")
    hold = await store.take_hold(account.id, 100, request_id, "me", 60_000)
    store.settle_later(
        Settlement(
            request_id=request_id, account_id=account.id, charged_account_id=account.id, user_id=None,
            key_id=None, hold_id=hold, route="quota/fast", upstream_model="m", input_tokens=10,
            output_tokens=tokens - 10, multiplier="1", charged=tokens, estimated=False, outcome=Outcome.OK,
            status=200,
        )
    )
    await store.commit_pending()


def wal_salt(store: SqliteStore) -> bytes:
    """The WAL header's salts, which SQLite changes each time it writes the WAL from its start."""
    with open(store.path.with_name(store.path.name + "-wal"), "rb") as wal:
        return wal.read(24)[16:24]


def page_size(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("PRAGMA page_size").fetchone()[0])
    finally:
        conn.close()


async def test_a_new_store_has_small_pages_and_an_existing_file_keeps_its_own(tmp_path: Path) -> None:
    async with SqliteStore(tmp_path / "new.db") as new:
        await charge(new, await funded(new))
    assert page_size(tmp_path / "new.db") == sqlite_store.PAGE_SIZE == 1024

    old = tmp_path / "old.db"  # a file made with SQLite's default pages before this store opened it
    conn = sqlite3.connect(old)
    conn.execute("PRAGMA page_size = 4096")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE made_elsewhere (x)")
    conn.close()
    async with SqliteStore(old) as store:
        account = await funded(store)
        await charge(store, account)
        assert await store.verify_ledger() == []
        fresh = await store.account(account.id)
        assert fresh is not None and (fresh.balance, fresh.held) == (10_000_000 - 30, 0)
    assert page_size(old) == 4096


async def test_hot_writes_wait_at_the_restart_gate_and_go_on_when_it_opens(store: SqliteStore) -> None:
    account = await funded(store)
    gate = store._restart_gate = asyncio.Event()
    hold = asyncio.ensure_future(store.take_hold(account.id, 100, new_id("req"), "me", 60_000))
    await asyncio.sleep(0.05)
    assert not hold.done()  # waiting for the restart, not in SQLite's busy handler
    store._restart_gate = None
    gate.set()
    await asyncio.wait_for(hold, 5)
    fresh = await store.account(account.id)
    assert fresh is not None and fresh.held == 100


async def test_the_wal_restarts_from_its_start_under_concurrent_requests(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_store, "WAL_RESTART_BYTES", 64 << 10)
    account = await funded(store)
    for _ in range(40):
        await charge(store, account)
    salt = wal_salt(store)
    restarted: list[tuple[int, int]] = []

    async def restart() -> None:
        restarted.append(await store._checkpoint(restart=True))

    async with anyio.create_task_group() as tg:
        tg.start_soon(restart)
        for _ in range(60):
            tg.start_soon(charge, store, account)
    await charge(store, account)
    (frames, copied), = restarted
    assert frames == copied and frames * 1048 > 64 << 10  # all of it copied into the file
    assert wal_salt(store) != salt  # then written again from its start
    fresh = await store.account(account.id)
    assert fresh is not None and (fresh.balance, fresh.held) == (10_000_000 - 101 * 30, 0)
    assert await store.verify_ledger() == []


async def test_the_wal_file_keeps_its_size_after_a_restart_until_it_passes_the_trim_size(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_store, "WAL_RESTART_BYTES", 64 << 10)
    wal = store.path.with_name(store.path.name + "-wal")
    account = await funded(store)
    for _ in range(40):
        await charge(store, account)
    grown = wal.stat().st_size
    await store._checkpoint(restart=True)
    await charge(store, account)  # the first commit after a restart: SQLite would cut the file here
    assert wal.stat().st_size == grown  # no ftruncate on a request's commit

    monkeypatch.setattr(sqlite_store, "WAL_TRIM_BYTES", grown // 2)
    for _ in range(40):
        await charge(store, account)
    await store._checkpoint(restart=True)
    assert wal.stat().st_size == 0  # cut by the checkpointer, writers held back meanwhile
    await charge(store, account)
    assert await store.verify_ledger() == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_writeback_starts_once_the_file_exists(tmp_path: Path) -> None:
    target = tmp_path / "quota.db-wal"
    writeback = Writeback(target)
    try:
        assert writeback.supported
        assert writeback.start() is False  # no file yet: nothing to write out
        target.write_bytes(b"frame" * 10_000)
        assert writeback.start() is True
        assert target.read_bytes() == b"frame" * 10_000
    finally:
        writeback.close()
