"""The store's ledger on a real SQLite file: what a charge was for, paging, the outcome
check, usage buckets, the v3 -> v4 migration, and which writes are durable at commit."""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from importlib import resources
from itertools import groupby
from pathlib import Path

import anyio
import pytest

from quota_proxy.keys import new_id
from quota_proxy.store import (
    Account,
    LedgerEntry,
    Outcome,
    Settlement,
    billed_tokens,
)
from quota_proxy.store.sqlite import LATEST_VERSION, MIGRATIONS, SqliteStore, _statements

pytestmark = pytest.mark.anyio


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    async with SqliteStore(tmp_path / "quota.db") as s:
        yield s


async def funded(store: SqliteStore, name: str = "acme", amount: int = 1_000_000) -> Account:
    account = await store.create_account(name)
    await store.credit(account.id, amount, "credit", "initial")
    return account


def settlement(account: Account, **fields: object) -> Settlement:
    base = Settlement(
        request_id=new_id("req"),
        account_id=account.id,
        charged_account_id=account.id,
        user_id=None,
        key_id=None,
        hold_id=None,
        route="quota/sonnet",
        upstream_model="claude-sonnet",
        input_tokens=10,
        output_tokens=20,
        multiplier="x3",
        charged=90,
        estimated=False,
        outcome=Outcome.OK,
        status=200,
    )
    return replace(base, **fields)  # type: ignore[arg-type]


async def test_a_charge_entry_carries_what_it_was_for(store: SqliteStore) -> None:
    account = await funded(store)
    key = await store.create_key(account.id, "live", "digest-1", "qta_live_ab", name="ci")
    await store.credit(account.id, 5000, "credit", "pool")
    facts, _ = await store.grant(account.id, "bob@example", 1000, "trial", None, "h")
    user = await store.user(account.id, "bob@example")
    assert user is not None
    s = settlement(
        account,
        user_id=user.id,
        charged_account_id=user.id,
        key_id=key.id,
        input_tokens=100,
        cache_read_tokens=1000,
        cache_write_tokens=50,
        cache_write_1h_tokens=7,
        output_tokens=30,
        reasoning_tokens=12,
        charged=3 * 1187,
        estimated=True,
        outcome=Outcome.CLIENT_DISCONNECTED,
        session_id="sess-42",
        status=200,
    )
    assert s.billed_tokens == 1187
    ledger_id = await store.settle(s)

    entry = (await store.ledger(user.id, 1))[0]
    assert (entry.public_id, entry.kind, entry.amount) == (ledger_id, "charge", -3561)
    charge = entry.charge
    assert charge is not None
    assert charge.request_id == s.request_id == entry.request_id
    assert (charge.key_id, charge.key_prefix, charge.user) == (key.public_id, "qta_live_ab", "bob@example")
    assert (charge.route, charge.upstream_model, charge.multiplier) == ("quota/sonnet", "claude-sonnet", "x3")
    assert (charge.input_tokens, charge.output_tokens) == (100, 30)
    assert (charge.cache_read_tokens, charge.cache_write_tokens, charge.cache_write_1h_tokens) == (1000, 50, 7)
    assert charge.reasoning_tokens == 12 and charge.billed_tokens == 1187
    assert (charge.charged, charge.estimated, charge.status) == (3561, True, 200)
    assert charge.outcome is Outcome.CLIENT_DISCONNECTED
    assert charge.session_id == "sess-42"
    # The same details by the entry's id; a grant or credit carries none.
    assert await store.ledger_entry(ledger_id or "") == entry
    grant_entry = await store.ledger_entry(facts["ledger_id"])
    assert grant_entry is not None and grant_entry.kind == "grant" and grant_entry.charge is None
    assert await store.ledger_entry("ledg_nope") is None
    assert await store.verify_ledger() == []


async def test_reading_a_page_of_charges_is_one_query_not_one_per_entry(store: SqliteStore) -> None:
    account = await funded(store)
    for _ in range(60):
        await store.settle(settlement(account))
    statements: list[str] = []
    await store.db.set_trace_callback(statements.append)
    try:
        page = await store.ledger_page(account.id)
    finally:
        await store.db.set_trace_callback(None)  # type: ignore[arg-type]
    assert len(page.entries) == 50 and all(e.charge is not None for e in page.entries)
    assert len(statements) == 2, statements  # the page and the count of older entries


async def test_paging_walks_every_entry_once_and_says_how_many_are_left(store: SqliteStore) -> None:
    account = await funded(store)  # 1 credit
    other = await funded(store, "other")  # entries of another account never show
    for i in range(129):
        if i % 3:
            await store.settle(settlement(account, charged=i))
        else:
            await store.credit(account.id, i + 1, "credit", f"c{i}")
        await store.credit(other.id, 1, "credit", "noise")
    everything = await store.ledger_page(account.id, None)
    assert len(everything.entries) == 130 and everything.more == 0 and everything.next_before is None
    ids = [e.id for e in everything.entries]
    assert ids == sorted(ids, reverse=True)
    assert {e.account_id for e in everything.entries} == {account.id}

    first = await store.ledger_page(account.id)
    assert len(first.entries) == 50 and first.more == 80
    assert first.next_before == first.entries[-1].id
    walked: list[LedgerEntry] = list(first.entries)
    cursor: int | None = first.next_before
    pages = [first]
    while cursor is not None:
        page = await store.ledger_page(account.id, 50, cursor)
        pages.append(page)
        walked += page.entries
        cursor = page.next_before
    assert [len(p.entries) for p in pages] == [50, 50, 30]
    assert [p.more for p in pages] == [80, 30, 0]
    assert walked == list(everything.entries)

    exact = await store.ledger_page(account.id, 130)
    assert (len(exact.entries), exact.more, exact.next_before) == (130, 0, None)
    assert (await store.ledger_page(account.id, 5, everything.entries[-1].id)).entries == ()
    with pytest.raises(ValueError):
        await store.ledger_page(account.id, 0)


async def test_an_unknown_outcome_is_refused_and_changes_nothing(store: SqliteStore) -> None:
    account = await funded(store)
    hold = await store.take_hold(account.id, 500, "req_x", "me", 60_000)
    before = await store.account(account.id)
    bad = settlement(account, hold_id=hold, outcome="rejected")
    with pytest.raises(sqlite3.IntegrityError, match="not a known outcome"):
        await store.settle(bad)
    assert await store.account(account.id) == before
    assert await store.open_holds() == 1
    assert len(await store.ledger(account.id)) == 1
    assert await store.usage(account.id) == []
    # Nor can a stored outcome be changed to one that is not known.
    await store.settle(replace(bad, outcome=Outcome.UPSTREAM_REJECTED))
    with pytest.raises(sqlite3.IntegrityError, match="not a known outcome"):
        await store.db.execute("UPDATE requests SET outcome = 'bogus'")
    for outcome in Outcome:  # every member is accepted
        await store.settle(settlement(account, outcome=outcome, charged=0))


async def test_usage_and_rate_windows_count_every_bucket(store: SqliteStore) -> None:
    account = await funded(store)
    key = await store.create_key(account.id, "live", "d", "qta_live_cd", tpm=10_000)
    assert await store.count_request(key.id, None, 10_000)
    buckets = {"input_tokens": 3, "cache_read_tokens": 400, "cache_write_tokens": 50,
               "cache_write_1h_tokens": 6, "output_tokens": 70, "reasoning_tokens": 20}
    for _ in range(2):
        await store.settle(settlement(account, key_id=key.id, charged=3 * 529, **buckets))
    rows = await store.usage(account.id, days=1)
    assert len(rows) == 1
    row = rows[0]
    assert (row.requests, row.input_tokens, row.output_tokens, row.charged) == (2, 6, 140, 6 * 529)
    assert (row.cache_read_tokens, row.cache_write_tokens, row.cache_write_1h_tokens) == (800, 100, 12)
    assert row.reasoning_tokens == 40
    summary = await store.usage_summary(account.id, days=1)
    for total in (summary.by_route[0], summary.by_day[0]):
        assert (total.requests, total.input_tokens, total.cache_read_tokens, total.cache_write_tokens,
                total.cache_write_1h_tokens, total.output_tokens, total.reasoning_tokens) == (
                2, 6, 800, 100, 12, 140, 40)
    assert summary.by_route[0].name == "quota/sonnet"
    # tpm counts billed tokens (reasoning is inside output, not added again)
    window = await store._one("SELECT tokens FROM rate_windows WHERE key_id = ?", (key.id,))
    assert window[0] == billed_tokens(row) == 2 * 529


def _create_v3(path: Path) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    for number, name in ((n, MIGRATIONS[n]) for n in (1, 2, 3)):
        for statement in _statements(resources.files("quota_proxy.store").joinpath(name).read_text()):
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {number}")
    conn.execute("INSERT INTO accounts (public_id, kind, name, created_at) VALUES ('acct_a', 'developer', 'a', 0)")
    conn.execute("INSERT INTO ledger (public_id, account_id, amount, balance_after, kind, created_at) "
                 "VALUES ('ledg_c', 1, 1000, 1000, 'credit', 0)")
    for rid, outcome in (("req_1", "ok"), ("req_2", "rejected")):
        conn.execute(
            "INSERT INTO requests (request_id, account_id, charged_account_id, route, upstream_model, "
            "input_tokens, output_tokens, multiplier, charged, outcome, status, ledger_id, created_at) "
            "VALUES (?, 1, 1, 'quota/fast', 'm', 4, 6, 'x1', 10, ?, 200, ?, 86400000)",
            (rid, outcome, "ledg_" + rid),
        )
    conn.close()


async def test_a_v3_store_migrates_with_its_history_intact(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    _create_v3(path)
    async with SqliteStore(path) as store:
        assert (await store._one("PRAGMA user_version"))[0] == LATEST_VERSION == 7
        outcomes = await store._all("SELECT request_id, outcome, cache_read_tokens, session_id FROM requests")
        assert outcomes == [("req_1", "ok", 0, None), ("req_2", "upstream_rejected", 0, None)]
        entries = await store.ledger(1)
        assert [e.kind for e in entries] == ["charge", "charge", "credit"]
        assert [e.charge.outcome for e in entries if e.charge] == [Outcome.UPSTREAM_REJECTED, Outcome.OK]
        assert await store.verify_ledger() == []
        daily = await store._all("SELECT requests, input_tokens, cache_read_tokens FROM usage_daily")
        assert daily == [(2, 8, 0)]


async def test_money_that_came_in_commits_on_the_full_sync_connection(store: SqliteStore) -> None:
    assert store._tx is not None
    assert (await store._one("PRAGMA synchronous"))[0] == 1  # NORMAL: charges, holds
    assert store._inline is not None  # the hot path's writes, on the event loop's thread
    assert store._inline.execute("PRAGMA synchronous").fetchone()[0] == 1
    sync = list(await store._tx.execute_fetchall("PRAGMA synchronous"))
    assert sync[0][0] == 2  # FULL: the durable transactions
    durable: list[str] = []
    cheap: list[str] = []
    await store._tx.set_trace_callback(durable.append)
    await store.db.set_trace_callback(cheap.append)
    store._inline.set_trace_callback(cheap.append)
    try:
        account = await store.create_account("acme")
        await store.credit(account.id, 1000, "credit", "")
        key = await store.create_key(account.id, "live", "dg", "qta_live_x")
        await store.revoke_key(key.public_id)
        await store.grant(account.id, "u1", 10, "", "idem", "hash")
        user = await store.user(account.id, "u1")
        assert user is not None
        await store.set_billing_mode(user.id, "developer")
        hold = await store.take_hold(account.id, 50, "req_d", "me", 60_000)
        await store.settle(settlement(account, hold_id=hold, charged=5))
    finally:
        await store._tx.set_trace_callback(None)  # type: ignore[arg-type]
        await store.db.set_trace_callback(None)  # type: ignore[arg-type]
        store._inline.set_trace_callback(None)

    def writes(log: list[str]) -> list[str]:
        # SQLite traces a statement once more per trigger step it runs: count each once.
        issued = [text for text, _ in groupby(log)]
        found = (re.match(r"(INSERT) INTO (\w+)|(UPDATE) (\w+)", text) for text in issued)
        return [" ".join(g for g in m.groups() if g) for m in found if m]

    assert writes(durable) == [
        "INSERT accounts", "INSERT ledger", "INSERT api_keys", "UPDATE api_keys", "INSERT accounts",
        "INSERT ledger", "INSERT ledger", "INSERT idempotency", "UPDATE accounts",
    ]
    assert durable.count("BEGIN IMMEDIATE") == durable.count("COMMIT") == 6
    assert writes(cheap) == ["INSERT holds", "INSERT requests"]


async def test_a_failed_durable_write_rolls_back_and_the_next_one_works(store: SqliteStore) -> None:
    account = await funded(store)
    with pytest.raises(ValueError, match="no such account"):
        await store.credit(account.id + 99, 5, "credit", "")
    with pytest.raises(ValueError, match="already exists"):
        await store.create_account("acme")
    assert store._tx is not None and not store._tx.in_transaction
    await store.credit(account.id, 5, "credit", "")
    assert (await store.account(account.id)).balance == 1_000_005  # type: ignore[union-attr]


async def test_concurrent_credits_and_charges_keep_the_books_exact(store: SqliteStore) -> None:
    account = await funded(store, amount=10_000)

    async def credit() -> None:
        await store.credit(account.id, 7, "credit", "")

    async def charge() -> None:
        hold = await store.take_hold(account.id, 10, new_id("req"), "me", 60_000)
        await store.settle(settlement(account, hold_id=hold, charged=3))

    async with anyio.create_task_group() as tg:
        for _ in range(40):
            tg.start_soon(credit)
            tg.start_soon(charge)
    fresh = await store.account(account.id)
    assert fresh is not None and (fresh.balance, fresh.held) == (10_000 + 40 * 7 - 40 * 3, 0)
    assert await store.verify_ledger() == []
    page = await store.ledger_page(account.id, None)
    assert len(page.entries) == 81


async def test_sync_puts_the_cheap_commits_on_disk(store: SqliteStore) -> None:
    account = await funded(store)
    for _ in range(3):
        await store.settle(settlement(account))
    log, checkpointed = await store.sync()
    assert log > 0 and checkpointed == log  # every frame of the WAL is in the database file
    # a copy of the main file alone (no WAL) holds the charges now
    copy = store.path.with_name("copy.db")
    copy.write_bytes(store.path.read_bytes())
    conn = sqlite3.connect(copy)
    try:
        assert conn.execute("SELECT count(*) FROM ledger WHERE kind = 'charge'").fetchone()[0] == 3
    finally:
        conn.close()


async def test_verify_finds_a_charge_that_does_not_match_its_request(store: SqliteStore) -> None:
    account = await funded(store)
    await store.settle(settlement(account, charged=90))
    assert await store.verify_ledger() == []
    await store.db.execute("UPDATE requests SET charged = 91")  # the request table is not append-only
    problems = await store.verify_ledger()
    assert [(p["name"], p["unmatched_charges"], p["balance"] - p["ledger_sum"]) for p in problems] == [
        ("acme", 1, 0)
    ]


async def test_a_cancelled_durable_write_leaves_no_transaction_open(store: SqliteStore) -> None:
    account = await store.create_account("acme")
    done = 0
    for i in range(40):  # cancel at different points: lock, BEGIN, INSERT, COMMIT
        with anyio.move_on_after(i * 0.00005):
            await store.credit(account.id, 1, "credit", "")
            done += 1
        await store.credit(account.id, 1000, "credit", "")  # the next one always works
    fresh = await store.account(account.id)
    assert fresh is not None
    ledger = await store.ledger_page(account.id, None)
    assert fresh.balance == sum(e.amount for e in ledger.entries)
    assert fresh.balance - 40 * 1000 == len(ledger.entries) - 40 == done  # each 1 whole or absent
    assert 0 < done < 40  # some were cancelled, some not
    assert await store.verify_ledger() == []


def test_request_and_ledger_ids_sort_by_creation_time() -> None:
    """Their unique indexes grow at the end (one page per settlement group, not one random
    page per row); the format users see stays prefix + 24 hex digits."""
    from quota_proxy.keys import new_ledger_id
    from quota_proxy.state import new_request_id

    earlier = [new_request_id(), new_ledger_id()]
    time.sleep(0.002)
    later = [new_request_id(), new_ledger_id()]
    for before, after in zip(earlier, later, strict=True):
        assert re.fullmatch(r"(req|ledg)_[0-9a-f]{24}", after)
        assert before < after and before[:-12] != after[:-12]
    many = {new_request_id() for _ in range(10_000)}
    assert len(many) == 10_000  # 48 random bits after the millisecond


async def test_holds_keep_only_the_index_the_hot_path_uses(store: SqliteStore) -> None:
    """Each index on holds is a page more in every hold's and every settlement's commit."""
    rows = await store._all("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'holds'")
    assert [name for (name,) in rows] == ["holds_key"]
    account = await funded(store)
    hold = await store.take_hold(account.id, 10, "req_a", "me", ttl_ms=-1)
    await store.refresh_holds("someone else", 60_000)
    assert await store.release_expired_holds() == 1  # found without holds_expiry
    assert await store.available(account.id) == 1_000_000
    assert hold > 0
