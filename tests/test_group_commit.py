"""Settlements off the response path (issue 14, item 2): journaled before the caller has the
end of the answer, committed in groups afterwards. A process killed in between loses no
charge and doubles none: the next process to open the store commits the journal once, even
when several open it at the same moment.

The kill lands exactly in the gap: `[store] settle_delay_ms` lets each group wait a minute
for a quiet moment (the next request the gateway sends upstream), and the upstream holds
every answer back until all the requests have gone upstream, so every answer has been
received, and its settlement is in the journal and not in the database, when SIGKILL
arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import openai
import orjson
import pytest

from quota_proxy.config import load_settings
from quota_proxy.store import Outcome, Settlement, open_store
from quota_proxy.store.group_commit import SettlementJournal, decode, encode
from quota_proxy.testing import run_fake_upstream
from tests.conftest import closed_port, config_toml, run_cli
from tests.serving import Served, stop, wait_ready

pytestmark = pytest.mark.anyio

FUNDS = 10_000_000
REQUESTS = 12
WINDOW_MS = 60_000  # the longest a group waits for a quiet moment: the kill always lands first
ALL_SENT_S = 1.0  # the upstream's first byte waits this long: every request has gone upstream by then


def settlement(n: int, **changes: Any) -> Settlement:
    s = Settlement(
        request_id=f"req_{n}", account_id=1, charged_account_id=1, user_id=None, key_id=None,
        hold_id=None, route="quota/fast", upstream_model="m", input_tokens=3, output_tokens=4,
        multiplier="1", charged=7, estimated=False, outcome=Outcome.OK, status=200,
        created_at=1_700_000_000_000 + n,
    )  # fmt: skip
    return replace(s, **changes)


def test_a_settlement_survives_the_journal_unchanged() -> None:
    s = settlement(
        1, session_id="sess", cache_read_tokens=5, outcome=Outcome.CLIENT_DISCONNECTED, estimated=True
    )
    assert decode(encode(s)) == s
    assert encode(s).endswith(b"\n") and encode(s).count(b"\n") == 1


def test_a_live_segment_is_not_an_orphan_and_a_torn_line_is_left_out(tmp_path: Path) -> None:
    live = SettlementJournal(tmp_path / "j")
    live.append(settlement(1))
    assert list(SettlementJournal(tmp_path / "j").orphans()) == []  # its writer holds the lock

    dead = SettlementJournal(tmp_path / "j")
    dead.append(settlement(2))
    dead.append(settlement(3))
    segment = dead.seal()
    assert segment is not None
    os.write(segment.fd, encode(settlement(4))[:-9])  # died inside write(2)
    segment.release()  # the process is gone: the file stays, unlocked

    found = list(SettlementJournal(tmp_path / "j").orphans())
    assert [[s.request_id for s in batch] for _, batch in found] == [["req_2", "req_3"]]
    for orphan, _ in found:
        orphan.discard()
    assert sorted(p.suffix for p in (tmp_path / "j").iterdir()) == [".settle"]  # only the live one


@asynccontextmanager
async def gateway(config: Path, key: str, db: Path) -> AsyncIterator[Served]:
    port = closed_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "quota_proxy", "serve", "--config", str(config), "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    served = Served(proc, port, key, db)
    try:
        await wait_ready(served)
        yield served
    finally:
        stop(proc)


async def books(config: Path) -> dict[str, int]:
    """What the store holds, read through a fresh store (which commits orphans first)."""
    settings = load_settings(config)
    async with open_store(settings.store) as store:
        account = await store.account_by_name("acme")
        assert account is not None
        assert await store.verify_ledger() == []
        ledger = await store.ledger(account.id, limit=1000)
        return {
            "balance": account.balance,
            "held": account.held,
            "charges": sum(-e.amount for e in ledger if e.kind == "charge"),
            "charge_rows": sum(1 for e in ledger if e.kind == "charge"),
            "open_holds": await store.open_holds(),
        }


@pytest.fixture(params=["sqlite", "postgres"])
async def store_config(request: pytest.FixtureRequest) -> AsyncIterator[dict[str, Any]]:
    if request.param == "sqlite":
        yield {}
        return
    from tests.pgserver import fresh_database

    async with fresh_database("gc") as url:
        yield {"url": url, "pool_size": 4}


async def test_sigkill_between_answer_and_commit_loses_nothing_and_doubles_nothing(
    tmp_path: Path, store_config: dict[str, Any]
) -> None:
    async with run_fake_upstream() as upstream:
        config, db, journal = tmp_path / "q.toml", tmp_path / "q.db", tmp_path / "journal"
        store = {**(store_config or {"path": str(db)}), "journal": str(journal), "settle_delay_ms": WINDOW_MS}
        config.write_text(config_toml(upstream.base_url, db, store=store))
        run_cli("--config", str(config), "accounts", "create", "acme", "--quota-tokens", str(FUNDS))
        created = run_cli(
            "--config", str(config), "keys", "create", "--account", "acme", "--kind", "live", "--json"
        )
        key = str(orjson.loads(created.stdout)["key"])

        async with gateway(config, key, db) as served:
            async with openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key=key, max_retries=0) as client:
                replies = await asyncio.gather(*(
                    client.chat.completions.create(
                        model="quota/sonnet", messages=[{"role": "user", "content": f"question {n}"}], max_tokens=20,
                        extra_body={"fake": {"first_byte_delay_s": ALL_SENT_S}},
                    )
                    for n in range(REQUESTS)
                ))  # fmt: skip
            told = [int((r.usage.model_extra or {})["charged_quota_tokens"]) for r in replies]
            assert all(t > 0 for t in told) and len(told) == REQUESTS
            # Every caller has its whole answer; the charges are journaled, not committed.
            segments = [p for p in journal.iterdir() if p.suffix == ".settle"]
            journaled = [decode(line) for p in segments for line in p.read_bytes().splitlines()]
            assert sorted(s.charged for s in journaled) == sorted(told)
            if not store_config:
                with sqlite3.connect(db) as raw:
                    assert raw.execute("SELECT count(*) FROM requests").fetchone()[0] == 0
                    assert raw.execute("SELECT count(*) FROM holds").fetchone()[0] == REQUESTS
            os.killpg(served.proc.pid, signal.SIGKILL)
            await anyio.to_thread.run_sync(served.proc.wait)

        # Three processes open the store at once; the journal is committed exactly once.
        async def open_and_list() -> None:
            await anyio.to_thread.run_sync(lambda: run_cli("--config", str(config), "accounts", "list"))

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(open_and_list)
        after = await books(config)
        assert after == {
            "balance": FUNDS - sum(told),
            "held": 0,
            "charges": sum(told),
            "charge_rows": REQUESTS,
            "open_holds": 0,
        }
        assert [p for p in journal.iterdir() if p.suffix == ".settle"] == []

        # A later start finds nothing more to commit: nothing is charged twice.
        async with gateway(config, key, db):
            pass
        assert await books(config) == after


def committed(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(db)) as raw:
        return int(raw.execute("SELECT count(*) FROM requests").fetchone()[0])


async def committed_reaches(db: Path, count: int) -> int:
    """The committed settlements once there are `count` (or after 10 s)."""
    with anyio.move_on_after(10):
        while committed(db) < count:
            await anyio.sleep(0.01)
    return committed(db)


def configured(
    tmp_path: Path, upstream_url: str, settle_delay_ms: int, settle_gather_ms: int = 0
) -> tuple[Path, Path, str]:
    config, db = tmp_path / "q.toml", tmp_path / "q.db"
    store = {
        "path": str(db),
        "journal": str(tmp_path / "journal"),
        "settle_delay_ms": settle_delay_ms,
        "settle_gather_ms": settle_gather_ms,
    }
    config.write_text(config_toml(upstream_url, db, store=store))
    run_cli("--config", str(config), "accounts", "create", "acme", "--quota-tokens", str(FUNDS))
    created = run_cli(
        "--config", str(config), "keys", "create", "--account", "acme", "--kind", "live", "--json"
    )
    return config, db, str(orjson.loads(created.stdout)["key"])


async def test_a_group_commits_when_the_gateway_next_sends_a_request_upstream(tmp_path: Path) -> None:
    """`settle_delay_ms` is only the longest wait: while the gateway waits on an upstream
    its loop is idle, and the settlements waiting for a group commit then."""
    async with run_fake_upstream() as upstream:
        config, db, key = configured(tmp_path, upstream.base_url, WINDOW_MS)
        seen = []
        async with gateway(config, key, db) as served:
            async with openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key=key, max_retries=0) as client:
                for n in range(3):
                    await client.chat.completions.create(
                        model="quota/sonnet", messages=[{"role": "user", "content": f"q{n}"}], max_tokens=5
                    )
                    # Each request's own settlement waits (a minute at most); the one before
                    # it committed as this one went upstream.
                    seen.append(await committed_reaches(db, n))
            await anyio.sleep(0.2)
            seen.append(committed(db))
        assert seen == [0, 1, 2, 2]


async def test_a_group_gathers_for_settle_gather_ms_before_a_quiet_moment_commits_it(tmp_path: Path) -> None:
    """Requests sent upstream while the group is younger than `settle_gather_ms` leave it
    waiting: at one request at a time, one commit then serves several settlements."""
    gather_s = 1.5
    async with run_fake_upstream() as upstream:
        config, db, key = configured(tmp_path, upstream.base_url, WINDOW_MS, int(gather_s * 1000))
        seen = []
        async with gateway(config, key, db) as served:
            async with openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key=key, max_retries=0) as client:

                async def ask(n: int) -> None:
                    await client.chat.completions.create(
                        model="quota/sonnet", messages=[{"role": "user", "content": f"q{n}"}], max_tokens=5
                    )

                started = anyio.current_time()
                for n in range(3):
                    await ask(n)
                    seen.append(committed(db))
                assert anyio.current_time() - started < gather_s, "too slow a machine for this test"
                await anyio.sleep(gather_s + 0.1)
                await ask(3)  # the group is ripe: it commits as this request goes upstream
                seen.append(await committed_reaches(db, 3))
            await anyio.sleep(0.2)
            seen.append(committed(db))
        assert seen == [0, 0, 0, 3, 3]


async def test_a_group_with_no_quiet_moment_commits_after_settle_delay_ms(tmp_path: Path) -> None:
    async with run_fake_upstream() as upstream:
        config, db, key = configured(tmp_path, upstream.base_url, 20)
        async with gateway(config, key, db) as served:
            async with openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key=key, max_retries=0) as client:
                await client.chat.completions.create(
                    model="quota/sonnet", messages=[{"role": "user", "content": "alone"}], max_tokens=5
                )
            # No request follows: the timer commits it.
            assert await committed_reaches(db, 1) == 1
