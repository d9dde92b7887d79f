"""Measure the single executable for docs/deploy.md: size, start-up of `--help` and
`config check`, and time from `serve` start to the first 200 on /healthz.

    python packaging/measure.py [dist/quota-proxy] [--runs 10]

Runs the binary with a clean environment (PATH=/usr/bin:/bin, nothing else) against a
throwaway config in a temporary folder. Needs only the standard library.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

CLEAN_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(folder: Path, port: int) -> Path:
    config = folder / "quota-proxy.toml"
    config.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\n'
        '[store]\npath = "quota.db"\n'
        f'[upstreams.local]\nbase_url = "http://127.0.0.1:{free_port()}/v1"\n'
        '[routes."quota/fast"]\nupstream = "local"\nmodel = "m"\nmultiplier = 1\n'
    )
    return config


def timed_runs(cmd: list[str], runs: int, cwd: Path) -> list[float]:
    subprocess.run(cmd, cwd=cwd, env=CLEAN_ENV, capture_output=True, check=True)  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, cwd=cwd, env=CLEAN_ENV, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return times


def time_to_healthz(binary: str, cwd: Path, port: int, workers: int, timeout: float = 60) -> float:
    start = time.perf_counter()
    proc = subprocess.Popen(
        [binary, "serve", "--port", str(port), "--workers", str(workers)],
        cwd=cwd,
        env=CLEAN_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while time.perf_counter() - start < timeout:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as reply:
                    if reply.status == 200:
                        return time.perf_counter() - start
            except OSError:
                time.sleep(0.01)
        raise RuntimeError(f"no /healthz within {timeout} s")
    finally:
        proc.terminate()
        proc.wait(timeout=40)


def summary(times: list[float]) -> str:
    ms = sorted(t * 1000 for t in times)
    return f"median {statistics.median(ms):.0f} ms (min {ms[0]:.0f}, max {ms[-1]:.0f}, n={len(ms)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("binary", nargs="?", default="dist/quota-proxy")
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    binary = os.path.abspath(args.binary)
    size = os.path.getsize(binary)
    print(f"size: {size} bytes ({size / 2**20:.1f} MiB)")
    with tempfile.TemporaryDirectory(prefix="quota-proxy-measure-") as tmp:
        folder = Path(tmp)
        port = free_port()
        write_config(folder, port)
        print(f"--help: {summary(timed_runs([binary, '--help'], args.runs, folder))}")
        print(f"config check: {summary(timed_runs([binary, 'config', 'check'], args.runs, folder))}")
        for workers in (1, 2):
            times = [time_to_healthz(binary, folder, port, workers) for _ in range(max(3, args.runs // 2))]
            print(f"serve --workers {workers} to first /healthz 200: {summary(times)}")


if __name__ == "__main__":
    main()
