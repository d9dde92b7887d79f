"""How fast a busy gateway takes a burst of new connections: the kernel's accept queue,
sampled while wrk opens 64 connections to a gateway that is already at full load.

    python bench/accept_queue.py                       # this source tree
    python bench/accept_queue.py --source /tmp/base    # another one (a `git worktree`)
    python bench/accept_queue.py --close               # clients that do not keep connections alive

A first wrk run (c=64, 3 s) loads the gateway; a second one starts at once, and `ss -ltn`
reads the listening socket's Recv-Q (connections the kernel completed that the gateway has
not accepted yet) every few milliseconds for its first 0.4 s. Prints that timeline and the
second run's wrk p50/p99/max: the first request on a connection waits for its accept, and
wrk's p99 corrects each long wait into several samples (coordinated omission), so a slow
accept shows as a p99 of tens of milliseconds or more. With --close every request opens a
new connection (`Connection: close`), so every request waits for its accept.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import services  # noqa: E402
from run import FULL, body_for, expectations  # noqa: E402

SAMPLE_FOR_S = 0.4


def accept_queue(port: int) -> int | None:
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout.split()
    return int(out[1]) if len(out) > 1 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, help="run quota_proxy from this source tree")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--close", action="store_true", help="a new connection for every request")
    args = parser.parse_args()
    services.raise_fd_limit()
    scenario = next(s for s in FULL if s.name == "chat c=64")
    with tempfile.TemporaryDirectory(prefix="accept-queue-") as tmp:
        work = Path(tmp)
        with services.mock_upstream(work) as mock:
            config, key, port = services.prepare_quota_proxy(work, mock.port, source=args.source)
            with services.quota_proxy(config, key, port, work / "gateway.log", source=args.source) as gateway:
                body = work / "body.json"
                body.write_bytes(body_for(gateway, scenario))
                env = {**os.environ, "BENCH_BODY_FILE": str(body), "BENCH_AUTH": gateway.auth or "",
                       "BENCH_EXPECT": "\t".join(e.decode() for e in expectations(scenario))}

                close = ["-H", "Connection: close"] if args.close else []

                def wrk(seconds: int) -> subprocess.Popen[str]:
                    return subprocess.Popen(
                        ["wrk", "-t2", f"-c{args.connections}", f"-d{seconds}s", "--latency", "--timeout", "10s",
                         *close, "-s", str(services.BENCH / "wrk_post.lua"), gateway.url],
                        stdout=subprocess.PIPE, text=True, env=env)

                wrk(3).communicate()
                started = time.perf_counter()
                second = wrk(5)
                timeline = []
                while (elapsed := time.perf_counter() - started) < SAMPLE_FOR_S:
                    timeline.append((elapsed * 1000, accept_queue(port)))
                    time.sleep(0.002)
                report, _ = second.communicate()
    print("source:", args.source or "this tree", "(a new connection per request)" if args.close else "")
    print("accept queue (ms after the second wrk started: connections waiting):")
    print("  " + ", ".join(f"{ms:.0f}: {waiting}" for ms, waiting in timeline))
    peak = max((w for _, w in timeline if w is not None), default=0)
    if peak == 0:
        print("no connection was waiting at any sample")
    else:
        peak_at = next(ms for ms, waiting in timeline if waiting == peak)
        drained = next((ms for ms, waiting in timeline if ms > peak_at and waiting == 0), None)
        print(f"peak {peak} waiting at {peak_at:.0f} ms; "
              + (f"empty from {drained:.0f} ms" if drained is not None else "still waiting at the last sample"))
    latency = re.search(r"Latency\s+\S+\s+\S+\s+(\S+)", report)
    percentiles = dict(re.findall(r"\s(50|99)%\s+(\S+)", report))
    rate = re.search(r"Requests/sec:\s+(\S+)", report)
    print(f"wrk c={args.connections}: p50 {percentiles.get('50')} p99 {percentiles.get('99')} "
          f"max {latency.group(1) if latency else '?'} req/s {rate.group(1) if rate else '?'}")


if __name__ == "__main__":
    main()
