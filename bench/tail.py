"""Where the c=1 tail is: one keep-alive client, one request at a time, each slow request
matched with the gateway's own access-log line (by x-quota-request-id).

    python bench/tail.py [--seconds 6] [--slow-ms 5]

A slow request whose `latency_ms` (the gateway's view, first request byte to last answer
byte) is small waited outside the app: in the kernel, or for an event loop held up by
something else. `hold_ms` large means the hold's write waited (for the file's lock, or for
the filesystem while a checkpoint syncs). Prints the client's p50/p99/max and the slow ones.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import services  # noqa: E402
from rawclient import build_request  # noqa: E402

BODY = json.dumps({"model": "quota/fast", "messages": [{"role": "user", "content": "hi there"}],
                   "max_tokens": 64}).encode()


async def requests_in_turn(port: int, key: str, seconds: float) -> list[tuple[float, float, str]]:
    """(wall time, client latency ms, request id) for each request of a `seconds` pass."""
    request = build_request(services.HOST, port, "/v1/chat/completions", BODY, key)
    reader, writer = await asyncio.open_connection(services.HOST, port)
    out = []
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            started, wall = time.perf_counter(), time.time()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            headers = dict(
                (name.strip().lower(), value.strip())
                for name, _, value in (line.partition(b":") for line in head.split(b"\r\n")[1:])
            )
            await reader.readexactly(int(headers[b"content-length"]))
            out.append((wall, (time.perf_counter() - started) * 1000, headers[b"x-quota-request-id"].decode()))
    finally:
        writer.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--slow-ms", type=float, default=5.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="quota-tail-"))
    log = work / "quota-proxy.log"
    with services.mock_upstream(work) as mock:
        config, key, port = services.prepare_quota_proxy(work, mock.port)
        with services.quota_proxy(config, key, port, log):
            asyncio.run(requests_in_turn(port, key, 1.0))  # warm-up
            results = asyncio.run(requests_in_turn(port, key, args.seconds))
    lines = {}
    for line in log.read_text().splitlines():
        if '"event":"request"' in line:
            entry = json.loads(line)
            lines[entry["request_id"]] = entry
    latencies = sorted(ms for _, ms, _ in results)
    print(f"{len(results)} requests: client p50 {latencies[len(latencies) // 2]:.2f} ms, "
          f"p99 {latencies[int(len(latencies) * 0.99)]:.2f} ms, max {latencies[-1]:.2f} ms")
    app = sorted(entry["latency_ms"] for entry in lines.values())
    print(f"gateway's own view: p50 {app[len(app) // 2]:.2f} ms, p99 {app[int(len(app) * 0.99)]:.2f} ms")
    slow = [r for r in results if r[1] > args.slow_ms]
    print(f"{len(slow)} slower than {args.slow_ms:g} ms (time, client ms, gateway ms, hold ms, upstream ms):")
    for wall, ms, request_id in slow:
        entry = lines.get(request_id, {})
        print(f"  {time.strftime('%H:%M:%S', time.gmtime(wall))}.{int(wall * 1000) % 1000:03d} {ms:7.2f} "
              f"{entry.get('latency_ms', '-')!s:>8} {entry.get('hold_ms', '-')!s:>8} {entry.get('upstream_ms', '-')!s:>8}")


if __name__ == "__main__":
    main()
