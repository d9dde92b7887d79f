"""The upstream side: one shared client, header hygiene, and error translation.

`UpstreamProxy` is an ASGI app that forwards the (already rewritten) request body to the
route's upstream and relays the answer. It is the innermost room of the house: it knows
nothing about money; metering wraps it.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time

from quota_proxy.asgi import Message, Receive, Scope, Send, read_body, send_bytes, send_error
from quota_proxy.config import Route, Upstream
from quota_proxy.errors import QuotaError, UpstreamError, UpstreamTimeout
from quota_proxy.http_client import (
    ConnectFailed,
    ConnectTimedOut,
    ReadTimedOut,
    UpstreamClient,
    UpstreamHTTPError,
    UpstreamResponse,
)

logger = logging.getLogger("quota_proxy.upstream")

# What the upstream answered, handed back to metering through the scope.
OUTCOME_KEY = "quota.outcome"

_RESPONSE_HEADERS_KEPT = frozenset({b"content-type", b"retry-after", b"x-request-id", b"openai-processing-ms"})


def create_client() -> UpstreamClient:
    """The one client the app shares: a keep-alive pool per upstream. It keeps no cookies
    (a shared client must never carry one reply's cookies into another user's request)."""
    return UpstreamClient()


def upstream_headers(upstream: Upstream, user_agent: bytes | None) -> list[tuple[bytes, bytes]]:
    """Only what the upstream needs: never the caller's key, cookies or hop-by-hop headers."""
    headers = [(b"content-type", b"application/json"), (b"accept-encoding", b"identity")]
    if user_agent:
        headers.append((b"user-agent", user_agent))
    if upstream.api_key:
        headers.append((b"authorization", b"Bearer " + upstream.api_key.encode("latin-1")))
    return headers


def relay_headers(response: UpstreamResponse) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in response.headers if k in _RESPONSE_HEADERS_KEPT]


def translate_status(response: UpstreamResponse) -> QuotaError | None:
    """SPEC §3: 5xx and 401/403 are the gateway's problem (502); other 4xx pass through (None)."""
    status = response.status_code
    if status >= 500:
        return UpstreamError(f"The upstream model server answered {status}.", upstream_status=status)
    if status in (401, 403):
        return UpstreamError(
            "The upstream model server refused the gateway's credentials.", upstream_status=status
        )
    return None


def translate_exception(exc: UpstreamHTTPError) -> QuotaError:
    if isinstance(exc, (ConnectTimedOut, ReadTimedOut)):
        return UpstreamTimeout()
    if isinstance(exc, ConnectFailed):
        return UpstreamError("The upstream model server is unreachable.")
    return UpstreamError("The upstream model server closed the connection unexpectedly.")


def stream_error_event(error: QuotaError) -> bytes:
    """The last SSE event of a stream the upstream broke after it began."""
    return b"data: " + error.json_bytes() + b"\n\n"


class UpstreamProxy:
    """Forwards POSTs to scope['quota.route'].upstream and relays the reply, streaming when asked.

    One watcher covers the whole exchange: a caller who leaves, before the first byte or
    mid-stream, cancels the upstream request at once (its connection is closed).
    """

    def __init__(self, client: UpstreamClient) -> None:
        self.client = client
        self._cool_until: dict[str, float] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The body was limited and rewritten by metering; it comes back whole, at once.
        body = await read_body(scope, receive, sys.maxsize)
        finished = False
        left = False
        exchange = asyncio.current_task()
        assert exchange is not None

        async def send_until_final(message: Message) -> None:
            nonlocal finished
            if not message.get("more_body", False) and message["type"] == "http.response.body":
                finished = True
            await send(message)

        def on_receive(done: asyncio.Future[Message]) -> None:
            nonlocal left
            if done.cancelled() or done.exception() is not None or finished:
                return
            if done.result()["type"] == "http.disconnect":
                left = True
                exchange.cancel()

        # A plain task and a callback, not an anyio task group: this runs on every request,
        # and cancel scopes cost more than the rest of the hop.
        watcher: asyncio.Future[Message] = asyncio.ensure_future(receive())
        watcher.add_done_callback(on_receive)
        try:
            await self._exchange(scope, send_until_final, body)
        except asyncio.CancelledError:
            if not left:
                raise
            exchange.uncancel()
        finally:
            watcher.remove_done_callback(on_receive)
            watcher.cancel()
        if left:
            scope[OUTCOME_KEY] = "client_disconnected"

    def _candidates(self, route: Route) -> list[Upstream]:
        """The route's upstreams in order, those cooling down after a failure last."""
        if len(route.upstreams) == 1:
            return list(route.upstreams)
        now = time.monotonic()
        ready = [u for u in route.upstreams if self._cool_until.get(u.name, 0.0) <= now]
        return ready + [u for u in route.upstreams if u not in ready]

    async def _exchange(self, scope: Scope, send: Send, body: bytes) -> None:
        """Try the route's upstreams in order until one answers; nothing reaches the caller
        before an upstream has answered, so a failed attempt is never seen by it."""
        route: Route = scope["quota.route"]
        log = scope.setdefault("quota.log", {})
        ua = None
        for key, value in scope["headers"]:
            if key == b"user-agent":
                ua = value
        path = scope["path"].removeprefix("/v1")
        candidates = self._candidates(route)
        failure: QuotaError | None = None
        for attempt, upstream in enumerate(candidates, start=1):
            last = attempt == len(candidates)
            log["upstream"] = upstream.name
            started = time.perf_counter()
            try:
                response = await self.client.send(
                    upstream.base_url + path,
                    body,
                    upstream_headers(upstream, ua),
                    timeout=upstream.timeout_s,
                    connect_timeout=upstream.connect_timeout_s,
                )
            except UpstreamHTTPError as exc:
                failure = translate_exception(exc)
                self._failed(scope, upstream, type(exc).__name__, started, attempt, last)
                continue
            if (response.status_code >= 500 or response.status_code == 429) and not last:
                await response.aclose()
                self._failed(scope, upstream, f"status_{response.status_code}", started, attempt, last)
                continue
            scope["quota.upstream_started"] = started
            try:
                if scope.get("quota.stream", False) and response.status_code == 200:
                    await self._relay_stream(scope, send, response)
                else:
                    await self._relay_whole(scope, send, response)
            finally:
                await response.aclose()
            return
        scope[OUTCOME_KEY] = "upstream_error"
        assert failure is not None
        await send_error(send, failure)

    def _failed(
        self, scope: Scope, upstream: Upstream, kind: str, started: float, attempt: int, last: bool
    ) -> None:
        if len(scope["quota.route"].upstreams) > 1:
            self._cool_until[upstream.name] = time.monotonic() + upstream.cooldown_s
        elapsed_ms = round((time.perf_counter() - started) * 1000, 3)
        scope["quota.log"].setdefault("upstream_errors", []).append((upstream.name, kind))
        logger.warning(
            "upstream attempt failed: request %s route %s upstream %s attempt %d: %s after %.1f ms%s",
            scope.get("quota.request_id"), scope["quota.route"].alias, upstream.name, attempt,
            kind, elapsed_ms, "" if last else "; trying the next upstream",
        )

    async def _relay_whole(self, scope: Scope, send: Send, response: UpstreamResponse) -> None:
        try:
            body = await response.aread()
            _record_upstream_time(scope)
        except UpstreamHTTPError as exc:
            scope[OUTCOME_KEY] = "upstream_error"
            await send_error(send, translate_exception(exc))
            return
        error = translate_status(response)
        if error is not None:
            scope[OUTCOME_KEY] = "upstream_error"
            await send_error(send, error)
            return
        scope[OUTCOME_KEY] = "ok" if response.status_code < 400 else "upstream_rejected"
        content_type = response.header(b"content-type") or b"application/json"
        headers = [(k, v) for k, v in relay_headers(response) if k != b"content-type"]
        await send_bytes(send, response.status_code, body, headers, content_type)

    async def _relay_stream(self, scope: Scope, send: Send, response: UpstreamResponse) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                    (b"x-accel-buffering", b"no"),
                ],
            }
        )
        _record_upstream_time(scope)
        outcome = "ok"
        first = True
        try:
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                if first:
                    first = False
                    log = scope["quota.log"]
                    log["ttfb_ms"] = round((time.perf_counter() - scope["quota.started"]) * 1000, 3)
        except UpstreamHTTPError as exc:
            outcome = "upstream_broken"
            error = translate_exception(exc)
            if isinstance(exc, ReadTimedOut):
                error = UpstreamTimeout("The upstream model server stopped sending mid-stream.")
            await send(
                {"type": "http.response.body", "body": stream_error_event(error), "more_body": True}
            )
        scope[OUTCOME_KEY] = outcome
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _record_upstream_time(scope: Scope) -> None:
    """Upstream time so far: the whole reply, or a stream's headers."""
    elapsed = time.perf_counter() - scope["quota.upstream_started"]
    scope["quota.upstream_s"] = elapsed
    scope["quota.log"]["upstream_ms"] = round(elapsed * 1000, 3)
