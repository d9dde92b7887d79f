"""The floor under quota-proxy: what uvicorn (uvloop, httptools) and the gateway's own
upstream client cost by themselves, side by side with the mock answered directly and the
gateway, on one machine in one run.

    python bench/floor.py [--seconds 5] [--rounds 2]

The floor app reads the body (the gateway's own `read_body`), renames the model, POSTs it through
`quota_proxy.http_client.UpstreamClient` and sends the answer back: the same server and the
same client as the gateway, nothing else (no auth, metering, store, log or metrics). What
the gateway adds over the floor is its own layers' cost. Every response is verified as in
run.py (status 200 and `completion_tokens` in the body).
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import procstat  # noqa: E402
import services  # noqa: E402
from run import FULL, run_wrk  # noqa: E402

SCENARIOS = [sc for sc in FULL if sc.name in ("chat c=1", "chat c=64")]


def floor_app(mock_port: int) -> Any:
    """The ASGI app: the gateway's server and upstream client, and nothing else."""
    from quota_proxy.asgi import read_body
    from quota_proxy.http_client import UpstreamClient

    url = f"http://{services.HOST}:{mock_port}/v1/chat/completions"
    client = UpstreamClient()
    headers = [(b"content-type", b"application/json")]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(scope, receive, 1 << 20)
        response = await client.send(url, body.replace(b"quota/fast", b"mock-model"), headers,
                                     timeout=60, connect_timeout=5)
        data = await response.aread()
        await response.aclose()
        await send({"type": "http.response.start", "status": response.status_code,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})

    return app


def serve_floor(mock_port: int, port: int) -> None:
    import uvicorn

    uvicorn.run(floor_app(mock_port), host=services.HOST, port=port, loop="uvloop", http="httptools",
                access_log=False, log_level="warning")


@contextlib.contextmanager
def floor(workdir: Path, mock_port: int) -> Iterator[services.Target]:
    port = services.free_port()
    log = workdir / "floor.log"
    argv = [sys.executable, __file__, "--serve", str(mock_port), str(port)]
    with services.process(argv, log) as proc:
        deadline = time.monotonic() + 15
        while True:  # the floor answers no GET of its own: wait for its port instead
            with contextlib.suppress(OSError), socket.create_connection((services.HOST, port), timeout=1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the floor app did not start; {log}")
            time.sleep(0.05)
        yield services.Target("floor", port, "quota/fast", None, proc.pid)


def measure(target: services.Target, seconds: int, workdir: Path) -> list[str]:
    lines = []
    for sc in SCENARIOS:
        assert target.pid is not None
        cpu0 = procstat.cpu_seconds(target.pid)
        wrk = run_wrk(target, sc, seconds, workdir)
        cpu = procstat.cpu_seconds(target.pid) - cpu0
        n = max(wrk["requests"], 1)
        bad = n - wrk["good"]
        if bad:
            raise SystemExit(f"{target.name} {sc.name}: {bad} responses were not a verified 200")
        lat = wrk["latency_us"]
        lines.append(f"| {sc.name} | {target.name} | {n / (wrk['duration_us'] / 1e6):,.0f} | "
                     f"{lat['p50'] / 1000:.2f} | {lat['p99'] / 1000:.2f} | {cpu / n * 1000:.3f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--serve", nargs=2, type=int, metavar=("MOCK_PORT", "PORT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve_floor(*args.serve)
        return 0
    services.raise_fd_limit()
    print("| scenario | target | req/s | p50 ms | p99 ms | CPU ms/req |")
    print("|---|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="quota-floor-") as tmp:
        workdir = Path(tmp)
        with services.mock_upstream(workdir) as mock:
            config, key, port = services.prepare_quota_proxy(workdir, mock.port)
            with floor(workdir, mock.port) as bare, services.quota_proxy(config, key, port, workdir / "gw.log") as gw:
                for _ in range(args.rounds):
                    for target in (mock, bare, gw):
                        for line in measure(target, args.seconds, workdir):
                            print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
