"""Two gateway machines on one PostgreSQL database (SPEC §8 stores, issue 10).

Two `quota-proxy serve --workers 2` processes share one fresh database, with the fake
upstream as its own process. The overspend race is split across both; then grants with
one idempotency key race across both, a key revoked through one store is refused by
both, a database outage fails closed with 503 store_unavailable and heals by itself, and
a SIGKILLed gateway's holds are released by the survivor after their expiry.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import httpx
import pytest

from tests.pgserver import allow_connections, fresh_database
from tests.stress.harness import (
    Checks,
    FakeUpstreamProcess,
    GatewayProcess,
    ProcessSet,
    Reply,
    RouteConf,
    UpstreamConf,
    auth,
    chat_body,
    error_shape_ok,
    free_port,
    latency_figures,
    ledger_verify,
    new_key,
    scale,
    send,
    write_config,
)

pytestmark = pytest.mark.anyio

REQUESTS = scale(1000, 2000)
COVERED = scale(100, 200)  # requests the balance pays for in full
PROMPT = "alpha beta gamma delta"  # the fake counts 7 prompt tokens
COST = 7 + 8  # 8 reply words at x1
HOLD_TTL_S = 10  # the smallest the config allows: a dead gateway's holds go within ~15 s


@dataclass
class Pair:
    a: GatewayProcess
    b: GatewayProcess
    fake: FakeUpstreamProcess
    url: str

    async def rows(self, sql: str, *args: Any) -> list[Any]:
        conn = await asyncpg.connect(self.url)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    async def value(self, sql: str, *args: Any) -> Any:
        return (await self.rows(sql, *args))[0][0]

    def upstream_requests(self) -> int:
        return int(httpx.get(f"{self.fake.url}/_fake/stats").json().get("requests", 0))


@asynccontextmanager
async def two_gateways(
    procs: ProcessSet, workdir: Path, accounts: list[tuple[str, int]], **billing: Any
) -> AsyncIterator[Pair]:
    async with fresh_database("gw") as url:
        fake = procs.add(FakeUpstreamProcess(workdir)).start()
        gateways = []
        for name in ("a", "b"):
            folder = workdir / name
            folder.mkdir()
            port = free_port()
            config = write_config(
                folder / "quota-proxy.toml", store=folder / "unused.db", port=port, store_url=url,
                upstreams=[UpstreamConf("fake", fake.base_url)],
                routes=[RouteConf("pg/x1", "fake", 1, max_output_tokens=64)],
                billing={"hold_ttl_s": HOLD_TTL_S, **billing},
            )
            gateways.append(GatewayProcess(folder, config, port, workers=2, name=f"gateway-{name}"))
        for account, quota_tokens in accounts:
            gateways[0].cli("accounts", "create", account, "--quota-tokens", str(quota_tokens))
        for gateway in gateways:
            procs.add(gateway).start()
        yield Pair(gateways[0], gateways[1], fake, url)
        for gateway in gateways:
            gateway.stop()


async def test_overspend_race_across_two_gateways(procs: ProcessSet, workdir: Path) -> None:
    checks = Checks("pg_overspend_two_gateways")
    funds = COVERED * COST
    async with two_gateways(procs, workdir, [("race", funds)]) as pair:
        key = new_key(pair.a, "race", "live", "race")
        replies: list[tuple[str, Reply]] = []
        go = anyio.Event()
        limits = httpx.Limits(max_connections=REQUESTS, max_keepalive_connections=REQUESTS)
        async with (
            httpx.AsyncClient(base_url=pair.a.url, timeout=120, limits=limits) as via_a,
            httpx.AsyncClient(base_url=pair.b.url, timeout=120, limits=limits) as via_b,
        ):

            async def one(i: int) -> None:
                await go.wait()
                client, name = (via_a, "a") if i % 2 == 0 else (via_b, "b")
                stream = i % 4 >= 2
                body = chat_body(PROMPT, model="pg/x1", stream=stream, max_tokens=8,
                                 fake={"reply_words": 8})
                replies.append((name, await send(client, "POST", "/v1/chat/completions", key=key,
                                                 body=body, stream=stream)))

            started = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for i in range(REQUESTS):
                    tg.start_soon(one, i)
                go.set()
            elapsed = time.perf_counter() - started

        statuses = Counter(r.status for _, r in replies)
        answered = [(name, r) for name, r in replies if r.status == 200]
        checks.expect("every reply is 200 or 402", set(statuses) <= {200, 402}, dict(statuses))
        for _, r in replies:
            if r.status != 200:
                checks.expect("refusals are JSON errors", error_shape_ok(r), r.body[:200])
        checks.expect("both gateways answered some", {n for n, _ in answered} == {"a", "b"})
        # At the edge the overdraft cap lowers max_tokens, so a few more than COVERED may be
        # answered with shorter replies; what may never happen is spending past the funds.
        checks.expect("the balance paid for what was answered", 0 < len(answered) <= 2 * COVERED, len(answered))
        checks.expect("nothing forwarded without a hold", pair.upstream_requests() == len(answered),
                      (pair.upstream_requests(), len(answered)))
        balance, held = (await pair.rows("SELECT balance, held FROM accounts WHERE name = 'race'"))[0]
        charged = await pair.value("SELECT coalesce(sum(charged), 0) FROM requests")
        checks.expect("charges are exact: funds - balance = sum of charges", funds - balance == charged,
                      (funds, balance, charged))
        checks.expect("never below zero", balance >= 0, balance)
        checks.expect("no hold left", held == 0 and await pair.value("SELECT count(*) FROM holds") == 0)
        settled = {r["request_id"]: r["charged"] for r in await pair.rows("SELECT request_id, charged FROM requests")}
        for _, r in answered:
            checks.expect("every answer settled once, charged", settled.get(r.request_id or "", 0) > 0,
                          r.request_id)
        charges = await pair.value("SELECT count(*) FROM ledger WHERE kind = 'charge'")
        checks.expect("one ledger entry per charge", charges == sum(1 for c in settled.values() if c > 0))
        code, data = ledger_verify(pair.a)
        checks.expect("ledger verify passes", code == 0, data)
        checks.finish({
            "requests": REQUESTS, "statuses": dict(statuses), "answered": len(answered),
            "answered_by": dict(Counter(n for n, _ in answered)), "funds": funds, "balance": balance,
            "charged": charged, "elapsed_s": round(elapsed, 2),
            "latency": latency_figures([r.elapsed_s for _, r in replies]),
        })


async def test_grants_revocation_outage_and_a_killed_gateway(procs: ProcessSet, workdir: Path) -> None:
    checks = Checks("pg_shared_state_two_gateways")
    async with two_gateways(procs, workdir, [("acme", 10_000_000)]) as pair:
        secret = new_key(pair.a, "acme", "secret", "funding")
        async with (
            httpx.AsyncClient(base_url=pair.a.url, timeout=60) as via_a,
            httpx.AsyncClient(base_url=pair.b.url, timeout=60) as via_b,
        ):
            both = (via_a, via_b)

            # 1. The same idempotency key on both gateways at once: one grant.
            grants: list[Reply] = []

            async def grant(i: int) -> None:
                grants.append(await send(
                    both[i % 2], "POST", "/v1/funding/grant", key=secret,
                    body={"external_user_id": "alice", "amount": 0.5},
                    headers={"idempotency-key": "grant-once"},
                ))

            async with anyio.create_task_group() as tg:
                for i in range(20):
                    tg.start_soon(grant, i)
            checks.expect("every grant reply is 200", all(g.status == 200 for g in grants),
                          [g.status for g in grants])
            firsts = [g for g in grants if g.status == 200 and g.json()["duplicate"] is False]
            checks.expect("exactly one grant, the rest replays", len(firsts) == 1, len(firsts))
            checks.expect("replays answer the first grant",
                          len({g.json()["ledger_id"] for g in grants if g.status == 200}) == 1)
            alice = await pair.value("SELECT balance FROM accounts WHERE name = 'alice'")
            checks.expect("alice got $0.50 once", alice == 500_000, alice)

            # 2. A key revoked in the shared store is refused by both gateways within 5 s.
            doomed = pair.a.cli_json("keys", "create", "--account", "acme", "--kind", "live")
            live = str(doomed["key"])
            body = chat_body(PROMPT, model="pg/x1", max_tokens=8)
            for client in both:
                reply = await send(client, "POST", "/v1/chat/completions", key=live, body=body)
                checks.expect("the key works on both before", reply.status == 200, reply.status)
            pair.a.cli("keys", "revoke", doomed["id"])
            revoked_at = time.monotonic()
            refused_after = {}
            for name, client in zip(("a", "b"), both, strict=True):
                while time.monotonic() - revoked_at < 10:
                    reply = await send(client, "POST", "/v1/chat/completions", key=live, body=body)
                    if reply.status == 401:
                        refused_after[name] = round(time.monotonic() - revoked_at, 2)
                        break
                    await anyio.sleep(0.1)
            checks.expect("both refuse the revoked key within 5 s",
                          len(refused_after) == 2 and max(refused_after.values()) <= 5, refused_after)

            # 3. The database goes away: fail closed (503 store_unavailable, nothing forwarded),
            #    /readyz says so, and the gateways heal by themselves when it returns.
            key = new_key(pair.a, "acme", "live", "outage")
            for client in both:  # warm the key caches: the hold, not auth, must refuse
                await send(client, "POST", "/v1/chat/completions", key=key, body=body)
            forwarded_before = pair.upstream_requests()
            database = pair.url.rpartition("/")[2]
            await allow_connections(database, False)
            outage = [await send(c, "POST", "/v1/chat/completions", key=key, body=body) for c in both * 3]
            ready = [await send(c, "GET", "/readyz") for c in both]
            checks.expect("inference fails closed with 503 store_unavailable",
                          all(r.status == 503 and r.json()["error"]["code"] == "store_unavailable"
                              for r in outage), [(r.status, r.body[:120]) for r in outage])
            checks.expect("/readyz reports the store", all(r.status == 503 for r in ready),
                          [r.status for r in ready])
            checks.expect("nothing was forwarded during the outage",
                          pair.upstream_requests() == forwarded_before)
            await allow_connections(database, True)
            healed_after = None
            started = time.monotonic()
            while time.monotonic() - started < 15:
                # several per gateway, so both workers of each are seen to heal
                replies = [await send(c, "POST", "/v1/chat/completions", key=key, body=body)
                           for c in both for _ in range(4)]
                if all(r.status == 200 for r in replies):
                    healed_after = round(time.monotonic() - started, 2)
                    break
                await anyio.sleep(0.2)
            checks.expect("both gateways heal without a restart", healed_after is not None)

            # 4. SIGKILL gateway a mid-stream; b keeps serving and releases a's hold after expiry.
            slow = chat_body(PROMPT, model="pg/x1", stream=True, max_tokens=40,
                             fake={"reply_words": 40, "chunk_delay_s": 0.5})
            balance_before = await pair.value("SELECT balance FROM accounts WHERE name = 'acme'")
            async with via_a.stream("POST", "/v1/chat/completions", json=slow, headers=auth(key)) as r:
                checks.expect("the slow stream started", r.status_code == 200, r.status_code)
                chunks = r.aiter_raw()  # not closed until the kill: closing it would hang up
                await chunks.__anext__()
                held = await pair.value("SELECT held FROM accounts WHERE name = 'acme'")
                checks.expect("the stream holds funds", held > 0, held)
                pair.a.kill()
            killed_at = time.monotonic()
            served = await send(via_b, "POST", "/v1/chat/completions", key=key, body=body)
            checks.expect("the survivor serves", served.status == 200, served.status)
            released_after = None
            while time.monotonic() - killed_at < HOLD_TTL_S + 15:
                if await pair.value("SELECT held FROM accounts WHERE name = 'acme'") == 0:
                    released_after = round(time.monotonic() - killed_at, 2)
                    break
                await anyio.sleep(0.5)
            checks.expect("the dead gateway's hold is released by the survivor", released_after is not None)
            # ...at its expiry, not before: the dead gateway last refreshed it at most one
            # keeper interval (5 s) before it died.
            checks.expect("...after it expired", (released_after or 0) >= HOLD_TTL_S - 5, released_after)
            balance_after = await pair.value("SELECT balance FROM accounts WHERE name = 'acme'")
            checks.expect("the killed stream was not charged; the survivor's request was",
                          balance_before - balance_after == COST, (balance_before, balance_after))
        code, data = ledger_verify(pair.b)
        checks.expect("ledger verify passes", code == 0, data)
        checks.finish({
            "grants": len(grants), "revocation_refused_after_s": refused_after,
            "healed_after_s": healed_after, "hold_released_after_s": released_after,
        })
