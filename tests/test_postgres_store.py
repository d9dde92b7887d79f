"""What only the PostgreSQL store has to prove: the hold's condition is checked under the
row lock (a second connection waits, then re-checks), deadlocks are retried and not
dropped, a lost connection becomes StoreUnavailable and heals, and a settlement retried
after a lost connection charges once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import asyncpg
import pytest

from quota_proxy.store import InsufficientFunds, Outcome, Settlement, StoreUnavailable
from quota_proxy.store.postgres import MIGRATIONS, PostgresStore, redact
from tests.conftest import closed_port
from tests.pgserver import allow_connections, create_schema, fresh_database, schema_url

pytestmark = pytest.mark.anyio

TTL_MS = 60_000


@pytest.fixture(scope="module")
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return "asyncio", {"use_uvloop": True}


@pytest.fixture(scope="module")
async def pg_database() -> AsyncIterator[str]:
    async with fresh_database("pgstore") as url:
        yield url


@pytest.fixture
async def url(pg_database: str) -> str:
    url = schema_url(pg_database)
    await create_schema(url)
    return url


@pytest.fixture
async def store(url: str) -> AsyncIterator[PostgresStore]:
    async with PostgresStore(url, pool_size=4, command_timeout_s=5) as opened:
        yield opened


async def funded(store: PostgresStore, amount: int) -> int:
    account = await store.create_account("acme")
    await store.credit(account.id, amount, "credit")
    return account.id


async def test_a_hold_waits_for_the_row_lock_and_rechecks_the_balance(store: PostgresStore, url: str) -> None:
    """Another gateway's uncommitted hold locks the row: this hold waits, then sees the
    committed `held` and no longer fits. A read-then-write would have let both through."""
    account = await funded(store, 1000)
    other = await asyncpg.connect(url)
    try:
        tx = other.transaction()
        await tx.start()
        await other.execute(
            "INSERT INTO holds (account_id, amount, request_id, owner, expires_at, created_at) "
            "VALUES ($1, 600, 'req_other', 'other', quota_now_ms() + 60000, quota_now_ms())",
            account,
        )
        outcome: list[Any] = []

        async def mine() -> None:
            try:
                outcome.append(await store.take_hold(account, 600, "req_mine", "me", TTL_MS))
            except InsufficientFunds as short:
                outcome.append(short)

        async with anyio.create_task_group() as tg:
            tg.start_soon(mine)
            await anyio.sleep(0.5)
            assert outcome == []  # blocked on the row lock, not answered from a stale read
            waiting = await store._one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND datname = current_database()"
            )
            assert waiting[0] == 1
            await tx.commit()
        assert isinstance(outcome[0], InsufficientFunds) and outcome[0].available == 400
    finally:
        await other.close()
    assert await store.verify_ledger() == []


async def test_a_rolled_back_hold_lets_the_waiting_one_through(store: PostgresStore, url: str) -> None:
    account = await funded(store, 1000)
    other = await asyncpg.connect(url)
    try:
        tx = other.transaction()
        await tx.start()
        await other.execute(
            "INSERT INTO holds (account_id, amount, request_id, owner, expires_at, created_at) "
            "VALUES ($1, 600, 'req_other', 'other', quota_now_ms() + 60000, quota_now_ms())",
            account,
        )
        async with anyio.create_task_group() as tg:
            result: list[int] = []

            async def mine() -> None:
                result.append(await store.take_hold(account, 600, "req_mine", "me", TTL_MS))

            tg.start_soon(mine)
            await anyio.sleep(0.3)
            assert result == []
            await tx.rollback()
        assert len(result) == 1
    finally:
        await other.close()
    assert await store.available(account) == 400


async def test_the_hold_is_one_statement_with_the_balance_condition(store: PostgresStore) -> None:
    """The trigger behind the hold's INSERT holds the conditional UPDATE itself."""
    body = await store._one("SELECT prosrc FROM pg_proc WHERE proname = 'holds_reserve'")
    compact = " ".join(body[0].split())
    assert (
        "UPDATE accounts SET held = held + NEW.amount WHERE id = NEW.account_id "
        "AND balance - held >= NEW.amount" in compact
    )


async def test_a_deadlock_is_retried_not_dropped(store: PostgresStore) -> None:
    first = (await store.create_account("one")).id
    second = (await store.create_account("two")).id
    both_locked = anyio.Event()
    locked = 0
    attempts = 0

    def crossing(a: int, b: int) -> Any:
        async def work(conn: asyncpg.Connection) -> int:
            nonlocal locked, attempts
            attempts += 1
            await conn.execute("SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE", a)
            locked += 1
            if locked == 2:
                both_locked.set()
            with anyio.fail_after(10):
                await both_locked.wait()
            await conn.execute("SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE", b)
            return a

        return work

    done: list[int] = []

    async def run(a: int, b: int) -> None:
        done.append(await store._run(crossing(a, b), tx=True))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, first, second)
        tg.start_soon(run, second, first)
    assert sorted(done) == sorted([first, second])
    assert attempts == 3  # the deadlock victim ran once more


async def test_an_unreachable_server_is_store_unavailable() -> None:
    store = PostgresStore(f"postgresql://postgres@127.0.0.1:{closed_port()}/nothing", connect_timeout_s=2)
    with pytest.raises(StoreUnavailable):
        await store.open()


async def test_lost_connections_fail_closed_then_heal(store: PostgresStore, url: str) -> None:
    account = await funded(store, 1000)
    await _kill_connections(url)
    outcomes = []
    for _ in range(6):
        try:
            outcomes.append(await store.available(account))
        except StoreUnavailable:
            outcomes.append("unavailable")
    assert outcomes[-1] == 1000  # the pool reconnected by itself
    assert all(o in (1000, "unavailable") for o in outcomes)


async def test_a_settlement_retried_after_a_lost_connection_charges_once(store: PostgresStore, url: str) -> None:
    account = await funded(store, 1000)
    hold = await store.take_hold(account, 100, "req_1", "me", TTL_MS)
    s = Settlement("req_1", account, account, None, None, hold, "quota/fast", "m", 3, 4, "x1", 7,
                   False, Outcome.OK, 200)
    await _kill_connections(url)
    first = await store.settle(s)  # the dead pooled connection fails; the retry writes it
    assert first is not None
    await _kill_connections(url)
    assert await store.settle(s) == first
    fresh = await store.account(account)
    assert fresh is not None and (fresh.balance, fresh.held) == (993, 0)
    assert [e.kind for e in await store.ledger(account)] == ["charge", "credit"]


async def test_the_schema_has_its_version_and_migrating_twice_is_a_no_op(url: str) -> None:
    async with PostgresStore(url) as a, PostgresStore(url) as b:
        assert await a._one("SELECT max(version) FROM schema_version") == (len(MIGRATIONS),) == (4,)
        assert (await b.account_count()) == 0


def test_urls_are_shown_without_their_password() -> None:
    assert redact("postgresql://quota:s3cret@db:5432/quota") == "postgresql://quota:***@db:5432/quota"
    assert redact("postgresql://quota@db/quota") == "postgresql://quota@db/quota"


async def _kill_connections(url: str) -> None:
    """Terminate every other connection to this database, as a server restart would."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await conn.close()


async def test_a_hold_retried_for_the_same_request_is_the_same_hold(store: PostgresStore) -> None:
    account = await funded(store, 1000)
    first = await store.take_hold(account, 300, "req_1", "me", TTL_MS)
    assert await store.take_hold(account, 300, "req_1", "me", TTL_MS) == first
    assert await store.available(account) == 700
    assert await store.verify_ledger() == []


async def test_a_connection_comes_back_from_the_pool_outside_any_transaction(url: str) -> None:
    async with PostgresStore(url, pool_size=1) as store:

        async def abandon(conn: asyncpg.Connection) -> None:
            await conn.execute("BEGIN")

        await store._run(abandon)
        assert not await store._run(lambda conn: _in_transaction(conn))
        assert await store._run(lambda conn: conn.fetchval("SHOW synchronous_commit")) == "off"


async def _in_transaction(conn: asyncpg.Connection) -> bool:
    return bool(conn.is_in_transaction())


async def test_a_settlement_waits_out_an_outage_and_is_written_once(store: PostgresStore, url: str) -> None:
    """The database goes away between the reply and its settlement: the settlement goes to
    the journal and the settlement writer commits it once the database is back, exactly once."""
    account = await funded(store, 1000)
    hold = await store.take_hold(account, 100, "req_1", "me", TTL_MS)
    s = Settlement("req_1", account, account, None, None, hold, "quota/fast", "m", 3, 4, "x1", 7,
                   False, Outcome.OK, 200)
    database = url.partition("?")[0].rpartition("/")[2]
    await allow_connections(database, False)
    try:
        assert await store.settle(s) is None  # journaled, not raised into the response path
        assert store.settlements.pending
        journaled = b"".join(path.read_bytes() for path in store.settlements.journal.directory.glob("*.settle"))
        assert journaled.count(b"req_1") == 1  # it would survive this process too
        with pytest.raises(StoreUnavailable):
            await store.refresh_holds("me", TTL_MS)
    finally:
        await allow_connections(database, True)
    with anyio.fail_after(15):  # the writer retries with a backoff of at most 2 s
        while store.settlements.pending:
            await anyio.sleep(0.05)
    fresh = await store.account(account)
    assert fresh is not None and (fresh.balance, fresh.held) == (993, 0)
    entries = await store.ledger(account)
    assert [e.kind for e in entries] == ["charge", "credit"]
    assert await store.settle(s) == entries[0].public_id  # settled before: nothing charged again
    assert await store.verify_ledger() == []


async def test_the_keeper_skips_a_hold_a_settlement_has_locked_instead_of_waiting(
    store: PostgresStore, url: str
) -> None:
    """A settlement group locks the holds it deletes in its own order; a refresh that waited
    for them could close a circle (PostgreSQL's deadlock_timeout then stalls the account's
    requests for a second, as bench/pg.py showed). It skips the locked one instead."""
    account = await funded(store, 1000)
    settling = await store.take_hold(account, 100, "req_settling", "me", TTL_MS)
    waiting = await store.take_hold(account, 100, "req_waiting", "me", TTL_MS)
    before = dict(await store._all("SELECT id, expires_at FROM holds"))
    other = await asyncpg.connect(url)
    try:
        tx = other.transaction()
        await tx.start()
        await other.execute("DELETE FROM holds WHERE id = $1", settling)  # a group in flight
        await anyio.sleep(0.01)
        with anyio.fail_after(2):  # it used to wait for the lock until the transaction ended
            await store.refresh_holds("me", TTL_MS)
        after = dict(await store._all("SELECT id, expires_at FROM holds"))
        assert after[waiting] > before[waiting]
        assert after[settling] == before[settling]  # skipped: being settled
        await tx.rollback()
    finally:
        await other.close()
    await store.refresh_holds("me", TTL_MS)  # the next tick refreshes it after all
    assert dict(await store._all("SELECT id, expires_at FROM holds"))[settling] > before[settling]


def test_groups_take_their_row_locks_in_one_order_whatever_order_requests_ended_in() -> None:
    from quota_proxy.store.postgres import _lock_order

    def settled(request_id: str, account: int, hold: int) -> Settlement:
        return Settlement(request_id, account, account, None, 7, hold, "quota/fast", "m", 3, 4, "x1", 7,
                          False, Outcome.OK, 200)

    batch = [settled("req_a", 2, 10), settled("req_b", 1, 12), settled("req_c", 2, 9), settled("req_d", 1, 11)]
    one_way = [s.request_id for s in sorted(batch, key=_lock_order)]
    other_way = [s.request_id for s in sorted(reversed(batch), key=_lock_order)]
    assert one_way == other_way == ["req_d", "req_b", "req_c", "req_a"]
