"""One forwarded agent request: the upstream call (the chat path's attempt loop, with its
fallback and cooldowns), the relay that reads usage in the upstream's own dialect, and the
one settlement (through the chat path's Meter)."""

from __future__ import annotations

from typing import Any

import orjson

from quota_proxy.agents.relay import StreamMeter, TranslatedMeter, stream_meter, whole_reply, whole_usage
from quota_proxy.agents.request import AgentRequest, Mode, Protocol, mode_for
from quota_proxy.asgi import Message, Receive, Scope, Send, send_bytes, send_error, until_disconnect
from quota_proxy.config import Upstream
from quota_proxy.errors import UpstreamTimeout
from quota_proxy.http_client import ReadTimedOut, UpstreamHTTPError, UpstreamResponse
from quota_proxy.meter import NO_USAGE, Meter, Usage
from quota_proxy.state import RequestState
from quota_proxy.store.models import Outcome
from quota_proxy.tokens import estimate_output_tokens
from quota_proxy.upstream import (
    Call,
    UpstreamProxy,
    first_bytes,
    looks_like_event_stream,
    record_upstream_time,
    relay_headers,
    translate_exception,
    translate_status,
)
from quota_proxy.usage import Buckets

_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class Exchange:
    """One forwarded request: the upstream call, the relay, and the settlement."""

    def __init__(self, proxy: UpstreamProxy, state: RequestState, request: AgentRequest, meter: Meter) -> None:
        self.proxy = proxy  # the chat path's: one attempt loop, one view of cooling upstreams
        self.state = state
        self.request = request
        self.money = meter  # the hold taken, and the one settlement (the chat path's Meter)
        self.status = 0
        self.outcome = Outcome.FAILED
        self.usage: Usage | None = None
        self.meter: StreamMeter | None = None

    # ---- pricing -------------------------------------------------------------------------

    def price(self, b: Buckets) -> int:
        """What the caller is told it cost: the Meter's charge (output past the cap not billed)."""
        return self.money.charge(Usage.of(b))

    def extension(self, b: Buckets, estimated: bool = False) -> dict[str, Any]:
        extra: dict[str, Any] = {
            "route_multiplier": str(self.request.route.multiplier),
            "charged_quota_tokens": self.price(b),
        }
        if estimated:
            extra["estimated"] = True
        return extra

    def estimate(self, text: str) -> Buckets:
        return Buckets(input=self.request.prompt_estimate, output=estimate_output_tokens(text))

    # ---- the exchange --------------------------------------------------------------------

    async def run(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Forward and relay through the chat path's attempt loop (fallback, cooldown, the
        logged failures); a caller who leaves cancels the upstream request at once."""

        async def watched(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.status = message["status"]
            await send(message)

        outcome = await until_disconnect(receive, watched, self._forward, scope)
        self.outcome = outcome or Outcome.CLIENT_DISCONNECTED

    async def _forward(self, send: Send) -> Outcome:
        request = self.request

        def call_for(upstream: Upstream) -> Call:
            _mode, url, body, headers = request.upstream_call(upstream)
            return Call(url, body, headers)

        async def relay(upstream: Upstream, response: UpstreamResponse, started: float) -> Outcome | None:
            mode = mode_for(upstream, request.protocol)
            if request.stream and response.status_code == 200:
                return await self._relay_stream(send, response, mode, started)
            return await self._relay_whole(send, response, mode, started)

        return await self.proxy.attempt(self.state, request.route, call_for, relay, send)

    async def _relay_whole(
        self, send: Send, response: UpstreamResponse, mode: Mode, started: float
    ) -> Outcome | None:
        """Relay a whole reply in the caller's dialect; None when a 200 is not a JSON object."""
        raw = await response.aread()
        record_upstream_time(self.state, started)
        error = translate_status(response)
        if error is not None:
            await send_error(send, error)
            return Outcome.UPSTREAM_ERROR
        status = response.status_code
        if status >= 400:
            # The caller's request was at fault: its body as the upstream sent it, in the
            # caller's dialect when the upstream spoke another one.
            if mode is Mode.TRANSLATED and self.request.protocol is Protocol.MESSAGES:
                raw = _anthropic_error_from_openai(raw, status)
            await send_bytes(
                send, status, raw, [(k, v) for k, v in relay_headers(response) if k != b"content-type"]
            )
            return Outcome.UPSTREAM_REJECTED
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            return None
        reported, text = whole_usage(self.request.protocol, mode, obj)
        usage = Usage.of(reported) if reported is not None else Usage.of(self.estimate(text), True)
        self.usage = usage
        reply = whole_reply(
            self.request.protocol, mode, obj, self.request.body, usage.buckets,
            self.extension(usage.buckets, usage.estimated),
        )  # fmt: skip
        # Settled before the caller has the reply: what it was told it cost is on the books.
        self.outcome, self.status = Outcome.OK, status
        self.settle_once()
        headers = [(k, v) for k, v in relay_headers(response) if k != b"content-type"]
        await send_bytes(send, 200, orjson.dumps(reply), headers)
        return Outcome.OK

    async def _relay_stream(
        self, send: Send, response: UpstreamResponse, mode: Mode, started: float
    ) -> Outcome | None:
        """Relay the event stream as it arrives; None (nothing sent) if its first bytes show
        it is not one (an HTML error page from a proxy in between, a JSON body)."""
        request = self.request
        chunks = response.aiter_raw()
        first = await first_bytes(chunks)
        record_upstream_time(self.state, started)
        if not looks_like_event_stream(response.header(b"content-type"), first):
            return None
        meter = stream_meter(request.protocol, mode, self.extension, request.body, request.route.model)
        self.meter = meter
        self.status = 200
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        self.state.log["ttfb_ms"] = round(self.state.elapsed_s * 1000, 3)
        try:
            out = meter.feed(first)
            if out:
                await send({"type": "http.response.body", "body": out, "more_body": True})
            async for chunk in chunks:
                out = meter.feed(chunk)
                if out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
        except UpstreamHTTPError as exc:
            self.outcome = Outcome.UPSTREAM_BROKEN
            error = translate_exception(exc)
            if isinstance(exc, ReadTimedOut):
                error = UpstreamTimeout("The upstream model server stopped sending mid-stream.")
            tail = meter.broken(error.code, error.message)
        else:
            self.outcome = Outcome.OK
            tail = meter.finish()
            if not meter.final and isinstance(meter, TranslatedMeter):
                # A translated stream that ended without usage: estimate and close it properly.
                estimated = self.estimate(meter.delivered_text())
                self.usage = Usage.of(estimated, True)
                tail += meter.translator.finish(estimated, self.extension(estimated, True))
        self.settle_once()
        await send({"type": "http.response.body", "body": tail, "more_body": False})
        return self.outcome

    # ---- settlement ----------------------------------------------------------------------

    def _final_usage(self) -> Usage | None:
        if self.usage is not None:
            return self.usage
        meter = self.meter
        if meter is None:
            return None
        if meter.final and meter.usage is not None:
            return Usage.of(meter.usage)
        # Cut short (the caller left, the upstream broke): what was delivered, estimated.
        # Nothing delivered means nothing produced, and that is not charged.
        output = estimate_output_tokens(meter.delivered_text())
        if output == 0:
            return None
        if meter.usage is not None:  # the input side was reported (Anthropic's message_start)
            return Usage.of(meter.usage.with_output(max(meter.usage.output, output)), True)
        return Usage.of(Buckets(input=self.request.prompt_estimate, output=output), True)

    def settle_once(self) -> None:
        """Settle through the Meter (a no-op the second time), with the agent's session."""
        usage = self._final_usage() or NO_USAGE
        self.money.settle(self.outcome, usage, self.status, session_id=self.request.session_id)


def _anthropic_error_from_openai(raw: bytes, status: int) -> bytes:
    """A Chat server's error body, in Anthropic's shape (the message kept verbatim)."""
    try:
        error = orjson.loads(raw).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        error = None
    message = error.get("message") if isinstance(error, dict) else None
    kind = (
        "not_found_error"
        if status == 404
        else "rate_limit_error"
        if status == 429
        else "invalid_request_error"
    )
    out: dict[str, Any] = {
        "type": kind,
        "message": message if isinstance(message, str) else raw.decode("utf-8", "replace"),
    }
    return orjson.dumps({"type": "error", "error": out})

