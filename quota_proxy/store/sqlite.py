"""The SQLite store: one file, WAL mode, the money invariants enforced by the schema.

Four connections. `_inline` runs the request path's writes (holds, rate windows, groups of
settlements: each one statement, atomic by itself) on the event loop's own thread while the
file's write lock is free, and `_db` (aiosqlite, a thread of its own) runs them when it is
not, and every read; both with `synchronous = NORMAL`: a power cut may roll back their last
commits, which are charges, holds and their releases (a lost charge favours the user). `_tx`
runs `_durable_tx()` transactions under an asyncio lock with `synchronous = FULL`, so each is
on disk before it returns: money that came in (credits, purchases, grants), accounts and
keys. `_checkpointer` copies the WAL into the file on a timer, from a worker thread. See
docs/reliability.md for what a power cut can cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import aiosqlite
import anyio
import orjson

from quota_proxy.keys import new_id, new_ledger_id
from quota_proxy.store.dashboard_sqlite import DashboardQueries
from quota_proxy.store.group_commit import GroupObserver, SettlementJournal, SettlementWriter
from quota_proxy.store.models import (
    Account,
    IdempotencyMismatch,
    InsufficientFunds,
    KeyRecord,
    LedgerEntry,
    LedgerPage,
    Settlement,
    StoreError,
    TooManyInFlight,
    UsageRow,
    UsageSummary,
    UsageTotal,
)
from quota_proxy.store.records import (
    ACCOUNT_COLUMNS,
    BUCKET_COLUMNS,
    KEY_COLUMNS,
    LEDGER_COLUMNS,
    LEDGER_SELECT,
    REQUEST_COLUMN_COUNT,
    REQUEST_COLUMNS,
    account_record,
    key_record,
    ledger_record,
    now_ms,
    request_row,
)
from quota_proxy.store.writeback import Writeback

logger = logging.getLogger("quota_proxy.store")

# Schema versions and their scripts, applied in order. Numbers are reserved per branch, so
# the list may have gaps while branches merge; a file is at the highest version it ran.
MIGRATIONS: dict[int, str] = {
    1: "schema_v1.sql",
    2: "schema_v2.sql",
    3: "schema_v3.sql",
    4: "schema_v4.sql",
    5: "schema_v5.sql",
    6: "schema_v6.sql",  # orders, payment events, redemption codes, low-balance alerts
    7: "schema_v7.sql",  # two hold indexes fewer: fewer pages written per request
}
LATEST_VERSION = max(MIGRATIONS)
BUSY_TIMEOUT_MS = 30_000
# A new store's page size. Every commit writes each page it touches whole into the WAL, and a
# request touches about 14 (hold: 3; settlement: 11, mostly index leaves): 1,024-byte pages
# write a quarter of the bytes of SQLite's default 4,096, which is what the WAL's fsyncs,
# the kernel's write-back and the restarts below are paid in (c=1: 107 -> 30 MB/s of WAL).
# An existing store keeps its page size; `quota-proxy store copy` to a new file converts it.
PAGE_SIZE = 1024
# No connection checkpoints inside a commit (SQLite's default does, every 1,000 WAL pages:
# a ~13 ms stall on one request in ~50); `_checkpointer` does, on this timer, from a worker
# thread. A checkpoint starts with an fsync of the WAL; a hot-path write landing on the WAL
# meanwhile may wait for it in the kernel (10-100 ms on the benchmark machines' virtual
# disks); `_write_back_wal` keeps that fsync short, which made such waits rare. Every
# second, because the WAL's restart (below) needs a moment with no reader, and a 5 s timer
# found none often enough (the WAL grew to 580 MB in 15 s of load).
CHECKPOINT_INTERVAL_S = 1.0
# A passive checkpoint never waits, so under steady writes it never finds the WAL wholly
# copied, and SQLite restarts the WAL from its start only then: left alone the file grows
# without bound (800 MB in 15 s of load, measured). Past this size the timer repeats
# passive rounds until few frames are left to copy, then runs a RESTART, which holds every
# writer back while it syncs (3-15 ms): this process's hot writes wait for it on an event
# (`_restart_gate`) rather than in SQLite's busy handler. Past WAL_TRIM_BYTES (readers kept
# it from restarting for a while) the restart is a TRUNCATE, which also cuts the file.
# Otherwise the file keeps its largest size until the store closes: cutting it on every
# restart (journal_size_limit) made the next request's commit wait 20-30 ms for ftruncate.
WAL_RESTART_BYTES = 64 << 20
WAL_TRIM_BYTES = 256 << 20
WAL_RESTART_LEFT = 200
RESTART_WAIT_MS = 200
PASSIVE_ROUNDS = 8
WAL_WRITEBACK_INTERVAL_S = 0.02  # how often, at most, the WAL's write-out is started
HOT_RETRY_FIRST_S = 0.0005  # a busy hot-path write retries on the loop after 0.5, 1, 2, … ms,
HOT_RETRY_LAST_S = 0.016  # then goes to the connection's thread, which waits for the lock
SETTLE_ROWS_PER_STATEMENT = 500  # 22 values a row, under SQLite's 32,766 variables
COPY_TABLES = ("accounts", "api_keys", "ledger", "requests", "holds", "idempotency")

_BUCKET_SUMS = ", ".join(f"sum({c})" for c in BUCKET_COLUMNS)
_NO_LIMIT = -1  # SQLite's LIMIT -1: every row


def _connect_sync(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    _configure(conn)
    return conn


def _configure(conn: sqlite3.Connection) -> None:
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # before WAL mode; no effect on an existing file
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")  # a migration is on disk when it commits
    conn.execute("PRAGMA foreign_keys = ON")


def _statements(script: str) -> Iterable[str]:
    """Split a script into statements, keeping trigger bodies whole."""
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            if buffer.strip():
                yield buffer
            buffer = ""


def migrate(path: Path) -> int:
    """Bring the file's schema up to date; safe when several processes start at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = _connect_sync(path)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > LATEST_VERSION:
                raise StoreError(
                    f"{path}: schema version {version} is newer than this quota-proxy "
                    f"({LATEST_VERSION}); upgrade quota-proxy"
                )
            for number in sorted(n for n in MIGRATIONS if n > version):
                name = MIGRATIONS[number]
                script = resources.files("quota_proxy.store").joinpath(name).read_text()
                for statement in _statements(script):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return LATEST_VERSION
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path}: {exc}") from exc
    finally:
        conn.close()


class SqliteStore(DashboardQueries):
    """The store interface over one SQLite file."""

    def __init__(
        self,
        path: str | Path,
        *,
        journal: Path | None = None,
        settle_delay_ms: int = 0,
        settle_gather_ms: int = 0,
    ) -> None:
        self.path = Path(path)
        self._db: aiosqlite.Connection | None = None
        self._tx: aiosqlite.Connection | None = None
        self._checkpointer: sqlite3.Connection | None = None  # used from worker threads only
        self._checkpoint_lock = asyncio.Lock()
        self._restart_gate: asyncio.Event | None = None  # hot writes wait for a WAL restart
        self._inline: sqlite3.Connection | None = None
        self._checkpoints: asyncio.Task[None] | None = None
        self._wal = self.path.with_name(self.path.name + "-wal")
        self._wal_frame_bytes = 4096 + 24  # read from the file at open
        self._wal_writeback = Writeback(self._wal)
        self._wal_written = asyncio.Event()
        self._writebacks: asyncio.Task[None] | None = None
        self._tx_lock = asyncio.Lock()
        self.settlements = SettlementWriter(
            SettlementJournal(journal or self.path.with_name(self.path.name + "-settlements")),
            self._settle_group,
            settle_delay_ms / 1000,
            settle_gather_ms / 1000,
        )

    async def open(self) -> None:
        await anyio.to_thread.run_sync(migrate, self.path)
        self._db = await aiosqlite.connect(self.path, isolation_level=None)
        self._tx = await aiosqlite.connect(self.path, isolation_level=None)
        for conn, synchronous in ((self._db, "NORMAL"), (self._tx, "FULL")):
            await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            await conn.execute(f"PRAGMA synchronous = {synchronous}")
            await conn.execute("PRAGMA foreign_keys = ON")
            await conn.execute("PRAGMA wal_autocheckpoint = 0")
        # busy_timeout = 0 on both: the hot path falls back to the thread when the file is
        # busy, and the checkpointer never sleeps in SQLite's busy handler holding the lock.
        self._inline = _connect_hot(self.path)
        self._wal_frame_bytes = self._inline.execute("PRAGMA page_size").fetchone()[0] + 24
        self._checkpointer = _connect_hot(self.path)
        self._checkpoints = asyncio.get_running_loop().create_task(self._checkpoint_periodically())
        if self._wal_writeback.supported:
            self._writebacks = asyncio.get_running_loop().create_task(self._write_back_wal())
        self.settlements.start()
        await self.settlements.recover()

    @property
    def description(self) -> str:
        return str(self.path)

    async def close(self) -> None:
        await self.settlements.close()
        for task in (self._checkpoints, self._writebacks):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._checkpoints = self._writebacks = None
        self._wal_writeback.close()
        with contextlib.suppress(sqlite3.Error, StoreError):
            await self.sync()
        for conn in (self._db, self._tx):
            if conn is not None:
                await conn.close()
        for plain in (self._inline, self._checkpointer):
            if plain is not None:
                plain.close()
        self._db = self._tx = None
        self._checkpointer = self._inline = None

    async def _checkpoint_periodically(self) -> None:
        while True:
            await asyncio.sleep(CHECKPOINT_INTERVAL_S)
            try:
                await self._checkpoint(restart=True)
            except sqlite3.Error as exc:  # briefly locked: the next round catches up
                logger.debug("checkpoint skipped: %s", exc)

    async def _write_back_wal(self) -> None:
        """After hot-path writes, start the WAL's write-out (store/writeback.py), at most
        once per WAL_WRITEBACK_INTERVAL_S, so a checkpoint's fsync finds little to write."""
        while True:
            await self._wal_written.wait()
            self._wal_written.clear()
            await anyio.to_thread.run_sync(self._wal_writeback.start)
            await asyncio.sleep(WAL_WRITEBACK_INTERVAL_S)

    async def _checkpoint(self, *, restart: bool = False) -> tuple[int, int]:
        """A passive checkpoint on a worker thread. With `restart`, past WAL_RESTART_BYTES:
        passive rounds until few frames are left, then a RESTART (or a TRUNCATE, past
        WAL_TRIM_BYTES) while this process's hot writes wait at `_restart_gate`.
        Returns the WAL's frames and how many of them are in the database file."""
        conn = self._checkpointer
        if conn is None:
            raise StoreError("the store is not open")
        wal, frame_bytes = self._wal, self._wal_frame_bytes

        def due(frames: int) -> bool:
            return restart and frames * frame_bytes > WAL_RESTART_BYTES

        def passive() -> tuple[int, int]:
            _busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if not due(frames):
                return int(frames), int(copied)
            for _ in range(PASSIVE_ROUNDS):
                if frames - copied <= WAL_RESTART_LEFT:
                    break
                _busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            return int(frames), int(copied)

        def restart_wal(frames: int) -> tuple[int, int]:
            if frames * frame_bytes > 4 * WAL_RESTART_BYTES:  # far behind: wait for readers (briefly) this time
                conn.execute(f"PRAGMA busy_timeout = {RESTART_WAIT_MS}")
            mode = "TRUNCATE" if wal.stat().st_size > WAL_TRIM_BYTES else "RESTART"
            try:
                _busy, frames, copied = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
            finally:
                conn.execute("PRAGMA busy_timeout = 0")
            return int(frames), int(copied)

        async with self._checkpoint_lock:
            gate = None
            try:
                frames, copied = await anyio.to_thread.run_sync(passive)
                if not due(frames):
                    return frames, copied
                gate = self._restart_gate = asyncio.Event()
                await self.db.execute("SELECT 1")  # the connection's thread has run every hot write sent to it
                return await anyio.to_thread.run_sync(restart_wal, frames)
            finally:
                if gate is not None:
                    self._restart_gate = None
                    gate.set()

    async def __aenter__(self) -> SqliteStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreError("the store is not open")
        return self._db

    @asynccontextmanager
    async def _durable_tx(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction that is on disk when it commits (`synchronous = FULL`).

        For every write a power cut must not undo once the caller has been answered: money
        that came in (credits, purchases, grants, redemptions), accounts, keys, and the
        settings that decide who pays. Runs under a lock on its own connection, so nothing
        else slips into it; charges and holds stay on the cheap NORMAL connection.
        """
        tx = self._tx
        if tx is None:
            raise StoreError("the store is not open")
        async with self._tx_lock:
            try:
                await tx.execute("BEGIN IMMEDIATE")
                yield tx
            except BaseException:
                # Shielded, and queued behind whatever the connection's thread still runs
                # (a cancelled BEGIN may yet execute), so no transaction outlives the lock.
                with anyio.CancelScope(shield=True), contextlib.suppress(sqlite3.OperationalError):
                    await tx.execute("ROLLBACK")
                raise
            with anyio.CancelScope(shield=True):
                await tx.execute("COMMIT")

    async def _hot_write(self, sql: str, params: Sequence[Any]) -> list[Any]:
        """A write on the request path: run on the event loop's own thread when the file's
        write lock is free (one statement of tens of microseconds, against ~50 us of CPU
        for the hand-off to the connection's thread and back), else through that thread,
        which waits for the lock. Nothing of a statement refused as busy was applied."""
        # Inline while a passive checkpoint runs too: through the thread, a write waited for
        # the whole checkpoint (10-25 ms, every second); on the loop one in ~10 s waited.
        while self._restart_gate is not None:
            await self._restart_gate.wait()
        inline = self._inline
        self._wal_written.set()
        pause = HOT_RETRY_FIRST_S
        while inline is not None and pause <= HOT_RETRY_LAST_S:
            try:
                return inline.execute(sql, params).fetchall()
            except sqlite3.OperationalError as exc:
                if getattr(exc, "sqlite_errorcode", 0) & 0xFF not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                    raise
            # Busy (a checkpoint's restart, another process's write): try again shortly, in
            # steps finer than SQLite's own busy handler (1, 2, 5, 10 ms: 18 ms for a 3 ms lock).
            await asyncio.sleep(pause)
            pause *= 2
        return list(await self.db.execute_fetchall(sql, params))

    async def _one(self, sql: str, params: Iterable[Any] = (), *, settled: bool = True) -> Any:
        """The first row; with `settled`, after this process's pending settlements commit
        (the hot path's own statements pass False: they need not wait for the charges)."""
        if settled and self.settlements.pending:
            await self.settlements.drain()
        rows = await self.db.execute_fetchall(sql, tuple(params))
        return next(iter(rows), None)

    async def _all(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        if self.settlements.pending:
            await self.settlements.drain()
        return list(await self.db.execute_fetchall(sql, tuple(params)))

    async def ping(self) -> None:
        await self._one("SELECT 1 FROM accounts LIMIT 1", settled=False)

    async def backup(self, target: Path) -> int:
        """A consistent copy of the live store through SQLite's online backup API; returns its size."""
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            raise StoreError(f"{target} exists; choose a new file")
        dest = await aiosqlite.connect(target)
        try:
            await self.db.backup(dest)
        finally:
            await dest.close()
        return target.stat().st_size

    async def dump(self, table: str) -> list[dict[str, Any]]:
        """Every row of one of the copied tables, oldest first (store copy)."""
        if table not in COPY_TABLES:
            raise ValueError(f"not a copied table: {table}")
        cursor = await self.db.execute(f"SELECT * FROM {table} ORDER BY rowid")
        columns = [d[0] for d in cursor.description]
        return [dict(zip(columns, row, strict=True)) for row in await cursor.fetchall()]

    async def load(self, steps: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Insert rows in this order, in one transaction, through the schema's triggers."""
        async with self._durable_tx() as tx:
            for table, row in steps:
                if table not in COPY_TABLES:
                    raise ValueError(f"not a copied table: {table}")
                columns = ", ".join(row)
                marks = ", ".join("?" for _ in row)
                await tx.execute(f"INSERT INTO {table} ({columns}) VALUES ({marks})", tuple(row.values()))

    async def sync(self) -> tuple[int, int]:
        """Put every commit so far on disk: a passive checkpoint, which fsyncs the WAL first.

        Charges commit with `synchronous = NORMAL`; calling this every few seconds (the hold
        keeper's tick) bounds in time what a power cut can take back. Returns the WAL's
        frames and how many of them the checkpoint copied into the database file.
        """
        return await self._checkpoint()

    async def account_count(self) -> int:
        row = await self._one("SELECT count(*) FROM accounts")
        return int(row[0])

    # -- accounts -----------------------------------------------------------------

    async def create_account(self, name: str) -> Account:
        try:
            async with self._durable_tx() as tx:
                rows = await tx.execute_fetchall(
                    f"INSERT INTO accounts (public_id, kind, name, created_at) "
                    f"VALUES (?, 'developer', ?, ?) RETURNING {ACCOUNT_COLUMNS}",
                    (new_id("acct"), name, now_ms()),
                )
        except sqlite3.IntegrityError:
            raise ValueError(f"an account named {name!r} already exists") from None
        return account_record(next(iter(rows)))

    async def account_by_name(self, name: str) -> Account | None:
        row = await self._one(
            f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE kind = 'developer' AND name = ?",
            (name,),
        )
        return account_record(row) if row else None

    async def account(self, account_id: int) -> Account | None:
        row = await self._one(f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = ?", (account_id,))
        return account_record(row) if row else None

    async def list_accounts(self) -> list[Account]:
        rows = await self._all(
            f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE kind = 'developer' ORDER BY name"
        )
        return [account_record(r) for r in rows]

    async def user(self, developer_id: int, external_user_id: str) -> Account | None:
        row = await self._one(
            f"SELECT {ACCOUNT_COLUMNS} FROM accounts "
            "WHERE kind = 'user' AND parent_id = ? AND name = ?",
            (developer_id, external_user_id),
        )
        return account_record(row) if row else None

    async def list_users(self, developer_id: int) -> list[Account]:
        rows = await self._all(
            f"SELECT {ACCOUNT_COLUMNS} FROM accounts "
            "WHERE kind = 'user' AND parent_id = ? ORDER BY name",
            (developer_id,),
        )
        return [account_record(r) for r in rows]

    async def set_billing_mode(self, user_id: int, mode: str) -> None:
        async with self._durable_tx() as tx:
            await tx.execute(
                "UPDATE accounts SET billing_mode = ? WHERE id = ? AND kind = 'user'", (mode, user_id)
            )

    # -- ledger -------------------------------------------------------------------

    async def credit(
        self, account_id: int, amount: int, kind: str, description: str = ""
    ) -> LedgerEntry:
        """A purchase, credit, refund or adjustment: one ledger row, on disk at return."""
        async with self._durable_tx() as tx:
            rows = await tx.execute_fetchall(
                f"INSERT INTO ledger (public_id, account_id, amount, balance_after, kind, "
                f"description, created_at) SELECT ?, id, ?, balance + ?, ?, ?, ? FROM accounts "
                f"WHERE id = ? RETURNING {LEDGER_COLUMNS}",
                (new_ledger_id(), amount, amount, kind, description, now_ms(), account_id),
            )
            row = next(iter(rows), None)
            if row is None:
                raise ValueError("no such account")
        return ledger_record(row)

    async def ledger(self, account_id: int, limit: int = 100) -> list[LedgerEntry]:
        """The newest entries, each with its request's details (see ledger_page)."""
        return list((await self.ledger_page(account_id, limit)).entries)

    async def ledger_page(
        self, account_id: int, limit: int | None = 50, before: int | None = None
    ) -> LedgerPage:
        """Entries older than `before` (a ledger id), newest first, at most `limit` (None:
        all), with the count of older entries left out and the cursor to page on.

        Two statements without a transaction is still exact: the ledger only grows by
        appending newer ids, so the count of ids below this page cannot change.
        """
        if limit is not None and limit < 1:
            raise ValueError("limit must be at least 1")
        before_id = before if before is not None else 2**63 - 1
        rows = await self._all(
            f"{LEDGER_SELECT} WHERE l.account_id = ? AND l.id < ? ORDER BY l.id DESC LIMIT ?",
            (account_id, before_id, _NO_LIMIT if limit is None else limit),
        )
        entries = tuple(ledger_record(r) for r in rows)
        more = 0
        if entries and limit is not None and len(entries) == limit:
            row = await self._one(
                "SELECT count(*) FROM ledger WHERE account_id = ? AND id < ?",
                (account_id, entries[-1].id),
            )
            more = int(row[0])
        return LedgerPage(entries, more, entries[-1].id if more else None)

    async def ledger_entry(self, public_id: str) -> LedgerEntry | None:
        """One entry by its ledg_ id, with its request's details."""
        row = await self._one(f"{LEDGER_SELECT} WHERE l.public_id = ?", (public_id,))
        return ledger_record(row) if row else None

    async def verify_ledger(self) -> list[dict[str, Any]]:
        """Accounts whose balance differs from the sum of their ledger, whose held amount
        differs from their open holds, or with charge entries that do not match their
        request (missing, another amount, another payer). Empty means the books reconcile."""
        rows = await self._all(
            """
            SELECT a.id, a.kind, a.name, a.balance, a.held,
                   coalesce((SELECT sum(amount) FROM ledger WHERE account_id = a.id), 0),
                   coalesce((SELECT sum(amount) FROM holds WHERE account_id = a.id), 0),
                   (SELECT count(*) FROM ledger l LEFT JOIN requests r ON r.request_id = l.request_id
                    WHERE l.account_id = a.id AND l.kind = 'charge'
                      AND (r.id IS NULL OR r.charged != -l.amount OR r.charged_account_id != a.id))
            FROM accounts a
            """
        )
        problems = []
        for acc_id, kind, name, balance, held, ledger_sum, holds_sum, unmatched in rows:
            if balance != ledger_sum or held != holds_sum or unmatched:
                problems.append(
                    {
                        "account_id": acc_id,
                        "kind": kind,
                        "name": name,
                        "balance": balance,
                        "ledger_sum": ledger_sum,
                        "held": held,
                        "open_holds": holds_sum,
                        "unmatched_charges": unmatched,
                    }
                )
        return problems

    # -- keys ---------------------------------------------------------------------

    async def create_key(
        self,
        account_id: int,
        kind: str,
        digest: str,
        prefix: str,
        name: str = "",
        routes: tuple[str, ...] | None = None,
        allow_community: bool = True,
        expires_at: int | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
        max_concurrent: int | None = None,
    ) -> KeyRecord:
        async with self._durable_tx() as tx:
            inserted = await tx.execute_fetchall(
                "INSERT INTO api_keys (public_id, account_id, kind, name, digest, prefix, routes, "
                "allow_community, expires_at, created_at, rpm, tpm, max_concurrent) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (
                new_id("key"),
                account_id,
                kind,
                name,
                digest,
                prefix,
                orjson.dumps(list(routes)).decode() if routes is not None else None,
                int(allow_community),
                expires_at,
                now_ms(),
                rpm,
                tpm,
                max_concurrent,
                ),
            )
            rows = await tx.execute_fetchall(
                f"SELECT {KEY_COLUMNS} FROM api_keys k JOIN accounts a ON a.id = k.account_id "
                "WHERE k.id = ?",
                (next(iter(inserted))[0],),
            )
        return key_record(next(iter(rows)))

    async def key_by_digest(self, digest: str) -> KeyRecord | None:
        row = await self._one(
            f"SELECT {KEY_COLUMNS} FROM api_keys k JOIN accounts a ON a.id = k.account_id "
            "WHERE k.digest = ?",
            (digest,),
            settled=False,
        )
        return key_record(row) if row else None

    async def list_keys(self, account_id: int | None = None) -> list[KeyRecord]:
        where, params = ("WHERE k.account_id = ?", (account_id,)) if account_id else ("", ())
        rows = await self._all(
            f"SELECT {KEY_COLUMNS} FROM api_keys k JOIN accounts a ON a.id = k.account_id "
            f"{where} ORDER BY k.id",
            params,
        )
        return [key_record(r) for r in rows]

    async def revoke_key(self, id_or_prefix: str) -> list[KeyRecord]:
        """Revoke by public id or display prefix; refuses an ambiguous prefix."""
        async with self._durable_tx() as tx:
            rows = await tx.execute_fetchall(
                f"SELECT {KEY_COLUMNS} FROM api_keys k JOIN accounts a ON a.id = k.account_id "
                "WHERE k.public_id = ? OR k.prefix = ?",
                (id_or_prefix, id_or_prefix),
            )
            keys = [key_record(r) for r in rows]
            if len(keys) > 1:
                raise ValueError(
                    f"{id_or_prefix!r} matches {len(keys)} keys; revoke by id: "
                    + ", ".join(k.public_id for k in keys)
                )
            if keys:
                await tx.execute(
                    "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                    (now_ms(), keys[0].id),
                )
        return keys

    # -- holds and settlement -----------------------------------------------------

    async def take_hold(
        self,
        account_id: int,
        amount: int,
        request_id: str,
        owner: str,
        ttl_ms: int,
        key_id: int | None = None,
        max_concurrent: int | None = None,
    ) -> int:
        """Reserve amount against the available balance, atomically.

        InsufficientFunds if it does not fit; TooManyInFlight if the key already has
        max_concurrent holds open.
        """
        now = now_ms()
        try:
            (row,) = await self._hot_write(
                "INSERT INTO holds (account_id, amount, request_id, owner, expires_at, created_at, "
                "key_id, max_concurrent) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (account_id, amount, request_id, owner, now + ttl_ms, now, key_id, max_concurrent),
            )
        except sqlite3.IntegrityError as exc:
            if "rate_limited" in str(exc):
                raise TooManyInFlight() from None
            if "insufficient_balance" not in str(exc):
                raise
            # What the refusal saw, pending settlements' holds included (as on PostgreSQL):
            # the meter commits those and asks again itself.
            row = await self._one("SELECT balance - held FROM accounts WHERE id = ?", (account_id,), settled=False)
            raise InsufficientFunds(int(row[0]) if row else 0) from None
        return int(row[0])

    async def count_request(self, key_id: int, rpm: int | None, tpm: int | None) -> bool:
        """Count one request in the key's current minute if it is under both limits."""
        minute = now_ms() // 60000
        rows = await self._hot_write(
            "INSERT INTO rate_windows (key_id, minute, requests) VALUES (?, ?, 1) "
            "ON CONFLICT (key_id, minute) DO UPDATE SET requests = requests + 1 "
            "WHERE requests < ? AND tokens < ? RETURNING requests",
            (key_id, minute, rpm or 2**62, tpm or 2**62),
        )
        return bool(rows)

    async def purge_rate_windows(self) -> None:
        await self.db.execute("DELETE FROM rate_windows WHERE minute < ?", (now_ms() // 60000 - 2,))

    async def available(self, account_id: int) -> int:
        row = await self._one("SELECT balance - held FROM accounts WHERE id = ?", (account_id,))
        return int(row[0]) if row else 0

    async def settle(self, s: Settlement) -> str | None:
        """Charge, release the hold, record usage: one statement, committed when this
        returns. Returns the ledger id (the earlier one if the request was settled before).

        On the NORMAL connection: a power cut may lose the last few settlements (the
        charge is then not taken, the hold is gone with it); docs/reliability.md.
        """
        ledger_id = new_ledger_id() if s.charged > 0 else None
        cursor = await self.db.execute(
            f"INSERT INTO requests ({REQUEST_COLUMNS}) VALUES {_marks(1)} ON CONFLICT (request_id) DO NOTHING",
            request_row(s, ledger_id, s.created_at or now_ms()),
        )
        if cursor.rowcount == 0:
            # Settled before: the key is the request id, so nothing is charged twice.
            row = await self._one("SELECT ledger_id FROM requests WHERE request_id = ?", (s.request_id,))
            return str(row[0]) if row and row[0] is not None else None
        return ledger_id

    def settle_later(self, s: Settlement) -> None:
        """Journal the settlement now and commit it with the next group (store/group_commit.py)."""
        self.settlements.submit(s)

    async def commit_pending(self) -> bool:
        return await self.settlements.drain()

    def quiet(self) -> None:
        self.settlements.quiet()

    def observe_settlement_groups(self, observe: GroupObserver) -> None:
        self.settlements.observe = observe

    async def _settle_group(self, batch: Sequence[Settlement]) -> None:
        """One multi-row INSERT per 500 settlements: one statement, so one transaction and
        one WAL commit, run whole on the connection's thread (nothing interleaves)."""
        now = now_ms()
        for start in range(0, len(batch), SETTLE_ROWS_PER_STATEMENT):
            rows = batch[start : start + SETTLE_ROWS_PER_STATEMENT]
            values: list[Any] = []
            for s in rows:
                values.extend(request_row(s, new_ledger_id() if s.charged > 0 else None, s.created_at or now))
            await self._hot_write(
                f"INSERT INTO requests ({REQUEST_COLUMNS}) VALUES {_marks(len(rows))} "
                "ON CONFLICT (request_id) DO NOTHING",
                values,
            )

    async def release_hold(self, hold_id: int) -> None:
        await self.db.execute("DELETE FROM holds WHERE id = ?", (hold_id,))

    async def refresh_holds(self, owner: str, ttl_ms: int) -> None:
        """Keep this process's in-flight holds alive; a crashed process stops doing this."""
        await self.db.execute(
            "UPDATE holds SET expires_at = ? WHERE owner = ?", (now_ms() + ttl_ms, owner)
        )

    async def release_expired_holds(self) -> int:
        """Release the holds nobody refreshed, after committing what their dead owners had
        journaled (so their charges are not released with them)."""
        await self.settlements.recover()
        cursor = await self.db.execute("DELETE FROM holds WHERE expires_at < ?", (now_ms(),))
        return cursor.rowcount

    async def open_holds(self) -> int:
        row = await self._one("SELECT count(*) FROM holds")
        return int(row[0])

    # -- usage --------------------------------------------------------------------

    async def usage(self, account_id: int, days: int = 30, user_id: int | None = None) -> list[UsageRow]:
        since = time.strftime("%Y-%m-%d", time.gmtime(time.time() - (days - 1) * 86400))
        user_filter = "AND u.user_id = ?" if user_id is not None else ""
        params: tuple[Any, ...] = (account_id, since) + ((user_id,) if user_id is not None else ())
        rows = await self._all(
            f"""
            SELECT u.day, u.route, usr.name, u.requests, u.input_tokens, u.output_tokens, u.charged,
                   u.cache_read_tokens, u.cache_write_tokens, u.cache_write_1h_tokens,
                   u.reasoning_tokens
            FROM usage_daily u LEFT JOIN accounts usr ON usr.id = u.user_id AND u.user_id != 0
            WHERE u.account_id = ? AND u.day >= ? {user_filter}
            ORDER BY u.day, u.route, usr.name
            """,
            params,
        )
        return [UsageRow(*r) for r in rows]

    async def usage_by_session(self, account_id: int, days: int = 30, limit: int = 100) -> list[UsageTotal]:
        """Usage per agent session (the X-Claude-Code-Session-Id / session_id header a
        request carried), most recently active first; requests without one are left out."""
        since = now_ms() - days * 86_400_000
        rows = await self._all(
            """
            SELECT session_id, count(*), sum(input_tokens), sum(output_tokens), sum(charged),
                   sum(cache_read_tokens), sum(cache_write_tokens), sum(cache_write_1h_tokens),
                   sum(reasoning_tokens)
            FROM requests INDEXED BY requests_session
            WHERE account_id = ? AND session_id IS NOT NULL AND created_at >= ?
            GROUP BY session_id ORDER BY max(created_at) DESC LIMIT ?
            """,
            (account_id, since, limit),
        )
        return [UsageTotal(*row) for row in rows]

    async def usage_summary(
        self, account_id: int, days: int = 30, top_users: int = 100
    ) -> UsageSummary:
        """Usage summed in SQL by route, by day, and for the top users by charge.

        Aggregation stays in SQLite so an account with many app users costs one index range
        scan (usage_daily_by_user is covering), not a row each.
        """
        since = time.strftime("%Y-%m-%d", time.gmtime(time.time() - (days - 1) * 86400))
        where = "account_id = ? AND day >= ?"
        by_route = await self._all(
            f"SELECT route, {_BUCKET_SUMS} FROM usage_totals WHERE {where} "
            "GROUP BY route ORDER BY route",
            (account_id, since),
        )
        by_day = await self._all(
            f"SELECT day, {_BUCKET_SUMS} FROM usage_totals WHERE {where} GROUP BY day ORDER BY day",
            (account_id, since),
        )
        by_user = await self._all(
            f"""
            SELECT usr.name, t.* FROM (
                SELECT user_id, {_BUCKET_SUMS} FROM usage_daily INDEXED BY usage_daily_by_user
                WHERE {where} AND user_id != 0 GROUP BY user_id
                ORDER BY sum(charged) DESC, user_id LIMIT ?
            ) t JOIN accounts usr ON usr.id = t.user_id
            """,
            (account_id, since, top_users),
        )
        return UsageSummary(
            by_route=tuple(UsageTotal(*row) for row in by_route),
            by_day=tuple(UsageTotal(*row) for row in by_day),
            by_user=tuple(UsageTotal(row[0], *row[2:]) for row in by_user),
        )

    # -- funding ------------------------------------------------------------------

    async def grant(
        self,
        developer_id: int,
        external_user_id: str,
        amount: int,
        description: str,
        idempotency_key: str | None,
        request_hash: str,
    ) -> tuple[dict[str, Any], bool]:
        """Move amount from the developer's pool to the user, in one transaction.

        Returns the grant's facts and whether they are a replay of an earlier grant
        with the same idempotency key. Raises IdempotencyMismatch or InsufficientFunds.
        """
        async with self._durable_tx() as tx:
            return await self._grant_in_tx(
                tx, developer_id, external_user_id, amount, description,
                idempotency_key, request_hash,
            )

    async def _grant_in_tx(
        self,
        tx: aiosqlite.Connection,
        developer_id: int,
        external_user_id: str,
        amount: int,
        description: str,
        idempotency_key: str | None,
        request_hash: str,
    ) -> tuple[dict[str, Any], bool]:
        now = now_ms()
        if idempotency_key is not None:
            rows = list(
                await tx.execute_fetchall(
                    "SELECT request_hash, response FROM idempotency WHERE account_id = ? AND key = ?",
                    (developer_id, idempotency_key),
                )
            )
            if rows:
                if rows[0][0] != request_hash:
                    raise IdempotencyMismatch()
                return orjson.loads(rows[0][1]), True
        dev = list(
            await tx.execute_fetchall(
                "SELECT balance - held FROM accounts WHERE id = ?", (developer_id,)
            )
        )
        available = int(dev[0][0])
        if available < amount:
            raise InsufficientFunds(available)
        await tx.execute(
            "INSERT INTO accounts (public_id, kind, name, parent_id, created_at) "
            "VALUES (?, 'user', ?, ?, ?) ON CONFLICT DO NOTHING",
            (new_id("user"), external_user_id, developer_id, now),
        )
        user = list(
            await tx.execute_fetchall(
                "SELECT id, balance, billing_mode FROM accounts "
                "WHERE kind = 'user' AND parent_id = ? AND name = ?",
                (developer_id, external_user_id),
            )
        )[0]
        user_id, balance_before, billing_mode = user
        dev_ledger, user_ledger = new_ledger_id(), new_ledger_id()
        insert = (
            "INSERT INTO ledger (public_id, account_id, amount, balance_after, kind, "
            "idempotency_key, related_id, description, created_at) "
            "SELECT ?, id, ?, balance + ?, 'grant', ?, ?, ?, ? FROM accounts WHERE id = ? "
            "RETURNING balance_after"
        )
        dev_after = list(
            await tx.execute_fetchall(
                insert,
                (dev_ledger, -amount, -amount, idempotency_key, user_ledger, description, now,
                 developer_id),
            )
        )[0][0]
        user_after = list(
            await tx.execute_fetchall(
                insert,
                (user_ledger, amount, amount, idempotency_key, dev_ledger, description, now,
                 user_id),
            )
        )[0][0]
        facts = {
            "external_user_id": external_user_id,
            "amount": amount,
            "balance_before": balance_before,
            "balance_after": user_after,
            "ledger_id": user_ledger,
            "developer_ledger_id": dev_ledger,
            "developer_balance_after": dev_after,
            "billing_mode": billing_mode,
            "description": description,
            "created_at": now,
        }
        if idempotency_key is not None:
            await tx.execute(
                "INSERT INTO idempotency (account_id, key, request_hash, response, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (developer_id, idempotency_key, request_hash, orjson.dumps(facts), now),
            )
        return facts, False

    async def purge_idempotency(self, older_than_ms: int) -> int:
        cursor = await self.db.execute(
            "DELETE FROM idempotency WHERE created_at < ?", (now_ms() - older_than_ms,)
        )
        return cursor.rowcount


def _marks(rows: int) -> str:
    """Placeholders for `rows` settlements: "(?, …)" once, or "(?, …), (?, …)" for a group."""
    one = "(" + ", ".join("?" * REQUEST_COLUMN_COUNT) + ")"
    return one if rows == 1 else ", ".join([one] * rows)


def _connect_hot(path: Path) -> sqlite3.Connection:
    """A plain connection for the event loop's writes or the checkpointer's thread."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    for pragma in ("busy_timeout = 0", "synchronous = NORMAL", "foreign_keys = ON", "wal_autocheckpoint = 0"):
        conn.execute(f"PRAGMA {pragma}")
    return conn
