"""How quota-proxy's cost grows with the work it holds.

    python bench/scale.py             # 1,000,000 records, 100,000 keys, 1,000 open streams
    python bench/scale.py --quick     # 20,000 records, 2,000 keys, 100 streams

1. Store size. A store holding N request records (each with its ledger entry and daily
   roll-up, written by the schema's own settlement trigger through the stdlib sqlite3
   module, so `quota-proxy ledger verify` must still pass) against an empty one:
   GET /v1/me latency, the chat path at concurrency 1 (auth, hold, upstream, settle), and
   take_hold + settle timed through the store API alone. A second large store attributes a
   third of its requests to 1,000 app users, which /v1/me breaks down by user.
2. Keys. 100,000 keys against 1,000: GET /v1/models (auth and nothing else) with one key
   (cached), with 1,000 keys each used once (every lookup misses the cache and reads
   SQLite), and with unknown well-formed keys (401 after a lookup).
3. Open streams. 1,000 concurrent streams from a slow upstream held open at once: the
   gateway's RSS while all are open, per open stream, and after they end.

Results are printed as Markdown and written to bench/results/scale-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import secrets
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import procstat  # noqa: E402
import services  # noqa: E402
from rawclient import build_request, one  # noqa: E402
from run import RESULTS, machine  # noqa: E402
from services import HOST, Target  # noqa: E402

DAY_MS = 86_400_000
CHAT = {"model": "quota/fast", "max_tokens": 64,
        "messages": [{"role": "user", "content": "In one sentence, why keep a gateway fast?"}]}


# -- generating data -------------------------------------------------------------------

def fill_requests(store: Path, records: int, users: int = 0, days: int = 60) -> dict[str, Any]:
    """Append `records` settled requests for the 'bench' account, spread over `days` days.

    Each row goes through the schema's requests_settle trigger, which writes the charge's
    ledger row (balance_after exact) and the usage_daily roll-up, as the gateway would.
    With users > 0, every third request is attributed to one of `users` app users
    (developer-billed, so the developer's balance pays).
    """
    t0 = time.perf_counter()
    db = sqlite3.connect(store, isolation_level=None)
    try:
        db.execute("PRAGMA synchronous = OFF")
        db.execute("PRAGMA cache_size = -200000")
        acct = db.execute("SELECT id FROM accounts WHERE kind = 'developer' AND name = 'bench'").fetchone()[0]
        key_id = db.execute("SELECT min(id) FROM api_keys WHERE account_id = ?", (acct,)).fetchone()[0]
        now = int(time.time() * 1000)
        start = now - days * DAY_MS
        db.execute("BEGIN")
        db.execute(
            "INSERT INTO ledger (public_id, account_id, amount, balance_after, kind, description, created_at) "
            "SELECT 'ledg_fillcredit', id, ?, balance + ?, 'credit', 'scale bench funding', ? "
            "FROM accounts WHERE id = ?", (10**15, 10**15, start, acct))
        user_ids: list[int] = []
        for u in range(users):
            cur = db.execute(
                "INSERT INTO accounts (public_id, kind, name, parent_id, billing_mode, created_at) "
                "VALUES (?, 'user', ?, ?, 'developer', ?)", (f"user_fill{u:08x}", f"app-user-{u}", acct, start))
            user_ids.append(int(cur.lastrowid or 0))
        routes = (("quota/fast", "x1", 1), ("quota/double", "x2", 2))
        step = (now - start) / max(records, 1)
        batch = 50_000

        def rows(lo: int, hi: int) -> Any:
            for i in range(lo, hi):
                alias, mult, factor = routes[i % 2]
                user = user_ids[(i // 3) % users] if users and i % 3 == 0 else None
                yield (f"req_fill{i:016x}", acct, user, acct, key_id, None, alias, "mock-model",
                       42, 20, mult, 62 * factor, 0, "ok", 200, f"ledg_fill{i:016x}",
                       int(start + i * step))

        for lo in range(0, records, batch):
            db.executemany(
                "INSERT INTO requests (request_id, account_id, user_id, charged_account_id, key_id, "
                "hold_id, route, upstream_model, input_tokens, output_tokens, multiplier, charged, "
                "estimated, outcome, status, ledger_id, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows(lo, min(records, lo + batch)))
        db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        counts = {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                  for t in ("requests", "ledger", "usage_daily", "accounts", "api_keys")}
    finally:
        db.close()
    return {"seconds": round(time.perf_counter() - t0, 1), "rows": counts,
            "file_mb": round(store.stat().st_size / 2**20, 1)}


def fill_keys(store: Path, count: int, keep: int) -> list[str]:
    """Add `count` live keys to the 'bench' account; return `keep` of them (the rest are lost)."""
    from quota_proxy import keys as keymod

    alphabet = keymod.BASE62
    kept: list[str] = []
    db = sqlite3.connect(store, isolation_level=None)
    try:
        acct = db.execute("SELECT id FROM accounts WHERE kind = 'developer' AND name = 'bench'").fetchone()[0]
        now = int(time.time() * 1000)
        rows = []
        for i in range(count):
            raw = secrets.token_bytes(32)
            key = keymod.LIVE_PREFIX + "".join(alphabet[b % 62] for b in raw)
            if len(kept) < keep:
                kept.append(key)
            rows.append((f"key_fill{i:016x}", acct, "live", f"fill {i}",
                         hashlib.sha256(key.encode()).hexdigest(), keymod.display_prefix(key), 1, now))
        db.execute("BEGIN")
        db.executemany("INSERT INTO api_keys (public_id, account_id, kind, name, digest, prefix, "
                       "allow_community, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        db.execute("COMMIT")
    finally:
        db.close()
    return kept


# -- measuring ----------------------------------------------------------------------------

def _get(path: str, port: int, key: str) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nAuthorization: Bearer {key}\r\n\r\n").encode()


async def _sequential(port: int, requests: list[bytes], expect_status: int = 200) -> dict[str, Any]:
    """Send requests one after another on one keep-alive connection; latency of each."""
    reader, writer = await asyncio.open_connection(HOST, port)
    times, wrong = [], 0
    try:
        for req in requests:
            r = await one(reader, writer, req)
            if r.status != expect_status:
                wrong += 1
            times.append(r.t_end * 1000)
    finally:
        writer.close()
    return _stats(times) | {"unexpected_status": wrong}


def _stats(ms: list[float]) -> dict[str, Any]:
    s = sorted(ms)
    return {"n": len(s), "p50_ms": statistics.median(s), "p90_ms": s[int(0.9 * (len(s) - 1))],
            "p99_ms": s[int(0.99 * (len(s) - 1))], "mean_ms": statistics.fmean(s)}


def measure_store(gw: Target, n: int) -> dict[str, Any]:
    assert gw.auth is not None
    me = [_get("/v1/me", gw.port, gw.auth)] * n
    chat_body = json.dumps(CHAT).encode()
    chat = [build_request(HOST, gw.port, "/v1/chat/completions", chat_body, gw.auth)] * n

    async def go() -> dict[str, Any]:
        await _sequential(gw.port, me[: max(5, n // 10)])  # warm the page cache and the key cache
        await _sequential(gw.port, chat[: max(5, n // 10)])
        return {"me": await _sequential(gw.port, me), "chat_c1": await _sequential(gw.port, chat)}

    return _run(go())


def measure_store_api(store: Path, n: int) -> dict[str, Any]:
    """take_hold + settle through SqliteStore, the gateway stopped: the store's own cost."""
    from quota_proxy.store import Settlement
    from quota_proxy.store.sqlite import SqliteStore

    async def go() -> dict[str, Any]:
        async with SqliteStore(store) as st:
            acct = (await st.account_by_name("bench"))
            assert acct is not None
            holds, settles = [], []
            for i in range(n):
                rid = f"req_scale{secrets.token_hex(8)}{i}"
                t0 = time.perf_counter()
                hold = await st.take_hold(acct.id, 318, rid, "scale-bench", 120_000)
                t1 = time.perf_counter()
                await st.settle(Settlement(rid, acct.id, acct.id, None, None, hold, "quota/fast", "mock-model",
                                           42, 20, "x1", 62, False, "ok", 200))
                t2 = time.perf_counter()
                holds.append((t1 - t0) * 1000)
                settles.append((t2 - t1) * 1000)
            return {"take_hold": _stats(holds), "settle": _stats(settles)}

    return _run(go())


def measure_keys(gw: Target, keys: list[str], n: int) -> dict[str, Any]:
    fake = ["qta_live_" + "".join(secrets.choice("ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz0123456789")
                                  for _ in range(32)) for _ in range(n)]

    async def go() -> dict[str, Any]:
        hot = [_get("/v1/models", gw.port, keys[0])] * n
        await _sequential(gw.port, hot[:50])
        return {
            "cached_key": await _sequential(gw.port, hot),
            "uncached_keys": await _sequential(gw.port, [_get("/v1/models", gw.port, k) for k in keys[1 : n + 1]]),
            "unknown_keys": await _sequential(gw.port, [_get("/v1/models", gw.port, k) for k in fake], 401),
        }

    return _run(go())


def measure_open_streams(gw: Target, mock: Target, count: int, delay_ms: float) -> dict[str, Any]:
    """Open `count` slow streams at once; sample the gateway's memory while all are open."""
    assert gw.pid is not None and gw.auth is not None
    body = json.dumps({**CHAT, "stream": True, "stream_options": {"include_usage": True},
                       "mock_chunk_delay_ms": delay_ms}).encode()
    request = build_request(HOST, gw.port, "/v1/chat/completions", body, gw.auth)
    idle = procstat.memory_kb(gw.pid)
    procstat.reset_peak(gw.pid)
    cpu0 = procstat.cpu_seconds(gw.pid)

    async def go() -> dict[str, Any]:
        first_seen = 0
        all_open = asyncio.Event()
        results: list[Any] = []

        async def stream() -> None:
            nonlocal first_seen
            reader, writer = await asyncio.open_connection(HOST, gw.port, limit=2**20)
            try:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                first_seen += 1
                if first_seen == count:
                    all_open.set()
                rest = await reader.readuntil(b"0\r\n\r\n")
                results.append((status, b"data: [DONE]" in rest and b"completion_tokens" in rest))
            except Exception as exc:  # noqa: BLE001 — counted and reported
                results.append((0, repr(exc)))
            finally:
                writer.close()

        t0 = time.perf_counter()
        tasks = [asyncio.create_task(stream()) for _ in range(count)]
        try:
            await asyncio.wait_for(all_open.wait(), timeout=60)
            opened_s = time.perf_counter() - t0
        except TimeoutError:
            opened_s = float("nan")
        samples = []
        open_at_mock = []
        for _ in range(6):
            samples.append(procstat.memory_kb(gw.pid)["VmRSS"])
            open_at_mock.append(services.mock_stats(mock).get("open_streams", -1))
            await asyncio.sleep(0.25)
        await asyncio.gather(*tasks)
        ok = sum(1 for s, good in results if s == 200 and good is True)
        return {"opened_s": opened_s, "rss_open_kb": max(samples), "open_at_mock": max(open_at_mock),
                "ok": ok, "failed": count - ok,
                "failures": [r for r in results if r[0] != 200 or r[1] is not True][:3],
                "wall_s": time.perf_counter() - t0}

    before = services.mock_stats(mock)
    out = _run(go())
    after = services.mock_stats(mock)
    time.sleep(1.0)
    mem = procstat.memory_kb(gw.pid)
    out.update({
        "streams": count,
        "chunk_delay_ms": delay_ms,
        "rss_idle_mb": idle["VmRSS"] / 1024,
        "rss_open_mb": out.pop("rss_open_kb") / 1024,
        "peak_rss_mb": mem["VmHWM"] / 1024,
        "rss_after_mb": mem["VmRSS"] / 1024,
        "upstream_streams": after["delayed_streams"] - before["delayed_streams"],
        "cpu_ms_per_stream": (procstat.cpu_seconds(gw.pid) - cpu0) * 1000 / count,
    })
    out["kb_per_open_stream"] = (out["rss_open_mb"] - out["rss_idle_mb"]) * 1024 / count
    return out


def _run(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


# -- the run ----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--records", type=int)
    p.add_argument("--keys", type=int)
    p.add_argument("--streams", type=int)
    p.add_argument("--samples", type=int, help="requests per latency figure (default 500)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    records = args.records or (20_000 if args.quick else 1_000_000)
    n_keys = args.keys or (2_000 if args.quick else 100_000)
    streams = args.streams or (100 if args.quick else 1_000)
    n = args.samples or (100 if args.quick else 500)
    few_keys = min(1_000, n_keys)
    services.raise_fd_limit()
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="quota-scale-"))
    result: dict[str, Any] = {"machine": machine(), "records": records, "keys": n_keys, "streams": streams,
                              "samples": n, "command": " ".join([Path(sys.executable).name, *sys.argv])}

    def gateway_on(store: Path, name: str, stack: contextlib.ExitStack, mock: Target) -> tuple[Target, Path]:
        d = work / name
        d.mkdir(exist_ok=True)
        config, key, port = services.prepare_quota_proxy(d, mock.port, store)
        gw = stack.enter_context(services.quota_proxy(config, key, port, d / "gw.log"))
        return gw, config

    try:
        with services.mock_upstream(work) as mock:
            stores: dict[str, Any] = {}
            for name, n_records, users in (("empty", 0, 0), ("records", records, 0), ("records+users", records, 1000)):
                store = work / f"{name}.db"
                d = work / f"prep-{name}"
                d.mkdir()
                services.prepare_quota_proxy(d, mock.port, store)  # schema, account, first key
                fill = fill_requests(store, n_records, users) if n_records else None
                print(f"store {name}: {fill}", flush=True)
                with contextlib.ExitStack() as stack:
                    gw, config = gateway_on(store, name, stack, mock)
                    figures = measure_store(gw, n)
                stores[name] = {"fill": fill, **figures, "store_api": measure_store_api(store, n),
                                "ledger_verify": services.cli(config, "ledger", "verify").strip()}
                print(f"  /v1/me p50 {figures['me']['p50_ms']:.2f} ms, chat c=1 p50 "
                      f"{figures['chat_c1']['p50_ms']:.2f} ms; {stores[name]['ledger_verify']}", flush=True)
            result["stores"] = stores

            keys: dict[str, Any] = {}
            for name, count in (("few", few_keys), ("many", n_keys)):
                store = work / f"keys-{name}.db"
                d = work / f"prep-keys-{name}"
                d.mkdir()
                services.prepare_quota_proxy(d, mock.port, store)
                kept = fill_keys(store, count, n + 1)
                with contextlib.ExitStack() as stack:
                    gw, _ = gateway_on(store, f"keys-{name}", stack, mock)
                    keys[name] = {"keys_in_store": count + 2, **measure_keys(gw, kept, n)}
                print(f"keys {name} ({count}): cached p50 {keys[name]['cached_key']['p50_ms']:.3f} ms, "
                      f"uncached p50 {keys[name]['uncached_keys']['p50_ms']:.3f} ms", flush=True)
            result["keys_scale"] = keys

            with contextlib.ExitStack() as stack:
                gw, _ = gateway_on(work / "streams.db", "streams", stack, mock)
                time.sleep(0.5)
                delay = 400.0 if not args.quick else 100.0
                # Twice: if memory is leaked per stream, the second batch ends higher than the first.
                result["open_streams"] = measure_open_streams(gw, mock, streams, delay)
                result["open_streams_again"] = measure_open_streams(gw, mock, streams, delay)
            print(f"open streams: {result['open_streams']}", flush=True)
            print(f"open streams again: {result['open_streams_again']}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["wall_s"] = round(time.time() - started, 1)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or RESULTS / f"scale{'-quick' if args.quick else ''}-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    text = render(result)
    out.with_suffix(".md").write_text(text + "\n")
    print()
    print(text)
    return 0


def render(r: dict[str, Any]) -> str:
    s = r["stores"]
    lines = [
        "| store | rows (requests / ledger / usage_daily) | fill s | GET /v1/me p50 / p99 ms | chat c=1 p50 / p99 ms | take_hold p50 ms | settle p50 ms | ledger verify |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, v in s.items():
        rows = v["fill"]["rows"] if v["fill"] else None
        rows_s = f"{rows['requests']:,} / {rows['ledger']:,} / {rows['usage_daily']:,}" if rows else "0"
        lines.append(
            f"| {name} | {rows_s} | {v['fill']['seconds'] if v['fill'] else '–'} | "
            f"{v['me']['p50_ms']:.2f} / {v['me']['p99_ms']:.2f} | {v['chat_c1']['p50_ms']:.2f} / {v['chat_c1']['p99_ms']:.2f} | "
            f"{v['store_api']['take_hold']['p50_ms']:.3f} | {v['store_api']['settle']['p50_ms']:.3f} | "
            f"{'ok' if v['ledger_verify'].startswith('ledger ok') else v['ledger_verify'][:60]} |")
    k = r["keys_scale"]
    lines += ["", "| keys in store | one key, cached: p50 / p99 ms | distinct keys, uncached: p50 / p99 ms | unknown keys (401): p50 / p99 ms |",
              "|---|---|---|---|"]
    for v in k.values():
        lines.append(f"| {v['keys_in_store']:,} | {v['cached_key']['p50_ms']:.3f} / {v['cached_key']['p99_ms']:.3f} | "
                     f"{v['uncached_keys']['p50_ms']:.3f} / {v['uncached_keys']['p99_ms']:.3f} | "
                     f"{v['unknown_keys']['p50_ms']:.3f} / {v['unknown_keys']['p99_ms']:.3f} |")
    lines += ["", "| batch | open streams | chunk delay ms | all open after s | RSS before MB | RSS all open MB | KB per open stream | peak RSS MB | RSS after MB | completed ok | upstream streams | CPU ms/stream |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for batch, key in ((1, "open_streams"), (2, "open_streams_again")):
        o = r.get(key)
        if o is None:
            continue
        lines.append(
            f"| {batch} | {o['streams']:,} (mock saw {o['open_at_mock']} open) | {o['chunk_delay_ms']:g} | {o['opened_s']:.2f} | {o['rss_idle_mb']:.1f} | "
            f"{o['rss_open_mb']:.1f} | {o['kb_per_open_stream']:.1f} | {o['peak_rss_mb']:.1f} | "
            f"{o['rss_after_mb']:.1f} | {o['ok']}/{o['streams']} | {o['upstream_streams']} | {o['cpu_ms_per_stream']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
