"""Connections waiting in the kernel's accept queue are accepted together, not one per
event-loop turn (quota_proxy.accept): on uvloop, whose libuv accepts one connection each
time it polls a listening socket, a burst of new connections to a busy worker otherwise
waits a loop turn per connection ahead of it (bench/RESULTS.md, *The c=64 tail*)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import cast

import pytest

from quota_proxy import accept
from quota_proxy.accept import Acceptor
from quota_proxy.asgi import Receive, Scope, Send
from quota_proxy.runner import RunningServer, run_server

pytestmark = pytest.mark.anyio

WAITING = 48
REQUEST = b"GET / HTTP/1.1\r\nHost: gateway\r\n\r\n"


async def hello(scope: Scope, receive: Receive, send: Send) -> None:
    assert scope["type"] == "http"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@asynccontextmanager
async def waiting_clients(server: RunningServer, count: int) -> AsyncIterator[list[socket.socket]]:
    """`count` connections the kernel completed and queued, each with a request sent, made
    without giving the loop a turn: all of them wait to be accepted."""
    socks = [socket.create_connection((server.host, server.port)) for _ in range(count)]
    try:
        for sock in socks:
            sock.sendall(REQUEST)
            sock.setblocking(False)
        yield socks
    finally:
        for sock in socks:
            sock.close()


async def turns_until_answered(socks: list[socket.socket], max_turns: int = 2000) -> int:
    """Loop turns (one `sleep(0)` each) until every socket has its whole answer."""
    received = {sock: b"" for sock in socks}
    for turn in range(1, max_turns + 1):
        await asyncio.sleep(0)
        for sock in socks:
            if received[sock].endswith(b"ok"):
                continue
            with suppress(BlockingIOError):
                received[sock] += sock.recv(4096)
        if all(data.endswith(b"ok") for data in received.values()):
            assert all(data.startswith(b"HTTP/1.1 200") for data in received.values())
            return turn
    raise AssertionError(f"not every answer arrived in {max_turns} turns")


async def test_connections_waiting_to_be_accepted_are_served_in_a_few_loop_turns() -> None:
    async with run_server(hello) as server, waiting_clients(server, WAITING) as socks:
        turns = await turns_until_answered(socks)
    # One accept per turn needs at least WAITING turns (50 measured); all at once about five
    # (accept, open, read, run the app, write), whatever the number waiting.
    assert turns < WAITING // 3, turns


async def test_the_loops_own_accept_takes_one_waiting_connection_per_turn() -> None:
    """What the acceptor is for, measured on the loop alone: a plain server on uvloop serves
    a queue of waiting connections one loop turn per connection. (If a later uvloop accepts
    the whole queue by itself, this fails, and the acceptor can go.)"""
    loop = asyncio.get_running_loop()
    assert type(loop).__module__.startswith("uvloop"), type(loop)

    opened: list[asyncio.Transport] = []

    class Answer(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.Transport, transport)
            opened.append(self.transport)

        def data_received(self, data: bytes) -> None:
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

    plain = await loop.create_server(Answer, "127.0.0.1", 0)
    try:
        port = plain.sockets[0].getsockname()[1]
        async with waiting_clients(RunningServer("127.0.0.1", port), WAITING) as socks:
            turns = await turns_until_answered(socks)
    finally:
        for transport in opened:
            transport.close()
        plain.close()
        await plain.wait_closed()
    assert turns >= WAITING, turns


async def test_a_closed_acceptor_leaves_no_listening_descriptor_behind() -> None:
    """The acceptor holds its own descriptors of the listening sockets; once it and the
    server's own are closed, the port refuses connections."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    acceptor = Acceptor([listener], asyncio.Protocol, asyncio.get_running_loop())
    listener.close()
    with socket.create_connection(("127.0.0.1", port)):
        pass  # still listening: the acceptor's descriptor keeps the socket open
    acceptor.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)


async def test_the_acceptor_takes_every_waiting_connection_up_to_its_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accept, "MAX_PER_DRAIN", 3)
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    port = listener.getsockname()[1]
    opened: list[asyncio.BaseTransport] = []

    class Recorder(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            opened.append(transport)

    acceptor = Acceptor([listener], Recorder, asyncio.get_running_loop())
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
    try:
        assert acceptor.drain() == 3  # the limit; the next connection's drain takes the rest
        assert acceptor.drain() == 2
        assert acceptor.drain() == 0  # nothing left waiting: one EAGAIN, no connection
        for _ in range(5):
            await asyncio.sleep(0)
        assert len(opened) == 5
        # Handed to the loop as TCP transports that send at once, as its own are.
        sock = opened[0].get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        for transport in opened:
            transport.close()
        for client in clients:
            client.close()
        acceptor.close()
        listener.close()
