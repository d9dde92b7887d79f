"""Small ASGI helpers shared by the middleware and endpoints."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Protocol, TypeVar

import orjson

from quota_proxy.errors import PayloadTooLarge, QuotaError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def send_bytes(
    send: Send,
    status: int,
    body: bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
    content_type: bytes = b"application/json",
) -> None:
    raw_headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    if headers:
        raw_headers.extend(headers)
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


async def send_json(
    send: Send,
    status: int,
    data: Any,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    await send_bytes(send, status, orjson.dumps(data), headers)


async def send_error(send: Send, error: QuotaError) -> None:
    """Answer with the error's status, JSON body and extra headers (Retry-After, ...)."""
    await send_bytes(send, error.status, error.json_bytes(), error.headers)


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of a request header (name in lower case)."""
    for key, value in scope["headers"]:
        if key == name:
            return value  # type: ignore[no-any-return]
    return None


def replay_receive(body: bytes, receive: Receive) -> Receive:
    """A receive() that yields an already-read body once, then defers to the real one."""
    sent = False

    async def receive_again() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_again


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole request body, refusing more than limit bytes (413) before reading it all."""
    declared = header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"Request body is larger than the limit of {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"Request body is larger than the limit of {limit} bytes.")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


T = TypeVar("T")

# The scope key under which a server that knows its connections (quota_proxy.http_protocol)
# puts a ConnectionWatch for the request's client.
CONNECTION_KEY = "quota.connection"


class ConnectionWatch(Protocol):
    """The server's own view of a request's client connection: whether it is gone, and one
    callback for when it goes. `forget` unsubscribes only the callback it is given: the
    connection's next request may have subscribed its own meanwhile."""

    client_gone: bool

    def on_client_gone(self, callback: Callable[[], None]) -> None: ...

    def forget(self, callback: Callable[[], None]) -> None: ...


def _client_left(watcher: asyncio.Future[Message]) -> bool:
    if not watcher.done() or watcher.cancelled() or watcher.exception() is not None:
        return False
    return bool(watcher.result()["type"] == "http.disconnect")


async def until_disconnect(
    receive: Receive, send: Send, work: Callable[[Send], Awaitable[T]], scope: Scope | None = None
) -> T | None:
    """Run work(send), cancelling it at once if the client disconnects before the reply's
    final body message; None then. uvicorn's send() silently drops writes after a
    disconnect, so only a concurrent receive() learns of it, or the server's ConnectionWatch
    in the scope, which costs no task: this runs on every proxied request.
    """
    finished = False
    left = False
    task = asyncio.current_task()
    assert task is not None

    async def tracked(message: Message) -> None:
        nonlocal finished
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            finished = True
        await send(message)

    def client_gone() -> None:
        nonlocal left
        if not finished:
            left = True
            task.cancel()

    def on_receive(done: asyncio.Future[Message]) -> None:
        if _client_left(done):
            client_gone()

    connection: ConnectionWatch | None = scope.get(CONNECTION_KEY) if scope is not None else None
    watcher: asyncio.Future[Message] | None = None
    if connection is None:
        watcher = asyncio.ensure_future(receive())
        watcher.add_done_callback(on_receive)
    try:
        # One loop turn first. A client that left while the request waited (for its hold,
        # say) is seen here, and nothing is forwarded for it. And under load, every request
        # ready in this turn gets here before any goes upstream, so their sends, replies and
        # settlements come in batches: at c=64 this turn is worth 10-15 % more requests a
        # second and halves wrk's p99 (bench/RESULTS.md, afternoon of 2026-12-03).
        await asyncio.sleep(0)
        if connection is not None:
            if connection.client_gone:
                return None
            connection.on_client_gone(client_gone)
        elif watcher is not None and _client_left(watcher):
            finished = True  # the watcher's callback, still to run, must not cancel this task
            return None
        return await work(tracked)
    except asyncio.CancelledError:
        if not left:
            raise
        task.uncancel()
        return None
    finally:
        if watcher is not None:
            watcher.remove_done_callback(on_receive)
            watcher.cancel()
        elif connection is not None:
            connection.forget(client_gone)
