"""Scenario 1 — overspend race at scale (SPEC §2, §4).

`quota-proxy serve --workers 2` on one SQLite file, the fake upstream as its own process,
N concurrent chat completions (streaming and not, inference keys and user-billed through a
secret key) against four balances that together cover about N/10 of them. The holds must
stop every request that the balance cannot pay, and every answered request must be
charged exactly once.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests.stress.harness import (
    Checks,
    FakeUpstreamProcess,
    ProcessSet,
    Reply,
    RouteConf,
    UpstreamConf,
    balances,
    chat_body,
    error_shape_ok,
    latency_figures,
    ledger_verify,
    new_key,
    query,
    scale,
    send,
    start_gateway,
    usd,
)

pytestmark = pytest.mark.anyio

REQUESTS = scale(300, 1000)
COVERED = scale(30, 100)
PROMPT = "alpha beta gamma delta"  # the fake counts 4 words + 3 = 7 prompt tokens
REPLY_WORDS = 8
MAX_TOKENS = 8
FAKE_PROMPT_TOKENS = 7


def cost(multiplier: float) -> int:
    """What one answered request costs when the upstream reports its usage."""
    return math.ceil((FAKE_PROMPT_TOKENS + REPLY_WORDS) * multiplier)


# payer -> (route alias, multiplier); "dev" is the developer account itself
PAYERS = {
    "dev": ("stress/x1", 1),
    "u-one": ("stress/x1", 1),
    "u-three": ("stress/x3", 3),
    "u-half": ("stress/half", 0.5),
}


async def test_overspend_race(procs: ProcessSet, workdir: Path) -> None:
    checks = Checks("1_overspend_race")
    per_payer = COVERED // len(PAYERS)
    funds = {payer: per_payer * cost(mult) for payer, (_, mult) in PAYERS.items()}
    dev_initial = sum(funds.values()) + 1  # + 1 quota token granted to the developer-billed user

    fake = procs.add(FakeUpstreamProcess(workdir)).start()
    gateway = start_gateway(
        procs, workdir, workers=2,
        upstreams=[UpstreamConf("fake", fake.base_url)],
        routes=[RouteConf("stress/x1", "fake", 1), RouteConf("stress/x3", "fake", 3),
                RouteConf("stress/half", "fake", 0.5)],
        accounts=[("race", dev_initial)],
    )
    live = new_key(gateway, "race", "live", "race-live")
    secret = new_key(gateway, "race", "secret", "race-secret")
    for user in ("u-one", "u-three", "u-half"):
        gateway.cli("grant", "--account", "race", "--user", user, "--usd", usd(funds[user]))
    gateway.cli("grant", "--account", "race", "--user", "u-devbilled", "--usd", usd(1))
    gateway.cli("users", "set-mode", "--account", "race", "--user", "u-devbilled", "developer")
    db = gateway.workdir / "quota.db"
    ids = {name: i for i, name in query(db, "SELECT id, name FROM accounts")}
    before = balances(db)
    requests_before = query(db, "SELECT count(*) FROM requests")[0][0]

    # The plan: N requests in four equal payer groups, alternating streaming/non-streaming.
    plan: list[dict[str, Any]] = []
    for i in range(REQUESTS):
        payer = list(PAYERS)[i % len(PAYERS)]
        route, mult = PAYERS[payer]
        if payer == "dev":
            # half through the inference key, half through the developer-billed user
            path, key = ("/v1/chat/completions", live) if i % 8 < 4 else (
                "/v1/users/u-devbilled/chat/completions", secret)
        else:
            path, key = f"/v1/users/{payer}/chat/completions", secret
        stream = i % 2 == 1
        plan.append({
            "payer": payer, "path": path, "key": key, "stream": stream, "mult": mult,
            "body": chat_body(PROMPT, model=route, stream=stream, max_tokens=MAX_TOKENS,
                              include_usage=stream and i % 4 == 3, fake={"reply_words": REPLY_WORDS}),
        })

    replies: list[Reply | None] = [None] * len(plan)
    go = anyio.Event()
    limits = httpx.Limits(max_connections=REQUESTS + 10, max_keepalive_connections=REQUESTS + 10)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=120, limits=limits) as client:

        async def one(i: int) -> None:
            await go.wait()
            p = plan[i]
            replies[i] = await send(client, "POST", p["path"], key=p["key"], body=p["body"], stream=p["stream"])

        started = time.perf_counter()
        with anyio.fail_after(300):
            async with anyio.create_task_group() as tg:
                for i in range(len(plan)):
                    tg.start_soon(one, i)
                await anyio.sleep(0.2)
                started = time.perf_counter()
                go.set()
        elapsed = time.perf_counter() - started

    # -- read the books back --------------------------------------------------------------
    after = balances(db)
    rows = query(db, "SELECT request_id, charged_account_id, charged, outcome, status FROM requests")
    req_by_id = defaultdict(list)
    for r in rows:
        req_by_id[r[0]].append(r)
    charge_rows = query(db, "SELECT request_id, account_id, amount FROM ledger WHERE kind = 'charge'")
    ledger_by_req = Counter(r[0] for r in charge_rows)
    open_holds = query(db, "SELECT count(*), coalesce(sum(amount), 0) FROM holds")[0]

    statuses = Counter(r.status if r else -1 for r in replies)
    served = Counter()
    refused = Counter()
    answered_ids = set()
    for p, reply in zip(plan, replies, strict=False):
        assert reply is not None
        kind = ("stream" if p["stream"] else "whole")
        if reply.status == 200:
            served[p["payer"]] += 1
            answered_ids.add(reply.request_id)
            found = req_by_id.get(reply.request_id, [])
            checks.expect("every 200 has exactly one requests row", len(found) == 1, (reply.request_id, found))
            checks.expect("every 200 has exactly one charge ledger row",
                          ledger_by_req.get(reply.request_id, 0) == 1, reply.request_id)
            if found:
                checks.expect("every 200 charged > 0 with outcome ok", found[0][2] > 0 and found[0][3] == "ok",
                              found[0])
                checks.expect("the right balance paid",
                              found[0][1] == ids[p["payer"] if p["payer"] != "dev" else "race"], (p, found[0]))
            shown = _charge_shown(reply, p["stream"], p["body"], checks, kind)
            if shown is not None and found:
                checks.expect("usage.charged_quota_tokens = the charge in the store", shown == found[0][2],
                              (shown, found[0][2]))
        elif reply.status == 402:
            refused[p["payer"]] += 1
            checks.expect("402 has the SPEC error shape", error_shape_ok(reply)
                          and reply.json()["error"]["code"] == "insufficient_balance", reply.body[:300])
            checks.expect("every 402 charged nothing (no requests row)", reply.request_id not in req_by_id,
                          reply.request_id)
            checks.expect("every 402 charged nothing (no ledger row)", reply.request_id not in ledger_by_req,
                          reply.request_id)
        else:
            checks.expect("every answer is 200 or 402", False, (reply.status, reply.error, reply.body[:300]))

    phantom = {r[0] for r in rows} - answered_ids
    checks.expect("no charge without a 200 (no phantom requests rows)",
                  requests_before == 0 and not phantom, sorted(phantom)[:5])

    drops = {}
    for name, account_id in ids.items():
        bal_before, _ = before[account_id]
        bal_after, held_after = after[account_id]
        charged = sum(r[2] for r in rows if r[1] == account_id)
        ledger_charged = -sum(r[2] for r in charge_rows if r[1] == account_id)
        drops[name] = {"before": bal_before, "after": bal_after, "charged": charged}
        checks.expect("no balance below zero", bal_after >= 0, (name, bal_after))
        checks.expect("balance drop = sum of charges (per account)",
                      bal_before - bal_after == charged == ledger_charged,
                      (name, bal_before - bal_after, charged, ledger_charged))
        checks.expect("nothing held after the run", held_after == 0, (name, held_after))
    total_charged = sum(r[2] for r in rows)
    total_drop = sum(before[a][0] - after[a][0] for a in ids.values())
    checks.expect("sum of charges = sum of balance drops", total_charged == total_drop, (total_charged, total_drop))
    checks.expect("no open holds", open_holds[0] == 0, open_holds)
    verify_code, verify = ledger_verify(gateway)
    checks.expect("quota-proxy ledger verify exits 0", verify_code == 0, verify)
    checks.expect("the balance edge was reached (some 402s)", statuses.get(402, 0) > 0, statuses)

    latencies = [r.elapsed_s for r in replies if r is not None]
    checks.finish({
        "requests": REQUESTS,
        "workers": 2,
        "balances_cover_full_price_requests": COVERED,
        "funds_quota_tokens": funds,
        "statuses": dict(statuses),
        "served_by_payer": dict(served),
        "refused_by_payer": dict(refused),
        "streams": sum(1 for p in plan if p["stream"]),
        "user_billed": sum(1 for p in plan if p["path"].startswith("/v1/users/")),
        "total_charged_quota_tokens": total_charged,
        "total_balance_drop": total_drop,
        "min_balance_after": min(after[a][0] for a in ids.values()),
        "accounts": drops,
        "elapsed_s": round(elapsed, 2),
        "throughput_rps": round(REQUESTS / elapsed, 1),
        "latency": latency_figures(latencies),
        "ledger_verify": verify,
    })


def _charge_shown(reply: Reply, stream: bool, body: dict[str, Any], checks: Checks, kind: str) -> int | None:
    """The charged_quota_tokens the caller was shown, and the stream's own invariants."""
    if not stream:
        usage = reply.json().get("usage") or {}
        return usage.get("charged_quota_tokens")
    events = reply.events()
    checks.expect("a served stream ends with [DONE]", events[-1:] == ["[DONE]"], events[-3:])
    parsed = [json.loads(e) for e in events if e != "[DONE]"]
    checks.expect("a served stream carries no error event", not any("error" in e for e in parsed), events[-3:])
    with_usage = [e["usage"] for e in parsed if isinstance(e.get("usage"), dict)]
    if body.get("stream_options", {}).get("include_usage"):
        checks.expect("a stream that asked for usage gets one usage chunk", len(with_usage) == 1, with_usage)
        return with_usage[0].get("charged_quota_tokens") if with_usage else None
    checks.expect("a stream that did not ask for usage sees none", not with_usage, with_usage)
    return None
