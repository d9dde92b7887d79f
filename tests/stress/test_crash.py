"""Scenario 3 — crash (SPEC §2 holds, §4 settlement).

SIGKILL the whole `serve --workers 2` process group while slow streams are in flight and
short requests keep landing, then restart it on the same file: the file is intact, the
books reconcile, every charge committed before the kill is still there, the dead
processes' holds keep counting against the balance until their expiry and are then
released by the new process's keeper, and the gateway serves again at once.
"""

from __future__ import annotations

import signal
import sqlite3
import time
from collections import Counter
from pathlib import Path

import anyio
import httpx
import pytest

from tests.stress.harness import (
    KEEPER_INTERVAL_S,
    Checks,
    FakeUpstreamProcess,
    ProcessSet,
    Reply,
    RouteConf,
    UpstreamConf,
    auth,
    chat_body,
    ledger_verify,
    new_key,
    query,
    scale,
    send,
    start_gateway,
)

pytestmark = pytest.mark.anyio

STREAMS = scale(50, 200)
HOLD_TTL_S = 10  # the minimum the config accepts
FUNDS = 50_000_000
SLOW = {"chunk_delay_s": 0.1, "reply_words": 200}  # ~20 s per stream: all still running at the kill


def now_ms() -> int:
    return int(time.time() * 1000)


def integrity(db: Path) -> list[str]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return [r[0] for r in con.execute("PRAGMA integrity_check").fetchall()]
    finally:
        con.close()


async def test_sigkill_mid_stream(procs: ProcessSet, workdir: Path) -> None:
    checks = Checks("3_crash")
    fake = procs.add(FakeUpstreamProcess(workdir)).start()
    gateway = start_gateway(procs, workdir, workers=2, upstreams=[UpstreamConf("fake", fake.base_url)],
                            routes=[RouteConf("stress/x1", "fake", 1, max_output_tokens=256)],
                            billing={"hold_ttl_s": HOLD_TTL_S}, accounts=[("crash", FUNDS)])
    key = new_key(gateway, "crash", "live")
    db = gateway.workdir / "quota.db"
    account_id = query(db, "SELECT id FROM accounts WHERE name = 'crash'")[0][0]
    quick = chat_body("quick one", model="stress/x1")
    slow = chat_body("slow stream please", model="stress/x1", stream=True, max_tokens=200, fake=SLOW)

    committed_by_client: list[str] = []  # request ids whose 200 arrived before the kill
    killed_at = float("inf")
    headers_seen = 0
    stream_replies: list[Reply] = []
    limits = httpx.Limits(max_connections=STREAMS + 50)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=60, limits=limits) as client:
        for _ in range(20):
            r = await send(client, "POST", "/v1/chat/completions", key=key, body=quick)
            assert r.status == 200, r.body
            committed_by_client.append(r.request_id or "")

        async def stream_one() -> None:
            nonlocal headers_seen
            started = time.perf_counter()
            try:
                async with client.stream("POST", "/v1/chat/completions", json=slow, headers=auth(key)) as resp:
                    headers_seen += 1
                    body = b""
                    async for chunk in resp.aiter_raw():
                        body += chunk
                    stream_replies.append(Reply(resp.status_code, resp.headers.get("x-quota-request-id"),
                                                body, time.perf_counter() - started))
            except httpx.HTTPError as exc:
                stream_replies.append(Reply(0, None, b"", time.perf_counter() - started, error=type(exc).__name__))

        async def trickle() -> None:
            while True:
                r = await send(client, "POST", "/v1/chat/completions", key=key, body=quick)
                if r.status == 200 and time.time() < killed_at:
                    committed_by_client.append(r.request_id or "")
                if r.status == 0:
                    return
                await anyio.sleep(0.02)

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for _ in range(STREAMS):
                    tg.start_soon(stream_one)
                tg.start_soon(trickle)
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    held = query(db, "SELECT count(*) FROM holds")[0][0]
                    if headers_seen >= STREAMS and held >= STREAMS:
                        break
                    await anyio.sleep(0.1)
                await anyio.sleep(0.5)  # let a few more short requests commit
                # What the file holds just before the kill.
                ledger_at_kill = {r[0] for r in query(db, "SELECT public_id FROM ledger")}
                requests_at_kill = {r[0] for r in query(db, "SELECT request_id FROM requests")}
                holds_at_kill = query(db, "SELECT id, amount, owner, expires_at, request_id FROM holds")
                killed_at = time.time()
                gateway.signal_group(signal.SIGKILL)
                exit_code = gateway.wait(10)
                tg.cancel_scope.deadline = anyio.current_time() + 10

    in_flight = headers_seen
    kill_ms = int(killed_at * 1000)
    checks.expect("the whole group died", exit_code == -signal.SIGKILL and not gateway.pids(), exit_code)
    checks.expect("streams were in flight at the kill", len(holds_at_kill) >= STREAMS, len(holds_at_kill))

    # -- the file, before anyone touches it again ---------------------------------------
    ic = integrity(db)
    checks.expect("PRAGMA integrity_check = ok after SIGKILL", ic == ["ok"], ic)
    ledger_after_kill = {r[0] for r in query(db, "SELECT public_id FROM ledger")}
    checks.expect("every ledger row committed before the kill is still there",
                  ledger_at_kill <= ledger_after_kill, len(ledger_at_kill - ledger_after_kill))
    requests_now = {r[0] for r in query(db, "SELECT request_id FROM requests")}
    checks.expect("every 200 answered before the kill is charged in the file",
                  set(committed_by_client) <= requests_now, len(set(committed_by_client) - requests_now))
    killed_ids = {r.request_id for r in stream_replies if r.request_id}
    dead_owners = sorted({h[2] for h in holds_at_kill})

    # -- restart on the same file -----------------------------------------------------
    restart_started = time.monotonic()
    gateway.start()
    ready_s = time.monotonic() - restart_started
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        first = await send(client, "POST", "/v1/chat/completions", key=key, body=quick)
        first_ok_s = time.monotonic() - restart_started
        checks.expect("the restarted gateway serves at once", first.status == 200 and first_ok_s < 20,
                      (first.status, first_ok_s, first.body[:200]))
        ic = integrity(db)
        checks.expect("PRAGMA integrity_check = ok after restart", ic == ["ok"], ic)
        code, verify = ledger_verify(gateway)
        checks.expect("ledger verify clean right after restart", code == 0, verify)

        # Dead holds not yet expired must still be held (and counted in `held`).
        check_ms = now_ms()
        holds_now = {r[0] for r in query(db, "SELECT id FROM holds")}
        # A short request that ended between the snapshot and the kill was settled (then, or
        # from its journal at the restart): its hold went with its charge. The rest are dead.
        settled = {r[0] for r in query(db, "SELECT request_id FROM requests")}
        unexpired = [h for h in holds_at_kill if h[3] > check_ms + 200 and h[4] not in settled]
        still = [h for h in unexpired if h[0] in holds_now]
        checks.expect("dead holds still counted until their expiry", len(still) == len(unexpired),
                      (len(still), len(unexpired)))
        balance = (await client.get("/v1/balance", headers=auth(key))).json()
        held_right_after = balance["held_quota_tokens"]
        checks.expect("available balance excludes the dead holds",
                      held_right_after >= sum(h[1] for h in still)
                      and balance["available_quota_tokens"] == balance["balance_quota_tokens"] - held_right_after,
                      balance)

        # Then the keeper of the new processes releases them, soon after expiry.
        expiry_ms = max((h[3] for h in holds_at_kill), default=kill_ms)
        deadline = time.monotonic() + (expiry_ms - now_ms()) / 1000 + KEEPER_INTERVAL_S * 2 + 5
        released_at = None
        while time.monotonic() < deadline:
            left = query(db, f"SELECT count(*) FROM holds WHERE owner IN ({','.join('?' * len(dead_owners))})",
                         dead_owners)[0][0] if dead_owners else 0
            if left == 0:
                released_at = now_ms()
                break
            await anyio.sleep(0.25)
        checks.expect("every dead hold released after its expiry", released_at is not None,
                      query(db, "SELECT count(*) FROM holds")[0][0])
        checks.expect("no dead hold released before its expiry", released_at is None or released_at >= expiry_ms - 50,
                      (released_at, expiry_ms))
        held_final = query(db, "SELECT held FROM accounts WHERE id = ?", (account_id,))[0][0]
        checks.expect("nothing held once released", held_final == 0, held_final)
        again = await send(client, "POST", "/v1/chat/completions", key=key, body=slow | {"stream": False,
                           "fake": {"reply_words": 3}})
        checks.expect("serves after the release", again.status == 200, again.status)
    code, verify = ledger_verify(gateway)
    checks.expect("ledger verify clean after the release", code == 0, verify)
    ledger_final = {r[0] for r in query(db, "SELECT public_id FROM ledger")}
    checks.expect("charges committed before the kill survive the restart", ledger_at_kill <= ledger_final,
                  len(ledger_at_kill - ledger_final))
    killed_charged = query(db, "SELECT count(*) FROM requests WHERE request_id IN "
                           f"({','.join('?' * len(killed_ids))})", sorted(killed_ids))[0][0] if killed_ids else 0

    checks.finish({
        "streams_in_flight_at_kill": in_flight,
        "holds_at_kill": len(holds_at_kill),
        "held_at_kill_quota_tokens": sum(h[1] for h in holds_at_kill),
        "dead_owners": len(dead_owners),
        "charges_committed_before_kill": len(requests_at_kill),
        "client_200s_before_kill": len(committed_by_client),
        "stream_outcomes_at_client": dict(Counter(r.error or r.status for r in stream_replies)),
        "killed_streams_charged": killed_charged,
        "restart_ready_s": round(ready_s, 2),
        "first_200_after_restart_s": round(first_ok_s, 2),
        "held_right_after_restart": held_right_after,
        "dead_holds_released_s_after_kill": round((released_at - kill_ms) / 1000, 1) if released_at else None,
        "last_dead_hold_expiry_s_after_kill": round((expiry_ms - kill_ms) / 1000, 1),
        "hold_ttl_s": HOLD_TTL_S,
        "integrity_check": "ok" if ic == ["ok"] else ic,
        "ledger_verify": verify,
    })
