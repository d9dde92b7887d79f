"""Incremental SSE handling for metering: find the usage event, pass the rest through untouched.

Upstream reads are cut at event boundaries (a partial event waits for its end), and a run of
complete events that holds no usage object is forwarded as the very bytes that arrived.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import orjson

_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_SEPARATORS = (b"\n\n", b"\r\n\r\n", b"\r\r")

# Given a parsed event that carries usage, return the bytes to send in its place (b"" to drop
# it), or None to send the event as it came.
UsageHandler = Callable[[dict[str, Any]], bytes | None]


class SSEMeter:
    """Feeds upstream bytes, yields bytes for the caller, and remembers what was delivered."""

    __slots__ = ("_pending", "_on_usage", "delivered")

    def __init__(self, on_usage: UsageHandler) -> None:
        self._pending = b""
        self._on_usage = on_usage
        self.delivered: list[bytes] = []

    def feed(self, chunk: bytes) -> bytes:
        data = self._pending + chunk if self._pending else chunk
        end = _last_boundary(data)
        if end < 0:
            self._pending = data
            return b""
        complete, self._pending = data[:end], data[end:]
        self.delivered.append(complete)
        if _USAGE_OBJECT.search(complete) is None:
            return complete
        out = []
        for event in _split_events(complete):
            payload = _data_payload(event)
            parsed = _parse_usage_event(payload) if payload is not None else None
            replacement = self._on_usage(parsed) if parsed is not None else None
            out.append(event if replacement is None else replacement)
        return b"".join(out)

    def flush(self) -> bytes:
        """What is left when the upstream ends without a final blank line."""
        rest, self._pending = self._pending, b""
        if rest:
            self.delivered.append(rest)
        return rest

    def delivered_text(self) -> str:
        """The completion text the caller received, for estimating a stream cut short."""
        parts: list[str] = []
        for block in self.delivered:
            for event in _split_events(block):
                payload = _data_payload(event)
                if not payload or payload == b"[DONE]":
                    continue
                try:
                    obj = orjson.loads(payload)
                except orjson.JSONDecodeError:
                    continue
                parts.extend(_choice_texts(obj))
        return "".join(parts)


def _last_boundary(data: bytes) -> int:
    """Index just past the last event boundary, or -1."""
    if data.endswith(_SEPARATORS):  # the usual read: whole events, nothing to search
        return len(data)
    end = -1
    for sep in _SEPARATORS:
        i = data.rfind(sep)
        if i >= 0:
            end = max(end, i + len(sep))
    return end


def _split_events(block: bytes) -> list[bytes]:
    """Events with their trailing blank line kept, so joining them gives back block."""
    events = []
    start = 0
    for m in _BOUNDARY.finditer(block):
        events.append(block[start : m.end()])
        start = m.end()
    if start < len(block):
        events.append(block[start:])
    return events


def _data_payload(event: bytes) -> bytes | None:
    lines = [line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    if not lines:
        return None
    return b"\n".join(lines)


def _parse_usage_event(payload: bytes) -> dict[str, Any] | None:
    if _USAGE_OBJECT.search(payload) is None:
        return None
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if isinstance(obj, dict) and isinstance(obj.get("usage"), dict):
        return obj
    return None


def _choice_texts(obj: Any) -> list[str]:
    """The completion text of a response or a stream event: message or delta content,
    reasoning, refusals, tool-call arguments and legacy completion text."""
    if not isinstance(obj, dict):
        return []
    texts = []
    for choice in obj.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        for part in (choice.get("delta"), choice.get("message")):
            if not isinstance(part, dict):
                continue
            for field in ("content", "reasoning_content", "refusal"):
                if isinstance(part.get(field), str):
                    texts.append(part[field])
            for call in part.get("tool_calls") or ():
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                    texts.append(fn["arguments"])
        if isinstance(choice.get("text"), str):
            texts.append(choice["text"])
    return texts


def completion_texts(obj: Any) -> str:
    """The text of a whole (non-streamed) response, for estimating when usage is absent."""
    return "".join(_choice_texts(obj))
