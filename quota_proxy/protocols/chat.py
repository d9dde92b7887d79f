"""Reading a Chat Completions reply (whole or streamed) as a few plain facts, so each
target protocol only says how to write them."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

import orjson

from quota_proxy.usage import Buckets, from_chat


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def sse(name: str | None, data: dict[str, Any]) -> bytes:
    """One server-sent event; named events are how Anthropic and Responses streams look."""
    head = b"event: " + name.encode() + b"\n" if name else b""
    return head + b"data: " + orjson.dumps(data) + b"\n\n"


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str = ""


@dataclass(slots=True)
class ChatReply:
    """A whole chat completion's first choice, reduced to what the agent APIs carry."""

    model: str
    text: str
    tool_calls: list[ToolCall]
    finish_reason: str | None
    usage: Buckets | None
    reasoning: str = ""  # a reasoning server's reasoning_content (vLLM, SGLang, DeepSeek)


REASONING_FIELDS = ("reasoning_content", "reasoning")


def field_of(obj: Any, name: str) -> dict[str, Any]:
    """obj[name] when both are JSON objects, else an empty one."""
    value = obj.get(name) if isinstance(obj, dict) else None
    return value if isinstance(value, dict) else {}


def list_of(obj: Any, name: str) -> list[Any]:
    """obj[name] when it is a JSON array, else an empty one."""
    value = obj.get(name) if isinstance(obj, dict) else None
    return value if isinstance(value, list) else []


def str_of(obj: dict[str, Any], name: str) -> str:
    value = obj.get(name)
    return value if isinstance(value, str) else ""


def read_reply(obj: dict[str, Any]) -> ChatReply:
    choices = obj.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    message = field_of(choice, "message")
    text = str_of(message, "content")
    calls = []
    for raw in list_of(message, "tool_calls"):
        fn = raw.get("function") if isinstance(raw, dict) else None
        if isinstance(fn, dict):
            args = fn.get("arguments")
            calls.append(
                ToolCall(
                    str(raw.get("id") or new_id("call_")),
                    str(fn.get("name") or ""),
                    args if isinstance(args, str) else "",
                )
            )
    finish = choice.get("finish_reason")
    return ChatReply(
        model=str(obj.get("model") or ""),
        text=text,
        tool_calls=calls,
        finish_reason=finish if isinstance(finish, str) else None,
        usage=from_chat(obj.get("usage")),
        reasoning="".join(str_of(message, name) for name in REASONING_FIELDS),
    )


@dataclass(slots=True)
class StreamFacts:
    """What one chat chunk said: text, then tool-call pieces in order, each as
    (chat tool index, the call if this piece starts it, an arguments fragment)."""

    text: str = ""
    reasoning: str = ""
    tools: list[tuple[int, ToolCall | None, str]] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Buckets | None = None


class ChatStreamReader:
    """Turns chat.completion.chunk objects into StreamFacts (first choice only)."""

    __slots__ = ("model", "_known", "delivered")

    def __init__(self) -> None:
        self.model = ""
        self._known: set[int] = set()
        self.delivered: list[str] = []  # text and argument pieces, to estimate a cut stream

    def read(self, chunk: dict[str, Any]) -> StreamFacts:
        facts = StreamFacts()
        if not self.model and isinstance(chunk.get("model"), str):
            self.model = chunk["model"]
        usage = from_chat(chunk.get("usage"))
        if usage is not None:
            facts.usage = usage
        for choice in list_of(chunk, "choices"):
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = field_of(choice, "delta")
            if isinstance(delta.get("content"), str):
                facts.text += delta["content"]
                self.delivered.append(delta["content"])
            for name in REASONING_FIELDS:
                if isinstance(delta.get(name), str):
                    facts.reasoning += delta[name]
                    self.delivered.append(delta[name])
            for raw in list_of(delta, "tool_calls"):
                if not isinstance(raw, dict):
                    continue
                index = raw.get("index", 0)
                index = index if isinstance(index, int) else 0
                fn = field_of(raw, "function")
                call = None
                if index not in self._known:
                    self._known.add(index)
                    call = ToolCall(str(raw.get("id") or new_id("call_")), str(fn.get("name") or ""))
                piece = str_of(fn, "arguments")
                facts.tools.append((index, call, piece))
                self.delivered.append(piece)
            if isinstance(choice.get("finish_reason"), str):
                facts.finish_reason = choice["finish_reason"]
        return facts


def parse_arguments(arguments: str) -> Any:
    """Tool-call arguments as JSON; an unparseable string is kept under "_raw" so nothing is lost."""
    if not arguments.strip():
        return {}
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return {"_raw": arguments}
    return value if isinstance(value, dict) else {"_value": value}


def text_of(content: Any) -> str:
    """The text of a content value that is a string or a list of text-bearing parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""
