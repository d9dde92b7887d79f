"""The HTTP/1.1 connection: uvicorn's httptools protocol with the server's own answers in
SPEC JSON, and limits on slow, large and too many clients.

uvicorn answers some requests itself, before any app sees them: a request it cannot parse
(`400 text/plain "Invalid HTTP request received."`) and, over `limit_concurrency`,
`503 text/plain`. httptools itself puts no bound on header size or on the time a client may
take to send its headers. This subclass:

* answers malformed requests `400 bad_request`, headers over `[server] max_header_bytes`
  `431 headers_too_large`, and requests beyond `[server] max_connections` `503 overloaded`,
  all in the SPEC error shape with an `x-quota-request-id`;
* closes a connection whose request headers are not complete `[server] header_timeout_s`
  after it opened (or after the request's first byte, on a kept-alive connection): a
  `408 request_timeout` if part of a request came, silently if nothing did. uvicorn's
  `timeout_keep_alive` covers only the idle time between requests.

It relies on these uvicorn internals (checked by tests/test_server_protocol.py):
`HttpToolsProtocol.send_400_response`, the parser callbacks, `limit_concurrency`,
`server_state.connections/tasks/default_headers`, and `RequestResponseCycle.send` being the
ASGI `send` it hands the app.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from quota_proxy.accept import drain_waiting
from quota_proxy.asgi import CONNECTION_KEY, Receive, Scope, Send, send_error
from quota_proxy.context import REQUEST_ID_HEADER
from quota_proxy.errors import BadRequest, QuotaError
from quota_proxy.state import new_request_id

logger = logging.getLogger("quota_proxy.server")

# The defaults of the [server] settings of the same names, for a plain uvicorn Config.
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_MAX_HEADER_BYTES = 131_072
# After a refusal, how long what the client still sends is read and dropped before closing
# (Apache's lingering close): closing with unread input makes the kernel send a reset, which
# can destroy the answer before the client reads it.
LINGER_S = 2.0


class MalformedRequest(BadRequest):
    default_message = "Malformed HTTP request: the request line or a header could not be parsed."


class HeadersTooLarge(QuotaError):
    status, code, type = 431, "headers_too_large", "invalid_request_error"
    default_message = "The request headers are too large."


class RequestTimeout(QuotaError):
    status, code, type = 408, "request_timeout", "invalid_request_error"
    default_message = "The request headers did not arrive in time."


class Overloaded(QuotaError):
    status, code, type = 503, "overloaded", "api_error"
    default_message = "The gateway is at its connection limit; retry shortly."


class CorkedTransport(asyncio.Transport):
    """The connection's writes of one event-loop turn sent as one: uvicorn writes a
    response's head and its body separately, which is two send(2) calls and two TCP segments
    for every answer. Held bytes go out at the end of the turn (call_soon), before the loop
    waits for anything, and at once before a close or an EOF."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.inner = transport
        self._loop = loop
        self._held: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if not self._held:
            self._loop.call_soon(self.flush)
        self._held.append(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def flush(self) -> None:
        held = self._held
        if not held:
            return
        self._held = []
        if not self.inner.is_closing():
            self.inner.write(held[0] if len(held) == 1 else b"".join(held))

    def close(self) -> None:
        self.flush()
        self.inner.close()

    def write_eof(self) -> None:
        self.flush()
        self.inner.write_eof()

    def abort(self) -> None:
        self._held = []
        self.inner.abort()

    def can_write_eof(self) -> bool:
        return self.inner.can_write_eof()

    def is_closing(self) -> bool:
        return self.inner.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.inner.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self.inner.pause_reading()

    def resume_reading(self) -> None:
        self.inner.resume_reading()

    def is_reading(self) -> bool:
        return self.inner.is_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.inner.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.inner.get_protocol()

    def get_write_buffer_size(self) -> int:
        return self.inner.get_write_buffer_size() + sum(map(len, self._held))

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.inner.set_write_buffer_limits(high, low)


class GatewayConfig(Config):
    """uvicorn's Config with the limits this protocol reads; it is pickled to workers."""

    def __init__(
        self,
        app: Any,
        *,
        header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, http=GatewayProtocol, **kwargs)
        self.header_timeout_s = header_timeout_s
        self.max_header_bytes = max_header_bytes


class GatewayProtocol(HttpToolsProtocol):
    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.header_timeout_s: float = getattr(config, "header_timeout_s", DEFAULT_HEADER_TIMEOUT_S)
        self.max_header_bytes: int = getattr(config, "max_header_bytes", DEFAULT_MAX_HEADER_BYTES)
        # uvicorn would answer its own text/plain 503; the cap is enforced in _serve instead.
        self.max_connections = self.limit_concurrency
        self.limit_concurrency = None
        self.inner_app = self.app
        self.app = self._serve
        self.header_timer: asyncio.TimerHandle | None = None
        self.awaiting_headers = True
        self.header_bytes = 0
        self.parsed_header_bytes = 0
        self.headers_too_large = False
        self.lingering = False
        # The ConnectionWatch the app finds in each request's scope (asgi.CONNECTION_KEY).
        self.client_gone = False
        self._gone_callback: Callable[[], None] | None = None

    # -- the header deadline -------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = self.cork = CorkedTransport(transport, self.loop)
        self._arm_header_timer()
        drain_waiting(self.server_state)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.awaiting_headers = True
        self.parsed_header_bytes = 0
        if self.header_timer is None:  # a kept-alive connection's next request starts now
            self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        self.awaiting_headers = False
        self.header_bytes = 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.awaiting_headers = True

    def on_response_complete(self) -> None:
        # The answer is whole: out now, not at the end of this loop turn, which comes only
        # after the app's own teardown in the same task step (its access line, metrics).
        self.cork.flush()
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)
        self.client_gone = True
        callback, self._gone_callback = self._gone_callback, None
        if callback is not None:
            callback()

    # -- the ConnectionWatch (asgi.until_disconnect): no receive() task per request -------

    def on_client_gone(self, callback: Callable[[], None]) -> None:
        self._gone_callback = callback

    def forget(self, callback: Callable[[], None]) -> None:
        if self._gone_callback is callback:
            self._gone_callback = None

    def _arm_header_timer(self) -> None:
        self.header_timer = self.loop.call_later(self.header_timeout_s, self._headers_timed_out)

    def _cancel_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _headers_timed_out(self) -> None:
        self.header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self._arm_header_timer()  # a pipelined request waits for the response before it anyway
            return
        if self.header_bytes:
            logger.debug("closing a connection whose request headers took over %ss", self.header_timeout_s)
            self._refuse(RequestTimeout(f"The request headers did not arrive within {self.header_timeout_s:g} s."))
        else:
            self.transport.close()  # nothing was asked, so nothing is answered

    # -- header size: counted as parsed, and as received while headers are incomplete ----

    def on_url(self, url: bytes) -> None:
        self._count_header_bytes(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_header_bytes(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count_header_bytes(self, n: int) -> None:
        self.parsed_header_bytes += n
        if self.parsed_header_bytes > self.max_header_bytes:
            self.headers_too_large = True
            raise ValueError("headers too large")  # httptools stops parsing; send_400_response answers

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return  # refused: what follows is dropped
        if self.awaiting_headers:
            self.header_bytes += len(data)
        super().data_received(data)
        refused = self.lingering or self.transport.is_closing()
        if self.awaiting_headers and self.header_bytes > self.max_header_bytes and not refused:
            self._refuse(self._too_large())

    def _too_large(self) -> HeadersTooLarge:
        return HeadersTooLarge(f"The request line and headers are over {self.max_header_bytes} bytes.")

    # -- the server's own answers --------------------------------------------------------

    def send_400_response(self, msg: str) -> None:
        self._refuse(self._too_large() if self.headers_too_large else MalformedRequest())

    def _refuse(self, error: QuotaError) -> None:
        """Answer before (or instead of) the app, then close: the rest of what the client
        sent cannot be trusted to frame a next request."""
        self._cancel_header_timer()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if cycle.response_started and not cycle.more_body and not self.pipeline:
                # The next request went wrong while this response is being written: it gets
                # no answer; this one finishes, then the connection closes.
                cycle.keep_alive = False
                self.lingering = True
                return
            if cycle.response_started or self.pipeline:
                self.transport.close()  # in the middle of a response there is no room for an answer
                return
            # The app's request is void (its body was malformed): it now reads a disconnect,
            # and whatever it sends is dropped, as for a client that left.
            cycle.disconnected = True
            cycle.message_event.set()
        body = error.json_bytes()
        head = [STATUS_LINE[error.status]]
        headers = [
            *self.server_state.default_headers,
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (REQUEST_ID_HEADER, new_request_id().encode()),
            (b"connection", b"close"),
        ]
        for name, value in headers:
            head.extend([name, b": ", value, b"\r\n"])
        head.extend([b"\r\n", body])
        self.transport.write(b"".join(head))
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.lingering = True
        self.transport.write_eof()
        self.flow.resume_reading()
        self.loop.call_later(LINGER_S, self.transport.close)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app, behind the connection cap and a last JSON 500 (the app's own middleware
        answers its errors; this catches what escapes it)."""
        limit = self.max_connections
        if limit is not None and (len(self.connections) > limit or len(self.tasks) > limit):
            busy = Overloaded()
            busy.headers = [(b"connection", b"close"), (b"retry-after", b"1"),
                            (REQUEST_ID_HEADER, new_request_id().encode())]
            await send_error(send, busy)
            return
        scope[CONNECTION_KEY] = self
        try:
            await self.inner_app(scope, receive, send)
        except Exception:
            cycle = getattr(send, "__self__", None)
            if cycle is None or getattr(cycle, "response_started", True):
                raise  # uvicorn closes the connection: a started response cannot change status
            logger.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            error = QuotaError()
            error.headers = [(b"connection", b"close"), (REQUEST_ID_HEADER, new_request_id().encode())]
            await send_error(send, error)
