"""Payments and alerts on the PostgreSQL store itself, where it differs from SQLite: crossings
committed out of id order, two gateways scanning and claiming at once, and the schema's
triggers. (The HTTP behaviour runs on both engines: tests/test_payments_on_postgres.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest

from quota_proxy.store.alerts import Crossing
from quota_proxy.store.alerts_postgres import PostgresAlertStore
from quota_proxy.store.payments_postgres import PostgresPaymentStore
from quota_proxy.store.postgres import PostgresStore
from tests.pgserver import create_schema, fresh_database, schema_url

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return "asyncio", {}


@pytest.fixture(scope="module")
async def pg_database() -> AsyncIterator[str]:
    async with fresh_database("pgpay") as url:
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


def build(public_id: str, crossing: Crossing) -> bytes:
    return orjson.dumps({"id": public_id, "account": crossing.account_name, "ledger_id": crossing.ledger_id})


async def watched(store: PostgresStore, name: str, balance: int = 1000, threshold: int = 500) -> int:
    account = await store.create_account(name)
    await store.credit(account.id, balance, "credit")
    await PostgresAlertStore(store).set(account.id, "https://hooks.example/alerts", (threshold,), ())
    return account.id


async def test_a_crossing_committed_after_a_later_id_still_alerts(store: PostgresStore, url: str) -> None:
    """Ledger ids come from a sequence before commit: an entry with a lower id can commit after
    the scanner has read a higher one. An id cursor would skip it; the trigger-fed queue cannot."""
    acme = await watched(store, "acme")
    globex = await watched(store, "globex")
    initech = await watched(store, "initech")
    alerts = PostgresAlertStore(store)
    slow = await asyncpg.connect(url)
    try:
        async with slow.transaction():
            await slow.execute(
                "INSERT INTO ledger (public_id, account_id, amount, balance_after, kind, created_at) "
                "VALUES ('ledg_slow', $1, -600, 0, 'adjustment', 0)", acme,
            )
            await store.credit(globex, -600, "adjustment")  # a higher id, committed first
            assert await alerts.scan(build) == 1
        try:
            async with slow.transaction():  # an entry whose transaction rolls back alerts nothing
                await slow.execute(
                    "INSERT INTO ledger (public_id, account_id, amount, balance_after, kind, created_at) "
                    "VALUES ('ledg_gone', $1, -600, 0, 'adjustment', 0)", initech,
                )
                raise RuntimeError("roll back")
        except RuntimeError:
            pass
    finally:
        await slow.close()
    assert await alerts.scan(build) == 1  # the late one
    assert await alerts.scan(build) == 0
    alerted = {d["account"]: d["ledger_id"] for i in (acme, globex, initech) for d in await alerts.deliveries(i)}
    assert alerted.keys() == {"acme", "globex"} and alerted["acme"] == "ledg_slow"


async def test_two_gateways_scan_and_claim_each_alert_once(store: PostgresStore, url: str) -> None:
    ids = [await watched(store, f"dev{i}") for i in range(20)]
    for account_id in ids:
        await store.credit(account_id, -700, "adjustment")
    async with PostgresStore(url, pool_size=4) as other:
        gateways = (PostgresAlertStore(store), PostgresAlertStore(other))
        queued = await asyncio.gather(*(g.scan(build, batch=3) for g in gateways for _ in range(5)))
        queued_rest = sum([await g.scan(build) for g in gateways])
        assert sum(queued) + queued_rest == 20
        claims = await asyncio.gather(*(g.claim_due(60_000, limit=4) for g in gateways for _ in range(4)))
    claimed = [d.public_id for batch in claims for d in batch]
    assert len(claimed) == len(set(claimed)) == 20  # each once; none missed (8 claims of up to 4)
    assert all(d.attempts == 1 and d.webhook_url for batch in claims for d in batch)


async def test_the_schema_refuses_what_the_code_never_does(store: PostgresStore, url: str) -> None:
    account = await store.create_account("acme")
    payments = PostgresPaymentStore(store)
    order = await payments.create_order(account.id, "starter", 500, "usd", 1000, "stripe")
    await payments.abandon_order(order.public_id)
    [code] = await payments.create_codes(["digest"], "starter", 1000, None)
    redeemed = await payments.redeem(account.id, "digest")
    assert redeemed.code_id == code and redeemed.balance_after == 1000
    conn = await asyncpg.connect(url)
    try:
        with pytest.raises(asyncpg.RaiseError, match="cannot move back"):
            await conn.execute("UPDATE orders SET status = 'pending' WHERE public_id = $1", order.public_id)
        with pytest.raises(asyncpg.RaiseError, match="claimed once"):
            await conn.execute("UPDATE redemption_codes SET claimed_at = 1 WHERE public_id = $1", code)
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.executemany(
                "INSERT INTO payment_events (provider, event_id, type, outcome, created_at) "
                "VALUES ('stripe', 'evt_1', 't', 'x', 0)", [(), ()],
            )
    finally:
        await conn.close()
