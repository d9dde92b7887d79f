"""`quota-proxy store copy`: SQLite -> PostgreSQL -> SQLite, every account, key digest,
ledger entry, request, hold, user and idempotency key, verified; never into a non-empty store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from quota_proxy.config import StoreSettings
from quota_proxy.keys import digest
from quota_proxy.store import Outcome, Settlement, Store, open_store
from tests.conftest import run_cli
from tests.pgserver import create_schema, fresh_database, schema_url

pytestmark = pytest.mark.anyio


async def fill(store: Store) -> None:
    dev = await store.create_account("acme")
    await store.credit(dev.id, 10_000, "purchase", "starter")
    key = await store.create_key(dev.id, "live", digest("qta_live_copy"), "qta_live_cop", "ci",
                                 ("quota/fast",), False, None, 5, None, 3)
    await store.grant(dev.id, "alice", 2_000, "welcome", "idem-1", "h1")
    alice = await store.user(dev.id, "alice")
    assert alice is not None
    for i, (payer, charged) in enumerate([(dev.id, 40), (alice.id, 25), (dev.id, 0)]):
        hold = await store.take_hold(payer, 100, f"req_{i}", "gw", 60_000, key.id, 3)
        await store.settle(Settlement(f"req_{i}", dev.id, payer, alice.id if payer == alice.id else None,
                                      key.id, hold, "quota/fast", "m", 10, charged, "x1", charged, i == 1,
                                      Outcome.OK, 200, cache_read_tokens=i))
    await store.take_hold(dev.id, 500, "req_open", "gw", 60_000, key.id, 3)
    await store.credit(dev.id, -7, "adjustment", "fix")


def config(tmp_path: Path, name: str, store_line: str) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(f'[store]\n{store_line}\n[upstreams.u]\nbase_url = "http://127.0.0.1:9/v1"\n'
                    '[routes."quota/fast"]\nupstream = "u"\nmodel = "m"\nmultiplier = 1\n')
    return path


async def snapshot(store: Store) -> dict[str, Any]:
    accounts = {a["public_id"]: (a["name"], a["balance"], a["held"], a["billing_mode"])
                for a in await store.dump("accounts")}
    ledger = [(e["public_id"], e["amount"], e["balance_after"], e["kind"], e["request_id"], e["created_at"])
              for e in await store.dump("ledger")]
    keys = [(k["public_id"], k["digest"], k["routes"], bool(k["allow_community"]), k["max_concurrent"])
            for k in await store.dump("api_keys")]
    requests = [(r["request_id"], r["charged"], bool(r["estimated"]), r["cache_read_tokens"], r["ledger_id"])
                for r in await store.dump("requests")]
    holds = [(h["id"], h["amount"], h["request_id"]) for h in await store.dump("holds")]
    idem = [(i["key"], orjson.loads(i["response"])) for i in await store.dump("idempotency")]
    summary = await store.usage_summary(next(a.id for a in await store.list_accounts()))
    return {"accounts": accounts, "ledger": ledger, "keys": keys, "requests": requests, "holds": holds,
            "idempotency": idem, "usage": summary}


async def test_copy_to_postgres_and_back_keeps_every_record(tmp_path: Path) -> None:
    source_path = tmp_path / "source.db"
    async with open_store(StoreSettings(path=source_path)) as source:
        await fill(source)
        original = await snapshot(source)
    async with fresh_database("copy") as database:
        url = schema_url(database)
        await create_schema(url)
        sqlite_config = config(tmp_path, "sqlite", f'path = "{source_path}"')
        out = run_cli("--config", str(sqlite_config), "store", "copy", "--to", url, "--json")
        report = orjson.loads(out.stdout)
        assert report["verified"] and (report["accounts"], report["ledger_entries"], report["holds"]) == (2, 6, 1)
        async with open_store(StoreSettings(url=url)) as copied:
            assert await snapshot(copied) == original
            assert await copied.verify_ledger() == []

        refused = run_cli("--config", str(sqlite_config), "store", "copy", "--to", url, check=False)
        assert refused.returncode == 1 and "not empty" in refused.stderr

        back_path = tmp_path / "back.db"
        pg_config = config(tmp_path, "pg", f'url = "{url}"')
        run_cli("--config", str(pg_config), "store", "copy", "--to", str(back_path))
        async with open_store(StoreSettings(path=back_path)) as back:
            assert await snapshot(back) == original
        verify = run_cli("--config", str(config(tmp_path, "back", f'path = "{back_path}"')), "ledger", "verify")
        assert "ledger ok" in verify.stdout
