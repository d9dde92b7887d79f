"""Benchmark quota-proxy against the upstream it fronts, side by side, in one run.

    python bench/run.py                  # full run (~6 min on 2 cores; ~10 min with LiteLLM)
    python bench/run.py --quick          # smoke run, a few seconds, same checks
    python bench/run.py --with-litellm   # also LiteLLM proxy (own venv, installed on first use)
    python bench/run.py --baseline DIR   # also quota-proxy from DIR (git worktree add DIR <commit>)

It starts the mock upstream (bench/mock_upstream.py) and quota-proxy in front of it (one
worker, metering and SQLite settlement on, default logging), and for each scenario runs
wrk (bench/wrk_post.lua, every response's status and body checked) against DIRECT (the
mock) and each gateway, alternating in time, for several rounds. After each wrk run a
short pass of bench/rawclient.py measures stream time-to-first-byte and counts upstream
calls exactly. It reports medians and ranges as Markdown and writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import procstat  # noqa: E402
import services  # noqa: E402
from rawclient import run_pass_sync  # noqa: E402
from services import BENCH, HOST, Target  # noqa: E402

RESULTS = BENCH / "results"
MESSAGES = [
    {"role": "system", "content": "You are a concise assistant for a team of developers."},
    {"role": "user", "content": "In one sentence, why should a gateway add as little latency as it can?"},
]


@dataclass(frozen=True)
class Scenario:
    name: str
    stream: bool
    concurrency: int
    delay_ms: float = 0.0

    @property
    def kind(self) -> str:
        if not self.stream:
            return "chat"
        return f"stream+{self.delay_ms:g}ms" if self.delay_ms else "stream"


FULL = [
    Scenario("chat c=1", False, 1),
    Scenario("chat c=32", False, 32),
    Scenario("chat c=64", False, 64),
    Scenario("stream c=1", True, 1),
    Scenario("stream c=32", True, 32),
    Scenario("stream+2ms c=1", True, 1, 2.0),
    Scenario("stream+2ms c=32", True, 32, 2.0),
]
QUICK = [
    Scenario("chat c=1", False, 1),
    Scenario("chat c=32", False, 32),
    Scenario("stream+1ms c=32", True, 32, 1.0),
]

CLEAN_FOREIGN = 0.25

# Issue 4's targets for one gateway worker.
TARGETS = {
    "added_p50_ms_c1": 0.5,
    "added_p99_ms_c1": 2.0,
    "cpu_ms_per_request": 0.4,
    "rps_c64": 2000.0,
    "added_ttfb_p50_ms": 0.5,
    "cpu_ms_per_stream": 1.0,
    "rss_idle_mb": 60.0,
    "rss_load_mb": 100.0,
}


def body_for(target: Target, sc: Scenario) -> bytes:
    body: dict[str, Any] = {"model": target.model, "messages": MESSAGES, "max_tokens": 64}
    if sc.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        if sc.delay_ms:
            body["mock_chunk_delay_ms"] = sc.delay_ms
    return json.dumps(body).encode()


def expectations(sc: Scenario) -> tuple[bytes, ...]:
    # The mock's reply ends with "never lost."; usage must reach the caller in both modes.
    if sc.stream:
        return (b" lost.", b"completion_tokens", b"data: [DONE]")
    return (b"never lost.", b"completion_tokens")


def run_wrk(target: Target, sc: Scenario, duration_s: int, workdir: Path) -> dict[str, Any]:
    body_file = workdir / f"body-{target.name}-{sc.kind}.json"
    body_file.write_bytes(body_for(target, sc))
    env = {
        **os.environ,
        "BENCH_BODY_FILE": str(body_file),
        "BENCH_AUTH": target.auth or "",
        "BENCH_EXPECT": "\t".join(e.decode() for e in expectations(sc)),
    }
    threads = 1 if sc.concurrency == 1 else 2
    argv = ["wrk", f"-t{threads}", f"-c{sc.concurrency}", f"-d{duration_s}s", "--timeout", "10s",
            "-s", str(BENCH / "wrk_post.lua"), target.url]
    out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=duration_s + 60)
    for line in out.stdout.splitlines():
        if line.startswith("WRKJSON "):
            return json.loads(line[len("WRKJSON "):])  # type: ignore[no-any-return]
    raise RuntimeError(f"wrk printed no summary:\n{out.stdout}\n{out.stderr}")


def settled_rows(store: Path | None) -> int | None:
    if store is None:
        return None
    import sqlite3

    with contextlib.closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=10)) as db:
        return int(db.execute("SELECT count(*) FROM requests").fetchone()[0])


def _children_cpu() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def wait_quiet(max_wait_s: float, threshold: float = 0.25) -> float:
    """Wait (at most max_wait_s) until the machine is idle, since it may be shared.

    Nothing of ours runs between measurements, so any CPU busy now is someone else's.
    Returns the foreign load (cores) seen last.
    """
    deadline = time.monotonic() + max_wait_s
    while True:
        b0, _ = procstat.machine_cpu()
        time.sleep(0.3)
        b1, _ = procstat.machine_cpu()
        load = (b1 - b0) / 0.3
        if load <= threshold or time.monotonic() >= deadline:
            return load


def measure(target: Target, mock: Target, sc: Scenario, duration_s: int, raw_s: float,
            workdir: Path, store: Path | None, max_wait_s: float = 0.0) -> dict[str, Any]:
    """One wrk run plus one exact-count pass against one target."""
    assert target.pid is not None and mock.pid is not None
    load_before = wait_quiet(max_wait_s) if max_wait_s > 0 else None
    stats0 = services.mock_stats(mock)
    rows0 = settled_rows(store)
    procstat.reset_peak(target.pid)
    loop0 = procstat.main_thread_cpu_seconds(target.pid)
    busy0, steal0 = procstat.machine_cpu()
    kids0 = _children_cpu()
    cpu0, mcpu0, t0 = procstat.cpu_seconds(target.pid), procstat.cpu_seconds(mock.pid), time.perf_counter()
    wrk = run_wrk(target, sc, duration_s, workdir)
    cpu1, mcpu1, t1 = procstat.cpu_seconds(target.pid), procstat.cpu_seconds(mock.pid), time.perf_counter()
    loop1 = procstat.main_thread_cpu_seconds(target.pid)
    busy1, steal1 = procstat.machine_cpu()
    ours = (cpu1 - cpu0) + (0 if target.pid == mock.pid else mcpu1 - mcpu0) + (_children_cpu() - kids0)
    mem = procstat.memory_kb(target.pid)
    # wrk stops with requests in flight; a slow gateway may still forward its backlog.
    stats1, drain_s = services.drain(mock, target)
    rows1 = settled_rows(store)
    calls = stats1["chat"] - stats0["chat"]
    done = max(wrk["requests"], 1)
    run: dict[str, Any] = {
        "target": target.name,
        "scenario": sc.name,
        "rps": wrk["requests"] / (wrk["duration_us"] / 1e6),
        "p50_ms": wrk["latency_us"]["p50"] / 1000,
        "p90_ms": wrk["latency_us"]["p90"] / 1000,
        "p99_ms": wrk["latency_us"]["p99"] / 1000,
        "max_ms": wrk["latency_us"]["max"] / 1000,
        "requests": wrk["requests"],
        "sent": wrk["sent"],
        "good": wrk["good"],
        "non200": wrk["non200"],
        "bad_body": wrk["bad"],
        "socket_errors": sum(v for k, v in wrk["errors"].items() if k != "status"),
        "sample": wrk["sample"],
        "upstream_calls": calls,
        "calls_per_request": calls / max(wrk["sent"], 1),
        "cpu_ms_per_request": (cpu1 - cpu0) * 1000 / done,
        "cpu_main_thread_ms_per_request": (loop1 - loop0) * 1000 / done,
        "cpu_util": (cpu1 - cpu0) / (t1 - t0),
        "mock_cpu_util": (mcpu1 - mcpu0) / (t1 - t0),
        "wrk_cpu_util": (_children_cpu() - kids0) / (t1 - t0),
        # CPU that other processes on the machine used during the run (should be ~0).
        "foreign_cpu_util": max(0.0, (busy1 - busy0) - ours) / (t1 - t0),
        "steal_util": (steal1 - steal0) / (t1 - t0),
        "rss_mb": mem["VmRSS"] / 1024,
        "peak_rss_mb": mem["VmHWM"] / 1024,
        "foreign_load_before": load_before,
        "drain_s": drain_s,
        "settled_rows": None if rows0 is None or rows1 is None else rows1 - rows0,
    }
    # Under wrk neither side's count is exact: wrk stops with requests in flight, and the
    # gateway settles (without an upstream call) those whose client left first. The exact
    # pass after each run is the figure that counts.
    run["calls_per_metered_request"] = (calls / run["settled_rows"]) if run["settled_rows"] else None
    stats2 = stats1
    raw = run_pass_sync(HOST, target.port, target.path, body_for(target, sc), target.auth,
                        expectations(sc), sc.concurrency, duration_s=raw_s)
    stats3 = services.mock_stats(mock)  # every answer is in: every upstream call was made
    run["exact"] = {
        "requests": raw.requests,
        "good": raw.good,
        "non200": raw.non200,
        "bad_body": raw.bad,
        "errors": raw.errors,
        "sample": raw.sample,
        "upstream_calls": stats3["chat"] - stats2["chat"],
        "delayed_streams": stats3["delayed_streams"] - stats2["delayed_streams"],
        "ttfb_head_p50_ms": pct(raw.ttfb_head, 50) * 1000,
        "ttfb_p50_ms": pct(raw.ttfb_first, 50) * 1000,
        "ttfb_p99_ms": pct(raw.ttfb_first, 99) * 1000,
        "total_p50_ms": pct(raw.total, 50) * 1000,
    }
    run["exact"]["calls_per_request"] = run["exact"]["upstream_calls"] / max(raw.requests, 1)
    return run


def _med(runs: list[dict[str, Any]], key: str, sub: str | None = None) -> dict[str, float]:
    values = [(r[sub][key] if sub else r[key]) for r in runs]
    values = [v for v in values if v is not None and v == v]
    if not values:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(runs: list[dict[str, Any]], scenarios: list[Scenario], targets: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for sc in scenarios:
        per: dict[str, Any] = {}
        by_target = {t: [r for r in runs if r["scenario"] == sc.name and r["target"] == t] for t in targets}
        for t, rs in by_target.items():
            if not rs:
                continue
            s = {k: _med(rs, k) for k in ("rps", "p50_ms", "p99_ms", "cpu_ms_per_request",
                                            "cpu_main_thread_ms_per_request", "cpu_util",
                                            "mock_cpu_util", "wrk_cpu_util", "foreign_cpu_util",
                                            "peak_rss_mb", "calls_per_request",
                                            "calls_per_metered_request")}
            for k in ("ttfb_p50_ms", "ttfb_p99_ms", "ttfb_head_p50_ms", "calls_per_request"):
                s[f"exact_{k}"] = _med(rs, k, "exact")
            s["rounds"] = len(rs)
            # The machine may be shared: the rounds during which other processes used
            # little CPU (< CLEAN_FOREIGN of a core), and their medians.
            clean = [r for r in rs if r["foreign_cpu_util"] < CLEAN_FOREIGN]
            s["clean"] = {"rounds": len(clean), **({k: _med(clean, k) for k in (
                "rps", "p50_ms", "p99_ms", "cpu_ms_per_request")} if clean else {})}
            s["requests"] = sum(r["requests"] for r in rs)
            s["non200"] = sum(r["non200"] + r["exact"]["non200"] for r in rs)
            s["bad_body"] = sum(r["bad_body"] + r["exact"]["bad_body"] for r in rs)
            s["socket_errors"] = sum(r["socket_errors"] + r["exact"]["errors"] for r in rs)
            s["exact_requests"] = sum(r["exact"]["requests"] for r in rs)
            s["exact_upstream_calls"] = sum(r["exact"]["upstream_calls"] for r in rs)
            s["samples"] = sorted({r["sample"] for r in rs if r["sample"]} |
                                  {r["exact"]["sample"] for r in rs if r["exact"]["sample"]})[:3]
            per[t] = s
        # Added cost, paired by round (each gateway run sits next to a direct run in time).
        direct = by_target.get("direct", [])
        for t in targets:
            if t == "direct" or t not in per:
                continue
            pairs = list(zip(direct, by_target[t], strict=False))
            for key, sub in (("p50_ms", None), ("p99_ms", None), ("ttfb_p50_ms", "exact")):
                diffs = [(b[sub][key] - a[sub][key]) if sub else (b[key] - a[key]) for a, b in pairs]
                name = "added_" + key.replace("_ms", "") + "_ms"
                per[t][name] = {"median": statistics.median(diffs), "min": min(diffs), "max": max(diffs)}
        out[sc.name] = per
    return out


def fmt(x: float, digits: int = 2) -> str:
    if x != x:
        return "–"
    return f"{x:,.{digits}f}"


def rng(m: dict[str, float], digits: int = 2) -> str:
    return f"{fmt(m['median'], digits)} [{fmt(m['min'], digits)}–{fmt(m['max'], digits)}]"


def render(summary: dict[str, Any], scenarios: list[Scenario], targets: list[str]) -> str:
    lines = [
        "| scenario | target | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | CPU ms/req (loop thread) | CPU util | peak RSS MB | upstream calls / client requests (exact pass) | non-200 / bad / errors | mock CPU | unattributed CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for sc in scenarios:
        for t in targets:
            s = summary[sc.name].get(t)
            if s is None:
                continue
            added50 = rng(s["added_p50_ms"]) if "added_p50_ms" in s else ""
            added99 = rng(s["added_p99_ms"]) if "added_p99_ms" in s else ""
            calls = (f"{s['exact_upstream_calls']}/{s['exact_requests']} = "
                     f"{s['exact_upstream_calls'] / max(s['exact_requests'], 1):.2f}")
            lines.append(
                f"| {sc.name} | {t} | {rng(s['rps'], 0)} | {rng(s['p50_ms'])} | {rng(s['p99_ms'])} | "
                f"{added50} | {added99} | {fmt(s['cpu_ms_per_request']['median'], 3)} "
                f"({fmt(s['cpu_main_thread_ms_per_request']['median'], 3)}) | "
                f"{fmt(s['cpu_util']['median'] * 100, 0)}% | {fmt(s['peak_rss_mb']['median'], 1)} | {calls} | "
                f"{s['non200']} / {s['bad_body']} / {s['socket_errors']} | "
                f"{fmt(s['mock_cpu_util']['median'] * 100, 0)}% | {fmt(s['foreign_cpu_util']['median'] * 100, 0)}% |"
            )
    gateways = [t for t in targets if t != "direct"]
    lines += [
        "",
        f"Rounds during which other processes used < {CLEAN_FOREIGN:.0%} of a core (this machine is shared):",
        "",
        "| scenario | target | quiet rounds | req/s | p50 ms | p99 ms | CPU ms/req |",
        "|---|---|---|---|---|---|---|",
    ]
    for sc in scenarios:
        for t in gateways:
            c = summary[sc.name].get(t, {}).get("clean")
            if not c:
                continue
            if not c["rounds"]:
                lines.append(f"| {sc.name} | {t} | 0 | | | | |")
                continue
            lines.append(f"| {sc.name} | {t} | {c['rounds']} | {rng(c['rps'], 0)} | {rng(c['p50_ms'])} | "
                         f"{rng(c['p99_ms'])} | {fmt(c['cpu_ms_per_request']['median'], 3)} |")
    streaming = [sc for sc in scenarios if sc.stream]
    if streaming:
        lines += [
            "",
            "Streams, time to first byte (raw client; head = response head, first = first `data:` event):",
            "",
            "| scenario | target | TTFB head p50 ms | TTFB first p50 ms | TTFB first p99 ms | added TTFB p50 ms | CPU ms/stream |",
            "|---|---|---|---|---|---|---|",
        ]
        for sc in streaming:
            for t in targets:
                s = summary[sc.name].get(t)
                if s is None:
                    continue
                added = rng(s["added_ttfb_p50_ms"], 3) if "added_ttfb_p50_ms" in s else ""
                lines.append(
                    f"| {sc.name} | {t} | {rng(s['exact_ttfb_head_p50_ms'], 3)} | {rng(s['exact_ttfb_p50_ms'], 3)} | "
                    f"{rng(s['exact_ttfb_p99_ms'], 3)} | {added} | {fmt(s['cpu_ms_per_request']['median'], 3)} |"
                )
    return "\n".join(lines)


def verdicts(summary: dict[str, Any], memory: dict[str, Any], target: str) -> list[tuple[str, float, float, bool]]:
    """(figure, measured, target, met) for issue 4's targets, where this run measured them."""
    out = []

    def get(scn: str, key: str) -> float | None:
        s = summary.get(scn, {}).get(target)
        return None if s is None or key not in s else s[key]["median"]

    checks = [
        ("added p50 ms, chat c=1", get("chat c=1", "added_p50_ms"), TARGETS["added_p50_ms_c1"], False),
        ("added p99 ms, chat c=1", get("chat c=1", "added_p99_ms"), TARGETS["added_p99_ms_c1"], False),
        ("CPU ms per request, chat c=32", get("chat c=32", "cpu_ms_per_request"), TARGETS["cpu_ms_per_request"], False),
        ("req/s, chat c=64", get("chat c=64", "rps"), TARGETS["rps_c64"], True),
        ("added TTFB p50 ms, stream c=1", get("stream c=1", "added_ttfb_p50_ms"), TARGETS["added_ttfb_p50_ms"], False),
        ("CPU ms per stream, stream c=32", get("stream c=32", "cpu_ms_per_request"), TARGETS["cpu_ms_per_stream"], False),
        ("RSS MB idle (after start)", memory.get(target, {}).get("idle_start_mb"), TARGETS["rss_idle_mb"], False),
        ("peak RSS MB under load", memory.get(target, {}).get("peak_load_mb"), TARGETS["rss_load_mb"], False),
    ]
    for name, value, goal, higher in checks:
        if value is not None:
            out.append((name, value, goal, value >= goal if higher else value <= goal))
    return out


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    import importlib.metadata as md

    for pkg in ("quota-proxy", "uvicorn", "uvloop", "httptools", "httpx", "httpcore", "orjson", "aiosqlite", "anyio"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[pkg] = md.version(pkg)
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.splitlines()
    git = subprocess.run(["git", "-C", str(BENCH.parent), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(BENCH.parent), "status", "--porcelain", "--", "quota_proxy"],
                           capture_output=True, text=True).stdout.strip()
    import hashlib
    import sqlite3

    digest = hashlib.sha256()
    for path in sorted((BENCH.parent / "quota_proxy").rglob("*")):
        if path.suffix in (".py", ".sql") and path.is_file():
            digest.update(str(path.relative_to(BENCH.parent)).encode() + b"\0" + path.read_bytes())
    changed = subprocess.run(["git", "-C", str(BENCH.parent), "status", "--porcelain", "--", "quota_proxy"],
                             capture_output=True, text=True).stdout.split("\n")
    return {
        "code_sha256": digest.hexdigest()[:16],
        "uncommitted": [line.strip() for line in changed if line.strip()],
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "wrk": wrk[0] if wrk else "unknown",
        "versions": versions,
        "git": git + ("+dirty(quota_proxy)" if dirty else ""),
    }


def scan_gateway_log(log: Path) -> dict[str, Any]:
    """Count the access log's statuses and outcomes, and every warning, error or traceback."""
    statuses: dict[str, int] = {}
    outcomes: dict[str, int] = {}
    other: list[str] = []
    other_count = 0
    with contextlib.suppress(OSError), open(log, errors="replace") as f:
        for line in f:
            if line.startswith("{"):
                try:
                    rec = json.loads(line)
                except ValueError:
                    rec = None
                if isinstance(rec, dict) and "status" in rec:
                    statuses[str(rec["status"])] = statuses.get(str(rec["status"]), 0) + 1
                    if "outcome" in rec:
                        outcomes[rec["outcome"]] = outcomes.get(rec["outcome"], 0) + 1
                    continue
                if isinstance(rec, dict) and "level" in rec:  # a structured log line
                    if str(rec["level"]).lower() in ("warning", "error", "critical", "exception"):
                        other_count += 1
                        if len(other) < 5:
                            other.append(line.rstrip()[:300])
                    continue
            if any(w in line for w in ("Traceback", "ERROR", "Exception", "WARNING", "failed")):
                other_count += 1
                if len(other) < 5:
                    other.append(line.rstrip()[:300])
    return {"statuses": statuses, "outcomes": outcomes, "problem_lines": other_count, "examples": other}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round, 1 s per run, 3 scenarios")
    p.add_argument("--with-litellm", action="store_true", help="also measure LiteLLM proxy (no database)")
    p.add_argument("--rounds", type=int, help="rounds per scenario (default 3; quick 1)")
    p.add_argument("--duration", type=int, help="seconds per wrk run (default 6; quick 1)")
    p.add_argument("--raw-seconds", type=float, help="seconds per exact-count/TTFB pass (default 1.5)")
    p.add_argument("--scenarios", help="comma-separated scenario names to run (default: all)")
    p.add_argument("--log-level", default="info", help="quota-proxy's --log-level (default info, as shipped)")
    p.add_argument("--out", type=Path, help="JSON results file (default bench/results/<run>.json)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, store)")
    p.add_argument("--max-wait", type=float, help="seconds to wait for a quiet machine before each "
                   "run (default 10; quick 0): other processes' CPU would skew the figures")
    p.add_argument("--baseline", type=Path, metavar="SOURCE",
                   help="also measure quota-proxy run from another source tree (a `git worktree` "
                        "of an earlier commit) as target 'baseline': an A/B in the same rounds")
    p.add_argument("--from-json", type=Path, metavar="RESULTS",
                   help="measure nothing: re-summarise and print a saved results file")
    args = p.parse_args(argv)

    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        scs = [Scenario(**sc) for sc in saved["settings"]["scenarios"]]
        names = list(dict.fromkeys(r["target"] for r in saved["runs"]))
        saved["summary"] = summarize(saved["runs"], scs, names)
        print(report(saved, scs, names, args.from_json))
        return 0
    if shutil.which("wrk") is None:
        print("wrk is not installed (Debian: apt-get install -y wrk)", file=sys.stderr)
        return 2
    scenarios = QUICK if args.quick else FULL
    if args.scenarios:
        wanted = {s.strip() for s in args.scenarios.split(",")}
        scenarios = [s for s in FULL + QUICK if s.name in wanted]
        scenarios = list(dict.fromkeys(scenarios))
    rounds = args.rounds or (1 if args.quick else 3)
    duration = args.duration or (1 if args.quick else 6)
    raw_s = args.raw_seconds or (0.3 if args.quick else 1.5)
    max_wait = args.max_wait if args.max_wait is not None else (0.0 if args.quick else 10.0)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_path = args.out or RESULTS / (("quick" if args.quick else "run") + f"-{stamp}.json")

    services.raise_fd_limit()
    host = machine()  # before the gateway starts: the code hash is of the code under test
    workdir = Path(tempfile.mkdtemp(prefix="quota-bench-"))
    started = time.time()
    runs: list[dict[str, Any]] = []
    memory: dict[str, Any] = {}
    info: dict[str, Any] = {}
    try:
        with contextlib.ExitStack() as stack:
            mock = stack.enter_context(services.mock_upstream(workdir))
            store = workdir / "quota.db"
            config, key, port = services.prepare_quota_proxy(workdir, mock.port, store)
            gw_log = workdir / "quota-proxy.log"
            gateway = stack.enter_context(services.quota_proxy(config, key, port, gw_log, args.log_level))
            targets: list[Target] = [mock, gateway]
            stores = {gateway.name: (config, store)}
            if args.baseline:
                base_dir = workdir / "baseline"
                base_dir.mkdir()
                base_config, base_key, base_port = services.prepare_quota_proxy(
                    base_dir, mock.port, source=args.baseline)
                targets.append(stack.enter_context(services.quota_proxy(
                    base_config, base_key, base_port, base_dir / "quota-proxy.log", args.log_level,
                    source=args.baseline, name="baseline")))
                stores["baseline"] = (base_config, base_dir / "quota.db")
            if args.with_litellm:
                targets.append(stack.enter_context(services.litellm(workdir, mock.port)))
            time.sleep(0.5)
            for t in targets[1:]:
                assert t.pid is not None
                memory[t.name] = {"idle_start_mb": procstat.memory_kb(t.pid)["VmRSS"] / 1024}
            print(f"# quota-proxy bench: {len(scenarios)} scenarios x {rounds} rounds x "
                  f"{[t.name for t in targets]}, {duration} s per run", flush=True)
            warm = Scenario("warmup", False, 8)
            warm_s = Scenario("warmup-stream", True, 8)
            for t in targets:
                for sc in (warm, warm_s):
                    if args.quick:
                        run_pass_sync(HOST, t.port, t.path, body_for(t, sc), t.auth, expectations(sc),
                                      sc.concurrency, count=100)
                    else:
                        run_wrk(t, sc, 2, workdir)
            for t in targets[1:]:
                assert t.pid is not None
                memory[t.name]["idle_warm_mb"] = procstat.memory_kb(t.pid)["VmRSS"] / 1024
            for rnd in range(rounds):
                for sc in scenarios:
                    order = targets if rnd % 2 == 0 else targets[::-1]
                    for t in order:
                        run = measure(t, mock, sc, duration, raw_s, workdir,
                                      stores[t.name][1] if t.name in stores else None, max_wait)
                        run["round"] = rnd + 1
                        runs.append(run)
                        print(f"  round {rnd + 1} {sc.name:16} {t.name:12} {run['rps']:9.0f} req/s "
                              f"p50 {run['p50_ms']:7.2f} ms p99 {run['p99_ms']:7.2f} ms "
                              f"cpu {run['cpu_ms_per_request']:.3f} ms/req non200 {run['non200']} "
                              f"bad {run['bad_body']} calls/req {run['calls_per_request']:.4f} "
                              f"exact {run['exact']['upstream_calls']}/{run['exact']['requests']} "
                              f"foreign cpu {run['foreign_cpu_util'] * 100:.0f}%",
                              flush=True)
            time.sleep(1.0)
            for t in targets[1:]:
                assert t.pid is not None
                mem = procstat.memory_kb(t.pid)
                memory[t.name]["idle_after_mb"] = mem["VmRSS"] / 1024
                memory[t.name]["peak_load_mb"] = max(
                    [r["peak_rss_mb"] for r in runs if r["target"] == t.name] or [mem["VmHWM"] / 1024])
            info["mock_connections"] = services.mock_stats(mock)["connections"]
        # Everything is stopped: check the books the gateway kept.
        info["ledger_verify"] = services.cli(config, "ledger", "verify").strip()[-500:]
        info["gateway_log"] = scan_gateway_log(gw_log)
        info["open_holds"] = _open_holds(store)
        if args.baseline:
            base_config, base_store = stores["baseline"]
            info["baseline"] = {
                "source": str(args.baseline),
                "git": subprocess.run(["git", "-C", str(args.baseline), "rev-parse", "--short", "HEAD"],
                                      capture_output=True, text=True).stdout.strip(),
                "ledger_verify": services.cli(base_config, "ledger", "verify",
                                              source=args.baseline).strip()[-500:],
                "open_holds": _open_holds(base_store),
            }
    finally:
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    names = [t.name for t in targets]
    summary = summarize(runs, scenarios, names)
    result = {
        "kind": "quick" if args.quick else "full",
        "started": dt.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
        "wall_s": round(time.time() - started, 1),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": host,
        "litellm": services.litellm_version() if args.with_litellm else None,
        "settings": {"rounds": rounds, "duration_s": duration, "raw_pass_s": raw_s,
                     "log_level": args.log_level, "scenarios": [asdict(s) for s in scenarios]},
        "targets": TARGETS,
        "memory": memory,
        "checks": info,
        "summary": summary,
        "runs": runs,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1))
    text = report(result, scenarios, names, out_path)
    out_path.with_suffix(".md").write_text(text + "\n")
    print()
    print(text)
    failed = [f"{r['target']} {r['scenario']} round {r['round']}: {r['sample'] or r['exact']['sample']}"
              for r in runs
              if r["non200"] or r["bad_body"] or r["socket_errors"] or r["exact"]["non200"]
              or r["exact"]["bad_body"] or r["exact"]["errors"]
              or r["exact"]["upstream_calls"] != r["exact"]["requests"]]
    if failed:
        print(f"\nVERIFICATION FAILED in {len(failed)} runs (non-200, bad bodies, errors, or upstream "
              "calls != client requests):", *failed[:10], sep="\n  ", file=sys.stderr)
        return 1
    return 0


def report(result: dict[str, Any], scenarios: list[Scenario], names: list[str], out_path: Path) -> str:
    summary, memory, info = result["summary"], result["memory"], result["checks"]
    table = render(summary, scenarios, names)
    mem_lines = ["", "| target | RSS idle at start MB | idle after warm-up MB | peak under load MB | idle after load MB |",
                 "|---|---|---|---|---|"]
    for name, m in memory.items():
        mem_lines.append(f"| {name} | {fmt(m['idle_start_mb'], 1)} | {fmt(m['idle_warm_mb'], 1)} | "
                         f"{fmt(m['peak_load_mb'], 1)} | {fmt(m['idle_after_mb'], 1)} |")
    verdict_lines = ["", "| issue 4 target | measured (quota-proxy) | target | met |", "|---|---|---|---|"]
    for name, value, goal, met in verdicts(summary, memory, "quota-proxy"):
        verdict_lines.append(f"| {name} | {fmt(value, 3)} | {fmt(goal, 1)} | {'yes' if met else '**no**'} |")
    return "\n".join([table, *mem_lines, *verdict_lines,
                       "", f"gateway log: {json.dumps(info['gateway_log'])}",
                       f"ledger verify: {info['ledger_verify']!r}; open holds after the run: {info['open_holds']}",
                       *_baseline_lines(info.get("baseline")),
                       f"results: {out_path}", f"wall time: {result['wall_s']} s"])


def _baseline_lines(baseline: dict[str, Any] | None) -> list[str]:
    if baseline is None:
        return []
    return [f"baseline: {baseline['source']} at {baseline['git']}; ledger verify: "
            f"{baseline['ledger_verify']!r}; open holds after the run: {baseline['open_holds']}"]


def _open_holds(store: Path) -> int | None:
    import sqlite3

    with contextlib.suppress(sqlite3.Error), contextlib.closing(sqlite3.connect(store)) as db:
        return int(db.execute("SELECT count(*) FROM holds").fetchone()[0])
    return None


if __name__ == "__main__":
    sys.exit(main())
