"""The PostgreSQL store: several gateway machines share one set of balances.

asyncpg, one pool per process. Every hot-path write is one statement and so one round trip
(the hold: an INSERT whose trigger runs the conditional UPDATE; the settlement: an INSERT
keyed by request id whose trigger charges, releases and rolls up). The few multi-statement
writes (grants) run in a transaction and are retried as a whole on deadlock or
serialization failure (SQLSTATE 40P01 / 40001), with a bound. Connection loss and timeouts
become StoreUnavailable, so callers fail closed; the pool reconnects by itself.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import hashlib
import logging
import random
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson

from quota_proxy.keys import new_id, new_ledger_id
from quota_proxy.store.dashboard_models import UsageGroup, UsageLine
from quota_proxy.store.dashboard_postgres import DASHBOARD_METHODS, PostgresDashboardQueries
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
    StoreUnavailable,
    TooManyInFlight,
    UsageRow,
    UsageSummary,
    UsageTotal,
)
from quota_proxy.store.records import (
    ACCOUNT_COLUMNS,
    BUCKET_COLUMNS,
    KEY_COLUMNS,
    KEY_FROM,
    LEDGER_COLUMNS,
    LEDGER_SELECT,
    REQUEST_COLUMN_COUNT,
    REQUEST_COLUMNS,
    REQUEST_USAGE_LINE_SUMS,
    USAGE_LINE_SUMS,
    account_record,
    key_record,
    ledger_record,
    now_ms,
    request_row,
)

logger = logging.getLogger("quota_proxy.store")

MIGRATIONS = ("pg_schema_v1.sql", "pg_schema_v2.sql", "pg_schema_v3.sql", "pg_schema_v4.sql")
COPY_TABLES = ("accounts", "api_keys", "ledger", "requests", "holds", "idempotency")
_BOOLEANS = frozenset({"estimated", "allow_community"})
MIGRATION_LOCK = 1364_0000  # pg_advisory_lock key: one migrator at a time across gateways
TX_ATTEMPTS = 5  # a deadlock or serialization failure is retried this many times, then raised
SETTLE_ATTEMPTS = 4  # a settlement survives this many lost connections before it is queued

_BUCKET_SUMS = ", ".join(f"sum({c})::bigint" for c in BUCKET_COLUMNS)
_RETRY_SQLSTATES = frozenset({"40P01", "40001"})
_UNAVAILABLE = (
    asyncpg.PostgresConnectionError,  # class 08
    asyncpg.exceptions.OperatorInterventionError,  # 57: shutdown, cancel, statement timeout
    asyncpg.exceptions.InsufficientResourcesError,  # 53: too many connections, disk full
    asyncpg.InterfaceError,  # the connection closed under us
    OSError,  # refused, unreachable
    TimeoutError,
)

T = TypeVar("T")
# A settlement: one INSERT whose triggers charge, release the hold and roll up. created_at
# is the gateway's clock when it settled (a journaled settlement keeps its own time), else
# the database's.
_SETTLE_SQL = (
    f"INSERT INTO requests ({REQUEST_COLUMNS}) VALUES ("
    + ", ".join(
        f"${n}" if n != 17 else "coalesce($17, quota_now_ms())" for n in range(1, REQUEST_COLUMN_COUNT + 1)
    )
    + ") ON CONFLICT (request_id) DO NOTHING"
)


def _default_journal(url: str) -> Path:
    """A journal folder for a store built without one (open_store passes the config's)."""
    return Path(tempfile.gettempdir()) / f"quota-settlements-{hashlib.sha256(url.encode()).hexdigest()[:12]}"



def _lock_order(s: Settlement) -> tuple[int, int, int, str, int, int]:
    """The order a group's settlements take their row locks in (accounts, usage rows, rate
    window, hold), the same in every gateway: two groups then never wait for each other in
    a circle. It is not the order the requests ended in; a group commits whole."""
    return (s.charged_account_id, s.account_id, s.user_id or 0, s.route, s.key_id or 0, s.hold_id or 0)


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def _discard(conn: asyncpg.Connection) -> None:
    """Close a connection that failed (the pool opens a fresh one in its place)."""
    with contextlib.suppress(asyncpg.InterfaceError):  # closed or given back already
        conn.terminate()


async def _reset(conn: asyncpg.Connection) -> None:
    """What a connection needs before the pool hands it out again. asyncpg's default sends
    `RESET ALL; CLOSE ALL; UNLISTEN *; …` on every release: one more round trip per store
    call. This store keeps no session state (SET LOCAL, transaction-scoped advisory locks,
    no cursors or LISTEN), so only an abandoned transaction needs undoing, and that is
    known without asking the server."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


class PostgresStore:
    """The store interface over a PostgreSQL database shared by every gateway."""

    def __init__(
        self,
        url: str,
        *,
        password: str | None = None,
        pool_size: int = 10,
        connect_timeout_s: float = 5.0,
        command_timeout_s: float = 10.0,
        journal: Path | None = None,
        settle_delay_ms: int = 0,
        settle_gather_ms: int = 0,
    ) -> None:
        self.url = url
        self._password = password
        self.pool_size = pool_size
        self.connect_timeout_s = connect_timeout_s
        self.command_timeout_s = command_timeout_s
        self._pool: asyncpg.Pool | None = None
        # The gateway's settlements (and settle()'s, when the database is away): journaled
        # on this machine, committed in groups, keyed by request id so none is written twice.
        self.settlements = SettlementWriter(
            SettlementJournal(journal or _default_journal(url)),
            self._settle_group,
            settle_delay_ms / 1000,
            settle_gather_ms / 1000,
        )
        self._dashboard = PostgresDashboardQueries(self)

    @property
    def description(self) -> str:
        return redact(self.url)

    # -- lifecycle ----------------------------------------------------------------------

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self.url,
                password=self._password,
                min_size=1,
                max_size=self.pool_size,
                timeout=self.connect_timeout_s,
                command_timeout=self.command_timeout_s,
                max_inactive_connection_lifetime=60.0,
                server_settings={"synchronous_commit": "off", "application_name": "quota-proxy"},
                reset=_reset,
            )
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"{self.description}: {type(exc).__name__}: {exc}") from exc
        except asyncpg.PostgresError as exc:
            raise StoreError(f"{self.description}: {exc}") from exc
        try:
            await self._run(self._migrate)
            self.settlements.start()
            await self.settlements.recover()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        await self.settlements.close()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), self.command_timeout_s)
            except (TimeoutError, *_UNAVAILABLE):
                pool.terminate()

    async def __aenter__(self) -> PostgresStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _migrate(self, conn: asyncpg.Connection) -> int:
        """Apply the migrations this database lacks, each in its own transaction, under an
        advisory lock so gateways starting together migrate once."""
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version "
                "(version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            version = await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_version")
            if version > len(MIGRATIONS):
                raise StoreError(
                    f"{self.description}: schema version {version} is newer than this "
                    f"quota-proxy ({len(MIGRATIONS)}); upgrade quota-proxy"
                )
            for number, name in enumerate(MIGRATIONS[version:], start=version + 1):
                script = resources.files("quota_proxy.store").joinpath(name).read_text()
                async with conn.transaction():
                    await conn.execute(script)
                    await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", number)
            return len(MIGRATIONS)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)

    # -- the one boundary where driver errors become store errors ------------------------

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreError("the store is not open")
        return self._pool

    async def _run(
        self,
        work: Callable[[asyncpg.Connection], Awaitable[T]],
        *,
        tx: bool = False,
        again: bool = True,
        durable: bool = False,
    ) -> T:
        """Run work on a pooled connection (in a transaction if tx); retry it whole on
        deadlock or serialization failure, at most TX_ATTEMPTS times; translate errors.

        A connection that failed is closed, so the pool replaces it. If `again` (work that is
        safe to repeat: reads, and writes keyed so a repeat is a no-op), a lost connection
        is retried once on a fresh one: after a database restart every pooled connection is
        dead, and the first request on each should not be the one to pay for it.

        Connections commit with synchronous_commit = off (holds and charges: the WAL writer
        puts them on disk within a fraction of a second, and the hold keeper's sync() every
        tick); `durable` work (money coming in, accounts, keys, grants) commits with it on,
        so it is on disk before the caller hears back. See docs/postgres.md.
        """
        lost_once = False
        for attempt in range(1, TX_ATTEMPTS + 1):
            try:
                conn = await self.pool.acquire(timeout=self.connect_timeout_s)
            except (asyncpg.PostgresError, *_UNAVAILABLE) as exc:
                # No connection at all (refused, timed out, database closed to connections).
                raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc
            try:
                if not (tx or durable):
                    return await work(conn)
                async with conn.transaction():
                    if durable:
                        await conn.execute("SET LOCAL synchronous_commit = on")
                    return await work(conn)
            except asyncpg.PostgresError as exc:
                if exc.sqlstate in _RETRY_SQLSTATES:
                    if attempt == TX_ATTEMPTS:
                        # Bounded: the caller is told (503, retry later), nothing is dropped.
                        raise StoreUnavailable(f"{exc.sqlstate} {TX_ATTEMPTS} times: {exc}") from exc
                    logger.info("store: %s, retrying (attempt %d)", exc.sqlstate, attempt)
                    await asyncio.sleep(random.uniform(0.001, 0.01) * 2**attempt)
                    continue
                if not isinstance(exc, _UNAVAILABLE):
                    raise
                _discard(conn)
                if again and not lost_once:
                    lost_once = True
                    continue
                raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc
            except (*_UNAVAILABLE, asyncpg.exceptions.InternalClientError) as exc:
                _discard(conn)  # the pool replaces it with a fresh connection
                if again and not lost_once:
                    lost_once = True
                    continue
                raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc
            finally:
                with contextlib.suppress(asyncpg.InterfaceError):  # already given back
                    await self.pool.release(conn)
        raise AssertionError("unreachable")

    async def _one(
        self, sql: str, *args: Any, again: bool = True, durable: bool = False, settled: bool = True
    ) -> Any:
        """The first row; with `settled`, after this process's pending settlements commit
        (the hot path's own statements pass False: they need not wait for the charges)."""
        if settled and self.settlements.pending:
            await self.settlements.drain()
        return await self._run(lambda conn: conn.fetchrow(sql, *args), again=again, durable=durable)

    async def _all(self, sql: str, *args: Any) -> list[Any]:
        if self.settlements.pending:
            await self.settlements.drain()
        return await self._run(lambda conn: conn.fetch(sql, *args))

    async def _execute(self, sql: str, *args: Any, durable: bool = False) -> str:
        return await self._run(lambda conn: conn.execute(sql, *args), durable=durable)

    async def ping(self) -> None:
        await self._one("SELECT 1 FROM accounts LIMIT 1", settled=False)

    async def sync(self) -> tuple[int, int]:
        """Put every commit so far on disk: one synchronous commit flushes the WAL up to
        itself, and with it every asynchronous commit (holds, charges) before it. Called by
        the hold keeper every tick, this bounds in time what a database crash can take back."""
        await self._run(lambda conn: conn.fetchval("SELECT txid_current()"), durable=True)
        return 0, 0

    async def backup(self, target: Path) -> int:
        raise StoreError(
            "backup copies a SQLite file; back up PostgreSQL with pg_dump (see docs/postgres.md)"
        )

    async def dump(self, table: str) -> list[dict[str, Any]]:
        """Every row of one of the copied tables, oldest first (store copy)."""
        if table not in COPY_TABLES:
            raise ValueError(f"not a copied table: {table}")
        order = "account_id, key" if table == "idempotency" else "id"
        rows = await self._all(f"SELECT * FROM {table} ORDER BY {order}")
        return [dict(r) for r in rows]

    async def load(self, steps: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Insert rows in this order, in one transaction, through the schema's triggers;
        then move the id sequences past the ids copied in."""

        async def work(conn: asyncpg.Connection) -> None:
            run: list[tuple[Any, ...]] = []
            sql = ""
            for table, row in steps:
                if table not in COPY_TABLES:
                    raise ValueError(f"not a copied table: {table}")
                columns = ", ".join(row)
                marks = ", ".join(f"${i}" for i in range(1, len(row) + 1))
                statement = f"INSERT INTO {table} ({columns}) VALUES ({marks})"
                if statement != sql and run:
                    await conn.executemany(sql, run)
                    run = []
                sql = statement
                run.append(tuple(bool(v) if k in _BOOLEANS and v is not None else v for k, v in row.items()))
            if run:
                await conn.executemany(sql, run)
            for table in ("accounts", "api_keys", "holds", "ledger", "requests"):
                await conn.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                    f"coalesce((SELECT max(id) FROM {table}), 0) + 1, false)"
                )

        await self._run(work, again=False, durable=True)

    async def account_count(self) -> int:
        row = await self._one("SELECT count(*) FROM accounts")
        return int(row[0])

    # -- accounts -----------------------------------------------------------------------

    async def create_account(self, name: str) -> Account:
        try:
            row = await self._one(
                f"INSERT INTO accounts (public_id, kind, name, created_at) "
                f"VALUES ($1, 'developer', $2, $3) RETURNING {ACCOUNT_COLUMNS}",
                new_id("acct"), name, now_ms(), again=False, durable=True,
            )
        except asyncpg.UniqueViolationError:
            raise ValueError(f"an account named {name!r} already exists") from None
        return account_record(row)

    async def account_by_name(self, name: str) -> Account | None:
        row = await self._one(
            f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE kind = 'developer' AND name = $1", name
        )
        return account_record(row) if row else None

    async def account(self, account_id: int) -> Account | None:
        row = await self._one(f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = $1", account_id)
        return account_record(row) if row else None

    async def list_accounts(self) -> list[Account]:
        rows = await self._all(
            f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE kind = 'developer' ORDER BY name"
        )
        return [account_record(r) for r in rows]

    async def user(self, developer_id: int, external_user_id: str) -> Account | None:
        row = await self._one(
            f"SELECT {ACCOUNT_COLUMNS} FROM accounts "
            "WHERE kind = 'user' AND parent_id = $1 AND name = $2",
            developer_id, external_user_id,
        )
        return account_record(row) if row else None

    async def list_users(self, developer_id: int) -> list[Account]:
        rows = await self._all(
            f"SELECT {ACCOUNT_COLUMNS} FROM accounts "
            "WHERE kind = 'user' AND parent_id = $1 ORDER BY name",
            developer_id,
        )
        return [account_record(r) for r in rows]

    async def set_billing_mode(self, user_id: int, mode: str) -> None:
        await self._execute(
            "UPDATE accounts SET billing_mode = $1 WHERE id = $2 AND kind = 'user'", mode, user_id,
            durable=True,
        )

    # -- ledger -------------------------------------------------------------------------

    async def credit(self, account_id: int, amount: int, kind: str, description: str = "") -> LedgerEntry:
        """A purchase, credit, refund or adjustment: one ledger row; its trigger moves the balance."""
        try:
            row = await self._one(
                f"INSERT INTO ledger (public_id, account_id, amount, balance_after, kind, "
                f"description, created_at) VALUES ($1, $2, $3, 0, $4, $5, $6) "
                f"RETURNING {LEDGER_COLUMNS}",
                new_ledger_id(), account_id, amount, kind, description, now_ms(), again=False, durable=True,
            )
        except (asyncpg.ForeignKeyViolationError, asyncpg.RaiseError):
            raise ValueError("no such account") from None
        return ledger_record(row)

    async def ledger(self, account_id: int, limit: int = 100) -> list[LedgerEntry]:
        """The newest entries, each with its request's details (see ledger_page)."""
        return list((await self.ledger_page(account_id, limit)).entries)

    async def ledger_page(
        self, account_id: int, limit: int | None = 50, before: int | None = None
    ) -> LedgerPage:
        """Entries older than `before` (a ledger id), newest first, at most `limit` (None:
        all), with the count of older entries left out and the cursor to page on."""
        if limit is not None and limit < 1:
            raise ValueError("limit must be at least 1")
        before_id = before if before is not None else 2**63 - 1
        rows = await self._all(
            f"{LEDGER_SELECT} WHERE l.account_id = $1 AND l.id < $2 ORDER BY l.id DESC LIMIT $3",
            account_id, before_id, limit,
        )
        entries = tuple(ledger_record(r) for r in rows)
        more = 0
        if entries and limit is not None and len(entries) == limit:
            row = await self._one(
                "SELECT count(*) FROM ledger WHERE account_id = $1 AND id < $2",
                account_id, entries[-1].id,
            )
            more = int(row[0])
        return LedgerPage(entries, more, entries[-1].id if more else None)

    async def ledger_entry(self, public_id: str) -> LedgerEntry | None:
        """One entry by its ledg_ id, with its request's details."""
        row = await self._one(f"{LEDGER_SELECT} WHERE l.public_id = $1", public_id)
        return ledger_record(row) if row else None

    async def verify_ledger(self) -> list[dict[str, Any]]:
        """Accounts whose balance differs from the sum of their ledger, or whose held amount
        differs from their open holds; read in one snapshot. Empty means the books reconcile."""
        rows = await self._all(
            """
            SELECT a.id, a.kind, a.name, a.balance, a.held,
                   coalesce(l.total, 0) AS ledger_sum, coalesce(h.total, 0) AS holds_sum,
                   coalesce(u.unmatched, 0) AS unmatched
            FROM accounts a
            LEFT JOIN (SELECT account_id, sum(amount) AS total FROM ledger GROUP BY account_id) l
                ON l.account_id = a.id
            LEFT JOIN (SELECT account_id, sum(amount) AS total FROM holds GROUP BY account_id) h
                ON h.account_id = a.id
            LEFT JOIN (
                SELECT l.account_id, count(*) AS unmatched
                FROM ledger l LEFT JOIN requests r ON r.request_id = l.request_id
                WHERE l.kind = 'charge'
                  AND (r.id IS NULL OR r.charged <> -l.amount OR r.charged_account_id <> l.account_id)
                GROUP BY l.account_id
            ) u ON u.account_id = a.id
            WHERE a.balance <> coalesce(l.total, 0) OR a.held <> coalesce(h.total, 0)
               OR coalesce(u.unmatched, 0) > 0
            ORDER BY a.id
            """
        )
        return [
            {
                "account_id": r["id"],
                "kind": r["kind"],
                "name": r["name"],
                "balance": r["balance"],
                "ledger_sum": int(r["ledger_sum"]),
                "held": r["held"],
                "open_holds": int(r["holds_sum"]),
                "unmatched_charges": int(r["unmatched"]),
            }
            for r in rows
        ]

    # -- keys ---------------------------------------------------------------------------

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
        row = await self._one(
            f"WITH k AS (INSERT INTO api_keys (public_id, account_id, kind, name, digest, prefix, "
            f"routes, allow_community, expires_at, created_at, rpm, tpm, max_concurrent) "
            f"VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) RETURNING *) "
            f"SELECT {KEY_COLUMNS} FROM k JOIN accounts a ON a.id = k.account_id",
            new_id("key"), account_id, kind, name, digest, prefix,
            orjson.dumps(list(routes)).decode() if routes is not None else None,
            allow_community, expires_at, now_ms(), rpm, tpm, max_concurrent, again=False, durable=True,
        )
        return key_record(row)

    async def key_by_digest(self, digest: str) -> KeyRecord | None:
        row = await self._one(f"SELECT {KEY_COLUMNS} {KEY_FROM} WHERE k.digest = $1", digest, settled=False)
        return key_record(row) if row else None

    async def list_keys(self, account_id: int | None = None) -> list[KeyRecord]:
        if account_id:
            rows = await self._all(
                f"SELECT {KEY_COLUMNS} {KEY_FROM} WHERE k.account_id = $1 ORDER BY k.id", account_id
            )
        else:
            rows = await self._all(f"SELECT {KEY_COLUMNS} {KEY_FROM} ORDER BY k.id")
        return [key_record(r) for r in rows]

    async def revoke_key(self, id_or_prefix: str) -> list[KeyRecord]:
        """Revoke by public id or display prefix; refuses an ambiguous prefix."""
        rows = await self._all(
            f"SELECT {KEY_COLUMNS} {KEY_FROM} WHERE k.public_id = $1 OR k.prefix = $1", id_or_prefix
        )
        keys = [key_record(r) for r in rows]
        if len(keys) > 1:
            raise ValueError(
                f"{id_or_prefix!r} matches {len(keys)} keys; revoke by id: "
                + ", ".join(k.public_id for k in keys)
            )
        if keys:
            await self._execute(
                "UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
                now_ms(), keys[0].id, durable=True,
            )
        return keys

    # -- holds and settlement -------------------------------------------------------------

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
        """Reserve amount against the available balance: one INSERT, whose trigger runs
        `UPDATE accounts SET held = held + amount WHERE id = … AND balance - held >= amount`.

        InsufficientFunds (with the available amount) if it does not fit; TooManyInFlight if
        the key already has max_concurrent holds open on any gateway.
        """
        try:
            row = await self._one(
                "INSERT INTO holds (account_id, amount, request_id, owner, expires_at, created_at, "
                "key_id, max_concurrent) "
                "SELECT $1, $2, $3, $4, now + $5, now, $6, $7 FROM quota_now_ms() AS now "
                "RETURNING id",
                account_id, amount, request_id, owner, ttl_ms, key_id, max_concurrent,
                settled=False,
            )
        except asyncpg.PostgresError as exc:
            if exc.sqlstate == "QP001":
                raise InsufficientFunds(int(getattr(exc, "detail", None) or 0)) from None
            if exc.sqlstate == "QP002":
                raise TooManyInFlight() from None
            if exc.sqlstate == "23505":  # taken by an attempt whose reply was lost
                earlier = await self._one("SELECT id FROM holds WHERE request_id = $1", request_id)
                if earlier is not None:
                    return int(earlier[0])
            raise
        return int(row[0])

    async def count_request(self, key_id: int, rpm: int | None, tpm: int | None) -> bool:
        """Count one request in the key's current minute if it is under both limits; the
        upsert runs under the window row's lock, so all gateways share one count."""
        row = await self._one(
            "INSERT INTO rate_windows AS w (key_id, minute, requests) "
            "VALUES ($1, quota_now_ms() / 60000, 1) "
            "ON CONFLICT (key_id, minute) DO UPDATE SET requests = w.requests + 1 "
            "WHERE w.requests < $2 AND w.tokens < $3 RETURNING requests",
            key_id, rpm or 2**62, tpm or 2**62,
            settled=False,
        )
        return row is not None

    async def purge_rate_windows(self) -> None:
        await self._execute("DELETE FROM rate_windows WHERE minute < quota_now_ms() / 60000 - 2")

    async def available(self, account_id: int) -> int:
        row = await self._one("SELECT balance - held FROM accounts WHERE id = $1", account_id)
        return int(row[0]) if row else 0

    async def settle(self, s: Settlement) -> str | None:
        """Charge, release the hold, record usage: one statement, keyed by request id.

        A lost connection is retried (the key makes a retry safe: a settlement that did
        commit is not written again); if the database stays away, the settlement goes to
        the journal and the settlement writer, which commits it once the database is back
        (None is returned then), and its hold (kept alive by this process) waits with it.
        """
        ledger_id = new_ledger_id() if s.charged > 0 else None
        delay = 0.05
        for attempt in range(1, SETTLE_ATTEMPTS + 1):
            try:
                return await self._settle(s, ledger_id)
            except StoreUnavailable as exc:
                if attempt == SETTLE_ATTEMPTS:
                    logger.warning("store: settlement of %s journaled for the writer: %s", s.request_id, exc)
                    self.settlements.submit(s)
                    return None
                await asyncio.sleep(delay)
                delay *= 4
        return None

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
        """The group in one transaction (executemany: pipelined, about one round trip), its
        rows in lock order (_lock_order), so two gateways' groups never deadlock."""
        rows = [
            request_row(s, new_ledger_id() if s.charged > 0 else None, s.created_at)
            for s in sorted(batch, key=_lock_order)
        ]

        async def insert(conn: asyncpg.Connection) -> None:
            await conn.executemany(_SETTLE_SQL, rows)

        await self._run(insert, tx=True)

    async def _settle(self, s: Settlement, ledger_id: str | None) -> str | None:
        row = await self._one(
            _SETTLE_SQL + " RETURNING ledger_id", *request_row(s, ledger_id, s.created_at), settled=False
        )
        if row is not None:
            return str(row[0]) if row[0] is not None else None
        # Settled before (the reply to an earlier attempt was lost): report that ledger id.
        earlier = await self._one("SELECT ledger_id FROM requests WHERE request_id = $1", s.request_id)
        return str(earlier[0]) if earlier and earlier[0] is not None else None

    async def release_hold(self, hold_id: int) -> None:
        await self._execute("DELETE FROM holds WHERE id = $1", hold_id)

    async def refresh_holds(self, owner: str, ttl_ms: int) -> None:
        """Keep this process's in-flight holds alive (a dead gateway stops doing this).

        A hold whose row is locked is being settled (deleted) by a group in flight: it is
        skipped, not waited for. Waiting deadlocked (seen in bench/pg.py: the group locks the
        holds in its own order, this UPDATE in the table's, and deadlock_timeout stalled
        every request of the account for a second); if that group rolls back, the next
        tick refreshes the hold, long before its TTL runs out.
        """
        await self._execute(
            "UPDATE holds SET expires_at = quota_now_ms() + $1 WHERE id IN "
            "(SELECT id FROM holds WHERE owner = $2 FOR UPDATE SKIP LOCKED)",
            ttl_ms, owner,
        )

    async def release_expired_holds(self) -> int:
        """Release the holds nobody refreshed, after committing what dead gateways on this
        machine had journaled (a dead machine's journal waits for its restart)."""
        await self.settlements.recover()
        status = await self._execute("DELETE FROM holds WHERE expires_at < quota_now_ms()")
        return int(status.split()[-1])

    async def open_holds(self) -> int:
        row = await self._one("SELECT count(*) FROM holds")
        return int(row[0])

    # -- usage --------------------------------------------------------------------------

    async def usage(self, account_id: int, days: int = 30, user_id: int | None = None) -> list[UsageRow]:
        since = _since(days)
        user_filter = "AND u.user_id = $3" if user_id is not None else ""
        args: tuple[Any, ...] = (account_id, since) + ((user_id,) if user_id is not None else ())
        rows = await self._all(
            f"""
            SELECT u.day, u.route, usr.name, u.requests, u.input_tokens, u.output_tokens, u.charged,
                   u.cache_read_tokens, u.cache_write_tokens, u.cache_write_1h_tokens,
                   u.reasoning_tokens
            FROM usage_daily u LEFT JOIN accounts usr ON usr.id = u.user_id AND u.user_id <> 0
            WHERE u.account_id = $1 AND u.day >= $2 {user_filter}
            ORDER BY u.day, u.route, usr.name
            """,
            *args,
        )
        return [UsageRow(*r) for r in rows]

    async def usage_by_session(self, account_id: int, days: int = 30, limit: int = 100) -> list[UsageTotal]:
        """Usage per agent session, most recently active first; requests without one left out."""
        rows = await self._all(
            """
            SELECT session_id, count(*), sum(input_tokens)::bigint, sum(output_tokens)::bigint,
                   sum(charged)::bigint, sum(cache_read_tokens)::bigint, sum(cache_write_tokens)::bigint,
                   sum(cache_write_1h_tokens)::bigint, sum(reasoning_tokens)::bigint
            FROM requests
            WHERE account_id = $1 AND session_id IS NOT NULL AND created_at >= $2
            GROUP BY session_id ORDER BY max(created_at) DESC LIMIT $3
            """,
            account_id, now_ms() - days * 86_400_000, limit,
        )
        return [UsageTotal(*row) for row in rows]

    async def usage_summary(
        self, account_id: int, days: int = 30, top_users: int = 100
    ) -> UsageSummary:
        """Usage summed in SQL by route, by day, and for the top users by charge (an
        index-only scan of usage_daily_by_user)."""
        since = _since(days)
        where = "account_id = $1 AND day >= $2"

        async def work(conn: asyncpg.Connection) -> UsageSummary:
            by_route = await conn.fetch(
                f"SELECT route, {_BUCKET_SUMS} FROM usage_totals WHERE {where} "
                "GROUP BY route ORDER BY route",
                account_id, since,
            )
            by_day = await conn.fetch(
                f"SELECT day, {_BUCKET_SUMS} FROM usage_totals WHERE {where} GROUP BY day ORDER BY day",
                account_id, since,
            )
            by_user = await conn.fetch(
                f"""
                SELECT usr.name, t.* FROM (
                    SELECT user_id, {_BUCKET_SUMS} FROM usage_daily
                    WHERE {where} AND user_id <> 0 GROUP BY user_id
                    ORDER BY sum(charged) DESC, user_id LIMIT $3
                ) t JOIN accounts usr ON usr.id = t.user_id
                ORDER BY 6 DESC, 2
                """,
                account_id, since, top_users,
            )
            return UsageSummary(
                by_route=tuple(UsageTotal(*row) for row in by_route),
                by_day=tuple(UsageTotal(*row) for row in by_day),
                by_user=tuple(UsageTotal(row[0], *tuple(row)[2:]) for row in by_user),
            )

        return await self._run(work)

    async def usage_by(self, account_id: int, group: UsageGroup, days: int) -> list[UsageLine]:
        """Usage of the last `days` days (UTC, today included) summed by one dimension (GET
        /v1/usage): day and route from the per-account roll-up, user from the per-user one,
        key and agent session from the request rows of the period."""
        since = _since(days)
        sums, request_sums = USAGE_LINE_SUMS, REQUEST_USAGE_LINE_SUMS
        start_ms = calendar.timegm(time.strptime(since, "%Y-%m-%d")) * 1000
        if group is UsageGroup.DAY or group is UsageGroup.ROUTE:
            column = group.value
            rows = await self._all(
                f"SELECT {column}, {sums} FROM usage_totals WHERE account_id = $1 AND day >= $2 "
                f"GROUP BY {column} ORDER BY {column}",
                account_id, since,
            )
        elif group is UsageGroup.USER:
            rows = await self._all(
                f"SELECT coalesce(usr.name, ''), {sums} FROM usage_daily u "
                "LEFT JOIN accounts usr ON usr.id = u.user_id AND u.user_id <> 0 "
                "WHERE u.account_id = $1 AND u.day >= $2 GROUP BY u.user_id, usr.name ORDER BY 1",
                account_id, since,
            )
        elif group is UsageGroup.KEY:
            rows = await self._all(
                f"SELECT coalesce(k.prefix || ' ' || k.name, k.prefix, ''), {request_sums} "
                "FROM requests r LEFT JOIN api_keys k ON k.id = r.key_id "
                "WHERE r.account_id = $1 AND r.created_at >= $2 GROUP BY r.key_id, k.prefix, k.name ORDER BY 1",
                account_id, start_ms,
            )
        else:
            rows = await self._all(
                f"SELECT r.session_id, {request_sums} FROM requests r "
                "WHERE r.account_id = $1 AND r.session_id IS NOT NULL AND r.created_at >= $2 "
                "GROUP BY r.session_id ORDER BY min(r.created_at)",
                account_id, start_ms,
            )
        return [UsageLine(str(r[0]).strip(), *(int(v) for v in tuple(r)[1:])) for r in rows]

    # -- funding ------------------------------------------------------------------------

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

        The developer's row is locked first (FOR NO KEY UPDATE: foreign keys that point at
        it still pass, so holds and settlements are not blocked by the lock's kind, only by
        the balance update itself); a concurrent grant with the same idempotency key, on any
        gateway, waits there and then finds this grant's committed answer to replay. Taking
        the row lock after the idempotency insert would deadlock: that insert's foreign key
        takes a KEY SHARE lock on the same row.
        """

        async def work(conn: asyncpg.Connection) -> tuple[dict[str, Any], bool]:
            now = now_ms()
            available = await conn.fetchval(
                "SELECT balance - held FROM accounts WHERE id = $1 FOR NO KEY UPDATE", developer_id
            )
            if idempotency_key is not None:
                claimed = await conn.fetchval(
                    "INSERT INTO idempotency (account_id, key, request_hash, response, created_at) "
                    "VALUES ($1, $2, $3, '', $4) ON CONFLICT DO NOTHING RETURNING 1",
                    developer_id, idempotency_key, request_hash, now,
                )
                if claimed is None:
                    earlier = await conn.fetchrow(
                        "SELECT request_hash, response FROM idempotency WHERE account_id = $1 AND key = $2",
                        developer_id, idempotency_key,
                    )
                    if earlier["request_hash"] != request_hash:
                        raise IdempotencyMismatch()
                    return orjson.loads(earlier["response"]), True
            if available is None or available < amount:
                raise InsufficientFunds(int(available or 0))
            await conn.execute(
                "INSERT INTO accounts (public_id, kind, name, parent_id, created_at) "
                "VALUES ($1, 'user', $2, $3, $4) ON CONFLICT DO NOTHING",
                new_id("user"), external_user_id, developer_id, now,
            )
            user = await conn.fetchrow(
                "SELECT id, balance, billing_mode FROM accounts "
                "WHERE kind = 'user' AND parent_id = $1 AND name = $2 FOR NO KEY UPDATE",
                developer_id, external_user_id,
            )
            dev_ledger, user_ledger = new_ledger_id(), new_ledger_id()
            insert = (
                "INSERT INTO ledger (public_id, account_id, amount, balance_after, kind, "
                "idempotency_key, related_id, description, created_at) "
                "VALUES ($1, $2, $3, 0, 'grant', $4, $5, $6, $7) RETURNING balance_after"
            )
            dev_after = await conn.fetchval(
                insert, dev_ledger, developer_id, -amount, idempotency_key, user_ledger, description, now
            )
            user_after = await conn.fetchval(
                insert, user_ledger, user["id"], amount, idempotency_key, dev_ledger, description, now
            )
            facts = {
                "external_user_id": external_user_id,
                "amount": amount,
                "balance_before": user["balance"],
                "balance_after": user_after,
                "ledger_id": user_ledger,
                "developer_ledger_id": dev_ledger,
                "developer_balance_after": dev_after,
                "billing_mode": user["billing_mode"],
                "description": description,
                "created_at": now,
            }
            if idempotency_key is not None:
                await conn.execute(
                    "UPDATE idempotency SET response = $3 WHERE account_id = $1 AND key = $2",
                    developer_id, idempotency_key, orjson.dumps(facts),
                )
            return facts, False

        return await self._run(work, again=False, durable=True)

    async def purge_idempotency(self, older_than_ms: int) -> int:
        status = await self._execute(
            "DELETE FROM idempotency WHERE created_at < $1", now_ms() - older_than_ms
        )
        return int(status.split()[-1])


def _since(days: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(time.time() - (days - 1) * 86400))


def _delegate(name: str) -> Callable[..., Awaitable[Any]]:
    async def method(self: PostgresStore, *args: Any, **kwargs: Any) -> Any:
        return await getattr(self._dashboard, name)(*args, **kwargs)

    method.__name__ = name
    return method


# The dashboard's sign-in, session and report queries (store/dashboard_postgres.py).
for _name in DASHBOARD_METHODS:
    setattr(PostgresStore, _name, _delegate(_name))
