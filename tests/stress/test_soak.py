"""Scenario 8 — soak (full form only: `QUOTA_STRESS=full`).

Ten minutes of mixed load on `serve --workers 2` — completions streamed and not, user-billed
completions, grants with Idempotency-Keys, balance reads, refusals (402, 404), upstream
errors and callers who hang up mid-stream — while the gateway's RSS and open fds (all its
processes) are sampled every 10 s. After the warm-up both curves must stay flat, and the
books must reconcile at the end. `QUOTA_STRESS_SOAK_S=N` runs a shorter soak in any form.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import anyio
import httpx
import pytest

from tests.stress.harness import (
    FULL,
    Checks,
    FakeUpstreamProcess,
    ProcessSet,
    RouteConf,
    UpstreamConf,
    auth,
    chat_body,
    ledger_verify,
    new_key,
    query,
    send,
    start_gateway,
)

pytestmark = pytest.mark.anyio

SOAK_S = float(os.environ.get("QUOTA_STRESS_SOAK_S") or 600)
SAMPLE_EVERY_S = 10.0
CALLERS = 8
WARMUP_S = min(60.0, SOAK_S / 5)
RSS_GROWTH_LIMIT = 32 * 2**20  # after warm-up, for the whole process group
FD_SPREAD_LIMIT = 24  # max - min open fds after warm-up (pooled keep-alive connections come and go)


@pytest.mark.skipif(not FULL and not os.environ.get("QUOTA_STRESS_SOAK_S"),
                    reason="soak runs in the full form only (QUOTA_STRESS=full)")
async def test_soak(procs: ProcessSet, workdir: Path) -> None:
    checks = Checks("8_soak")
    fake = procs.add(FakeUpstreamProcess(workdir)).start()
    gateway = start_gateway(procs, workdir, workers=2, upstreams=[UpstreamConf("fake", fake.base_url)],
                            routes=[RouteConf("stress/x1", "fake", 1), RouteConf("stress/x3", "fake", 3)],
                            accounts=[("soak", 10**12), ("broke", 1)])
    live = new_key(gateway, "soak", "live")
    secret = new_key(gateway, "soak", "secret")
    broke = new_key(gateway, "broke", "live")
    gateway.cli("grant", "--account", "soak", "--user", "soak-user", "--usd", "100000")
    db = gateway.workdir / "quota.db"

    statuses: Counter[str] = Counter()
    samples: list[dict[str, float]] = []
    started = time.monotonic()
    end = started + SOAK_S

    async def caller(n: int, client: httpx.AsyncClient) -> None:
        i = n
        while time.monotonic() < end:
            kind = i % 10
            model = "stress/x1" if i % 3 else "stress/x3"
            if kind == 0:
                r = await send(client, "POST", "/v1/chat/completions", key=live, body=chat_body(f"soak {i}", model=model))
            elif kind == 1:
                r = await send(client, "POST", "/v1/chat/completions", key=live, stream=True,
                               body=chat_body(f"soak {i}", model=model, stream=True, include_usage=i % 2 == 0))
            elif kind == 2:
                r = await send(client, "POST", "/v1/users/soak-user/chat/completions", key=secret, stream=i % 2 == 0,
                               body=chat_body(f"soak {i}", model=model, stream=i % 2 == 0))
            elif kind == 3:
                r = await send(client, "POST", "/v1/funding/grant", key=secret,
                               body={"external_user_id": f"soak-u{i % 50}", "amount": 0.01},
                               headers={"idempotency-key": f"soak-{i // 3}"})
            elif kind == 4:
                r = await send(client, "GET", "/v1/balance", key=live)
            elif kind == 5:
                r = await send(client, "POST", "/v1/chat/completions", key=broke, body=chat_body("x", model=model))
            elif kind == 6:
                r = await send(client, "POST", "/v1/chat/completions", key=live, body=chat_body("x", model="nope/none"))
            elif kind == 7:
                r = await send(client, "POST", "/v1/chat/completions", key=live,
                               body=chat_body("x", model=model, fake={"fail": "status:500"}))
            elif kind == 8:
                # A caller who hangs up after the first chunk of a slow stream.
                body = chat_body("leave early", model=model, stream=True, fake={"chunk_delay_s": 0.05, "reply_words": 40})
                try:
                    async with client.stream("POST", "/v1/chat/completions", json=body, headers=auth(live)) as resp:
                        async for _ in resp.aiter_raw():
                            break
                    statuses["hung up"] += 1
                except httpx.HTTPError as exc:
                    statuses[type(exc).__name__] += 1
                i += CALLERS
                continue
            else:
                r = await send(client, "GET", "/v1/me", key=secret)
            statuses[str(r.status) if r.status else (r.error or "?").split(":")[0]] += 1
            i += CALLERS

    async def sampler() -> None:
        while time.monotonic() < end:
            samples.append({"t_s": round(time.monotonic() - started, 1), "rss_mb": round(gateway.rss() / 2**20, 2),
                            "fds": gateway.fds(), "requests": sum(statuses.values())})
            await anyio.sleep(SAMPLE_EVERY_S)

    with anyio.fail_after(SOAK_S + 120):
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as client, anyio.create_task_group() as tg:
            tg.start_soon(sampler)
            for n in range(CALLERS):
                tg.start_soon(caller, n, client)
    await anyio.sleep(2)
    samples.append({"t_s": round(time.monotonic() - started, 1), "rss_mb": round(gateway.rss() / 2**20, 2),
                    "fds": gateway.fds(), "requests": sum(statuses.values())})

    steady = [s for s in samples if s["t_s"] >= WARMUP_S] or samples
    rss_growth = (max(s["rss_mb"] for s in steady[len(steady) // 2:]) - steady[0]["rss_mb"]) * 2**20
    fd_spread = max(s["fds"] for s in steady) - min(s["fds"] for s in steady)
    checks.expect("RSS flat after warm-up (growth < 32 MiB)", rss_growth < RSS_GROWTH_LIMIT, round(rss_growth / 2**20, 1))
    checks.expect("open fds flat after warm-up (spread <= 24)", fd_spread <= FD_SPREAD_LIMIT, fd_spread)
    checks.expect("no gateway 5xx other than the injected upstream 500 -> 502",
                  all(not k.startswith("5") or k == "502" for k in statuses), dict(statuses))
    checks.expect("no transport errors", all(k[0].isdigit() or k == "hung up" for k in statuses), dict(statuses))
    holds = query(db, "SELECT count(*) FROM holds")[0][0]
    checks.expect("no open holds at the end", holds == 0, holds)
    code, verify = ledger_verify(gateway)
    checks.expect("quota-proxy ledger verify exits 0", code == 0, verify)
    checks.finish({
        "duration_s": SOAK_S,
        "callers": CALLERS,
        "requests": sum(statuses.values()),
        "statuses": dict(statuses),
        "rss_growth_after_warmup_mb": round(rss_growth / 2**20, 2),
        "fd_spread_after_warmup": fd_spread,
        "curve": samples,
        "ledger_verify": verify,
    })
