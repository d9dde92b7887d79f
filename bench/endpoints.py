"""Every inference endpoint, side by side, in one run: what the gateway adds to each.

    python bench/endpoints.py                    # 2 rounds x 4 s per run, SQLite (~8 min)
    python bench/endpoints.py --quick            # smoke run: 1 round x 1 s, same checks
    python bench/endpoints.py --store postgres   # the gateway on PostgreSQL (or --store both)

Run it at `nice -n 10` on a shared machine. Scenarios, each streamed and not, at
concurrency 1 and 32:

  chat              POST /v1/chat/completions to a Chat upstream (the reference)
  messages-pass     POST /v1/messages to an `api = "anthropic"` upstream (passed through)
  messages-trans    POST /v1/messages to a Chat upstream (translated)
  responses-pass    POST /v1/responses to a `responses = true` upstream (passed through)
  responses-trans   POST /v1/responses to a Chat upstream (translated)

Each is sent DIRECT to the mock (bench/mock_upstream.py) and THROUGH one `quota-proxy
serve` worker (metering and settlement on, default logging) in front of it, alternating
which goes first by round. A passthrough's direct request is the same API at the mock; a
translation's is Chat Completions at the mock (what its upstream really serves). wrk with
bench/wrk_post.lua checks every response (status 200 and the scenario's body markers:
the reply's last words "never lost.", its usage, the stream's last event, and through
the gateway its `charged_quota_tokens`); the gateway's CPU per request comes from /proc;
after each wrk run an exact pass (bench/rawclient.py) counts upstream calls per client
request on the mock's /stats, which must be exactly 1.00.

Reported: req/s, p50/p99, added p50/p99 (gateway minus direct, paired by round), CPU ms per
request, and translated/passthrough ratios of added latency and of CPU (the issue asks
translation to cost at most 2x passthrough). Writes bench/results/endpoints-<time>.json
(and .md); exits 1 if any response failed verification or calls/request != 1.00.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import procstat  # noqa: E402
import services  # noqa: E402
from rawclient import run_pass_sync  # noqa: E402
from run import _children_cpu, machine, pct, scan_gateway_log, wait_quiet  # noqa: E402
from services import BENCH, HOST, Target  # noqa: E402

RESULTS = BENCH / "results"
SYSTEM = "You are a concise assistant for a team of developers."
PROMPT = "In one sentence, why should a gateway add as little latency as it can?"
MAX_TOKENS = 64
ANTHROPIC_VERSION = "2023-06-01"
MAX_RATIO = 2.0  # translation may cost at most twice what passthrough costs

PATHS = {"chat": "/v1/chat/completions", "messages": "/v1/messages", "responses": "/v1/responses"}
# The gateway's routes (added to services.quota_config's): alias -> what it reaches.
ROUTE_FOR = {"chat": "quota/fast", "pass": {"messages": "quota/claude", "responses": "quota/codex"},
             "trans": "quota/fast"}


def extra_config(mock_port: int) -> str:
    """Upstreams that speak Messages and Responses (the same mock) and routes on them."""
    base = f"http://127.0.0.1:{mock_port}/v1"
    return f"""
[upstreams.mock-anthropic]
base_url = "{base}"
api = "anthropic"
timeout_s = 60
connect_timeout_s = 5

[upstreams.mock-responses]
base_url = "{base}"
responses = true
timeout_s = 60
connect_timeout_s = 5

[routes."quota/claude"]
upstream = "mock-anthropic"
model = "mock-model"
multiplier = 1
max_output_tokens = 256

[routes."quota/codex"]
upstream = "mock-responses"
model = "mock-model"
multiplier = 1
max_output_tokens = 256
"""


@dataclass(frozen=True)
class Scenario:
    kind: str  # chat | messages-pass | messages-trans | responses-pass | responses-trans
    stream: bool
    concurrency: int

    @property
    def api(self) -> str:
        return self.kind.split("-")[0]

    @property
    def mode(self) -> str:
        return "ref" if self.kind == "chat" else self.kind.split("-")[1]

    @property
    def direct_api(self) -> str:
        """What the direct comparison sends to the mock: the upstream's own API."""
        return "chat" if self.mode == "trans" else self.api

    @property
    def name(self) -> str:
        return f"{self.kind} {'stream' if self.stream else 'json'} c={self.concurrency}"


KINDS = ("chat", "messages-pass", "messages-trans", "responses-pass", "responses-trans")
FULL = [Scenario(k, s, c) for k in KINDS for s in (False, True) for c in (1, 32)]


def body_for(api: str, model: str, stream: bool) -> bytes:
    """The same conversation (system prompt + one user turn, 64-token cap) in each API."""
    body: dict[str, Any]
    if api == "chat":
        body = {"model": model, "max_tokens": MAX_TOKENS, "messages": [
            {"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}]}
        if stream:
            body["stream_options"] = {"include_usage": True}
    elif api == "messages":
        body = {"model": model, "max_tokens": MAX_TOKENS, "system": SYSTEM,
                "messages": [{"role": "user", "content": PROMPT}]}
    else:
        body = {"model": model, "max_output_tokens": MAX_TOKENS, "instructions": SYSTEM,
                "input": [{"role": "user", "content": PROMPT}], "store": False}
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


def expectations(api: str, stream: bool, gateway: bool) -> tuple[bytes, ...]:
    """Body markers every response must hold: the reply's last words, its usage, the
    stream's terminal event, and through the gateway the charge it metered."""
    if api == "chat":
        marks: tuple[bytes, ...] = ((b" lost.", b'"completion_tokens"', b"data: [DONE]") if stream
                                    else (b"never lost.", b'"completion_tokens"'))
    elif api == "messages":
        marks = ((b'" lost."', b"event: message_delta", b'"output_tokens"', b"event: message_stop")
                 if stream else (b"never lost.", b'"output_tokens"', b'"end_turn"'))
    else:
        marks = ((b"never lost.", b"event: response.completed", b'"total_tokens"') if stream
                 else (b"never lost.", b'"total_tokens"', b'"status":"completed"'))
    return marks + ((b"charged_quota_tokens",) if gateway else ())


@dataclass
class Endpoint:
    """One side of a comparison: where to send, what, and what must come back."""

    target: Target
    api: str
    path: str
    body: bytes
    headers: dict[str, str]
    expect: tuple[bytes, ...]
    gateway: bool


def endpoint(target: Target, sc: Scenario, gateway: bool) -> Endpoint:
    api = sc.api if gateway else sc.direct_api
    if gateway:
        model = ROUTE_FOR["chat"] if sc.mode == "ref" else (
            ROUTE_FOR["trans"] if sc.mode == "trans" else ROUTE_FOR["pass"][api])  # type: ignore[index]
    else:
        model = "mock-model"
    headers = {"anthropic-version": ANTHROPIC_VERSION} if api == "messages" else {}
    return Endpoint(target, api, PATHS[api], body_for(api, str(model), sc.stream), headers,
                    expectations(api, sc.stream, gateway), gateway)


def run_wrk(ep: Endpoint, sc: Scenario, duration_s: float, workdir: Path) -> dict[str, Any]:
    body_file = workdir / f"body-{uuid.uuid4().hex[:8]}.json"
    body_file.write_bytes(ep.body)
    env = {
        **os.environ,
        "BENCH_BODY_FILE": str(body_file),
        "BENCH_AUTH": ep.target.auth or "",
        # Agents' own ways: Claude's SDK sends x-api-key, Codex a Bearer token.
        "BENCH_AUTH_HEADER": "x-api-key" if ep.api == "messages" else "",
        "BENCH_HEADERS": "\t".join(f"{k}: {v}" for k, v in ep.headers.items()),
        "BENCH_EXPECT": "\t".join(e.decode() for e in ep.expect),
    }
    threads = 1 if sc.concurrency == 1 else 2
    argv = ["wrk", f"-t{threads}", f"-c{sc.concurrency}", f"-d{duration_s:g}s", "--timeout", "10s",
            "-s", str(BENCH / "wrk_post.lua"), f"http://{HOST}:{ep.target.port}{ep.path}"]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=duration_s + 60)
    finally:
        body_file.unlink(missing_ok=True)
    for line in out.stdout.splitlines():
        if line.startswith("WRKJSON "):
            return json.loads(line[len("WRKJSON "):])  # type: ignore[no-any-return]
    raise RuntimeError(f"wrk printed no summary:\n{out.stdout}\n{out.stderr}")


def backend_pids(db_url: str) -> list[int]:
    """PostgreSQL server processes connected to our database (the gateway's pool)."""
    import asyncpg

    async def query() -> list[int]:
        conn = await asyncpg.connect(db_url)
        try:
            rows = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                                    "AND pid <> pg_backend_pid()")
            return [int(r["pid"]) for r in rows]
        finally:
            await conn.close()

    return asyncio.run(query())


def pids_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / procstat.CLK_TCK
    return total


def measure(ep: Endpoint, mock: Target, sc: Scenario, duration_s: float, raw_s: float, workdir: Path,
            max_wait_s: float, db_url: str | None = None) -> dict[str, Any]:
    """One wrk run and one exact-count pass against one side."""
    target = ep.target
    assert target.pid is not None and mock.pid is not None
    load_before = wait_quiet(max_wait_s) if max_wait_s > 0 else None
    busy0, _ = procstat.machine_cpu()
    kids0 = _children_cpu()
    # The PostgreSQL backends serving the gateway's pool: their CPU is the store's cost.
    pg_pids = backend_pids(db_url) if db_url and ep.gateway else []
    pg0 = pids_cpu(pg_pids)
    cpu0, mcpu0, t0 = procstat.cpu_seconds(target.pid), procstat.cpu_seconds(mock.pid), time.perf_counter()
    wrk = run_wrk(ep, sc, duration_s, workdir)
    cpu1, mcpu1, t1 = procstat.cpu_seconds(target.pid), procstat.cpu_seconds(mock.pid), time.perf_counter()
    pg1 = pids_cpu(pg_pids)
    busy1, _ = procstat.machine_cpu()
    ours = ((cpu1 - cpu0) + (0 if target.pid == mock.pid else mcpu1 - mcpu0) + (_children_cpu() - kids0)
            + (pg1 - pg0))
    stats1, drain_s = services.drain(mock, target)
    done = max(wrk["requests"], 1)
    run: dict[str, Any] = {
        "scenario": sc.name, "kind": sc.kind, "stream": sc.stream, "concurrency": sc.concurrency,
        "target": "gateway" if ep.gateway else "direct", "api": ep.api, "path": ep.path,
        "rps": wrk["requests"] / (wrk["duration_us"] / 1e6),
        "p50_ms": wrk["latency_us"]["p50"] / 1000,
        "p99_ms": wrk["latency_us"]["p99"] / 1000,
        "max_ms": wrk["latency_us"]["max"] / 1000,
        "requests": wrk["requests"], "sent": wrk["sent"], "good": wrk["good"],
        "non200": wrk["non200"], "bad_body": wrk["bad"],
        "socket_errors": sum(v for k, v in wrk["errors"].items() if k != "status"),
        "sample": wrk["sample"],
        "cpu_ms_per_request": (cpu1 - cpu0) * 1000 / done,
        "cpu_util": (cpu1 - cpu0) / (t1 - t0),
        "mock_cpu_ms_per_request": (mcpu1 - mcpu0) * 1000 / done,
        "foreign_cpu_util": max(0.0, (busy1 - busy0) - ours) / (t1 - t0),
        "pg_backends": len(pg_pids),
        "pg_cpu_ms_per_request": (pg1 - pg0) * 1000 / done if pg_pids else None,
        "foreign_load_before": load_before,
        "drain_s": drain_s,
    }
    raw = run_pass_sync(HOST, target.port, ep.path, ep.body, target.auth, ep.expect, sc.concurrency,
                        duration_s=raw_s, headers=ep.headers)
    stats2 = services.mock_stats(mock)  # every answer is in: every upstream call was made
    calls = {k: stats2[k] - stats1[k] for k in ("calls", "chat", "messages", "responses")}
    run["exact"] = {
        "requests": raw.requests, "good": raw.good, "non200": raw.non200, "bad_body": raw.bad,
        "errors": raw.errors, "sample": raw.sample, "upstream_calls": calls["calls"], "by_api": calls,
        "p50_ms": pct(raw.total, 50) * 1000, "ttfb_p50_ms": pct(raw.ttfb_first, 50) * 1000,
    }
    run["exact"]["calls_per_request"] = calls["calls"] / max(raw.requests, 1)
    # The upstream call must be of the API the route speaks (a translation calls Chat).
    run["exact"]["right_api"] = calls[sc.direct_api] == calls["calls"]
    return run


def failed(run: dict[str, Any]) -> bool:
    x = run["exact"]
    return bool(run["non200"] or run["bad_body"] or run["socket_errors"] or x["non200"] or x["bad_body"]
                or x["errors"] or not x["requests"] or x["upstream_calls"] != x["requests"]
                or not x["right_api"])


def _med(values: list[float]) -> dict[str, float]:
    values = [v for v in values if v == v]
    if not values:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(runs: list[dict[str, Any]], scenarios: list[Scenario]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for sc in scenarios:
        direct = [r for r in runs if r["scenario"] == sc.name and r["target"] == "direct"]
        gw = [r for r in runs if r["scenario"] == sc.name and r["target"] == "gateway"]
        if not direct or not gw:
            continue
        pairs = list(zip(direct, gw, strict=False))
        s: dict[str, Any] = {"rounds": len(pairs)}
        for side, rs in (("direct", direct), ("gateway", gw)):
            s[side] = {k: _med([r[k] for r in rs]) for k in (
                "rps", "p50_ms", "p99_ms", "cpu_ms_per_request", "foreign_cpu_util")}
            s[side]["exact_requests"] = sum(r["exact"]["requests"] for r in rs)
            s[side]["exact_upstream_calls"] = sum(r["exact"]["upstream_calls"] for r in rs)
            s[side]["failures"] = sum(r["non200"] + r["bad_body"] + r["socket_errors"] + r["exact"]["non200"]
                                      + r["exact"]["bad_body"] + r["exact"]["errors"] for r in rs)
            s[side]["requests"] = sum(r["requests"] for r in rs)
            s[side]["samples"] = sorted({r["sample"] for r in rs if r["sample"]}
                                        | {r["exact"]["sample"] for r in rs if r["exact"]["sample"]})[:3]
        pg_cpu = [r["pg_cpu_ms_per_request"] for r in gw if r.get("pg_cpu_ms_per_request") is not None]
        s["gateway"]["pg_cpu_ms_per_request"] = _med(pg_cpu) if pg_cpu else None
        s["added_p50_ms"] = _med([g["p50_ms"] - d["p50_ms"] for d, g in pairs])
        s["added_p99_ms"] = _med([g["p99_ms"] - d["p99_ms"] for d, g in pairs])
        s["gateway_calls_per_request"] = (s["gateway"]["exact_upstream_calls"]
                                          / max(s["gateway"]["exact_requests"], 1))
        out[sc.name] = s
    return out


def ratios(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """translated / passthrough of added p50 and of gateway CPU, per API x stream x c."""
    rows = []
    for api in ("messages", "responses"):
        for stream in (False, True):
            for c in (1, 32):
                tail = f"{'stream' if stream else 'json'} c={c}"
                p, t = summary.get(f"{api}-pass {tail}"), summary.get(f"{api}-trans {tail}")
                ref = summary.get(f"chat {tail}")
                if p is None or t is None:
                    continue
                ap, at = p["added_p50_ms"]["median"], t["added_p50_ms"]["median"]
                cp, ct = p["gateway"]["cpu_ms_per_request"]["median"], t["gateway"]["cpu_ms_per_request"]["median"]
                rows.append({
                    "api": api, "stream": stream, "concurrency": c,
                    "added_p50_pass_ms": ap, "added_p50_trans_ms": at,
                    "added_p50_ratio": at / ap if ap > 0 else float("nan"),
                    "cpu_pass_ms": cp, "cpu_trans_ms": ct, "cpu_ratio": ct / cp if cp > 0 else float("nan"),
                    "cpu_chat_ms": ref["gateway"]["cpu_ms_per_request"]["median"] if ref else float("nan"),
                    "added_p50_chat_ms": ref["added_p50_ms"]["median"] if ref else float("nan"),
                })
    return rows


def fmt(x: float, digits: int = 2) -> str:
    return "–" if x != x else f"{x:,.{digits}f}"


def rng(m: dict[str, float], digits: int = 2) -> str:
    if m["min"] == m["max"]:
        return fmt(m["median"], digits)
    return f"{fmt(m['median'], digits)} [{fmt(m['min'], digits)}–{fmt(m['max'], digits)}]"


def render(store: str, summary: dict[str, Any], scenarios: list[Scenario]) -> str:
    lines = [
        f"### store: {store}", "",
        "Medians over rounds [min–max]; added = gateway minus direct, paired by round. The last column "
        "is the most CPU (in % of a core) that other processes on the machine used during a run"
        + (" (PostgreSQL's backends serving the gateway are counted as ours, in the PG CPU column)"
           if store == "postgres" else "") + ".", "",
        "| scenario | direct API | req/s direct / gateway | p50 ms direct / gateway | added p50 ms "
        "| added p99 ms | gateway CPU ms/req " + ("| PG backends' CPU ms/req " if store == "postgres" else "")
        + "| upstream calls / request (exact) | failures | others' CPU, direct / gateway runs |",
        "|---|---|---:|---:|---:|---:|---:|" + ("---:|" if store == "postgres" else "") + "---:|---:|---:|",
    ]
    for sc in scenarios:
        s = summary.get(sc.name)
        if s is None:
            continue
        d, g = s["direct"], s["gateway"]
        lines.append(
            f"| {sc.name} | {sc.direct_api} | {fmt(d['rps']['median'], 0)} / {fmt(g['rps']['median'], 0)} "
            f"| {fmt(d['p50_ms']['median'])} / {fmt(g['p50_ms']['median'])} | {rng(s['added_p50_ms'])} "
            f"| {rng(s['added_p99_ms'])} | {rng(g['cpu_ms_per_request'], 3)} "
            + (f"| {rng(g['pg_cpu_ms_per_request'], 3) if g.get('pg_cpu_ms_per_request') else '–'} "
               if store == "postgres" else "")
            + f"| {g['exact_upstream_calls']}/{g['exact_requests']} = {s['gateway_calls_per_request']:.2f} "
            f"| {d['failures'] + g['failures']} "
            f"| {fmt(d['foreign_cpu_util']['max'] * 100, 0)}% / {fmt(g['foreign_cpu_util']['max'] * 100, 0)}% |")
    rows = ratios(summary)
    if rows:
        lines += [
            "", f"Translated / passthrough (at most {MAX_RATIO:g}x wanted; chat for reference):", "",
            "| API | mode | c | added p50 ms: chat / pass / trans | ratio | CPU ms/req: chat / pass / trans "
            "| ratio | within 2x (CPU) |",
            "|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in rows:
            ok = r["cpu_ratio"] <= MAX_RATIO
            lines.append(
                f"| {r['api']} | {'stream' if r['stream'] else 'json'} | {r['concurrency']} "
                f"| {fmt(r['added_p50_chat_ms'])} / {fmt(r['added_p50_pass_ms'])} / {fmt(r['added_p50_trans_ms'])} "
                f"| {fmt(r['added_p50_ratio'])} "
                f"| {fmt(r['cpu_chat_ms'], 3)} / {fmt(r['cpu_pass_ms'], 3)} / {fmt(r['cpu_trans_ms'], 3)} "
                f"| {fmt(r['cpu_ratio'])} | {'yes' if ok else '**no**'} |")
    return "\n".join(lines)


# ---- stores --------------------------------------------------------------------------------


@contextlib.contextmanager
def postgres_database(admin_url: str) -> Iterator[str]:
    """A database of our own on the server (created, then dropped), as bench/pg.py does."""
    import asyncpg

    name = f"qp_bench_{uuid.uuid4().hex[:8]}"

    async def execute(sql: str) -> None:
        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(execute(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.rpartition("/")[0] + f"/{name}"
    finally:
        asyncio.run(execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def prepare_gateway(workdir: Path, mock_port: int, store_line: str) -> tuple[Path, str, int]:
    """Config (services.quota_config's routes + the agent upstreams) on the given store,
    one account with a huge balance and a live key. Returns (config, key, port)."""
    port = services.free_port()
    config = workdir / "quota-proxy.toml"
    sqlite_path = workdir / "quota.db"
    text = services.quota_config(mock_port, sqlite_path, port)
    text = text.replace(f'path = "{sqlite_path}"', store_line) + extra_config(mock_port)
    config.write_text(text)
    services.cli(config, "accounts", "create", "bench", "--quota-tokens", str(10**12))
    key = json.loads(services.cli(config, "keys", "create", "--account", "bench", "--kind", "live",
                                  "--json"))["key"]
    return config, key, port


def gateway_code() -> str:
    """Where the spawned gateway's quota_proxy package is imported from."""
    out = subprocess.run([sys.executable, "-c", "import quota_proxy, os; print(os.path.dirname(quota_proxy.__file__))"],
                         capture_output=True, text=True, cwd=tempfile.gettempdir(), timeout=60)
    return out.stdout.strip() or out.stderr.strip()[-200:]


def run_store(store: str, mock: Target, scenarios: list[Scenario], args: argparse.Namespace,
              workdir: Path) -> dict[str, Any]:
    workdir = workdir / store
    workdir.mkdir()
    with contextlib.ExitStack() as stack:
        db_url: str | None = None
        if store == "sqlite":
            store_line = f'path = "{workdir / "quota.db"}"'
        else:
            url = stack.enter_context(postgres_database(args.pg))
            db_url = url
            store_line = f'url = "{url}"\npool_size = 20'
        config, key, port = prepare_gateway(workdir, mock.port, store_line)
        log = workdir / "quota-proxy.log"
        runs: list[dict[str, Any]] = []
        with services.quota_proxy(config, key, port, log) as gw:
            time.sleep(0.3)
            print(f"## store {store}: {len(scenarios)} scenarios x {args.rounds} rounds, "
                  f"{args.duration:g} s per run", flush=True)
            warmed: set[tuple[str, bool, bool]] = set()
            for sc in scenarios:  # warm every path once (imports, caches, connections)
                for side in (endpoint(mock, sc, False), endpoint(gw, sc, True)):
                    if (side.api + sc.mode, sc.stream, side.gateway) in warmed:
                        continue
                    warmed.add((side.api + sc.mode, sc.stream, side.gateway))
                    run_pass_sync(HOST, side.target.port, side.path, side.body, side.target.auth, side.expect, 8,
                                  count=200, headers=side.headers)
            for rnd in range(args.rounds):
                for sc in scenarios:
                    sides = [endpoint(mock, sc, False), endpoint(gw, sc, True)]
                    for ep in (sides if rnd % 2 == 0 else sides[::-1]):
                        run = measure(ep, mock, sc, args.duration, args.raw_seconds, workdir, args.max_wait,
                                      db_url)
                        run["round"] = rnd + 1
                        run["store"] = store
                        runs.append(run)
                        x = run["exact"]
                        print(f"  r{rnd + 1} {sc.name:30} {run['target']:8} {run['rps']:7.0f} req/s "
                              f"p50 {run['p50_ms']:6.2f} p99 {run['p99_ms']:6.2f} max {run['max_ms']:7.1f} ms "
                              f"cpu {run['cpu_ms_per_request']:.3f} ms/req  exact {x['upstream_calls']}/"
                              f"{x['requests']}{'' if x['right_api'] else ' WRONG API'}  "
                              f"fail {run['non200'] + run['bad_body'] + run['socket_errors']}"
                              f"+{x['non200'] + x['bad_body'] + x['errors']} "
                              f"foreign {run['foreign_cpu_util'] * 100:.0f}%"
                              + (f"  sample: {run['sample'] or x['sample']}"[:400] if failed(run) else ""),
                              flush=True)
        checks = {"ledger_verify": services.cli(config, "ledger", "verify").strip()[-500:],
                  "gateway_log": scan_gateway_log(log)}
    return {"store": store, "runs": runs, "summary": summarize(runs, scenarios), "checks": checks}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round, 1 s per run")
    p.add_argument("--store", choices=("sqlite", "postgres", "both"), default="sqlite")
    p.add_argument("--pg", default=os.environ.get("QUOTA_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test"),
                   help="PostgreSQL server (a database of our own is created on it and dropped)")
    p.add_argument("--rounds", type=int, help="rounds per scenario (default 2; quick 1)")
    p.add_argument("--duration", type=float, help="seconds per wrk run (default 4; quick 1)")
    p.add_argument("--raw-seconds", type=float, help="seconds per exact-count pass (default 1; quick 0.3)")
    p.add_argument("--max-wait", type=float, help="seconds to wait for a quiet machine before each run "
                   "(default 2; quick 0)")
    p.add_argument("--kinds", help=f"comma-separated subset of {','.join(KINDS)}")
    p.add_argument("--concurrency", help="comma-separated subset of 1,32")
    p.add_argument("--out", type=Path, help="JSON file (default bench/results/endpoints-<time>.json)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs, SQLite store)")
    args = p.parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed (Debian: apt-get install -y wrk)", file=sys.stderr)
        return 2
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.duration = args.duration or (1.0 if args.quick else 4.0)
    args.raw_seconds = args.raw_seconds or (0.3 if args.quick else 1.0)
    args.max_wait = args.max_wait if args.max_wait is not None else (0.0 if args.quick else 2.0)
    scenarios = FULL
    if args.kinds:
        wanted = {k.strip() for k in args.kinds.split(",")}
        scenarios = [s for s in scenarios if s.kind in wanted or s.kind == "chat"]
    if args.concurrency:
        cs = {int(c) for c in args.concurrency.split(",")}
        scenarios = [s for s in scenarios if s.concurrency in cs]
    stores = ["sqlite", "postgres"] if args.store == "both" else [args.store]
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_path = args.out or RESULTS / f"endpoints-{'quick-' if args.quick else ''}{stamp}.json"

    services.raise_fd_limit()
    host = machine()  # of this checkout; the gateway spawned may import another (recorded next)
    host["gateway_code"] = gateway_code()
    repo = str(Path(host["gateway_code"]).parent)
    host["gateway_git"] = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"],
                                         capture_output=True, text=True).stdout.strip()
    host["gateway_uncommitted"] = subprocess.run(
        ["git", "-C", repo, "status", "--porcelain", "--", "quota_proxy"],
        capture_output=True, text=True).stdout.split("\n")[:-1]
    started = time.time()
    workdir = Path(tempfile.mkdtemp(prefix="quota-bench-endpoints-"))
    per_store: list[dict[str, Any]] = []
    try:
        with services.mock_upstream(workdir) as mock:
            for store in stores:
                per_store.append(run_store(store, mock, scenarios, args, workdir))
            mock_final = services.mock_stats(mock)
    finally:
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    result: dict[str, Any] = {
        "kind": "quick" if args.quick else "full",
        "started": dt.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
        "wall_s": round(time.time() - started, 1),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": host,
        "load_average_end": os.getloadavg(),
        "settings": {"rounds": args.rounds, "duration_s": args.duration, "raw_pass_s": args.raw_seconds,
                     "max_wait_s": args.max_wait, "scenarios": [asdict(s) for s in scenarios]},
        "mock_final_stats": mock_final,
        "stores": {s["store"]: {"summary": s["summary"], "ratios": ratios(s["summary"]), "checks": s["checks"]}
                   for s in per_store},
        "runs": [r for s in per_store for r in s["runs"]],
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1))
    parts = [f"# quota-proxy endpoints bench, {result['started']} ({result['kind']}: {args.rounds} rounds x "
             f"{args.duration:g} s; gateway code {host['gateway_code']} at {host['gateway_git']}"
             f"{' + uncommitted ' + ', '.join(x.split()[-1] for x in host['gateway_uncommitted']) if host['gateway_uncommitted'] else ''}"
             f"; bench {host['git']})"]
    for s in per_store:
        parts += ["", render(s["store"], s["summary"], scenarios), "",
                  f"ledger verify: {s['checks']['ledger_verify']!r}",
                  f"gateway log: {json.dumps(s['checks']['gateway_log'])}"]
    parts += ["", f"results: {out_path}", f"wall time: {result['wall_s']} s"]
    text = "\n".join(parts)
    out_path.with_suffix(".md").write_text(text + "\n")
    print()
    print(text)
    bad = [f"{r['store']} {r['scenario']} {r['target']} round {r['round']}: "
           f"exact {r['exact']['upstream_calls']}/{r['exact']['requests']} right_api={r['exact']['right_api']} "
           f"{r['sample'] or r['exact']['sample']}" for r in result["runs"] if failed(r)]
    if bad:
        print(f"\nVERIFICATION FAILED in {len(bad)} runs (non-200, bad bodies, errors, or upstream calls "
              "!= client requests):", *bad[:20], sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
