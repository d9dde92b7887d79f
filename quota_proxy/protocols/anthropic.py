"""Anthropic Messages <-> Chat Completions.

Translated: system prompts (string or text blocks), multi-turn text, images (base64 and
URL sources), tool definitions and ``tool_choice``, ``tool_use`` and ``tool_result``
blocks, stop sequences, temperature/top_p, ``metadata.user_id``, stop reasons, and the
stream (text and tool-input deltas, the final usage). A Chat server's
``reasoning_content`` comes back as an unsigned ``thinking`` block.

Not translated, and refused with a 400 naming it: ``document``, ``search_result``,
``server_tool_use``/``web_search_tool_result``, ``container_upload`` and other blocks a Chat
server has no equivalent for; server tools (any tool with a ``type`` other than
``custom``); ``mcp_servers``; ``container``.
Dropped, because a Chat server cannot honour them and the answer stays valid without
them: ``cache_control`` markers, ``thinking`` (the budget and earlier ``thinking`` /
``redacted_thinking`` blocks), ``top_k``, ``service_tier``, ``context_management``.
"""

from __future__ import annotations

from typing import Any

import orjson

from quota_proxy.errors import BadRequest
from quota_proxy.protocols.chat import ChatStreamReader, new_id, parse_arguments, read_reply, sse, text_of
from quota_proxy.usage import Buckets

STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
_REFUSED_FIELDS = ("mcp_servers", "container")
_DROPPED_BLOCKS = frozenset({"thinking", "redacted_thinking"})


def _refuse(what: str) -> BadRequest:
    return BadRequest(
        f"{what} cannot be translated for this route's upstream, which speaks Chat Completions. "
        "Use a route whose upstream speaks the Anthropic Messages API.",
    )


def to_chat_request(body: dict[str, Any]) -> dict[str, Any]:
    """A Messages request as a Chat Completions request (model left for the caller to set)."""
    for name in _REFUSED_FIELDS:
        if body.get(name) is not None:
            raise _refuse(f"'{name}'")
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system is not None:
        text = text_of(system)
        if not isinstance(system, (str, list)):
            raise BadRequest("'system' must be a string or an array of text blocks.", param="system")
        if text:
            messages.append({"role": "system", "content": text})
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise BadRequest("'messages' must be a non-empty array.", param="messages")
    for message in raw_messages:
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise BadRequest(
                "Each message must be an object with role 'user' or 'assistant'.", param="messages"
            )
        messages.extend(_message(message["role"], message.get("content")))
    chat: dict[str, Any] = {"model": body.get("model"), "messages": messages}
    if body.get("max_tokens") is not None:
        chat["max_tokens"] = body["max_tokens"]
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            chat[name] = body[name]
    if isinstance(body.get("stop_sequences"), list) and body["stop_sequences"]:
        chat["stop"] = body["stop_sequences"]
    user = body.get("metadata", {}).get("user_id") if isinstance(body.get("metadata"), dict) else None
    if isinstance(user, str):
        chat["user"] = user
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        chat["tools"] = [_tool(t) for t in tools]
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        chat.update(_tool_choice(choice))
    if body.get("stream") is True:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return chat


def _message(role: str, content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise BadRequest("A message's content must be a string or an array of blocks.", param="messages")
    out: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": str(block.get("text", ""))})
        elif kind == "image" and role == "user":
            parts.append({"type": "image_url", "image_url": {"url": _image_url(block.get("source"))}})
        elif kind == "tool_use" and role == "assistant":
            calls.append(
                {
                    "id": str(block.get("id")),
                    "type": "function",
                    "function": {
                        "name": str(block.get("name")),
                        "arguments": orjson.dumps(block.get("input", {})).decode(),
                    },
                }
            )
        elif kind == "tool_result" and role == "user":
            result = block.get("content")
            text = result if isinstance(result, str) else _result_text(result, parts)
            if block.get("is_error") is True:
                text = "Error: " + text
            out.append({"role": "tool", "tool_call_id": str(block.get("tool_use_id")), "content": text})
        elif kind in _DROPPED_BLOCKS:
            continue
        else:
            raise _refuse(f"A {kind!r} content block in a {role} message")
    if role == "assistant":
        message: dict[str, Any] = {"role": "assistant", "content": "".join(p["text"] for p in parts) or None}
        if calls:
            message["tool_calls"] = calls
        if message["content"] is not None or calls:
            out.append(message)
    elif parts:
        only_text = all(p["type"] == "text" for p in parts)
        out.append({"role": "user", "content": "".join(p["text"] for p in parts) if only_text else parts})
    return out


def _result_text(result: Any, parts: list[dict[str, Any]]) -> str:
    """A tool result's text. Chat's tool messages carry text only, so its images (a
    screenshot tool's) join the user message that follows the tool messages."""
    if result is None:
        return ""
    if not isinstance(result, list):
        raise BadRequest("A tool_result's content must be a string or an array of blocks.", param="messages")
    texts = []
    for block in result:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(str(block.get("text", "")))
        elif kind == "image":
            parts.append({"type": "image_url", "image_url": {"url": _image_url(block.get("source"))}})
        else:
            raise _refuse(f"A {kind!r} block inside a tool_result")
    return "".join(texts)


def _image_url(source: Any) -> str:
    if isinstance(source, dict):
        if source.get("type") == "base64":
            return f"data:{source.get('media_type')};base64,{source.get('data')}"
        if source.get("type") == "url" and isinstance(source.get("url"), str):
            return str(source["url"])
    raise _refuse("An image source other than base64 or url")


def _tool(tool: Any) -> dict[str, Any]:
    if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
        raise BadRequest("Each tool must be an object with a 'name'.", param="tools")
    if tool.get("type") not in (None, "custom"):
        raise _refuse(f"The server tool {tool.get('type')!r}")
    fn: dict[str, Any] = {"name": tool["name"], "parameters": tool.get("input_schema") or {"type": "object"}}
    if isinstance(tool.get("description"), str):
        fn["description"] = tool["description"]
    return {"type": "function", "function": fn}


def _tool_choice(choice: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    kind = choice.get("type")
    if kind == "auto":
        out["tool_choice"] = "auto"
    elif kind == "any":
        out["tool_choice"] = "required"
    elif kind == "none":
        out["tool_choice"] = "none"
    elif kind == "tool":
        out["tool_choice"] = {"type": "function", "function": {"name": str(choice.get("name"))}}
    if choice.get("disable_parallel_tool_use") is True:
        out["parallel_tool_calls"] = False
    return out


def usage_object(b: Buckets) -> dict[str, Any]:
    """Buckets in Anthropic's own field style (input excludes cache reads and writes)."""
    return {
        "input_tokens": b.input,
        "cache_creation_input_tokens": b.cache_write_5m + b.cache_write_1h,
        "cache_read_input_tokens": b.cache_read,
        "cache_creation": {
            "ephemeral_5m_input_tokens": b.cache_write_5m,
            "ephemeral_1h_input_tokens": b.cache_write_1h,
        },
        "output_tokens": b.output,
    }


def from_chat_response(obj: dict[str, Any], usage: Buckets | None = None) -> dict[str, Any]:
    """A whole chat completion as a Messages response; ``usage`` overrides the chat usage."""
    reply = read_reply(obj)
    content: list[dict[str, Any]] = []
    if reply.reasoning:
        # A Chat server's reasoning, as a thinking block. It has no signature: sent back on a
        # translated route it is dropped, as every earlier thinking block is.
        content.append({"type": "thinking", "thinking": reply.reasoning, "signature": ""})
    if reply.text:
        content.append({"type": "text", "text": reply.text})
    for call in reply.tool_calls:
        content.append(
            {"type": "tool_use", "id": call.id, "name": call.name, "input": parse_arguments(call.arguments)}
        )
    buckets = usage or reply.usage or Buckets()
    return {
        "id": new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": reply.model,
        "content": content,
        "stop_reason": STOP_REASONS.get(reply.finish_reason or "stop", "end_turn"),
        "stop_sequence": None,
        "usage": usage_object(buckets),
    }


class StreamTranslator:
    """Chat chunks in, Anthropic SSE events out (message_start, content blocks with text and
    input_json deltas, message_delta with the stop reason and cumulative usage, message_stop)."""

    def __init__(self, model: str = "") -> None:
        self.reader = ChatStreamReader()
        self.model = model
        self.started = False
        self.finished = False
        self.block: int = -1  # index of the open content block, -1 for none
        self.block_kind = ""
        self.next_index = 0
        self.tool_blocks: dict[int, int] = {}  # chat tool index -> content block index
        self.stop_reason: str | None = None
        self.usage: Buckets | None = None

    def _start(self) -> list[bytes]:
        if self.started:
            return []
        self.started = True
        message: dict[str, Any] = {
            "id": new_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": self.reader.model or self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return [sse("message_start", {"type": "message_start", "message": message})]

    def _close_block(self) -> list[bytes]:
        if self.block < 0:
            return []
        index, self.block = self.block, -1
        return [sse("content_block_stop", {"type": "content_block_stop", "index": index})]

    def _open(self, block: dict[str, Any], kind: str) -> list[bytes]:
        out = self._close_block()
        self.block, self.block_kind = self.next_index, kind
        self.next_index += 1
        start = {"type": "content_block_start", "index": self.block, "content_block": block}
        return [*out, sse("content_block_start", start)]

    def feed(self, chunk: dict[str, Any]) -> bytes:
        facts = self.reader.read(chunk)
        out = self._start()
        if facts.reasoning:
            if self.block < 0 or self.block_kind != "thinking":
                out += self._open({"type": "thinking", "thinking": "", "signature": ""}, "thinking")
            delta = {"type": "thinking_delta", "thinking": facts.reasoning}
            out.append(
                sse(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": self.block, "delta": delta},
                )
            )
        if facts.text:
            if self.block < 0 or self.block_kind != "text":
                out += self._open({"type": "text", "text": ""}, "text")
            delta = {"type": "text_delta", "text": facts.text}
            out.append(
                sse(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": self.block, "delta": delta},
                )
            )
        for index, call, piece in facts.tools:
            if call is not None:
                out += self._open({"type": "tool_use", "id": call.id, "name": call.name, "input": {}}, "tool")
                self.tool_blocks[index] = self.block
            if piece:
                block = self.tool_blocks.get(index, self.block)
                delta = {"type": "input_json_delta", "partial_json": piece}
                out.append(
                    sse(
                        "content_block_delta", {"type": "content_block_delta", "index": block, "delta": delta}
                    )
                )
        if facts.finish_reason is not None:
            self.stop_reason = STOP_REASONS.get(facts.finish_reason, "end_turn")
            out += self._close_block()
        if facts.usage is not None:
            self.usage = facts.usage
        return b"".join(out)

    def finish(self, usage: Buckets | None = None, extra: dict[str, Any] | None = None) -> bytes:
        """The closing events, once the chat stream has ended; ``usage`` overrides what it
        reported and ``extra`` extends the usage object."""
        if self.finished:
            return b""
        self.finished = True
        out = self._start() + self._close_block()
        buckets = usage or self.usage or Buckets()
        delta = {"stop_reason": self.stop_reason or "end_turn", "stop_sequence": None}
        usage_out = {**usage_object(buckets), **(extra or {})}
        out.append(sse("message_delta", {"type": "message_delta", "delta": delta, "usage": usage_out}))
        out.append(sse("message_stop", {"type": "message_stop"}))
        return b"".join(out)


def error_event(error_type: str, message: str) -> bytes:
    """A stream's error event, in Anthropic's shape."""
    return sse("error", {"type": "error", "error": {"type": error_type, "message": message}})
