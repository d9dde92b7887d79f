"""SQLite against PostgreSQL, side by side in one run: what the shared store costs.

For each store, one `quota-proxy serve` (one worker) in front of the mock upstream; chat
completions at concurrency 1, 32 and 64, first with every request on ONE account (one
balance row: every hold and settlement takes the same row lock) and then spread over 16
accounts. Reported: requests/s, latency p50/p99, the latency the gateway adds over calling
the mock directly (c=1), and for PostgreSQL the database transactions per request (each
store call is one single-statement transaction: one round trip).

    python bench/pg.py [--seconds 4] [--pg postgresql://postgres@127.0.0.1:5432/test]
    python bench/pg.py --workers 2     # also `quota-proxy serve --workers 2`, beside one worker

With --workers N (N > 1) every scenario also runs against a gateway of N workers (its own
SQLite file, its own PostgreSQL database), and a second table puts req/s, added p50 and
PostgreSQL transactions per request of 1 and N workers side by side. There the added p50
is measured against the mock called directly at the same concurrency
(`added_p50_same_c_ms`); the first table's `added_p50_ms` stays what it was: against the
direct p50 at c=1.

Writes results/pg-<time>.json and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rawclient import PassResult, run_pass  # noqa: E402
from services import (  # noqa: E402
    HOST,
    ROOT,
    Target,
    free_port,
    mock_upstream,
    process,
    quota_config,
    raise_fd_limit,
    wait_http,
)

BENCH = Path(__file__).resolve().parent
CONCURRENCY = (1, 32, 64)
MANY_ACCOUNTS = 16
BODY = json.dumps({"model": "quota/fast", "messages": [{"role": "user", "content": "hello there"}],
                   "max_tokens": 16}).encode()
ENV = {"PYTHONPATH": str(ROOT)}


def cli(config: Path, *args: str) -> str:
    import subprocess

    result = subprocess.run([sys.executable, "-m", "quota_proxy", "--config", str(config), *args],
                            capture_output=True, text=True, timeout=120, env={**os.environ, **ENV})
    if result.returncode != 0:
        raise RuntimeError(f"quota-proxy {' '.join(args)}: {result.stderr}")
    return result.stdout


@contextmanager
def gateway(workdir: Path, mock_port: int, store_line: str,
            workers: int = 1) -> Iterator[tuple[Target, list[str]]]:
    """A gateway with one account per key: keys[0] is the hot account."""
    port = free_port()
    config = workdir / "quota-proxy.toml"
    text = quota_config(mock_port, workdir / "quota.db", port)
    config.write_text(text.replace(f'path = "{workdir / "quota.db"}"', store_line))
    keys = []
    for i in range(MANY_ACCOUNTS):
        cli(config, "accounts", "create", f"bench{i}", "--quota-tokens", str(10**12))
        keys.append(json.loads(cli(config, "keys", "create", "--account", f"bench{i}", "--kind", "live",
                                   "--json"))["key"])
    log = workdir / "gateway.log"
    argv = [sys.executable, "-m", "quota_proxy", "--config", str(config), "serve", "--port", str(port),
            "--log-level", "warning", "--workers", str(workers)]
    with process(argv, log, env=ENV, cwd=workdir) as proc:
        wait_http(f"http://{HOST}:{port}/readyz", proc, 60, log)
        yield Target("quota-proxy", port, "quota/fast", None, proc.pid), keys


async def measure(port: int, keys: list[str], concurrency: int, seconds: float) -> PassResult:
    """`concurrency` keep-alive clients; spread over the keys given (one key: the hot row)."""
    groups = min(len(keys), concurrency)
    per = [concurrency // groups + (1 if i < concurrency % groups else 0) for i in range(groups)]
    results = await asyncio.gather(*(
        run_pass(HOST, port, "/v1/chat/completions", BODY, keys[i], (b"choices",), per[i],
                 duration_s=seconds)
        for i in range(groups)
    ))
    out = PassResult()
    for r in results:
        out.requests += r.requests
        out.good += r.good
        out.non200 += r.non200
        out.errors += r.errors
        out.sample = out.sample or r.sample
        out.total += r.total
        out.wall_s = max(out.wall_s, r.wall_s)
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000 if ordered else 0.0


async def commits(url: str) -> int:
    """Transactions committed in the database so far. A backend reports its counts at most
    once a second, so wait that out first; the hold keeper's few statements per 5 s and the
    key cache's lookups are counted too (a small overestimate)."""
    await asyncio.sleep(1.5)
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"))
    finally:
        await conn.close()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    raise_fd_limit()
    rows: list[dict[str, Any]] = []
    worker_counts = [1] if args.workers <= 1 else [1, args.workers]
    with tempfile.TemporaryDirectory(prefix="quota-bench-pg-") as tmp, mock_upstream(Path(tmp)) as mock:
        direct_p50_by_c: dict[int, float] = {}
        for c in CONCURRENCY if len(worker_counts) > 1 else (1,):
            direct = await run_pass(HOST, mock.port, "/v1/chat/completions", BODY, None, (b"choices",), c,
                                    duration_s=args.seconds)
            direct_p50_by_c[c] = statistics.median(direct.total) * 1000
        direct_p50 = direct_p50_by_c[1]
        for workers in worker_counts:
            database = f"qp_bench_{uuid.uuid4().hex[:8]}"
            admin = await asyncpg.connect(args.pg)
            await admin.execute(f'CREATE DATABASE "{database}"')
            await admin.close()
            pg_url = args.pg.rpartition("/")[0] + f"/{database}"
            try:
                for engine, line in (("sqlite", f'path = "{Path(tmp) / f"s{workers}" / "quota.db"}"'),
                                     ("postgres", f'url = "{pg_url}"\npool_size = 20')):
                    workdir = Path(tmp) / f"{engine}-{workers}"
                    workdir.mkdir()
                    with gateway(workdir, mock.port, line, workers) as (target, keys):
                        await measure(target.port, keys[:1], 8, 1.0)  # warm up
                        for accounts in ("one", "many"):
                            for c in CONCURRENCY:
                                chosen = keys[:1] if accounts == "one" else keys
                                before = await commits(pg_url) if engine == "postgres" else 0
                                r = await measure(target.port, chosen, c, args.seconds)
                                after = await commits(pg_url) if engine == "postgres" else 0
                                row = {
                                    "engine": engine, "workers": workers, "accounts": accounts, "concurrency": c,
                                    "requests": r.requests, "ok": r.good, "non200": r.non200,
                                    "errors": r.errors,
                                    "rps": round(r.good / r.wall_s, 1), "p50_ms": round(pct(r.total, 0.5), 2),
                                    "p99_ms": round(pct(r.total, 0.99), 2),
                                    "added_p50_ms": round(pct(r.total, 0.5) - direct_p50, 2),
                                    "added_p50_same_c_ms": round(pct(r.total, 0.5) - direct_p50_by_c[c], 2)
                                    if c in direct_p50_by_c else None,
                                    "db_tx_per_request": round((after - before) / max(r.requests, 1), 2)
                                    if engine == "postgres" else None,
                                    "sample": r.sample,
                                }
                                rows.append(row)
                                print(json.dumps(row), flush=True)
            finally:
                admin = await asyncpg.connect(args.pg)
                await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
                await admin.close()
    return {"when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "seconds": args.seconds,
            "workers": worker_counts, "direct_p50_ms": round(direct_p50, 3),
            "direct_p50_ms_by_concurrency": {str(c): round(v, 3) for c, v in direct_p50_by_c.items()},
            "rows": rows, "load": os.getloadavg()}


def table(doc: dict[str, Any]) -> str:
    lines = [
        "| accounts | c | SQLite req/s | PG req/s | SQLite p50 / p99 ms | PG p50 / p99 ms "
        "| SQLite added p50 | PG added p50 | PG tx/request |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by = {(r["engine"], r["accounts"], r["concurrency"]): r for r in doc["rows"] if r.get("workers", 1) == 1}
    for accounts in ("one", "many"):
        for c in CONCURRENCY:
            s, p = by[("sqlite", accounts, c)], by[("postgres", accounts, c)]
            lines.append(
                f"| {accounts} | {c} | {s['rps']} | {p['rps']} | {s['p50_ms']} / {s['p99_ms']} "
                f"| {p['p50_ms']} / {p['p99_ms']} | {s['added_p50_ms']} | {p['added_p50_ms']} "
                f"| {p['db_tx_per_request']} |"
            )
    return "\n".join(lines) + "\n"


def workers_table(doc: dict[str, Any]) -> str:
    """1 worker against N, per engine: req/s, added p50 (vs direct at the same c), PG tx/request."""
    counts = doc.get("workers", [1])
    if len(counts) < 2:
        return ""
    n = counts[-1]
    lines = [
        f"| engine | accounts | c | req/s 1 / {n} workers | added p50 ms 1 / {n} workers "
        f"| p99 ms 1 / {n} workers | PG tx/request 1 / {n} workers | failures |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    by = {(r["engine"], r.get("workers", 1), r["accounts"], r["concurrency"]): r for r in doc["rows"]}
    for engine in ("sqlite", "postgres"):
        for accounts in ("one", "many"):
            for c in CONCURRENCY:
                a, b = by.get((engine, 1, accounts, c)), by.get((engine, n, accounts, c))
                if a is None or b is None:
                    continue
                tx = (f"{a['db_tx_per_request']} / {b['db_tx_per_request']}" if engine == "postgres" else "–")
                fails = sum(r["requests"] - r["ok"] for r in (a, b))  # non-200s, errors, bad bodies
                lines.append(
                    f"| {engine} | {accounts} | {c} | {a['rps']} / {b['rps']} "
                    f"| {a['added_p50_same_c_ms']} / {b['added_p50_same_c_ms']} "
                    f"| {a['p99_ms']} / {b['p99_ms']} | {tx} | {fails} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--workers", type=int, default=1,
                        help="also run every scenario on `serve --workers N` beside one worker (N > 1)")
    parser.add_argument("--pg", default=os.environ.get("QUOTA_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test"))
    args = parser.parse_args()
    doc = asyncio.run(run(args))
    out = BENCH / "results" / f"pg-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    text = f"direct mock p50 {doc['direct_p50_ms']} ms; load average {doc['load']}\n\n" + table(doc)
    extra = workers_table(doc)
    if extra:
        text += (f"\n{doc['workers'][-1]} workers beside 1 (added p50 against the mock at the same "
                 f"concurrency; direct p50 ms by c: {doc['direct_p50_ms_by_concurrency']}):\n\n{extra}")
    out.with_suffix(".md").write_text(f"# bench/pg.py, {doc['when']}, {doc['seconds']} s per pass\n\n{text}")
    print("\n" + text)
    print(f"written to {out} (and .md)")


if __name__ == "__main__":
    main()
