"""A real `quota-proxy serve` process for the server tests: started as an operator starts it,
in its own process group, in front of the fake upstream, with a funded key."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson

from quota_proxy.testing import run_fake_upstream
from tests.conftest import closed_port, config_toml, run_cli


@dataclass
class Served:
    proc: subprocess.Popen[str]
    port: int
    key: str
    db: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.key}"}

    def stderr(self) -> str:
        """Everything the process wrote to stderr (stops it first)."""
        return stop(self.proc)


def stop(proc: subprocess.Popen[str]) -> str:
    """Kill the process group if it still runs; what it wrote to stderr."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.stderr is not None and proc.stderr.closed:
        return ""  # already collected
    _, err = proc.communicate(timeout=10)
    return err or ""


@asynccontextmanager
async def serving(tmp_path: Path, *serve_args: str, **server: Any) -> AsyncIterator[Served]:
    """`quota-proxy serve --config … --port …` with `[server]` overrides; yields once /readyz is 200."""
    async with run_fake_upstream() as upstream:
        config = tmp_path / "q.toml"
        db = tmp_path / "q.db"
        config.write_text(config_toml(upstream.base_url, db, server=server))
        run_cli("--config", str(config), "accounts", "create", "acme", "--quota-tokens", "10000000")
        created = run_cli("--config", str(config), "keys", "create", "--account", "acme", "--kind", "live", "--json")
        port = closed_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "quota_proxy", "serve", "--config", str(config), "--port", str(port), *serve_args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        served = Served(proc, port, str(orjson.loads(created.stdout)["key"]), db)
        try:
            await wait_ready(served)
            yield served
        finally:
            stop(proc)


async def wait_ready(served: Served) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(300):
            if served.proc.poll() is not None:
                raise AssertionError(f"serve exited: {served.proc.stderr.read() if served.proc.stderr else ''}")
            try:
                if (await client.get(f"{served.url}/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await anyio.sleep(0.05)
    raise AssertionError("serve did not become ready")


def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send bytes on a fresh connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        # Refused before it read everything: its answer may still be there to read.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(data)
        received = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
        return received


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes


def parse_response(raw: bytes) -> RawResponse:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return RawResponse(status, headers, body)
