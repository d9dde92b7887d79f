"""The upstream HTTP/1.1 client: asyncio protocols, httptools for parsing, a keep-alive pool.

Why not httpx here: profiles of the gateway under load put 55-60 % of its CPU inside
httpx/httpcore (pool bookkeeping per request, anyio stream wrappers, cookie and auth
machinery a proxy hop never uses). This client does only what the hop needs: POST a body,
read the status and headers, then the body whole or as it arrives, with connect and read
timeouts, and reuse of idle connections. Parsing (chunked bodies included) is httptools,
the parser uvicorn itself runs on. bench/RESULTS.md has the before/after figures.

    UpstreamClient.send(...) -> UpstreamResponse     .aread() / .aiter_raw() / .aclose()

Errors (all UpstreamHTTPError):
    ConnectFailed        no connection (refused, DNS, TLS)
    ConnectTimedOut      no connection within connect_timeout
    ReadTimedOut         no byte for `timeout` seconds (before or after the headers)
    ProtocolFailed       the connection closed or sent garbage mid-message
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlsplit

import httptools

MAX_BUFFERED = 256 * 1024  # bytes read ahead of a slow caller before the upstream is paused
MAX_IDLE_PER_HOST = 256


class UpstreamHTTPError(Exception):
    pass


class ConnectFailed(UpstreamHTTPError):
    pass


class ConnectTimedOut(UpstreamHTTPError):
    pass


class ReadTimedOut(UpstreamHTTPError):
    pass


class ProtocolFailed(UpstreamHTTPError):
    pass


@dataclass(frozen=True, slots=True)
class _Origin:
    scheme: str
    host: str
    port: int
    host_header: bytes = field(init=False, compare=False)  # the Host header's value, IDNA-encoded once

    def __post_init__(self) -> None:
        default = 443 if self.scheme == "https" else 80
        host = self.host if self.port == default else f"{self.host}:{self.port}"
        object.__setattr__(self, "host_header", host.encode("idna"))


class _Connection(asyncio.Protocol):
    """One TCP connection; one response at a time, read through a small chunk queue."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.used = False
        self._parser = httptools.HttpResponseParser(self)
        self._reset()

    def _reset(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.keep_alive = False
        self.message_done = False
        self.error: UpstreamHTTPError | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._length_known = False
        self.received_any = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.error = ProtocolFailed(f"malformed HTTP from the upstream: {exc}")
            self._close()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.message_done and self.error is None:
            if self.headers_done and not self._length_known:
                self.message_done = True  # a body delimited by the connection's end
            else:
                self.error = ProtocolFailed("the upstream closed the connection mid-response")
        self._wake()

    def pause_writing(self) -> None:  # pragma: no cover - bodies are small
        pass

    def resume_writing(self) -> None:  # pragma: no cover
        pass

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        lower = name.lower()
        if lower == b"content-length" or (lower == b"transfer-encoding" and b"chunked" in value.lower()):
            self._length_known = True
        self.headers.append((lower, value))

    def on_headers_complete(self) -> None:
        self.headers_done = True
        # Read now: llhttp forgets it once the message is complete.
        self.keep_alive = bool(self._parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > MAX_BUFFERED and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        self.message_done = True

    # used by UpstreamResponse
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, timeout: float) -> None:
        """Until something happens on the connection, or ReadTimedOut."""
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        handle = loop.call_later(timeout, _time_out, waiter)
        try:
            await waiter
        finally:
            handle.cancel()
            self._waiter = None

    def take(self) -> bytes | None:
        if not self._chunks:
            return None
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._paused and self._buffered < MAX_BUFFERED // 2 and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return chunk

    def status(self) -> int:
        return int(self._parser.get_status_code())

    def reusable(self) -> bool:
        return self.message_done and self.keep_alive and not self.closed and self.error is None

    def prepare(self) -> None:
        self._reset()
        self._parser = httptools.HttpResponseParser(self)
        self.used = True

    def _close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True


def _time_out(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(ReadTimedOut("the upstream sent nothing within the read timeout"))


class UpstreamResponse:
    def __init__(self, client: UpstreamClient, origin: _Origin, conn: _Connection, timeout: float) -> None:
        self._client = client
        self._origin = origin
        self._conn = conn
        self._timeout = timeout
        self.status_code = conn.status()
        self.headers = conn.headers
        self._finished = False

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body as it arrives (chunked framing removed)."""
        conn = self._conn
        while True:
            chunk = conn.take()
            if chunk is not None:
                yield chunk
                continue
            if conn.error is not None:
                raise conn.error
            if conn.message_done:
                self._finished = True
                return
            await conn.wait(self._timeout)

    async def aread(self) -> bytes:
        return b"".join([chunk async for chunk in self.aiter_raw()])

    async def aclose(self) -> None:
        """Back to the pool if the message was read whole, else the connection is closed,
        which is how the upstream learns that its caller has gone."""
        conn = self._conn
        if self._finished and conn.reusable():
            self._client._release(self._origin, conn)
        else:
            conn._close()


class UpstreamClient:
    """A keep-alive pool per origin. Create one per app; close it at shutdown."""

    def __init__(self) -> None:
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._ssl: ssl.SSLContext | None = None

    async def send(
        self,
        url: str,
        body: bytes,
        headers: list[tuple[bytes, bytes]],
        *,
        timeout: float,
        connect_timeout: float,
    ) -> UpstreamResponse:
        """POST body to url; returns once the status and headers have arrived."""
        origin, target = _split(url)
        head = _request_head(origin, target, headers, len(body))
        # A pooled connection the upstream closed meanwhile fails before any byte comes
        # back; that is retried once on a fresh connection (nothing was processed).
        for attempt in range(2):
            conn = self._pooled(origin) if attempt == 0 else None
            reused = conn is not None
            if conn is None:
                conn = await self._connect(origin, connect_timeout)
            conn.prepare()
            assert conn.transport is not None
            conn.transport.write(head + body)
            try:
                while not conn.headers_done:
                    if conn.error is not None:
                        raise conn.error
                    await conn.wait(timeout)
            except ProtocolFailed:
                conn._close()
                if reused and not conn.received_any:
                    continue
                raise
            except BaseException:
                conn._close()
                raise
            return UpstreamResponse(self, origin, conn, timeout)
        raise ProtocolFailed("the upstream closed the connection before answering")

    def _pooled(self, origin: _Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    def _release(self, origin: _Origin, conn: _Connection) -> None:
        idle = self._idle.setdefault(origin, [])
        if len(idle) < MAX_IDLE_PER_HOST:
            idle.append(conn)
        else:
            conn._close()

    async def _connect(self, origin: _Origin, connect_timeout: float) -> _Connection:
        loop = asyncio.get_running_loop()
        ssl_context = None
        if origin.scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            ssl_context = self._ssl
        try:
            async with asyncio.timeout(connect_timeout):
                _, conn = await loop.create_connection(
                    _Connection,
                    origin.host,
                    origin.port,
                    ssl=ssl_context,
                    server_hostname=origin.host if ssl_context else None,
                )
        except TimeoutError:
            raise ConnectTimedOut(f"no connection to {origin.host}:{origin.port} in {connect_timeout} s") from None
        except (OSError, ssl.SSLError) as exc:
            raise ConnectFailed(f"cannot connect to {origin.host}:{origin.port}: {exc}") from None
        return conn

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn._close()
        self._idle.clear()


_ORIGINS: dict[str, tuple[_Origin, bytes]] = {}


def _split(url: str) -> tuple[_Origin, bytes]:
    cached = _ORIGINS.get(url)
    if cached is not None:
        return cached
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ConnectFailed(f"not an http(s) URL: {url!r}")
    port = parts.port or (443 if scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    result = (_Origin(scheme, parts.hostname, port), target.encode())
    if len(_ORIGINS) < 1024:
        _ORIGINS[url] = result
    return result


def _request_head(origin: _Origin, target: bytes, headers: list[tuple[bytes, bytes]], length: int) -> bytes:
    lines = [b"POST " + target + b" HTTP/1.1", b"host: " + origin.host_header]
    lines += [name + b": " + value for name, value in headers]
    lines.append(b"content-length: " + str(length).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n"
