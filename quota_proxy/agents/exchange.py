"""One forwarded agent request: the upstream call (with fallback), the relay that reads
its usage in the upstream's own dialect, and the one settlement."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import orjson

from quota_proxy.agents.relay import StreamMeter, TranslatedMeter, stream_meter, whole_reply, whole_usage
from quota_proxy.agents.request import AgentRequest, Mode, Protocol
from quota_proxy.asgi import Message, Receive, Send, send_bytes, send_error
from quota_proxy.errors import QuotaError, UpstreamError, UpstreamTimeout
from quota_proxy.http_client import ReadTimedOut, UpstreamClient, UpstreamHTTPError, UpstreamResponse
from quota_proxy.state import Billing, RequestState
from quota_proxy.store import Settlement, Store
from quota_proxy.store.models import Outcome
from quota_proxy.tokens import estimate_output_tokens
from quota_proxy.upstream import (
    MALFORMED,
    looks_like_event_stream,
    relay_headers,
    translate_exception,
    translate_status,
)
from quota_proxy.usage import Buckets, charge

_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


@dataclass(slots=True)
class _Usage:
    buckets: Buckets
    estimated: bool


class Exchange:
    """One forwarded request: the upstream call, the relay, and the settlement."""

    def __init__(
        self,
        client: UpstreamClient,
        store: Store,
        state: RequestState,
        request: AgentRequest,
        billing: Billing,
        key_id: int,
        hold_id: int,
    ) -> None:
        self.client = client
        self.store = store
        self.state = state
        self.request = request
        self.billing = billing
        self.key_id = key_id
        self.hold_id = hold_id
        self.status = 0
        self.outcome = Outcome.FAILED
        self.usage: _Usage | None = None
        self.meter: StreamMeter | None = None
        self.upstream_model = request.route.model
        self.settled = False

    # ---- pricing -------------------------------------------------------------------------

    def billable(self, b: Buckets) -> Buckets:
        """Output past the cap the gateway sent is not billed: the hold covered the cap."""
        return (
            b.with_output(min(b.output, self.request.output_cap)) if b.output > self.request.output_cap else b
        )

    def price(self, b: Buckets) -> int:
        route = self.request.route
        return charge(self.billable(b), route.multiplier.value, route.weights)

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

    async def run(self, receive: Receive, send: Send) -> None:
        """Forward and relay; a caller who leaves cancels the upstream request at once."""
        finished = False
        left = False
        task = asyncio.current_task()
        assert task is not None

        async def send_until_final(message: Message) -> None:
            nonlocal finished
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = True
            await send(message)

        def on_receive(done: asyncio.Future[Message]) -> None:
            nonlocal left
            if done.cancelled() or done.exception() is not None or finished:
                return
            if done.result()["type"] == "http.disconnect":
                left = True
                task.cancel()

        watcher: asyncio.Future[Message] = asyncio.ensure_future(receive())
        watcher.add_done_callback(on_receive)
        try:
            await self._forward(send_until_final)
        except asyncio.CancelledError:
            if not left:
                raise
            task.uncancel()
        finally:
            watcher.remove_done_callback(on_receive)
            watcher.cancel()
        if left:
            self.outcome = Outcome.CLIENT_DISCONNECTED

    async def _forward(self, send: Send) -> None:
        request = self.request
        log = self.state.log
        failure: QuotaError = UpstreamError("The route has no upstream.")
        failed = Outcome.UPSTREAM_ERROR
        candidates = request.route.upstreams
        for attempt, upstream in enumerate(candidates, start=1):
            last = attempt == len(candidates)
            mode, url, body, headers = request.upstream_call(upstream)
            log["upstream"] = upstream.name
            started = time.perf_counter()
            try:
                response = await self.client.send(
                    url, body, headers, timeout=upstream.timeout_s, connect_timeout=upstream.connect_timeout_s
                )
            except UpstreamHTTPError as exc:
                failure = translate_exception(exc)
                log.setdefault("upstream_errors", []).append((upstream.name, type(exc).__name__))
                continue
            if (response.status_code >= 500 or response.status_code == 429) and not last:
                await response.aclose()
                log.setdefault("upstream_errors", []).append(
                    (upstream.name, f"status_{response.status_code}")
                )
                continue
            try:
                if request.stream and response.status_code == 200:
                    try:
                        relayed = await self._relay_stream(send, response, mode, started)
                    except UpstreamHTTPError as exc:  # it broke before its first bytes
                        failure, failed, relayed = translate_exception(exc), Outcome.UPSTREAM_ERROR, False
                    else:
                        failure, failed = UpstreamError(MALFORMED), Outcome.UPSTREAM_MALFORMED
                    if not relayed:
                        # Nothing was sent yet: the next upstream may still answer.
                        log.setdefault("upstream_errors", []).append((upstream.name, "not_an_event_stream"))
                        continue
                else:
                    await self._relay_whole(send, response, mode, started)
            finally:
                await response.aclose()
            return
        self.outcome = failed
        await self._send_error(send, failure)

    async def _send_error(self, send: Send, error: QuotaError) -> None:
        self.status = error.status
        await send_error(send, error)

    async def _relay_whole(self, send: Send, response: UpstreamResponse, mode: Mode, started: float) -> None:
        try:
            raw = await response.aread()
        except UpstreamHTTPError as exc:
            self.outcome = Outcome.UPSTREAM_ERROR
            await self._send_error(send, translate_exception(exc))
            return
        _record_upstream_time(self.state, started)
        error = translate_status(response)
        if error is not None:
            self.outcome = Outcome.UPSTREAM_ERROR
            await self._send_error(send, error)
            return
        status = response.status_code
        self.status = status
        if status >= 400:
            # The caller's request was at fault: its body as the upstream sent it, in the
            # caller's dialect when the upstream spoke another one.
            self.outcome = Outcome.UPSTREAM_REJECTED
            if mode is Mode.TRANSLATED and self.request.protocol is Protocol.MESSAGES:
                raw = _anthropic_error_from_openai(raw, status)
            await send_bytes(
                send, status, raw, [(k, v) for k, v in relay_headers(response) if k != b"content-type"]
            )
            return
        try:
            obj = orjson.loads(raw)
            if not isinstance(obj, dict):
                raise ValueError
        except ValueError:
            self.outcome = Outcome.UPSTREAM_MALFORMED
            await self._send_error(send, UpstreamError("The upstream model server sent a malformed reply."))
            return
        reported, text = whole_usage(self.request.protocol, mode, obj)
        usage = _Usage(reported, False) if reported is not None else _Usage(self.estimate(text), True)
        self.usage = usage
        reply = whole_reply(
            self.request.protocol, mode, obj, self.request.body, usage.buckets,
            self.extension(usage.buckets, usage.estimated),
        )  # fmt: skip
        self.outcome = Outcome.OK
        await self.settle_once()
        headers = [(k, v) for k, v in relay_headers(response) if k != b"content-type"]
        await send_bytes(send, 200, orjson.dumps(reply), headers)

    async def _relay_stream(self, send: Send, response: UpstreamResponse, mode: Mode, started: float) -> bool:
        """Relay the event stream as it arrives; False (nothing sent) if its first bytes show
        it is not one (an HTML error page from a proxy in between, a JSON body)."""
        request = self.request
        chunks = response.aiter_raw()
        first = b""
        async for chunk in chunks:
            if chunk:
                first = chunk
                break
        _record_upstream_time(self.state, started)
        if not looks_like_event_stream(response.header(b"content-type"), first):
            return False
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
                self.usage = _Usage(estimated, True)
                tail += meter.translator.finish(estimated, self.extension(estimated, True))
        await self.settle_once()
        await send({"type": "http.response.body", "body": tail, "more_body": False})
        return True

    # ---- settlement ----------------------------------------------------------------------

    def _final_usage(self) -> _Usage | None:
        if self.usage is not None:
            return self.usage
        meter = self.meter
        if meter is None:
            return None
        if meter.final and meter.usage is not None:
            return _Usage(meter.usage, False)
        # Cut short (the caller left, the upstream broke): what was delivered, estimated.
        # Nothing delivered means nothing produced, and that is not charged.
        output = estimate_output_tokens(meter.delivered_text())
        if output == 0:
            return None
        if meter.usage is not None:  # the input side was reported (Anthropic's message_start)
            return _Usage(meter.usage.with_output(max(meter.usage.output, output)), True)
        return _Usage(Buckets(input=self.request.prompt_estimate, output=output), True)

    async def settle_once(self) -> None:
        if self.settled:
            return
        self.settled = True
        request = self.request
        usage = self._final_usage() or _Usage(Buckets(), False)
        billed = self.billable(usage.buckets)
        charged = self.price(usage.buckets)
        settlement = Settlement(
            request_id=self.state.request_id,
            account_id=self.billing.account_id,
            charged_account_id=self.billing.charged_account_id,
            user_id=self.billing.user_id,
            key_id=self.key_id,
            hold_id=self.hold_id,
            route=request.route.alias,
            upstream_model=self.upstream_model,
            multiplier=str(request.route.multiplier),
            charged=charged,
            estimated=usage.estimated,
            outcome=self.outcome,
            status=self.status,
            input_tokens=billed.input,  # uncached input only: the other buckets are apart
            output_tokens=billed.output,
            cache_read_tokens=billed.cache_read,
            cache_write_tokens=billed.cache_write_5m,
            cache_write_1h_tokens=billed.cache_write_1h,
            reasoning_tokens=billed.reasoning,
            session_id=request.session_id,
        )
        log = self.state.log
        log.update(
            input_tokens=billed.input_total,
            output_tokens=billed.output,
            cache_read_tokens=billed.cache_read,
            cache_write_tokens=billed.cache_write_5m + billed.cache_write_1h,
            charged=charged,
            estimated=usage.estimated,
            outcome=str(self.outcome),
        )
        started = time.perf_counter()
        await self.store.settle(settlement)
        log["settle_ms"] = round((time.perf_counter() - started) * 1000, 3)


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


def _record_upstream_time(state: RequestState, started: float) -> None:
    """The upstream's time before the gateway can answer: a whole reply, or a stream's headers."""
    elapsed = time.perf_counter() - started
    state.upstream_s = elapsed
    state.log["upstream_ms"] = round(elapsed * 1000, 3)
