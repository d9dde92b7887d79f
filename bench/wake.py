"""What a wake-up costs on this machine: the same small piece of Python work, timed when
the thread has just worked and when it has just slept.

    python bench/wake.py [--repeat 2000]

At one request at a time the gateway sleeps twice per request (waiting for the caller, then
for the upstream) and every piece of its work runs just after a wake-up; at c=64 it never
sleeps. On a virtual machine whose idle vCPU halts (Firecracker, `haltpoll.guest_halt_poll_ns=0`
on its kernel command line), work after a sleep finds cold caches and runs slower: this
prints how much, so the c=1 and c=64 figures of run.py can be read side by side.
"""

from __future__ import annotations

import argparse
import json
import time


def work() -> dict[int, str]:
    """About as much as a few of the gateway's steps: small dicts, JSON, strings."""
    out = {}
    for i in range(40):
        out[i] = json.dumps({"a": i, "b": [i, i + 1], "c": "x" * (i % 7)})
    return out


def timed(sleep_s: float, repeat: int) -> float:
    """Median µs of work() run `repeat` times, each after sleeping sleep_s (0: back to back)."""
    samples = []
    for _ in range(repeat):
        if sleep_s:
            time.sleep(sleep_s)
        started = time.perf_counter()
        work()
        samples.append(time.perf_counter() - started)
    samples.sort()
    return samples[len(samples) // 2] * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2000)
    args = parser.parse_args()
    hot = timed(0.0, args.repeat)
    print("| before the work | median µs | × back to back |")
    print("|---|---:|---:|")
    print(f"| nothing (back to back) | {hot:.1f} | 1.00 |")
    for sleep_s in (0.0002, 0.001, 0.005):
        after = timed(sleep_s, args.repeat)
        print(f"| a {sleep_s * 1000:g} ms sleep | {after:.1f} | {after / hot:.2f} |")
    try:
        with open("/sys/module/haltpoll/parameters/guest_halt_poll_ns") as f:
            print(f"\nhaltpoll.guest_halt_poll_ns = {f.read().strip()}")
    except OSError:
        pass


if __name__ == "__main__":
    main()
