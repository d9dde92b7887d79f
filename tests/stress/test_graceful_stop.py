"""Scenario 4 — graceful stop.

SIGTERM to `serve --workers 2` (the supervisor's pid, as `kill PID` or a service manager
sends it) while streams are in flight: the gateway stops taking new requests, lets every
in-flight stream finish (uvicorn's graceful shutdown, `timeout_graceful_shutdown = 30`),
settles each one, and exits with nothing held.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections import Counter
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

STREAMS = scale(30, 100)
GRACE_S = 30  # [server] graceful_timeout_s (default 30): uvicorn's timeout_graceful_shutdown
SIGNAL_LATENCY_S = 1.0
STREAM = {"chunk_delay_s": 0.25, "reply_words": 12}  # ~3 s per stream


def tcp_probe(port: int) -> str:
    """What a brand-new connection meets: refused, or accepted (by the kernel's backlog)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return "connected"
    except ConnectionRefusedError:
        return "refused"
    except OSError as exc:
        return type(exc).__name__


async def test_sigterm_lets_streams_finish(procs: ProcessSet, workdir: Path) -> None:
    checks = Checks("4_graceful_stop")
    fake = procs.add(FakeUpstreamProcess(workdir)).start()
    gateway = start_gateway(procs, workdir, workers=2, upstreams=[UpstreamConf("fake", fake.base_url)],
                            routes=[RouteConf("stress/x1", "fake", 1)], accounts=[("stop", 10_000_000)])
    key = new_key(gateway, "stop", "live")
    db = gateway.workdir / "quota.db"
    body = chat_body("please finish this stream", model="stress/x1", stream=True, include_usage=True, fake=STREAM)

    replies: list[Reply] = []
    headers_seen = 0
    probes: list[str] = []
    tcp_probes: list[str] = []
    limits = httpx.Limits(max_connections=STREAMS + 10)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=60, limits=limits) as client:

        async def stream_one() -> None:
            nonlocal headers_seen
            started = time.perf_counter()
            try:
                async with client.stream("POST", "/v1/chat/completions", json=body, headers=auth(key)) as resp:
                    headers_seen += 1
                    data = b"".join([c async for c in resp.aiter_raw()])
                    replies.append(Reply(resp.status_code, resp.headers.get("x-quota-request-id"), data,
                                         time.perf_counter() - started))
            except httpx.HTTPError as exc:
                replies.append(Reply(0, None, b"", time.perf_counter() - started, error=type(exc).__name__))

        with anyio.fail_after(GRACE_S + 30):
            async with anyio.create_task_group() as tg:
                for _ in range(STREAMS):
                    tg.start_soon(stream_one)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    if headers_seen >= STREAMS and query(db, "SELECT count(*) FROM holds")[0][0] >= STREAMS:
                        break
                    await anyio.sleep(0.05)
                in_flight = headers_seen
                stop_sent = time.monotonic()
                os.kill(gateway.pid, signal.SIGTERM)
                # uvicorn's supervisor polls for the signal every 0.5 s and a worker's main loop
                # every 0.1 s; requests that arrive after that must not be served.
                await anyio.sleep(SIGNAL_LATENCY_S)
                # New requests while draining: none may be served.
                async with httpx.AsyncClient(base_url=gateway.url, timeout=2) as fresh:
                    for _ in range(3):
                        r = await send(fresh, "POST", "/v1/chat/completions", key=key,
                                       body=chat_body("too late", model="stress/x1"))
                        probes.append(r.error.split(":")[0] if r.error else str(r.status))
                        tcp_probes.append(await anyio.to_thread.run_sync(tcp_probe, gateway.port))
        exit_code = await anyio.to_thread.run_sync(gateway.wait, GRACE_S + 15)
        exited_after_s = time.monotonic() - stop_sent

    checks.expect("all streams were in flight at SIGTERM", in_flight == STREAMS, in_flight)
    checks.expect(f"no new request is served while draining (sent {SIGNAL_LATENCY_S} s after SIGTERM)",
                  all(p != "200" for p in probes), probes)
    checks.expect("the gateway exits within the grace period", exit_code is not None and exited_after_s < GRACE_S + 5,
                  (exit_code, exited_after_s))
    checks.expect("it exits cleanly (status 0)", exit_code == 0, exit_code)
    for r in replies:
        events = r.events()
        checks.expect("every in-flight stream finishes: 200 ... [DONE]", r.status == 200 and events[-1:] == ["[DONE]"],
                      (r.status, r.error, events[-2:]))
        checks.expect("no stream ends with an error event", not any('"error"' in e for e in events), events[-2:])
    ids = [r.request_id for r in replies if r.request_id]
    rows = query(db, "SELECT request_id, outcome, charged FROM requests WHERE request_id IN "
                 f"({','.join('?' * len(ids))})", ids) if ids else []
    checks.expect("every stream is settled (one requests row each, outcome ok, charged)",
                  len(rows) == STREAMS and all(o == "ok" and c > 0 for _, o, c in rows), (len(rows), STREAMS))
    holds = query(db, "SELECT count(*) FROM holds")[0][0]
    held = query(db, "SELECT coalesce(sum(held), 0) FROM accounts")[0][0]
    checks.expect("no open holds after the stop", holds == 0 and held == 0, (holds, held))
    code, verify = ledger_verify(gateway)
    checks.expect("quota-proxy ledger verify exits 0", code == 0, verify)
    checks.finish({
        "streams_in_flight": in_flight,
        "stream_seconds_each": STREAM["chunk_delay_s"] * STREAM["reply_words"],
        "streams_finished_ok": sum(1 for r in replies if r.status == 200 and r.events()[-1:] == ["[DONE]"]),
        "settled_rows": len(rows),
        "new_requests_while_draining": probes,
        "new_tcp_connections_while_draining": tcp_probes,
        "exit_code": exit_code,
        "exited_after_sigterm_s": round(exited_after_s, 2),
        "stream_outcomes": dict(Counter(r.error or r.status for r in replies)),
        "open_holds_after": holds,
        "ledger_verify": verify,
    })
