"""Reading usage out of an agent-API reply while relaying it.

A native stream passes through as the bytes that arrived, event by event; only the event
that carries the final usage is rewritten, to add the charge. A translated stream is read as
Chat chunks and written as the caller's protocol. Either way the meter ends knowing the
usage buckets (exact when the upstream reported them) and the text it delivered (to
estimate a stream that was cut short).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import orjson

from quota_proxy.agents.request import Mode, Protocol
from quota_proxy.protocols import anthropic, responses
from quota_proxy.protocols.chat import list_of, read_reply, sse, str_of
from quota_proxy.usage import AnthropicStreamUsage, Buckets, from_anthropic, from_chat, from_responses

# Given the usage so far, the fields our usage extension adds (route multiplier, charge).
Extend = Callable[[Buckets], dict[str, Any]]

_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_TERMINAL = (b'"response.completed"', b'"response.incomplete"', b'"response.failed"')
_DELTA_FIELDS = ("text", "partial_json", "thinking")


class SSESplitter:
    """Cuts a byte stream into whole events, each with its blank line, as bytes."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        data = self._pending + chunk
        events = []
        start = 0
        for m in _BOUNDARY.finditer(data):
            events.append(data[start : m.end()])
            start = m.end()
        self._pending = data[start:]
        return events

    def flush(self) -> list[bytes]:
        rest, self._pending = self._pending, b""
        return [rest] if rest else []


def event_data(event: bytes) -> bytes | None:
    lines = [line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


def _json(data: bytes | None) -> dict[str, Any] | None:
    if data is None:
        return None
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


class StreamMeter:
    """The common surface: bytes in, bytes for the caller out; usage and text remembered."""

    def __init__(self, extend: Extend) -> None:
        self.extend = extend
        self.splitter = SSESplitter()
        self.usage: Buckets | None = None
        self.final = False  # the terminal usage was seen: ``usage`` is exact
        self.delivered: list[str] = []

    def feed(self, chunk: bytes) -> bytes:
        return b"".join(self.event(e) for e in self.splitter.feed(chunk))

    def finish(self) -> bytes:
        return b"".join(self.event(e) for e in self.splitter.flush())

    def event(self, event: bytes) -> bytes:
        raise NotImplementedError

    def broken(self, code: str, message: str) -> bytes:
        """The last event of a stream the upstream broke after it began."""
        raise NotImplementedError

    def delivered_text(self) -> str:
        return "".join(self.delivered)


class NativeMessagesMeter(StreamMeter):
    def __init__(self, extend: Extend) -> None:
        super().__init__(extend)
        self.acc = AnthropicStreamUsage()

    def event(self, event: bytes) -> bytes:
        data = event_data(event)
        if data is None:
            return event
        if b'"content_block_delta"' in data:
            delta = (_json(data) or {}).get("delta")
            if isinstance(delta, dict):
                self.delivered.extend(str_of(delta, f) for f in _DELTA_FIELDS)
            return event
        if b'"message_start"' not in data and b'"message_delta"' not in data:
            return event
        obj = _json(data)
        if obj is None:
            return event
        self.acc.feed(obj)
        self.usage = self.acc.buckets()
        if obj.get("type") != "message_delta" or self.usage is None or not isinstance(obj.get("usage"), dict):
            return event
        self.final = True
        obj["usage"].update(self.extend(self.usage))
        return sse("message_delta", obj)

    def broken(self, code: str, message: str) -> bytes:
        return anthropic.error_event("api_error", message)


class NativeResponsesMeter(StreamMeter):
    def __init__(self, extend: Extend) -> None:
        super().__init__(extend)
        self.seq = 0

    def event(self, event: bytes) -> bytes:
        data = event_data(event)
        if data is None:
            return event
        if b'.delta"' in data:
            obj = _json(data) or {}
            self.seq = (
                obj.get("sequence_number", self.seq)
                if isinstance(obj.get("sequence_number"), int)
                else self.seq
            )
            self.delivered.append(str_of(obj, "delta"))
            return event
        if not any(kind in data for kind in _TERMINAL):
            return event
        terminal = _json(data)
        response = terminal.get("response") if terminal is not None else None
        if terminal is None or not isinstance(response, dict):
            return event
        # The usage lives under response.usage, never at the event's top level.
        self.usage = from_responses(response.get("usage"))
        if self.usage is None:
            return event
        self.final = True
        response["usage"].update(self.extend(self.usage))
        return sse(str(terminal.get("type")), terminal)

    def broken(self, code: str, message: str) -> bytes:
        error = {
            "type": "error",
            "sequence_number": self.seq + 1,
            "code": code,
            "message": message,
            "param": None,
        }
        return sse("error", error)


class TranslatedMeter(StreamMeter):
    """Chat chunks in; Anthropic or Responses events out."""

    def __init__(
        self, extend: Extend, translator: anthropic.StreamTranslator | responses.StreamTranslator
    ) -> None:
        super().__init__(extend)
        self.translator = translator

    def event(self, event: bytes) -> bytes:
        obj = _json(event_data(event))
        if obj is None:  # [DONE], comments, keep-alives: the translator writes its own ending
            return b""
        out = self.translator.feed(obj)
        if self.translator.usage is not None:
            self.usage = self.translator.usage
            self.final = True
        return out

    def finish(self) -> bytes:
        out = super().finish()
        if self.usage is None:
            return out  # no usage: the endpoint estimates and closes the stream itself
        return out + self.close(self.usage)

    def close(self, usage: Buckets) -> bytes:
        return self.translator.finish(usage, self.extend(usage))

    def broken(self, code: str, message: str) -> bytes:
        if isinstance(self.translator, responses.StreamTranslator):
            return self.translator.failed(code, message)
        return anthropic.error_event("api_error", message)

    def delivered_text(self) -> str:
        return "".join(self.translator.reader.delivered)


def stream_meter(
    protocol: Protocol, mode: Mode, extend: Extend, request: dict[str, Any], model: str
) -> StreamMeter:
    if mode is Mode.NATIVE:
        return NativeMessagesMeter(extend) if protocol is Protocol.MESSAGES else NativeResponsesMeter(extend)
    if protocol is Protocol.MESSAGES:
        return TranslatedMeter(extend, anthropic.StreamTranslator(model))
    return TranslatedMeter(extend, responses.StreamTranslator(request, model))


def whole_usage(protocol: Protocol, mode: Mode, obj: dict[str, Any]) -> tuple[Buckets | None, str]:
    """The reported usage of a whole reply and its text (for an estimate when usage is missing)."""
    if mode is Mode.TRANSLATED:
        reply = read_reply(obj)
        return from_chat(obj.get("usage")), reply.text + "".join(c.arguments for c in reply.tool_calls)
    if protocol is Protocol.MESSAGES:
        content = obj.get("content")
        blocks: list[Any] = content if isinstance(content, list) else []
        text = "".join(
            str_of(b, "text")
            + str_of(b, "thinking")
            + (orjson.dumps(b["input"]).decode() if "input" in b else "")
            for b in blocks
            if isinstance(b, dict)
        )
        return from_anthropic(obj.get("usage")), text
    parts: list[str] = []
    for item in list_of(obj, "output"):
        if isinstance(item, dict):
            parts.append(str_of(item, "arguments"))
            for part in list_of(item, "content"):
                parts.append(str_of(part, "text") if isinstance(part, dict) else "")
    return from_responses(obj.get("usage")), "".join(parts)


def whole_reply(
    protocol: Protocol,
    mode: Mode,
    obj: dict[str, Any],
    request: dict[str, Any],
    usage: Buckets,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """The caller's reply: translated when needed, its usage in the protocol's own style, extended."""
    if mode is Mode.TRANSLATED:
        if protocol is Protocol.MESSAGES:
            obj = anthropic.from_chat_response(obj, usage)
        else:
            obj = responses.from_chat_response(obj, request, usage)
    elif not isinstance(obj.get("usage"), dict):
        obj["usage"] = (
            anthropic.usage_object(usage) if protocol is Protocol.MESSAGES else responses.usage_object(usage)
        )
    obj["usage"].update(extra)
    return obj
