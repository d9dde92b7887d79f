"""Serve an ASGI app with uvicorn inside the running event loop, on a free port.

Used by the demo (gateway and its upstream in one process) and by tests; `quota-proxy
serve` uses uvicorn's own process runner (serve.py) instead. Both speak HTTP through the
gateway's own protocol (http_protocol.GatewayProtocol), so tests run the connection code
that production runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

from quota_proxy.accept import GreedyAcceptServer
from quota_proxy.http_protocol import GatewayConfig

__all__ = ["RunningServer", "run_server"]


class _Server(GreedyAcceptServer):
    """A uvicorn server that leaves signals to its host, so several can share a process."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class RunningServer:
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


@asynccontextmanager
async def run_server(
    app: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    lifespan: Literal["auto", "on", "off"] = "off",
) -> AsyncIterator[RunningServer]:
    """Serve any ASGI app with uvicorn in the running event loop, on a free port by default."""
    # Binding here turns a busy port into an OSError instead of uvicorn's sys.exit(). The
    # explicit IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on sockets that name it,
    # and without it every response waits ~40 ms for a delayed ACK.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    config = GatewayConfig(
        app,
        lifespan=lifespan,
        ws="none",
        log_config=None,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=1,
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                await task
                raise RuntimeError("the server stopped during startup")
            await asyncio.sleep(0.005)
        client_host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
        yield RunningServer(client_host, sock.getsockname()[1])
    finally:
        server.should_exit = True
        await task
        sock.close()
