"""The upstream side: one shared client, header hygiene, error translation, and the one
attempt loop every inference path uses.

`UpstreamProxy` is the innermost room of the house: it forwards a request to the route's
upstreams in order (falling back before the first byte, cooling failed upstreams down) and
relays the answer. It knows nothing about money; metering wraps it. The OpenAI-compatible
path sends the same (already rewritten) body to each upstream; the agent endpoints give
`UpstreamProxy.attempt` their own per-upstream call (translated or native) and relay.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from quota_proxy.asgi import Receive, Scope, Send, send_bytes, send_error, until_disconnect
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
from quota_proxy.state import RequestState, request_state
from quota_proxy.store.models import Outcome

logger = logging.getLogger("quota_proxy.upstream")

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


MALFORMED = "The upstream model server sent a malformed reply."
_SSE_FIELD_STARTS = (b"data:", b"event:", b"id:", b"retry:", b":")


def looks_like_event_stream(content_type: bytes | None, first: bytes) -> bool:
    """A reply a streaming caller can be given: declared as an event stream, and its first
    bytes begin an SSE field (an HTML error page from a proxy in between does not)."""
    if content_type is None or not content_type.lower().startswith(b"text/event-stream"):
        return False
    return first.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(_SSE_FIELD_STARTS)


def looks_like_json_object(body: bytes) -> bool:
    """A reply that can be the JSON object a non-streaming caller asked for (parsed later)."""
    return body.lstrip(b" \t\r\n").startswith(b"{")


@dataclass(frozen=True, slots=True)
class Exchange:
    """What metering asks the upstream hop to do: send this body to the route, stream or not."""

    route: Route
    body: bytes
    stream: bool


@dataclass(frozen=True, slots=True)
class HopResult:
    """What the hop learned: how the exchange ended and the upstream's own time."""

    outcome: Outcome
    upstream_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Call:
    """One attempt's request to one upstream: a path that translates writes one per upstream."""

    url: str
    body: bytes
    headers: list[tuple[bytes, bytes]]


# The attempt loop's two seams: the request for an upstream, and the relay of its answer,
# which returns how the exchange ended, or None when the answer (a 200 that is not what the
# caller asked for) should not reach the caller and the next upstream should be tried.
CallFor = Callable[[Upstream], Call]
Relay = Callable[[Upstream, UpstreamResponse, float], Awaitable[Outcome | None]]


@runtime_checkable
class Hop(Protocol):
    """The innermost room: forwards one exchange and relays the reply to `send`."""

    async def forward(self, scope: Scope, receive: Receive, send: Send, exchange: Exchange) -> HopResult: ...


def stream_error_event(error: QuotaError) -> bytes:
    """The last SSE event of a stream the upstream broke after it began."""
    return b"data: " + error.json_bytes() + b"\n\n"


class UpstreamProxy:
    """Forwards an exchange to the route's upstreams and relays the reply, streaming when asked.

    One watcher covers the whole exchange: a caller who leaves, before the first byte or
    mid-stream, cancels the upstream request at once (its connection is closed).
    """

    def __init__(self, client: UpstreamClient, quiet: Callable[[], None] = lambda: None) -> None:
        self.client = client
        self._quiet = quiet  # called as each request goes upstream (Store.quiet)
        self._cool_until: dict[str, float] = {}

    def cooling_down(self) -> dict[str, float]:
        """Upstreams tried last after a recent failure, with the seconds left (this process's view)."""
        now = time.monotonic()
        return {name: until - now for name, until in self._cool_until.items() if until > now}

    async def forward(self, scope: Scope, receive: Receive, send: Send, exchange: Exchange) -> HopResult:
        state = request_state(scope)
        outcome = await until_disconnect(
            receive, send, lambda tracked: self._exchange(scope, state, tracked, exchange), scope
        )
        return HopResult(outcome or Outcome.CLIENT_DISCONNECTED, state.upstream_s)

    def _candidates(self, route: Route) -> list[Upstream]:
        """The route's upstreams in order, those cooling down after a failure last."""
        if len(route.upstreams) == 1:
            return list(route.upstreams)
        now = time.monotonic()
        ready = [u for u in route.upstreams if self._cool_until.get(u.name, 0.0) <= now]
        return ready + [u for u in route.upstreams if u not in ready]

    async def _exchange(self, scope: Scope, state: RequestState, send: Send, exchange: Exchange) -> Outcome:
        """The OpenAI-compatible hop: the same body to each upstream, relayed as it comes."""
        ua = None
        for key, value in scope["headers"]:
            if key == b"user-agent":
                ua = value
        path = scope["path"].removeprefix("/v1")

        def call_for(upstream: Upstream) -> Call:
            return Call(upstream.base_url + path, exchange.body, upstream_headers(upstream, ua))

        async def relay(upstream: Upstream, response: UpstreamResponse, started: float) -> Outcome | None:
            if exchange.stream and response.status_code == 200:
                return await self._relay_stream(state, send, response, started)
            return await self._relay_whole(state, send, response, started, exchange.stream)

        return await self.attempt(state, exchange.route, call_for, relay, send)

    async def attempt(self, state: RequestState, route: Route, call_for: CallFor, relay: Relay, send: Send) -> Outcome:
        """Try the route's upstreams in order until one answers usably; nothing reaches the
        caller before then, so a failed attempt is never seen by it.

        An attempt falls through to the next upstream on a connect or read error before the
        first byte, on a 5xx or 429 (unless it is the last), and when `relay` returns None
        (a 200 that is not what the caller asked for). Each failure is logged and cools the
        upstream down. When every attempt failed, the last failure is the caller's answer.
        """
        candidates = self._candidates(route)
        failure: QuotaError = UpstreamError("The route has no upstream.")
        outcome = Outcome.UPSTREAM_ERROR
        for attempt, upstream in enumerate(candidates, start=1):
            last = attempt == len(candidates)
            call = call_for(upstream)
            state.log["upstream"] = upstream.name
            started = time.perf_counter()
            # The loop waits for this answer next: a good moment for deferred store work,
            # which runs once this task has written the request and awaits the reply.
            self._quiet()
            try:
                response = await self.client.send(
                    call.url,
                    call.body,
                    call.headers,
                    timeout=upstream.timeout_s,
                    connect_timeout=upstream.connect_timeout_s,
                )
            except UpstreamHTTPError as exc:
                failure, outcome = translate_exception(exc), Outcome.UPSTREAM_ERROR
                self._failed(state, route, upstream, type(exc).__name__, started, attempt, last)
                continue
            try:
                if (response.status_code >= 500 or response.status_code == 429) and not last:
                    self._failed(state, route, upstream, f"status_{response.status_code}", started, attempt, last)
                    continue
                relayed = await relay(upstream, response, started)
            except UpstreamHTTPError as exc:
                # Failed before anything reached the caller: the next upstream may answer.
                failure, outcome = translate_exception(exc), Outcome.UPSTREAM_ERROR
                self._failed(state, route, upstream, type(exc).__name__, started, attempt, last)
                continue
            finally:
                await response.aclose()
            if relayed is not None:
                return relayed
            failure, outcome = UpstreamError(MALFORMED), Outcome.UPSTREAM_MALFORMED
            self._failed(state, route, upstream, "malformed_reply", started, attempt, last)
        await send_error(send, failure)
        return outcome

    def _failed(
        self,
        state: RequestState,
        route: Route,
        upstream: Upstream,
        kind: str,
        started: float,
        attempt: int,
        last: bool,
    ) -> None:
        if len(route.upstreams) > 1:
            self._cool_until[upstream.name] = time.monotonic() + upstream.cooldown_s
        elapsed_ms = round((time.perf_counter() - started) * 1000, 3)
        state.log.setdefault("upstream_errors", []).append((upstream.name, kind))
        logger.warning(
            "upstream attempt failed: request %s route %s upstream %s attempt %d: %s after %.1f ms%s",
            state.request_id, route.alias, upstream.name, attempt,
            kind, elapsed_ms, "" if last else "; trying the next upstream",
        )

    async def _relay_whole(
        self,
        state: RequestState,
        send: Send,
        response: UpstreamResponse,
        started: float,
        stream: bool,
    ) -> Outcome | None:
        """Relay a whole reply; None when a 200 cannot be what the caller asked for."""
        body = await response.aread()
        record_upstream_time(state, started)
        error = translate_status(response)
        if error is not None:
            await send_error(send, error)
            return Outcome.UPSTREAM_ERROR
        if response.status_code == 200 and (stream or not looks_like_json_object(body)):
            return None  # a stream asked for and JSON (or anything else) given, or not JSON at all
        content_type = response.header(b"content-type") or b"application/json"
        headers = [(k, v) for k, v in relay_headers(response) if k != b"content-type"]
        await send_bytes(send, response.status_code, body, headers, content_type)
        return Outcome.OK if response.status_code < 400 else Outcome.UPSTREAM_REJECTED

    async def _relay_stream(
        self, state: RequestState, send: Send, response: UpstreamResponse, started: float
    ) -> Outcome | None:
        """Relay an event stream as it arrives, once its first bytes show it is one."""
        chunks = response.aiter_raw()
        first = await first_bytes(chunks)
        record_upstream_time(state, started)
        if not looks_like_event_stream(response.header(b"content-type"), first):
            return None
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
        await send({"type": "http.response.body", "body": first, "more_body": True})
        state.log["ttfb_ms"] = round(state.elapsed_s * 1000, 3)
        outcome = Outcome.OK
        try:
            async for chunk in chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except UpstreamHTTPError as exc:
            outcome = Outcome.UPSTREAM_BROKEN
            error = translate_exception(exc)
            if isinstance(exc, ReadTimedOut):
                error = UpstreamTimeout("The upstream model server stopped sending mid-stream.")
            await send(
                {"type": "http.response.body", "body": stream_error_event(error), "more_body": True}
            )
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return outcome


async def first_bytes(chunks: AsyncIterator[bytes]) -> bytes:
    """The stream's first non-empty bytes (b"" if it ended at once)."""
    async for chunk in chunks:
        if chunk:
            return chunk
    return b""


def record_upstream_time(state: RequestState, started: float) -> None:
    """The upstream's time before the gateway can answer: a whole reply, or a stream's first bytes."""
    elapsed = time.perf_counter() - started
    state.upstream_s = elapsed
    state.log["upstream_ms"] = round(elapsed * 1000, 3)
