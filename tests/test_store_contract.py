"""The store contract, run against both engines: a real SQLite file and a real PostgreSQL
database (a fresh database per module, a fresh schema per test). Whatever the gateway
relies on — holds that fit atomically, settlement once per request, one grant per
idempotency key, books that reconcile — must hold on both."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest

from quota_proxy.config import StoreSettings
from quota_proxy.keys import digest
from quota_proxy.store import (
    IdempotencyMismatch,
    InsufficientFunds,
    Outcome,
    Settlement,
    Store,
    StoreError,
    TooManyInFlight,
    open_store,
)
from tests.pgserver import create_schema, fresh_database, schema_url

pytestmark = pytest.mark.anyio

TTL_MS = 60_000


@pytest.fixture(scope="module")
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return "asyncio", {"use_uvloop": True}


@pytest.fixture(scope="module")
async def pg_database() -> AsyncIterator[str]:
    async with fresh_database("contract") as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> StoreSettings:
    if request.param == "sqlite":
        return StoreSettings(path=tmp_path / "contract.db")
    return StoreSettings(url=schema_url(request.getfixturevalue("pg_database")), pool_size=8)


@pytest.fixture
async def store(settings: StoreSettings) -> AsyncIterator[Store]:
    if settings.url is not None:
        await create_schema(settings.url)
    async with open_store(settings) as opened:
        yield opened


async def raw(settings: StoreSettings, sql: str) -> None:
    """Run SQL around the store, as an operator with a database shell would."""
    if settings.url is None:
        conn = sqlite3.connect(settings.path)
        try:
            conn.execute(sql)
            conn.commit()
        finally:
            conn.close()
        return
    pg = await asyncpg.connect(settings.url)
    try:
        await pg.execute(sql)
    finally:
        await pg.close()


async def funded(store: Store, amount: int = 1000, name: str = "acme") -> int:
    account = await store.create_account(name)
    if amount:
        await store.credit(account.id, amount, "credit", "test funds")
    return account.id


def settlement(request_id: str, account: int, hold: int | None, charged: int, **extra: Any) -> Settlement:
    return Settlement(
        request_id=request_id, account_id=account, charged_account_id=account, user_id=None,
        key_id=extra.pop("key_id", None), hold_id=hold, route="quota/fast", upstream_model="m",
        input_tokens=extra.pop("input_tokens", 3), output_tokens=extra.pop("output_tokens", 4),
        multiplier="x1", charged=charged, estimated=False, outcome=Outcome.OK, status=200, **extra,
    )


async def test_it_is_a_store(store: Store) -> None:
    assert isinstance(store, Store)
    await store.ping()


async def test_credit_is_one_ledger_entry_and_moves_the_balance(store: Store) -> None:
    account = await funded(store, 0)
    entry = await store.credit(account, 250, "purchase", "starter")
    assert (entry.amount, entry.balance_after, entry.kind) == (250, 250, "purchase")
    await store.credit(account, -50, "adjustment", "fix")
    fresh = await store.account(account)
    assert fresh is not None and fresh.balance == 200
    assert [e.amount for e in await store.ledger(account)] == [-50, 250]
    assert await store.verify_ledger() == []


async def test_names_are_unique_and_lookups_find_them(store: Store) -> None:
    account = await funded(store, 0)
    with pytest.raises(ValueError):
        await store.create_account("acme")
    by_name = await store.account_by_name("acme")
    assert by_name is not None and by_name.id == account
    assert await store.account_by_name("nobody") is None
    assert [a.name for a in await store.list_accounts()] == ["acme"]
    assert await store.account_count() == 1


async def test_the_ledger_is_append_only(store: Store, settings: StoreSettings) -> None:
    account = await funded(store, 100)
    for sql in ("UPDATE ledger SET amount = 1000000", "DELETE FROM ledger"):
        with pytest.raises((sqlite3.DatabaseError, asyncpg.PostgresError), match="append-only"):
            await raw(settings, sql)
    fresh = await store.account(account)
    assert fresh is not None and fresh.balance == 100
    assert await store.verify_ledger() == []


async def test_a_balance_changes_only_through_the_ledger(store: Store, settings: StoreSettings) -> None:
    account = await funded(store, 100)
    with pytest.raises((sqlite3.DatabaseError, asyncpg.PostgresError), match="ledger"):
        await raw(settings, f"UPDATE accounts SET balance = 1000000 WHERE id = {account}")
    fresh = await store.account(account)
    assert fresh is not None and fresh.balance == 100


async def test_a_hold_fits_the_available_balance_or_is_refused(store: Store) -> None:
    account = await funded(store, 1000)
    first = await store.take_hold(account, 600, "req_a", "me", TTL_MS)
    with pytest.raises(InsufficientFunds) as short:
        await store.take_hold(account, 600, "req_b", "me", TTL_MS)
    assert short.value.available == 400
    assert await store.available(account) == 400
    held = await store.account(account)
    assert held is not None and (held.balance, held.held) == (1000, 600)
    await store.release_hold(first)
    assert await store.available(account) == 1000
    assert await store.open_holds() == 0
    assert await store.verify_ledger() == []


async def test_concurrent_holds_never_overspend(store: Store) -> None:
    account = await funded(store, 1000)
    taken: list[int] = []
    refused = 0

    async def one(i: int) -> None:
        nonlocal refused
        try:
            taken.append(await store.take_hold(account, 30, f"req_{i}", "me", TTL_MS))
        except InsufficientFunds:
            refused += 1

    async with anyio.create_task_group() as tg:
        for i in range(60):
            tg.start_soon(one, i)
    assert (len(taken), refused) == (33, 27)  # 33 × 30 = 990 fits in 1000; a 34th would not
    fresh = await store.account(account)
    assert fresh is not None and fresh.held == 990
    assert await store.verify_ledger() == []


async def test_a_key_may_have_max_concurrent_holds(store: Store) -> None:
    account = await funded(store, 1000)
    key = await store.create_key(account, "live", digest("qta_live_x"), "qta_live_x")
    holds = [await store.take_hold(account, 1, f"req_{i}", "me", TTL_MS, key.id, 2) for i in range(2)]
    with pytest.raises(TooManyInFlight):
        await store.take_hold(account, 1, "req_3", "me", TTL_MS, key.id, 2)
    await store.release_hold(holds[0])
    await store.take_hold(account, 1, "req_4", "me", TTL_MS, key.id, 2)


async def test_settlement_charges_releases_and_records_once(store: Store) -> None:
    account = await funded(store, 1000)
    hold = await store.take_hold(account, 100, "req_1", "me", TTL_MS)
    s = settlement("req_1", account, hold, 7, cache_read_tokens=5, session_id="sess")
    ledger_id = await store.settle(s)
    assert ledger_id is not None
    # The same settlement again (a retry after a lost reply) charges nothing more.
    assert await store.settle(s) == ledger_id
    fresh = await store.account(account)
    assert fresh is not None and (fresh.balance, fresh.held) == (993, 0)
    page = await store.ledger_page(account, 1)
    assert page.more == 1 and page.next_before == page.entries[0].id
    charge = page.entries[0].charge
    assert charge is not None
    assert (charge.request_id, charge.charged, charge.cache_read_tokens, charge.session_id) == (
        "req_1", 7, 5, "sess"
    )
    entry = await store.ledger_entry(page.entries[0].public_id)
    assert entry is not None and entry.charge == charge
    older = await store.ledger_page(account, 1, before=page.next_before)
    assert [e.amount for e in older.entries] == [1000] and older.more == 0
    summary = await store.usage_summary(account)
    assert [(t.name, t.requests, t.charged, t.cache_read_tokens) for t in summary.by_route] == [
        ("quota/fast", 1, 7, 5)
    ]
    rows = await store.usage(account)
    assert [(r.route, r.input_tokens, r.output_tokens) for r in rows] == [("quota/fast", 3, 4)]
    assert await store.verify_ledger() == []


async def test_a_free_settlement_writes_no_ledger_entry(store: Store) -> None:
    account = await funded(store, 1000)
    hold = await store.take_hold(account, 100, "req_1", "me", TTL_MS)
    assert await store.settle(settlement("req_1", account, hold, 0, input_tokens=0, output_tokens=0)) is None
    assert len(await store.ledger(account)) == 1
    assert await store.available(account) == 1000


async def test_an_unknown_outcome_is_refused(store: Store) -> None:
    account = await funded(store, 1000)
    bad = settlement("req_1", account, None, 1)
    object.__setattr__(bad, "outcome", "rejected")
    with pytest.raises(Exception, match="outcome"):
        await store.settle(bad)
    assert len(await store.ledger(account)) == 1


async def test_expired_holds_are_released_and_refreshed_ones_kept(store: Store) -> None:
    account = await funded(store, 1000)
    await store.take_hold(account, 100, "req_dead", "dead-gateway", 1)
    await store.take_hold(account, 100, "req_live", "live-gateway", 1)
    await store.refresh_holds("live-gateway", TTL_MS)
    await anyio.sleep(0.01)
    assert await store.release_expired_holds() == 1
    assert await store.available(account) == 900
    assert await store.verify_ledger() == []


async def test_rate_windows_count_requests(store: Store) -> None:
    account = await funded(store, 1000)
    key = await store.create_key(account, "live", digest("qta_live_r"), "qta_live_r", rpm=2)
    assert [await store.count_request(key.id, 2, None) for _ in range(3)] == [True, True, False]
    other = await store.create_key(account, "live", digest("qta_live_s"), "qta_live_s")
    assert await store.count_request(other.id, 2, None)
    await store.purge_rate_windows()


async def test_keys_are_found_by_digest_listed_and_revoked(store: Store) -> None:
    account = await funded(store, 0)
    key = await store.create_key(
        account, "secret", digest("sk-quota-abc"), "sk-quota-abc", "ci", ("quota/fast",), False,
        None, 10, 1000, 2,
    )
    found = await store.key_by_digest(digest("sk-quota-abc"))
    assert found == key
    assert (found.routes, found.allow_community, found.rpm, found.max_concurrent) == (
        ("quota/fast",), False, 10, 2
    )
    assert [k.id for k in await store.list_keys(account)] == [key.id]
    assert [k.id for k in await store.revoke_key(key.prefix)] == [key.id]
    revoked = await store.key_by_digest(digest("sk-quota-abc"))
    assert revoked is not None and revoked.revoked_at is not None
    assert await store.key_by_digest(digest("sk-quota-nope")) is None


async def test_a_grant_moves_funds_once_per_idempotency_key(store: Store) -> None:
    dev = await funded(store, 1000)
    facts, duplicate = await store.grant(dev, "alice", 300, "hi", "key-1", "hash-1")
    assert not duplicate and (facts["balance_before"], facts["balance_after"]) == (0, 300)
    again, duplicate = await store.grant(dev, "alice", 300, "hi", "key-1", "hash-1")
    assert duplicate and again == facts
    with pytest.raises(IdempotencyMismatch):
        await store.grant(dev, "alice", 500, "hi", "key-1", "hash-2")
    with pytest.raises(InsufficientFunds) as short:
        await store.grant(dev, "alice", 701, "", "key-2", "hash-3")
    assert short.value.available == 700
    user = await store.user(dev, "alice")
    assert user is not None and user.balance == 300
    assert [u.name for u in await store.list_users(dev)] == ["alice"]
    await store.set_billing_mode(user.id, "developer")
    changed = await store.user(dev, "alice")
    assert changed is not None and changed.billing_mode == "developer"
    assert await store.verify_ledger() == []


async def test_concurrent_grants_with_one_key_grant_once(store: Store) -> None:
    dev = await funded(store, 1000)
    results: list[bool] = []

    async def one() -> None:
        results.append((await store.grant(dev, "bob", 100, "", "same", "h"))[1])

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(one)
    assert sorted(results) == [False] + [True] * 9
    user = await store.user(dev, "bob")
    assert user is not None and user.balance == 100
    assert await store.available(dev) == 900
    assert await store.purge_idempotency(0) >= 0


async def test_a_grant_respects_open_holds(store: Store) -> None:
    dev = await funded(store, 1000)
    await store.take_hold(dev, 800, "req_1", "me", TTL_MS)
    with pytest.raises(InsufficientFunds):
        await store.grant(dev, "carol", 300, "", None, "h")
    assert await store.user(dev, "carol") is None


async def test_a_newer_schema_is_refused(settings: StoreSettings, store: Store) -> None:
    await store.close()
    if settings.url is None:
        await raw(settings, "PRAGMA user_version = 99")
    else:
        await raw(settings, "INSERT INTO schema_version (version) VALUES (99)")
    with pytest.raises(StoreError, match="newer"):
        async with open_store(settings):
            pass


async def test_usage_is_summed_by_each_dimension(store: Store) -> None:
    from quota_proxy.store.dashboard_models import UsageGroup

    dev = await funded(store, 1000)
    key = await store.create_key(dev, "live", digest("qta_live_u"), "qta_live_u", "ci")
    await store.grant(dev, "alice", 100, "", None, "h")
    alice = await store.user(dev, "alice")
    assert alice is not None
    for i, (user, session) in enumerate([(None, "s1"), (alice.id, "s1"), (alice.id, None)]):
        s = settlement(f"req_{i}", dev, None, 5, key_id=key.id, session_id=session, cache_read_tokens=2)
        object.__setattr__(s, "user_id", user)
        await store.settle(s)
    lines = {g: [(x.label, x.requests, x.charged, x.cache_read_tokens) for x in await store.usage_by(dev, g, 30)]
             for g in UsageGroup}
    assert lines[UsageGroup.ROUTE] == [("quota/fast", 3, 15, 6)]
    assert [x[1:] for x in lines[UsageGroup.DAY]] == [(3, 15, 6)]
    assert lines[UsageGroup.USER] == [("", 1, 5, 2), ("alice", 2, 10, 4)]
    assert lines[UsageGroup.KEY] == [("qta_live_u ci", 3, 15, 6)]
    assert lines[UsageGroup.SESSION] == [("s1", 2, 10, 4)]
    sessions = await store.usage_by_session(dev)
    assert [(t.name, t.requests, t.charged, t.cache_read_tokens) for t in sessions] == [("s1", 2, 10, 4)]
