"""Profile quota-proxy under load with py-spy and list the hot functions.

    pip install py-spy
    python bench/profile.py                      # chat c=1, chat c=32, stream c=32; 10 s each
    python bench/profile.py --seconds 5 --scenario "chat c=32"

Starts the mock upstream and the gateway as bench/run.py does, drives them with wrk, and
samples the gateway with `py-spy record` twice per scenario: once to a flame graph
(bench/results/profile-<scenario>.svg), once as collapsed stacks (…-raw.txt), from which
it prints the top functions by own time (the leaf of each sample) and by total time.
Sampling slows the gateway a little: take throughput figures from run.py, not from here.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import json  # noqa: E402
import os  # noqa: E402

import services  # noqa: E402
from run import FULL, RESULTS, Scenario, body_for, expectations  # noqa: E402

_LINE = re.compile(r"^(.*) (\d+)$")


def wrk_background(target: services.Target, sc: Scenario, seconds: int, workdir: Path) -> subprocess.Popen[str]:
    body_file = workdir / "profile-body.json"
    body_file.write_bytes(body_for(target, sc))
    env = {**os.environ, "BENCH_BODY_FILE": str(body_file), "BENCH_AUTH": target.auth or "",
           "BENCH_EXPECT": "\t".join(e.decode() for e in expectations(sc))}
    threads = 1 if sc.concurrency == 1 else 2
    return subprocess.Popen(
        ["wrk", f"-t{threads}", f"-c{sc.concurrency}", f"-d{seconds}s", "--timeout", "10s",
         "-s", str(services.BENCH / "wrk_post.lua"), target.url],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )


def spy(pid: int, seconds: int, fmt: str, out: Path, rate: int, native: bool) -> None:
    argv = ["py-spy", "record", "--pid", str(pid), "--duration", str(seconds), "--rate", str(rate), "--threads", "--gil",
            "--format", fmt, "--output", str(out), "--nolineno"]
    if native:
        argv.append("--native")
    subprocess.run(argv, check=True, capture_output=True, timeout=seconds + 60)


# Where a sample's time goes, by the frames on its stack (inclusive; a sample may count twice).
LAYERS = (
    ("upstream call: the HTTP client (connect, send, read, parse)", ("AsyncClient.send (httpx",
                                                                     "Response.aread (httpx",
                                                                     "Response.aiter_raw (httpx",
                                                                     "Response.aclose (httpx",
                                                                     "UpstreamClient.",
                                                                     "UpstreamResponse.")),
    ("upstream: opening connections", ("UpstreamClient._connect", "AsyncHTTPConnection._connect")),
    ("httpcore pool bookkeeping (per-connection checks)", ("_assign_requests_to_connections",)),
    ("store (aiosqlite hand-off, on the loop)", ("SqliteStore.",)),
    ("metering: parse, estimate, rewrite (metering.py, tokens.py)", ("_parse (quota_proxy/metering",
                                                                     "estimate_", "dumps (quota_proxy")),
    ("metering: settle (incl. the store call)", ("settle_once (quota_proxy",)),
    ("sending to the client (uvicorn send)", ("RequestResponseCycle.send (uvicorn",)),
    ("SSE relay (sse.py)", ("SSEMeter.",)),
    ("auth (key cache)", ("KeyCache.lookup",)),
    ("access log (logging)", ("Logger.info", "Logger._log")),
    ("metrics (prometheus_client)", ("Metrics.observe", "prometheus_client")),
    ("anyio task group / cancel scopes", ("TaskGroup.", "CancelScope.")),
    ("uvicorn protocol, outside the app", ("HttpToolsProtocol.",)),
)


def top_functions(raw: Path, n: int = 15) -> dict[str, Any]:
    """Own time (leaf frame) and total time per function, from py-spy's collapsed stacks.

    Recorded with --threads, each stack starts with its thread; the event loop runs on
    MainThread, SQLite statements on aiosqlite's worker threads.
    """
    own: Counter[str] = Counter()
    layers: Counter[str] = Counter()
    own_main: Counter[str] = Counter()
    total: Counter[str] = Counter()
    modules: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        frames, count = m.group(1).split(";"), int(m.group(2))
        thread = re.sub(r"^thread \(\d+\): ", "", frames[0]) if frames[0].startswith("thread (") else "?"
        thread = re.sub(r"^Thread-\d+ ", "", thread)
        frames = frames[1:] if frames[0].startswith("thread (") else frames
        if not frames:
            continue
        samples += count
        threads[thread] += count
        own[frames[-1]] += count
        if thread == "MainThread":
            own_main[frames[-1]] += count
        modules[_module(frames[-1])] += count
        for f in set(frames):
            total[f] += count
        stack = ";".join(frames)
        for layer, needles in LAYERS:
            if any(needle in stack for needle in needles):
                layers[layer] += count

    def share(counter: Counter[str]) -> list[tuple[str, int, float]]:
        return [(f, c, 100 * c / samples) for f, c in counter.most_common(n)]

    # Frames on (nearly) every stack, the server's trunk, say nothing: leave them out.
    branches = Counter({f: c for f, c in total.items() if c < 0.9 * samples})
    return {"samples": samples, "threads": share(threads), "own": share(own),
            "own_main": share(own_main), "total": share(branches), "modules": share(modules),
            "layers": [(name, layers[name], 100 * layers[name] / samples) for name, _ in LAYERS]}


def _module(frame: str) -> str:
    """'send (quota_proxy/metering.py)' -> 'quota_proxy/metering.py'; by package for libraries."""
    m = re.search(r"\(([^)]*)\)$", frame)
    path = m.group(1) if m else frame
    if path.startswith("quota_proxy/"):
        return path
    return path.split("/")[0] if "/" in path else path


def render(name: str, top: dict[str, Any]) -> str:
    lines = [f"### {name} — {top['samples']} samples (shares are of all non-idle samples)", "",
             "| thread | % |", "|---|---|"]
    lines += [f"| {t} | {p:.1f} |" for t, _c, p in top["threads"]]
    for title, key in (("own time, all threads", "own"), ("own time, event loop (MainThread)", "own_main"),
                       ("total time (inclusive; frames on >90% of stacks left out)", "total")):
        lines += ["", f"| # | {title} % | function (file) |", "|---|---|---|"]
        lines += [f"| {i} | {p:.1f} | `{f}` |" for i, (f, _c, p) in enumerate(top[key], 1)]
    lines += ["", "| layer (inclusive) | % |", "|---|---|"]
    lines += [f"| {name} | {p:.1f} |" for name, _c, p in top["layers"]]
    lines += ["", "| own time by module / package | % |", "|---|---|"]
    lines += [f"| `{f}` | {p:.1f} |" for f, _c, p in top["modules"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--scenario", action="append", help="scenario name from run.py (repeatable)")
    p.add_argument("--native", action="store_true", help="include C frames (sqlite3, orjson, …)")
    p.add_argument("--log-level", default="info")
    p.add_argument("--render", type=Path, nargs="+", metavar="RAW",
                   help="profile nothing: print the tables for saved …-raw.txt files")
    args = p.parse_args(argv)
    if args.render:
        for raw in args.render:
            print(render(raw.name.removesuffix("-raw.txt"), top_functions(raw)), end="\n\n")
        return 0
    if shutil.which("py-spy") is None or shutil.which("wrk") is None:
        print("needs py-spy (pip install py-spy) and wrk (apt-get install -y wrk)", file=sys.stderr)
        return 2
    names = args.scenario or ["chat c=1", "chat c=32", "stream c=32"]
    scenarios = [s for s in FULL if s.name in names]
    RESULTS.mkdir(parents=True, exist_ok=True)
    services.raise_fd_limit()
    workdir = Path(tempfile.mkdtemp(prefix="quota-profile-"))
    report = []
    try:
        with contextlib.ExitStack() as stack:
            mock = stack.enter_context(services.mock_upstream(workdir))
            config, key, port = services.prepare_quota_proxy(workdir, mock.port)
            gw = stack.enter_context(services.quota_proxy(config, key, port, workdir / "gw.log", args.log_level))
            assert gw.pid is not None
            for sc in scenarios:
                slug = sc.name.replace(" ", "").replace("=", "").replace("+", "-")
                for fmt, out in (("flamegraph", RESULTS / f"profile-{slug}.svg"),
                                 ("raw", RESULTS / f"profile-{slug}-raw.txt")):
                    load = wrk_background(gw, sc, args.seconds + 2, workdir)
                    try:
                        time.sleep(1.0)
                        spy(gw.pid, args.seconds, fmt, out, args.rate, args.native)
                    finally:
                        out_text, _ = load.communicate(timeout=args.seconds + 60)
                    summary = next((json.loads(line[8:]) for line in out_text.splitlines()
                                    if line.startswith("WRKJSON ")), None)
                    if summary and (summary["non200"] or summary["bad"]):
                        print(f"warning: {summary['non200']} non-200, {summary['bad']} bad bodies "
                              f"during the {sc.name} profile: {summary['sample']}", file=sys.stderr)
                top = top_functions(RESULTS / f"profile-{slug}-raw.txt")
                text = render(sc.name, top)
                (RESULTS / f"profile-{slug}.md").write_text(text + "\n")
                report.append(text)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("\n\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
