"""Scenario 5 — upstream faults (SPEC §3 errors, §4 charges).

One gateway process (`serve --workers 1`, so one event loop and one fd table to watch) in
front of two fake upstream processes: a healthy one, and a faulty one steered per request
through the fake's `fail` modes, plus a route to a closed port. For each fault, callers
keep hitting it for a while, and a steady stream of healthy requests runs alongside:

* the faulty caller gets the SPEC error, or the partial stream ending with a final SSE
  error event;
* the charge follows SPEC §4: nothing for an upstream error that produced no tokens,
  an `estimated` charge for what was delivered when a stream is cut short, the reported
  usage (capped at the max_tokens the gateway sent) otherwise;
* the healthy callers are not slowed (no head-of-line blocking);
* no file descriptor or connection is leaked (counted in /proc before and after).
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests.stress.harness import (
    FULL,
    Checks,
    FakeUpstreamProcess,
    ProcessSet,
    Reply,
    RouteConf,
    UpstreamConf,
    chat_body,
    error_shape_ok,
    free_port,
    latency_figures,
    ledger_verify,
    new_key,
    query,
    scale,
    send,
    start_gateway,
)

pytestmark = pytest.mark.anyio

WINDOW_S = 5.0 if FULL else 1.0  # how long each fault is kept up
FAULT_CALLERS = scale(3, 8)  # concurrent callers hitting the fault
HEALTHY_CALLERS = 4
UPSTREAM_TIMEOUT_S = 2  # the faulty upstream's timeout_s: a stall ends after this
MAX_TOKENS = 16
MULT = 3  # the faulty route's multiplier
FD_SLACK = 10  # pooled keep-alive connections may come and go
SETTLED_WITHIN_S = 2.0  # how long after its answer a settlement may take to show


@dataclass
class Fault:
    name: str
    variants: list[tuple[str, bool, dict[str, Any] | None]]  # (route, stream, fake)
    expect: str  # error | partial | complete | huge | passthrough | relayed
    status: int = 200
    code: str | None = None
    replies: list[tuple[Reply, bool]] = field(default_factory=list)


FAULTS = [
    Fault("connection_refused", [("stress/down", False, None), ("stress/down", True, None)],
          "error", 502, "upstream_error"),
    Fault("reset_mid_stream", [("stress/faulty", True, {"fail": "reset_mid_stream"})],
          "partial", code="upstream_error"),
    Fault("reset_mid_body", [("stress/faulty", False, {"fail": "reset_mid_stream"})],
          "error", 502, "upstream_error"),
    Fault("stalled_after_headers_stream", [("stress/faulty", True, {"fail": "stall_after_headers"})],
          "partial", code="upstream_timeout"),
    Fault("stalled_after_headers_whole", [("stress/faulty", False, {"fail": "stall_after_headers"})],
          "error", 504, "upstream_timeout"),
    Fault("slow_drip", [("stress/faulty", True, {"chunk_delay_s": 0.3, "reply_words": 5}),
                        ("stress/faulty", False, {"first_byte_delay_s": 1.2})], "complete"),
    Fault("malformed_sse", [("stress/faulty", True, {"fail": "malformed_sse"})], "relayed"),
    Fault("sse_answer_to_non_streaming_request", [("stress/faulty", False, {"fail": "malformed_sse"})],
          "error", 502, "upstream_error"),
    Fault("invalid_json", [("stress/faulty", False, {"fail": "malformed"}), ("stress/faulty", False, {"fail": "empty"})],
          "error", 502, "upstream_error"),
    Fault("huge_response", [("stress/faulty", False, {"fail": "huge"})], "huge"),
    Fault("429_retry_after", [("stress/faulty", False, {"fail": "status:429"}),
                              ("stress/faulty", True, {"fail": "status:429"})], "passthrough", 429),
    Fault("500", [("stress/faulty", False, {"fail": "status:500"}), ("stress/faulty", True, {"fail": "status:500"})],
          "error", 502, "upstream_error"),
]


def charge_of(input_tokens: int, output_tokens: int) -> int:
    return math.ceil((input_tokens + min(output_tokens, MAX_TOKENS)) * MULT)


async def test_upstream_faults(procs: ProcessSet, workdir: Path) -> None:
    checks = Checks("5_upstream_faults")
    healthy = procs.add(FakeUpstreamProcess(workdir, "healthy")).start()
    faulty = procs.add(FakeUpstreamProcess(workdir, "faulty")).start()
    gateway = start_gateway(
        procs, workdir, workers=1,
        upstreams=[UpstreamConf("healthy", healthy.base_url),
                   UpstreamConf("faulty", faulty.base_url, timeout_s=UPSTREAM_TIMEOUT_S),
                   UpstreamConf("down", f"http://127.0.0.1:{free_port()}/v1")],
        routes=[RouteConf("stress/healthy", "healthy", 1), RouteConf("stress/faulty", "faulty", MULT),
                RouteConf("stress/down", "down", 1)],
        accounts=[("faults", 10**9)],
    )
    key = new_key(gateway, "faults", "live")
    db = gateway.workdir / "quota.db"
    healthy_body = chat_body("healthy caller", model="stress/healthy")

    async def healthy_load(client: httpx.AsyncClient, seconds: float) -> list[Reply]:
        out: list[Reply] = []
        end = time.monotonic() + seconds

        async def caller() -> None:
            while time.monotonic() < end:
                out.append(await send(client, "POST", "/v1/chat/completions", key=key, body=healthy_body))

        async with anyio.create_task_group() as tg:
            for _ in range(HEALTHY_CALLERS):
                tg.start_soon(caller)
        return out

    figures: dict[str, Any] = {"window_s": WINDOW_S, "fault_callers": FAULT_CALLERS,
                               "healthy_callers": HEALTHY_CALLERS, "faults": {}}
    with anyio.fail_after(600):
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as client:
            # Warm up both pools (client->gateway, gateway->upstreams), then count.
            await healthy_load(client, 0.5)
            for _ in range(FAULT_CALLERS):
                await send(client, "POST", "/v1/chat/completions", key=key,
                           body=chat_body("warm", model="stress/faulty", max_tokens=MAX_TOKENS))
            baseline = await healthy_load(client, max(WINDOW_S, 1.5))
            base = latency_figures([r.elapsed_s for r in baseline])
            figures["healthy_baseline"] = base
        await anyio.sleep(0.5)
        fds_before = gateway.fds()
        rss_before = gateway.rss()

        for fault in FAULTS:
            async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as client:
                healthy_replies: list[Reply] = []
                end = time.monotonic() + WINDOW_S

                async def fault_caller(n: int, fault: Fault = fault, end: float = end) -> None:
                    i = n
                    while True:
                        route, stream, fake = fault.variants[i % len(fault.variants)]
                        body = chat_body(f"fault {fault.name} {i}", model=route, stream=stream,
                                         max_tokens=MAX_TOKENS, fake=fake)
                        fault.replies.append((await send(client, "POST", "/v1/chat/completions", key=key,
                                                         body=body, stream=stream), stream))
                        i += FAULT_CALLERS
                        if time.monotonic() >= end:
                            return

                async def healthy_window() -> None:
                    # Runs inside this iteration's task group, so it sees this iteration's list.
                    healthy_replies.extend(await healthy_load(client, WINDOW_S))  # noqa: B023

                started = time.monotonic()
                async with anyio.create_task_group() as tg:
                    for n in range(FAULT_CALLERS):
                        tg.start_soon(fault_caller, n)
                    tg.start_soon(healthy_window)
                took = time.monotonic() - started
            during = latency_figures([r.elapsed_s for r in healthy_replies])
            bad_healthy = [r for r in healthy_replies if r.status != 200]
            checks.expect(f"{fault.name}: healthy callers all served", not bad_healthy,
                          [(r.status, r.error) for r in bad_healthy[:3]])
            checks.expect(f"{fault.name}: healthy callers not slowed (p50 < 5x baseline + 10 ms, < 200 ms)",
                          during.get("p50_ms", 1e9) < min(5 * base["p50_ms"] + 10, 200), (during, base))
            verdicts = [_verify(fault, reply, stream, db, checks) for reply, stream in fault.replies]
            figures["faults"][fault.name] = {
                "injected": len(fault.replies),
                "answers": dict(Counter(v for v in verdicts)),
                "charged_quota_tokens": sorted({c for c in (_charged(db, r) for r, _ in fault.replies)
                                                if c is not None}),
                "window_s": round(took, 2),
                "healthy_during": during,
            }

        await anyio.sleep(1.0)  # let closed connections finish closing
        fds_after = gateway.fds()
        rss_after = gateway.rss()
    checks.expect("no fd leak (gateway fds after <= before + slack)", fds_after <= fds_before + FD_SLACK,
                  (fds_before, fds_after))
    holds = query(db, "SELECT count(*) FROM holds")[0][0]
    checks.expect("no open holds after the faults", holds == 0, holds)
    code, verify = ledger_verify(gateway)
    checks.expect("quota-proxy ledger verify exits 0", code == 0, verify)
    figures.update({
        "faults_injected": sum(len(f.replies) for f in FAULTS),
        "fds_before": fds_before, "fds_after": fds_after,
        "rss_mb_before": round(rss_before / 2**20, 1), "rss_mb_after": round(rss_after / 2**20, 1),
        "ledger_verify": verify,
    })
    checks.finish(figures)


def _charged(db: Path, reply: Reply) -> int | None:
    rows = query(db, "SELECT charged FROM requests WHERE request_id = ?", (reply.request_id,))
    return rows[0][0] if rows else None


def _verify(fault: Fault, reply: Reply, stream: bool, db: Path, checks: Checks) -> str:
    """Check one faulty exchange against the SPEC; returns a short verdict for the figures."""
    name = fault.name
    if reply.status == 0:
        checks.expect(f"{name}: the caller gets an answer, not a dropped connection", False, reply.error)
        return f"transport error {reply.error}"
    # The settlement commits just after the answer's last byte (journaled before it): a
    # reader in another process may look a moment too soon, so it looks again, briefly.
    deadline = time.monotonic() + SETTLED_WITHIN_S
    while True:
        rows = query(db, "SELECT input_tokens, output_tokens, charged, estimated, outcome FROM requests "
                         "WHERE request_id = ?", (reply.request_id,))
        if rows or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    ledger = query(db, "SELECT count(*), coalesce(-sum(amount), 0) FROM ledger WHERE request_id = ?",
                   (reply.request_id,))[0]
    checks.expect(f"{name}: settled exactly once", len(rows) == 1, (reply.request_id, rows))
    if not rows:
        return f"{reply.status} unsettled"
    input_tokens, output_tokens, charged, estimated, outcome = rows[0]
    checks.expect(f"{name}: ledger matches the requests row",
                  ledger == ((1, charged) if charged else (0, 0)), (ledger, charged))
    kind = fault.expect
    if kind in ("error", "passthrough"):
        checks.expect(f"{name}: status {fault.status}", reply.status == fault.status,
                      (reply.status, reply.body[:200]))
        if kind == "error":
            checks.expect(f"{name}: SPEC error body ({fault.code})",
                          error_shape_ok(reply) and reply.json()["error"]["code"] == fault.code, reply.body[:200])
        else:
            checks.expect(f"{name}: Retry-After passed through", reply.headers.get("retry-after") == "1",
                          reply.headers)
            checks.expect(f"{name}: the upstream's JSON error passed through",
                          reply.headers.get("content-type", "").startswith("application/json")
                          and isinstance(reply.json().get("error"), dict), reply.body[:200])
        checks.expect(f"{name}: an upstream error that produced nothing charges nothing", charged == 0, rows[0])
        return f"{reply.status} charged {charged}"
    checks.expect(f"{name}: status 200", reply.status == 200, (reply.status, reply.body[:200]))
    if kind == "partial":
        events = reply.events()
        last = _json(events[-1]) if events else None
        checks.expect(f"{name}: the partial stream ends with a final SSE error event ({fault.code})",
                      isinstance(last, dict) and isinstance(last.get("error"), dict)
                      and last["error"].get("code") == fault.code, events[-2:])
        # A cut stream that delivered tokens is charged an estimate; one that delivered none is
        # charged nothing, with nothing to estimate.
        checks.expect(f"{name}: the cut stream is charged as estimated (when it delivered tokens)",
                      estimated == 1 or output_tokens == 0, rows[0])
        expected = charge_of(input_tokens, output_tokens) if output_tokens > 0 else 0
        checks.expect(f"{name}: charge = delivered estimate; nothing when no token was produced (SPEC §4)",
                      charged == expected, rows[0])
        return f"200 partial+error, charged {charged}"
    if kind == "complete":
        if stream:
            checks.expect(f"{name}: the slow stream completes", reply.events()[-1:] == ["[DONE]"], reply.body[-100:])
        checks.expect(f"{name}: charged the reported usage", estimated == 0 and outcome == "ok"
                      and charged == charge_of(input_tokens, output_tokens) > 0, rows[0])
        return f"200 complete, charged {charged}"
    if kind == "relayed":
        events = reply.events()
        ends = events[-1:] == ["[DONE]"] or isinstance((_json(events[-1]) or {}).get("error"), dict)
        checks.expect(f"{name}: the stream ends ([DONE] or a final error event)", ends, events[-2:])
        checks.expect(f"{name}: charged an estimate of what was delivered",
                      estimated == 1 and charged == charge_of(input_tokens, output_tokens), rows[0])
        return f"200 relayed, charged {charged}"
    # huge
    usage = reply.json().get("usage", {})
    checks.expect(f"{name}: usage passed on", usage.get("output_tokens") == output_tokens > MAX_TOKENS, usage)
    checks.expect(f"{name}: output past the max_tokens sent is not billed",
                  charged == charge_of(input_tokens, MAX_TOKENS) == usage.get("charged_quota_tokens"), rows[0])
    return f"200 huge ({len(reply.body)} bytes), charged {charged}"


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None
