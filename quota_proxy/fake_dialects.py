"""The fake upstream's Anthropic Messages and OpenAI Responses endpoints, and the usage
each dialect reports, cache and reasoning fields included.

Counting is the same in every dialect, so one conversation costs the same through any of
them: the *uncached* prompt is its words plus 3 per message; reported cache reads and
writes come on top of it (``FakeUpstreamOptions.cache_read_tokens`` …), and reasoning
tokens on top of the reply's words, inside the output count, as real servers report them.
Each dialect then writes those numbers in its own style — that difference is what the
gateway's metering must undo.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

Events = Iterator[tuple[bool, bytes]]


@dataclass(frozen=True, slots=True)
class Counts:
    """What the fake reports for one request, before any dialect writes it down."""

    uncached: int
    cache_read: int
    cache_write_5m: int
    cache_write_1h: int
    words: int
    reasoning: int

    @property
    def output(self) -> int:
        return self.words + self.reasoning

    @property
    def prompt_total(self) -> int:
        return self.uncached + self.cache_read + self.cache_write_5m + self.cache_write_1h


def count_words(value: Any) -> int:
    """Words in every text-bearing field of a message, item or block, however nested."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(count_words(v) for v in value)
    if isinstance(value, dict):
        total = 0
        for key in ("text", "content", "output", "arguments", "input", "thinking"):
            item = value.get(key)
            total += (
                orjson_words(item)
                if key in ("input", "arguments") and isinstance(item, dict)
                else count_words(item)
            )
        return total
    return 0


def orjson_words(value: Any) -> int:
    return len(orjson.dumps(value).decode().split())


def anthropic_prompt(body: dict[str, Any]) -> int:
    messages = body.get("messages")
    listed: list[Any] = messages if isinstance(messages, list) else []
    return count_words(body.get("system")) + sum(count_words(m) + 3 for m in listed)


def responses_prompt(body: dict[str, Any]) -> int:
    raw = body.get("input")
    items = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else []
    instructions = count_words(body.get("instructions"))
    return instructions + (3 if instructions else 0) + sum(count_words(i) + 3 for i in items)


# ---- usage objects, one per dialect -------------------------------------------------------


def chat_usage(c: Counts) -> dict[str, Any]:
    """prompt_tokens includes cached tokens; completion_tokens includes reasoning."""
    usage: dict[str, Any] = {
        "prompt_tokens": c.prompt_total,
        "completion_tokens": c.output,
        "total_tokens": c.prompt_total + c.output,
    }
    if c.cache_read or c.cache_write_5m or c.cache_write_1h:
        details: dict[str, Any] = {"cached_tokens": c.cache_read}
        if c.cache_write_5m or c.cache_write_1h:
            details["cache_write_tokens"] = c.cache_write_5m + c.cache_write_1h
        usage["prompt_tokens_details"] = details
    if c.reasoning:
        usage["completion_tokens_details"] = {"reasoning_tokens": c.reasoning}
    return usage


def anthropic_usage(c: Counts, output: int | None = None) -> dict[str, Any]:
    """input_tokens excludes cache reads and writes; writes split by lifetime; thinking
    tokens are inside output_tokens (output_tokens_details breaks them out)."""
    usage: dict[str, Any] = {
        "input_tokens": c.uncached,
        "cache_creation_input_tokens": c.cache_write_5m + c.cache_write_1h,
        "cache_read_input_tokens": c.cache_read,
        "cache_creation": {
            "ephemeral_5m_input_tokens": c.cache_write_5m,
            "ephemeral_1h_input_tokens": c.cache_write_1h,
        },
        "output_tokens": c.output if output is None else output,
        "service_tier": "standard",
    }
    if c.reasoning and output is None:
        usage["output_tokens_details"] = {"thinking_tokens": c.reasoning}
    return usage


def responses_usage(c: Counts) -> dict[str, Any]:
    """input_tokens includes cached (and written) tokens; output_tokens includes reasoning."""
    details: dict[str, Any] = {
        "cached_tokens": c.cache_read,
        "cache_write_tokens": c.cache_write_5m + c.cache_write_1h,
    }
    if c.cache_write_5m or c.cache_write_1h:
        details["cache_write_tokens_details"] = {
            "ttl_30m_tokens": c.cache_write_5m,
            "ttl_12h_tokens": c.cache_write_1h,
        }
    return {
        "input_tokens": c.prompt_total,
        "input_tokens_details": details,
        "output_tokens": c.output,
        "output_tokens_details": {"reasoning_tokens": c.reasoning},
        "total_tokens": c.prompt_total + c.output,
    }


# ---- tool calls ---------------------------------------------------------------------------


def tool_arguments(words: list[str]) -> str:
    return orjson.dumps({"input": " ".join(words)}).decode()


def first_tool(body: dict[str, Any]) -> str | None:
    """The tool to call: the first declared one, unless the conversation just answered a call."""
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools or not isinstance(tools[0], dict):
        return None
    last: Any = None
    for name in ("messages", "input"):
        seq = body.get(name)
        if isinstance(seq, list) and seq:
            last = seq[-1]
    if isinstance(last, dict):
        content = last.get("content")
        if last.get("role") == "tool" or last.get("type") == "function_call_output":
            return None
        if isinstance(content, list) and any(
            isinstance(b, dict) and b.get("type") == "tool_result" for b in content
        ):
            return None
    tool = tools[0]
    fn: dict[str, Any] = tool["function"] if isinstance(tool.get("function"), dict) else tool
    found = fn.get("name")
    return found if isinstance(found, str) else None


def split_pieces(text: str, n: int = 3) -> list[str]:
    size = max(1, -(-len(text) // n))
    return [text[i : i + size] for i in range(0, len(text), size)]


# ---- Anthropic Messages ---------------------------------------------------------------------

_ANTHROPIC_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def _sse(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def anthropic_reply(
    body: dict[str, Any], words: list[str], finish: str, c: Counts, tool: str | None
) -> bytes | Events:
    stop = "tool_use" if tool else _ANTHROPIC_STOP.get(finish, "end_turn")
    message: dict[str, Any] = {
        "id": "msg_" + uuid.uuid4().hex[:24],
        "type": "message",
        "role": "assistant",
        "model": body.get("model"),
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
    }
    tool_id = "toolu_" + uuid.uuid4().hex[:24]
    if body.get("stream") is not True:
        if tool:
            content = [{"type": "tool_use", "id": tool_id, "name": tool, "input": {"input": " ".join(words)}}]
        else:
            content = [{"type": "text", "text": " ".join(words)}]
        reply = {**message, "content": content, "stop_reason": stop, "usage": anthropic_usage(c)}
        return orjson.dumps(reply)
    return _anthropic_events(message, words, stop, c, tool, tool_id)


def _anthropic_events(
    message: dict[str, Any], words: list[str], stop: str, c: Counts, tool: str | None, tool_id: str
) -> Events:
    yield (
        False,
        _sse(
            "message_start", {"type": "message_start", "message": {**message, "usage": anthropic_usage(c, 1)}}
        ),
    )
    if tool:
        block: dict[str, Any] = {"type": "tool_use", "id": tool_id, "name": tool, "input": {}}
    else:
        block = {"type": "text", "text": ""}
    yield (
        False,
        _sse("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block}),
    )
    yield False, _sse("ping", {"type": "ping"})
    if tool:
        for piece in split_pieces(tool_arguments(words)):
            delta = {"type": "input_json_delta", "partial_json": piece}
            yield (
                True,
                _sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}),
            )
    else:
        last = len(words) - 1
        for i, word in enumerate(words):
            delta = {"type": "text_delta", "text": word if i == last else word + " "}
            yield (
                True,
                _sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}),
            )
    yield False, _sse("content_block_stop", {"type": "content_block_stop", "index": 0})
    usage = anthropic_usage(c)
    usage.pop("cache_creation")
    usage.pop("service_tier")
    end: dict[str, Any] = {"stop_reason": stop, "stop_sequence": None}
    yield False, _sse("message_delta", {"type": "message_delta", "delta": end, "usage": usage})
    yield False, _sse("message_stop", {"type": "message_stop"})


def anthropic_error(status: int, message: str) -> bytes:
    kinds = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        413: "request_too_large",
        429: "rate_limit_error",
        529: "overloaded_error",
    }
    kind = kinds.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})


# ---- OpenAI Responses -----------------------------------------------------------------------


def _response(body: dict[str, Any], rid: str, status: str, output: list[Any], usage: Any) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": body.get("model"),
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": body.get("previous_response_id"),
        "store": body.get("store", True),
        "temperature": body.get("temperature"),
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [],
        "top_p": body.get("top_p"),
        "usage": usage,
    }


def responses_reply(
    body: dict[str, Any], words: list[str], finish: str, c: Counts, tool: str | None
) -> bytes | Events:
    rid = "resp_" + uuid.uuid4().hex[:24]
    status = "incomplete" if finish == "length" and not tool else "completed"
    text = " ".join(words)
    item_id = ("fc_" if tool else "msg_") + uuid.uuid4().hex[:24]
    call_id = "call_" + uuid.uuid4().hex[:24]
    if tool:
        done: dict[str, Any] = {
            "type": "function_call",
            "id": item_id,
            "call_id": call_id,
            "name": tool,
            "arguments": tool_arguments(words),
            "status": "completed",
        }
    else:
        part = {"type": "output_text", "text": text, "annotations": []}
        done = {
            "type": "message",
            "id": item_id,
            "status": "completed",
            "role": "assistant",
            "content": [part],
        }
    if body.get("stream") is not True:
        return orjson.dumps(_response(body, rid, status, [done], responses_usage(c)))
    return _responses_events(body, rid, status, words, done, c)


def _responses_events(
    body: dict[str, Any], rid: str, status: str, words: list[str], done: dict[str, Any], c: Counts
) -> Events:
    seq = iter(range(1_000_000))

    def event(kind: str, **fields: Any) -> bytes:
        return _sse(kind, {"type": kind, "sequence_number": next(seq), **fields})

    opening = _response(body, rid, "in_progress", [], None)
    yield False, event("response.created", response=opening)
    yield False, event("response.in_progress", response=opening)
    item_id = done["id"]
    if done["type"] == "function_call":
        yield (
            False,
            event(
                "response.output_item.added",
                output_index=0,
                item={**done, "arguments": "", "status": "in_progress"},
            ),
        )
        for piece in split_pieces(done["arguments"]):
            yield (
                True,
                event("response.function_call_arguments.delta", item_id=item_id, output_index=0, delta=piece),
            )
        yield (
            False,
            event(
                "response.function_call_arguments.done",
                item_id=item_id,
                output_index=0,
                arguments=done["arguments"],
            ),
        )
    else:
        added = {**done, "status": "in_progress", "content": []}
        empty = {"type": "output_text", "text": "", "annotations": []}
        where = {"item_id": item_id, "output_index": 0, "content_index": 0}
        yield False, event("response.output_item.added", output_index=0, item=added)
        yield False, event("response.content_part.added", **where, part=empty)
        last = len(words) - 1
        for i, word in enumerate(words):
            yield (
                True,
                event(
                    "response.output_text.delta",
                    **where,
                    delta=word if i == last else word + " ",
                    logprobs=[],
                ),
            )
        text = done["content"][0]["text"]
        yield False, event("response.output_text.done", **where, text=text, logprobs=[])
        yield False, event("response.content_part.done", **where, part=done["content"][0])
    yield False, event("response.output_item.done", output_index=0, item=done)
    final = _response(body, rid, status, [done], responses_usage(c))
    yield False, event(f"response.{status}", response=final)
