"""Stopping behind a load balancer (issue 9, item 10): on SIGTERM `quota-proxy serve` stops
listening at once, so new connections are refused (a balancer moves on) while a stream in
flight finishes and is settled. With `--workers`, uvicorn's supervisor used to keep its copy
of the listening socket open until the workers exited, so the kernel kept accepting
connections that nobody served."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import time
from pathlib import Path

import anyio
import httpx
import pytest

from tests.serving import serving

pytestmark = pytest.mark.anyio

MESSAGES = [{"role": "user", "content": "stream slowly please"}]
REFUSED_WITHIN_S = 0.5


def refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False  # accepted, then hung or reset: not what a balancer needs


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_refuses_new_connections_at_once_and_drains(tmp_path: Path, workers: int) -> None:
    async with serving(tmp_path, "--workers", str(workers)) as served:
        body = {"model": "quota/fast", "messages": MESSAGES, "stream": True,
                "fake": {"chunk_delay_s": 0.1, "reply_words": 20}}
        async with (
            httpx.AsyncClient(base_url=served.url, timeout=30) as http,
            http.stream("POST", "/v1/chat/completions", json=body, headers=served.auth) as live,
        ):
            chunks = live.aiter_bytes()
            await chunks.__anext__()
            signalled = time.monotonic()
            os.kill(served.proc.pid, signal.SIGTERM)
            refused_after = None
            while time.monotonic() - signalled < 3:
                if await anyio.to_thread.run_sync(refused, served.port):
                    refused_after = time.monotonic() - signalled
                    break
                await anyio.sleep(0.01)
            rest = b"".join([chunk async for chunk in chunks])
        assert rest.endswith(b"data: [DONE]\n\n")
        exit_code = await anyio.to_thread.run_sync(lambda: served.proc.wait(timeout=30))
        exited_after = time.monotonic() - signalled
        print(f"\nworkers={workers}: refused {refused_after and refused_after * 1000:.0f} ms after SIGTERM; "
              f"exited after {exited_after:.2f} s with {exit_code}")
        assert refused_after is not None and refused_after < REFUSED_WITHIN_S, refused_after
        assert exit_code in (0, -signal.SIGTERM)
    conn = sqlite3.connect(served.db)
    try:
        assert conn.execute("SELECT count(*) FROM requests WHERE outcome = 'ok'").fetchone()[0] == 1
        assert conn.execute("SELECT count(*) FROM holds").fetchone()[0] == 0
    finally:
        conn.close()
