"""The upstream HTTP client against real servers: keep-alive reuse, chunked bodies,
timeouts, refused connections, and closing an unfinished response."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from quota_proxy.http_client import ConnectFailed, ReadTimedOut, UpstreamClient
from quota_proxy.runner import run_server
from tests.conftest import closed_port

pytestmark = pytest.mark.anyio

HEADERS = [(b"content-type", b"application/json")]


class Recorder:
    """A tiny ASGI server that notes each request's client port and answers by path."""

    def __init__(self) -> None:
        self.ports: list[int] = []
        self.disconnected = anyio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.ports.append(scope["client"][1])
        while (await receive()).get("more_body"):
            pass
        if scope["path"] == "/chunked":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for part in (b"one ", b"two ", b"three"):
                await send({"type": "http.response.body", "body": part, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        elif scope["path"] == "/slow":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"first", "more_body": True})
            while (await receive())["type"] != "http.disconnect":
                pass
            self.disconnected.set()
        else:
            body = b'{"ok": true}'
            await send({"type": "http.response.start", "status": 201,
                        "headers": [(b"content-length", str(len(body)).encode()), (b"x-request-id", b"abc")]})
            await send({"type": "http.response.body", "body": body})


async def test_connections_are_reused_across_requests() -> None:
    app = Recorder()
    client = UpstreamClient()
    async with run_server(app) as server:
        for _ in range(5):
            response = await client.send(f"{server.url}/v1/x", b"{}", HEADERS, timeout=5, connect_timeout=5)
            assert response.status_code == 201
            assert response.header(b"x-request-id") == b"abc"
            assert await response.aread() == b'{"ok": true}'
            await response.aclose()
        await client.aclose()
    assert len(app.ports) == 5
    assert len(set(app.ports)) == 1, "every request should ride one keep-alive connection"


async def test_chunked_bodies_arrive_decoded_in_pieces() -> None:
    client = UpstreamClient()
    async with run_server(Recorder()) as server:
        response = await client.send(f"{server.url}/chunked", b"{}", HEADERS, timeout=5, connect_timeout=5)
        pieces = [piece async for piece in response.aiter_raw()]
        await response.aclose()
        await client.aclose()
    assert b"".join(pieces) == b"one two three"
    assert len(pieces) >= 2


async def test_refused_connection_and_read_timeout() -> None:
    client = UpstreamClient()
    with pytest.raises(ConnectFailed):
        await client.send(f"http://127.0.0.1:{closed_port()}/x", b"{}", HEADERS, timeout=1, connect_timeout=1)
    app = Recorder()
    async with run_server(app) as server:
        response = await client.send(f"{server.url}/slow", b"{}", HEADERS, timeout=0.3, connect_timeout=1)
        chunks = response.aiter_raw()
        assert await chunks.__anext__() == b"first"
        with pytest.raises(ReadTimedOut):
            await chunks.__anext__()
        await response.aclose()
        await client.aclose()


async def test_closing_an_unfinished_response_tells_the_upstream() -> None:
    app = Recorder()
    client = UpstreamClient()
    async with run_server(app) as server:
        response = await client.send(f"{server.url}/slow", b"{}", HEADERS, timeout=5, connect_timeout=1)
        assert await response.aiter_raw().__anext__() == b"first"
        await response.aclose()
        with anyio.fail_after(2):
            await app.disconnected.wait()
        # The closed connection is not reused: the next request opens a new one.
        again = await client.send(f"{server.url}/v1/x", b"{}", HEADERS, timeout=5, connect_timeout=1)
        await again.aread()
        await again.aclose()
        await client.aclose()
    assert len(set(app.ports)) == 2
