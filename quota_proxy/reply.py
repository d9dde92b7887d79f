"""Watching the reply: find what the upstream reported it used, tell the caller what it cost.

`MeteredReply.send` sits between the upstream hop and the caller. A stream passes through
event by event (SSEMeter finds the usage event; the rest goes on as the very bytes that
arrived); a whole reply is read, its usage extended with the charge, and sent on. Either
way the usage it found is what the meter settles.
"""

from __future__ import annotations

from typing import Any

import orjson

from quota_proxy.asgi import Message, Scope, Send, send_bytes, send_error
from quota_proxy.errors import UpstreamError
from quota_proxy.inference_request import InferenceRequest, Kind
from quota_proxy.meter import Meter, Usage
from quota_proxy.sse import SSEMeter, completion_texts
from quota_proxy.tokens import estimate_output_tokens
from quota_proxy.upstream import MALFORMED
from quota_proxy.usage import from_chat


class MeteredReply:
    """Watches the inner app's reply: extends usage, strips the hidden usage event."""

    def __init__(self, scope: Scope, meter: Meter, request: InferenceRequest, send: Send) -> None:
        self.scope = scope
        self.meter = meter
        self.request = request
        self._send = self._hold_last
        self._caller = send
        self.last: Message | None = None  # the reply's final message, sent after the settlement
        self.status = 0
        self.start: Message | None = None
        self.chunks: list[bytes] = []
        self.sse: SSEMeter | None = None
        self.usage: Usage | None = None
        self.malformed = False  # a 200 that is not the JSON object asked for

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            if self.status == 200 and self.request.stream and _is_event_stream(message):
                self.sse = SSEMeter(self._on_usage_event)
                await self._send(message)
            else:
                self.start = message
            return
        if message["type"] != "http.response.body":
            await self._send(message)
            return
        body = message.get("body", b"")
        more = message.get("more_body", False)
        if self.sse is not None:
            out = self.sse.feed(body) if body else b""
            if not more:
                out += self.sse.flush()
            if out or not more:
                await self._send({"type": "http.response.body", "body": out, "more_body": more})
            return
        self.chunks.append(body)
        if not more:
            await self._finish_whole()

    async def _hold_last(self, message: Message) -> None:
        """Everything goes to the caller at once except the final body message: that waits
        until the settlement is written, so a caller who has the whole answer also sees its
        charge in the balance."""
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.last = message
            return
        await self._caller(message)

    async def send_last(self) -> None:
        """Send the held final message (after the settlement)."""
        last, self.last = self.last, None
        if last is not None:
            await self._caller(last)

    def final_usage(self) -> Usage | None:
        """What to charge: the upstream's report; for a stream without one, an estimate of
        what the caller received (nothing received means nothing produced, not charged)."""
        if self.usage is not None or self.sse is None:
            return self.usage
        output = estimate_output_tokens(self.sse.delivered_text())
        return Usage(self.request.prompt_estimate, output, True) if output > 0 else None

    async def _finish_whole(self) -> None:
        assert self.start is not None
        body = b"".join(self.chunks)
        if self.status != 200:
            await self._send(self.start)
            await self._send({"type": "http.response.body", "body": body})
            return
        try:
            obj = orjson.loads(body)
            if not isinstance(obj, dict):
                raise ValueError
        except ValueError:
            self.malformed = True
            self.status = UpstreamError.status
            await send_error(self._send, UpstreamError(MALFORMED))
            return
        usage = read_usage(obj.get("usage"))
        if usage is None:
            usage = Usage(self.request.prompt_estimate, estimate_output_tokens(completion_texts(obj)), True)
        self.usage = usage
        obj["usage"] = self._extended_usage(obj.get("usage"), usage)
        headers = [(k, v) for k, v in self.start.get("headers", []) if k.lower() not in (b"content-length", b"content-type")]
        await send_bytes(self._send, 200, orjson.dumps(obj), headers)

    def _on_usage_event(self, event: dict[str, Any]) -> bytes | None:
        usage = read_usage(event.get("usage"))
        if usage is None:
            return None  # a usage object without counts: not ours to meter or to drop
        self.usage = usage
        if self.request.wants_usage:
            event["usage"] = self._extended_usage(event["usage"], usage)
        elif event.get("choices"):
            # Usage riding on a content chunk: the caller keeps the chunk, not the usage.
            event["usage"] = None
        else:
            return b""
        return b"data: " + orjson.dumps(event) + b"\n\n"

    def _extended_usage(self, original: Any, usage: Usage) -> dict[str, Any]:
        extended = dict(original) if isinstance(original, dict) else {}
        if not isinstance(original, dict):
            extended["prompt_tokens"] = usage.input_tokens
            if self.request.kind is not Kind.EMBEDDINGS:
                extended["completion_tokens"] = usage.output_tokens
            extended["total_tokens"] = usage.input_tokens + usage.output_tokens
        extended["input_tokens"] = usage.input_tokens
        extended["output_tokens"] = usage.output_tokens
        for name, count in (
            ("cache_read_tokens", usage.cache_read),
            ("cache_write_tokens", usage.cache_write_5m),
            ("cache_write_1h_tokens", usage.cache_write_1h),
        ):
            if count:
                extended[name] = count
        extended["route_multiplier"] = str(self.meter.route.multiplier)
        extended["charged_quota_tokens"] = self.meter.charge(usage)
        if usage.estimated:
            extended["estimated"] = True
        return extended


def read_usage(raw: Any) -> Usage | None:
    """The upstream's usage object in buckets (cached tokens are inside prompt_tokens), or
    None when it is missing or not counts."""
    buckets = from_chat(raw)
    return Usage.of(buckets) if buckets is not None else None


def _is_event_stream(message: Message) -> bool:
    for key, value in message.get("headers", ()):
        if key.lower() == b"content-type":
            return bytes(value).startswith(b"text/event-stream")
    return False

