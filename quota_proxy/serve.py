"""`quota-proxy serve`: uvicorn on uvloop with the gateway's HTTP protocol, one or more workers.

Stopping behind a load balancer: on SIGTERM (or SIGINT) the listening socket is closed at
once, so the kernel refuses new connections and a balancer moves on, while requests in
flight drain for up to `[server] graceful_timeout_s`. uvicorn alone notices the signal on
its next tick (0.1 s in a worker, 0.5 s in the `--workers` supervisor) and its supervisor
keeps its own copy of the socket open until every worker has exited, so the kernel went on
accepting connections that nobody would serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path
from types import FrameType

from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess

from quota_proxy.accept import GreedyAcceptServer
from quota_proxy.config import Settings
from quota_proxy.http_protocol import GatewayConfig
from quota_proxy.logs import configure_logging

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def raise_open_file_limit() -> None:
    """Every connection is a file descriptor: lift the soft limit (often 1,024) to the hard
    one, so a crowd of idle or slow clients cannot starve the gateway of sockets. Workers
    inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1_048_576
    if soft != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve(settings: Settings, config_path: Path) -> None:
    """Run until stopped. `settings.server` already carries the command line's overrides."""
    server = settings.server
    # Workers are separate processes: each loads the same validated file itself.
    os.environ["QUOTA_PROXY_CONFIG"] = str(config_path.resolve())
    os.environ["QUOTA_PROXY_LOG_LEVEL"] = server.log_level
    configure_logging(server.log_level, server.log_format)
    raise_open_file_limit()
    metrics_dir = None
    if server.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Workers write their metrics here; a scrape of any worker sums them all.
        metrics_dir = tempfile.mkdtemp(prefix="quota-proxy-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        run(uvicorn_config(settings))
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def uvicorn_config(settings: Settings) -> GatewayConfig:
    server = settings.server
    return GatewayConfig(
        "quota_proxy.app:app_from_environment",
        factory=True,
        host=server.host,
        port=server.port,
        workers=server.workers,
        loop="uvloop",
        ws="none",
        lifespan="on",
        access_log=False,
        log_level=server.log_level,
        log_config=None,
        timeout_graceful_shutdown=int(server.graceful_timeout_s),
        server_header=False,
        limit_concurrency=server.max_connections,
        header_timeout_s=server.header_timeout_s,
        max_header_bytes=server.max_header_bytes,
    )


def run(config: GatewayConfig) -> None:
    """uvicorn.run(), with the two stop-listening-at-once classes below."""
    try:
        if config.workers > 1:
            Supervisor(config, sockets=[config.bind_socket()]).run()
            return
        server = GatewayServer(config)
        server.run()
    except KeyboardInterrupt:
        return
    if not server.started:
        sys.exit(STARTUP_FAILURE)


class GatewayServer(GreedyAcceptServer):
    """A single-process server that accepts every waiting connection at once (quota_proxy.accept)
    and closes its listening sockets in the signal's own loop iteration, before the drain begins."""

    loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if self.loop is not None and self.started:
            self.loop.call_soon_threadsafe(self.stop_listening)

    def stop_listening(self) -> None:
        self.stop_accepting()
        for server in self.servers:
            server.close()  # uvicorn's shutdown() calls this again; a second close is a no-op


class Supervisor(Multiprocess):
    """uvicorn's `--workers` supervisor that, on a stop signal, closes its copy of the
    listening socket and passes the signal to the workers at once."""

    def __init__(self, config: GatewayConfig, sockets: list[socket.socket]) -> None:
        super().__init__(config, sockets)
        for sig in STOP_SIGNALS:
            signal.signal(sig, self.on_stop_signal)

    def on_stop_signal(self, sig: int, frame: FrameType | None) -> None:
        self.should_exit.set()  # before anything else: no worker may be (re)started from here on
        for sock in self.sockets:
            sock.close()
        for process in self.processes:
            if process.pid is not None and process.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
        # run() now leaves its loop and terminates and joins the workers, as on uvicorn's own handling.
