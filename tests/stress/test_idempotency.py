"""Scenario 2 — idempotency under fire (SPEC §3 Funding API).

200 concurrent grants over 20 Idempotency-Keys, against `serve --workers 2` (so the
duplicates race across two processes and two SQLite connections each): exactly 20 grants
land, every answer is a well-formed grant (the first one `duplicate: false`, the replays
`duplicate: true` with the very same ledger ids), and a reused key with another body is 409.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from pathlib import Path

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
    error_shape_ok,
    latency_figures,
    ledger_verify,
    new_key,
    query,
    scale,
    send,
    start_gateway,
)

pytestmark = pytest.mark.anyio

GRANTS = scale(200, 1000)
KEYS = scale(20, 100)
FUNDS = 100_000_000  # $100
GRANT_FIELDS = {
    "object", "external_user_id", "amount_granted", "amount_granted_quota_tokens", "balance_before",
    "balance_before_quota_tokens", "balance_after", "balance_after_quota_tokens", "ledger_id",
    "duplicate",
}


def grant_body(k: int) -> dict[str, object]:
    return {"external_user_id": f"idem-user-{k % 5}", "amount": (k + 1) / 100,
            "description": f"stress grant {k}"}


async def test_idempotency_under_fire(procs: ProcessSet, workdir: Path) -> None:
    checks = Checks("2_idempotency")
    fake = procs.add(FakeUpstreamProcess(workdir)).start()
    gateway = start_gateway(procs, workdir, workers=2, upstreams=[UpstreamConf("fake", fake.base_url)],
                            routes=[RouteConf("stress/x1", "fake", 1)], accounts=[("idem", FUNDS)])
    secret = new_key(gateway, "idem", "secret")
    db = gateway.workdir / "quota.db"
    dev_id = query(db, "SELECT id FROM accounts WHERE name = 'idem'")[0][0]
    ledger_before = query(db, "SELECT count(*) FROM ledger")[0][0]

    plan = [(f"stress-idem-{i % KEYS:03d}", i % KEYS) for i in range(GRANTS)]
    replies: list[Reply | None] = [None] * GRANTS
    go = anyio.Event()
    limits = httpx.Limits(max_connections=GRANTS + 10)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=60, limits=limits) as client:

        async def one(i: int) -> None:
            await go.wait()
            idem, k = plan[i]
            replies[i] = await send(client, "POST", "/v1/funding/grant", key=secret, body=grant_body(k),
                                    headers={"idempotency-key": idem})

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for i in range(GRANTS):
                    tg.start_soon(one, i)
                await anyio.sleep(0.2)
                started = time.perf_counter()
                go.set()
        elapsed = time.perf_counter() - started

        # the same keys with another body: 409, nothing granted
        conflicts = [await send(client, "POST", "/v1/funding/grant", key=secret,
                                body={**grant_body(k), "amount": 5}, headers={"idempotency-key": f"stress-idem-{k:03d}"})
                     for k in range(KEYS)]

    statuses = Counter(r.status if r else -1 for r in replies)
    by_key: dict[str, list[dict]] = defaultdict(list)
    for (idem, k), reply in zip(plan, replies, strict=False):
        assert reply is not None
        ok = reply.status == 200
        checks.expect("every grant answer is 200", ok, (reply.status, reply.error, reply.body[:200]))
        if not ok:
            continue
        data = reply.json()
        checks.expect("every answer is a well-formed grant", set(data) >= GRANT_FIELDS
                      and data["object"] == "funding.grant" and isinstance(data["duplicate"], bool), data)
        checks.expect("the answer is for its own request",
                      data.get("external_user_id") == grant_body(k)["external_user_id"]
                      and data.get("amount_granted_quota_tokens") == (k + 1) * 10_000, data)
        by_key[idem].append(data)
    for idem, answers in by_key.items():
        firsts = [a for a in answers if not a["duplicate"]]
        checks.expect("exactly one first answer per key", len(firsts) == 1, (idem, len(firsts)))
        checks.expect("replays answer with the same ledger entry",
                      len({(a["ledger_id"], a["balance_before_quota_tokens"], a["balance_after_quota_tokens"])
                           for a in answers}) == 1, idem)
    for reply in conflicts:
        checks.expect("same key, other body: 409 idempotency_conflict", reply.status == 409
                      and error_shape_ok(reply) and reply.json()["error"]["code"] == "idempotency_conflict",
                      (reply.status, reply.body[:200]))

    grant_rows = query(db, "SELECT account_id, amount, idempotency_key FROM ledger WHERE kind = 'grant'")
    user_side = [r for r in grant_rows if r[0] != dev_id]
    dev_side = [r for r in grant_rows if r[0] == dev_id]
    expected_total = sum((k + 1) * 10_000 for k in range(KEYS))
    checks.expect("exactly one grant per idempotency key (user side)",
                  len(user_side) == KEYS and len({r[2] for r in user_side}) == KEYS, len(user_side))
    checks.expect("exactly one grant per idempotency key (developer side)", len(dev_side) == KEYS, len(dev_side))
    checks.expect("idempotency table: one row per key",
                  query(db, "SELECT count(*) FROM idempotency")[0][0] == KEYS)
    dev_balance = balances(db)[dev_id][0]
    checks.expect("the pool dropped by exactly the 20 grants", dev_balance == FUNDS - expected_total,
                  (dev_balance, FUNDS - expected_total))
    user_total = sum(b for a, (b, _) in balances(db).items() if a != dev_id)
    checks.expect("the users received exactly the 20 grants", user_total == expected_total, user_total)
    ledger_rows = query(db, "SELECT count(*) FROM ledger")[0][0] - ledger_before
    verify_code, verify = ledger_verify(gateway)
    checks.expect("quota-proxy ledger verify exits 0", verify_code == 0, verify)
    checks.finish({
        "grants_sent": GRANTS,
        "idempotency_keys": KEYS,
        "workers": 2,
        "statuses": dict(statuses),
        "first_answers": sum(1 for a in by_key.values() for x in a if not x["duplicate"]),
        "duplicate_answers": sum(1 for a in by_key.values() for x in a if x["duplicate"]),
        "grant_ledger_rows_user_side": len(user_side),
        "ledger_rows_written": ledger_rows,
        "conflicting_replays": len(conflicts),
        "conflict_statuses": dict(Counter(r.status for r in conflicts)),
        "elapsed_s": round(elapsed, 2),
        "latency": latency_figures([r.elapsed_s for r in replies if r]),
    })
