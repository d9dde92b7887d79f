"""Scenario 6b/6c — hostile input: oversized requests, slow and idle clients (the fuzzing
is in test_fuzz.py).

* Oversized bodies (with and without Content-Length), oversized and numerous headers,
  pathological JSON.
* Slow clients (slowloris) and many idle connections: /healthz still answers promptly, and
  the gateway's memory and fds are measured before, during and after.
"""

from __future__ import annotations

import json
import resource
import socket
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests.stress.harness import (
    Checks,
    FakeUpstreamProcess,
    GatewayProcess,
    ProcessSet,
    RouteConf,
    UpstreamConf,
    books,
    latency_figures,
    ledger_verify,
    new_key,
    query,
    scale,
    start_gateway,
)

# Just over the 1,024 open files a gateway gets by default from a login shell or a systemd
# unit (LimitNOFILE soft limit), so that the reduced form too shows whether idle
# connections can exhaust it.
IDLE_CONNECTIONS = scale(1100, 2000)
DEFAULT_NOFILE = 1024
SLOW_CLIENTS = scale(100, 500)
MAX_BODY = 1_048_576
ALIASES = ["stress/x1", "stress/nostream", "stress/half"]


def start(procs: ProcessSet, workdir: Path, nofile: int | None = None) -> tuple[GatewayProcess, dict[str, str]]:
    fake = procs.add(FakeUpstreamProcess(workdir)).start()
    gateway = start_gateway(
        procs, workdir, workers=1, upstreams=[UpstreamConf("fake", fake.base_url, timeout_s=10)],
        routes=[RouteConf("stress/x1", "fake", 1), RouteConf("stress/nostream", "fake", 2, stream=False),
                RouteConf("stress/half", "fake", 0.5)],
        server={"max_body_bytes": MAX_BODY}, accounts=[("fuzz", 10**13)], nofile=nofile,
    )
    keys = {"live": new_key(gateway, "fuzz", "live"), "secret": new_key(gateway, "fuzz", "secret")}
    gateway.cli("grant", "--account", "fuzz", "--user", "known-user", "--usd", "1000")
    return gateway, keys


def money(db: Path) -> tuple[Any, ...]:
    """books() without the requests count: an upstream-refused request is recorded, charged 0."""
    ledger, accounts, _requests, holds, idem, keys = books(db)
    return ledger, accounts, holds, idem, keys


# -- oversized and pathological requests ----------------------------------------------


def test_oversized_requests(procs: ProcessSet, workdir: Path) -> None:
    checks = Checks("6b_hostile_input_oversized")
    gateway, keys = start(procs, workdir)
    db = gateway.workdir / "quota.db"
    secret = {"authorization": f"Bearer {keys['secret']}"}
    big = b'{"model": "stress/x1", "messages": [{"role": "user", "content": "' + b"a" * (2 * MAX_BODY) + b'"}]}'
    cases: list[tuple[str, str, str, dict[str, str], Any, tuple[int, ...]]] = [
        ("body over max_body_bytes (Content-Length)", "POST", "/v1/chat/completions", secret, big, (413,)),
        ("body over max_body_bytes (chunked)", "POST", "/v1/chat/completions", secret,
         (big[i:i + 65536] for i in range(0, len(big), 65536)), (413,)),
        ("grant body over max_body_bytes", "POST", "/v1/funding/grant", secret, big, (413,)),
        ("user completion over max_body_bytes", "POST", "/v1/users/known-user/chat/completions", secret, big, (413,)),
        ("PATCH body over max_body_bytes", "PATCH", "/v1/users/known-user", secret, big, (413,)),
        ("deeply nested JSON (inference)", "POST", "/v1/chat/completions", secret, b"[" * 200_000, (400,)),
        ("deeply nested JSON (grant)", "POST", "/v1/funding/grant", secret, b'{"a":' * 100_000, (400,)),
        ("64 KiB header", "GET", "/v1/balance", {**secret, "x-junk": "j" * 65536}, None, (200, 400, 431)),
        ("1 MiB header", "GET", "/v1/balance", {**secret, "x-junk": "j" * MAX_BODY}, None, (200, 400, 431)),
        ("300 headers", "GET", "/v1/balance", {**secret, **{f"x-h{i}": "v" * 100 for i in range(300)}}, None,
         (200, 400, 431)),
        ("64 KiB key", "GET", "/v1/balance", {"authorization": "Bearer " + "q" * 65536}, None, (401,)),
        ("60 KB path", "GET", "/v1/users/" + "a" * 60_000 + "/balance", secret, None, (400, 404, 414)),
        ("60 KB query", "GET", "/v1/balance?external_user_id=" + "a" * 60_000, secret, None, (400, 414)),
    ]
    outcomes = {}
    rss_before = gateway.rss()
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        for name, method, path, headers, content, allowed in cases:
            before = money(db)
            try:
                resp = client.request(method, path, headers=headers, content=content)
                status, body = resp.status_code, resp.text
                ctype, rid = resp.headers.get("content-type", ""), resp.headers.get("x-quota-request-id")
            except httpx.HTTPError as exc:  # the server may drop a request it will not read
                status, body, ctype, rid = 0, type(exc).__name__, "", None
            outcomes[name] = f"{status} {'app' if rid else 'server'} {ctype.split(';')[0]}" if status else body
            checks.expect(f"{name}: answered {allowed}", status in allowed, (status, body[:200]))
            checks.expect(f"{name}: no traceback, no HTML", "Traceback" not in body and "<html" not in body.lower(),
                          body[:200])
            if status >= 400 and (rid or status not in (400, 414, 431)):
                # The app's own refusals are SPEC JSON; uvicorn's protocol-level 400/414/431 carry no request id.
                checks.expect(f"{name}: SPEC JSON error", ctype.startswith("application/json")
                              and isinstance(json.loads(body).get("error"), dict), (status, ctype, body[:200]))
            checks.expect(f"{name}: books unchanged", money(db) == before)
        t = time.perf_counter()
        health = client.get("/healthz")
        health_ms = (time.perf_counter() - t) * 1000
    checks.expect("/healthz still answers promptly", health.status_code == 200 and health_ms < 500, health_ms)
    rss_after = gateway.rss()
    checks.expect("memory stays bounded after oversized requests (RSS growth < 64 MiB)",
                  rss_after - rss_before < 64 * 2**20, (rss_before, rss_after))
    checks.finish({"cases": outcomes, "max_body_bytes": MAX_BODY, "healthz_ms": round(health_ms, 2),
                   "rss_mb_before": round(rss_before / 2**20, 1), "rss_mb_after": round(rss_after / 2**20, 1)})


# -- slow clients and idle connections ------------------------------------------------


async def probe_health(url: str, n: int) -> dict[str, Any]:
    """n fresh-connection /healthz calls (2 s timeout each): latency figures and failures."""
    ok, failed = [], []
    for _ in range(n):
        async with httpx.AsyncClient(base_url=url, timeout=2) as c:
            t = time.perf_counter()
            try:
                r = await c.get("/healthz")
                if r.status_code == 200:
                    ok.append(time.perf_counter() - t)
                else:
                    failed.append(str(r.status_code))
            except httpx.HTTPError as exc:
                failed.append(type(exc).__name__)
        await anyio.sleep(0.05)
    return {**latency_figures(ok), "failed": failed}


def prompt(figures: dict[str, Any]) -> bool:
    return not figures["failed"] and figures.get("p50_ms", 1e9) < 100 and figures.get("max_ms", 1e9) < 1000


@pytest.mark.anyio
async def test_slow_and_idle_clients(procs: ProcessSet, workdir: Path) -> None:
    checks = Checks("6c_hostile_input_slow_idle")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = IDLE_CONNECTIONS + SLOW_CLIENTS + 200
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    gateway, keys = start(procs, workdir, nofile=DEFAULT_NOFILE)
    figures: dict[str, Any] = {"idle_connections": IDLE_CONNECTIONS, "slow_clients": SLOW_CLIENTS,
                               "gateway_fd_limit": _fd_limit(gateway.pid)}
    await anyio.sleep(0.5)
    base_fds, base_rss = gateway.fds(), gateway.rss()
    baseline = await probe_health(gateway.url, 10)

    # 1. Idle connections: connect, send nothing.
    idle: list[socket.socket] = []
    try:
        for _ in range(IDLE_CONNECTIONS):
            s = socket.create_connection(("127.0.0.1", gateway.port), timeout=5)
            idle.append(s)
        await anyio.sleep(1.0)
        during = await probe_health(gateway.url, 10)
        fds_idle, rss_idle = gateway.fds(), gateway.rss()
        async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as c:
            try:
                r = await c.post("/v1/chat/completions", headers={"authorization": f"Bearer {keys['live']}"},
                                 json={"model": "stress/x1", "messages": [{"role": "user", "content": "still there?"}]})
                completion = str(r.status_code)
            except httpx.HTTPError as exc:
                completion = type(exc).__name__
        checks.expect("a completion is served with the idle connections open", completion == "200", completion)
        await anyio.sleep(6)  # past uvicorn's keep-alive timeout (5 s)
        still_open = sum(1 for s in idle if _open(s))
    finally:
        for s in idle:
            s.close()
    checks.expect("/healthz answers promptly with idle connections open (p50 < 100 ms, max < 1 s)",
                  prompt(during), during)
    checks.expect("memory bounded with idle connections (RSS growth < 100 MiB)", rss_idle - base_rss < 100 * 2**20,
                  (base_rss, rss_idle))
    figures["idle"] = {"healthz_baseline": baseline, "healthz_during": during,
                       "gateway_fds_during": fds_idle, "rss_mb_before": round(base_rss / 2**20, 1),
                       "rss_mb_during": round(rss_idle / 2**20, 1),
                       "still_open_after_6s": still_open, "completion_during": completion}

    # 2. Slowloris: request headers one byte at a time, forever.
    async def slow_client(stop: anyio.Event) -> None:
        request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                   + keys["live"].encode() + b"\r\nX-Slow: " + b"s" * 10_000)
        try:
            async with await anyio.connect_tcp("127.0.0.1", gateway.port) as stream:
                for i in range(len(request)):
                    if stop.is_set():
                        return
                    await stream.send(request[i:i + 1])
                    await anyio.sleep(0.2)
        except OSError:
            return  # the server closed us: fine

    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        for _ in range(SLOW_CLIENTS):
            tg.start_soon(slow_client, stop)
        await anyio.sleep(2.0)
        slow_during = await probe_health(gateway.url, 10)
        fds_slow, rss_slow = gateway.fds(), gateway.rss()
        stop.set()
    checks.expect("/healthz answers promptly during slowloris (p50 < 100 ms, max < 1 s)", prompt(slow_during),
                  slow_during)
    figures["slowloris"] = {"healthz_during": slow_during, "gateway_fds_during": fds_slow,
                            "rss_mb_during": round(rss_slow / 2**20, 1)}

    await anyio.sleep(1.5)
    end_fds, end_rss = gateway.fds(), gateway.rss()
    checks.expect("fds return to baseline once the clients leave", end_fds <= base_fds + 10, (base_fds, end_fds))
    code, verify = ledger_verify(gateway)
    checks.expect("quota-proxy ledger verify exits 0", code == 0, verify)
    figures.update({"fds_before": base_fds, "fds_after": end_fds, "rss_mb_after": round(end_rss / 2**20, 1),
                    "open_holds_after": query(gateway.workdir / "quota.db", "SELECT count(*) FROM holds")[0][0]})
    checks.finish(figures)


def _open(s: socket.socket) -> bool:
    """Whether the server still holds this connection open (no EOF or reset)."""
    s.setblocking(False)
    try:
        return s.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def _fd_limit(pid: int) -> str:
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return " ".join(line.split()[3:5])
    except OSError:
        pass
    return "?"

