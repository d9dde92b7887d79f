"""The reply side of Responses <-> Chat Completions: a Chat completion (whole or streamed)
written as a Responses object or event stream, with usage in the Responses style."""

from __future__ import annotations

import time
from typing import Any

from quota_proxy.protocols.chat import ChatStreamReader, ToolCall, new_id, read_reply, sse
from quota_proxy.usage import Buckets


def usage_object(b: Buckets) -> dict[str, Any]:
    """Buckets in the Responses field style: input includes cached, output includes reasoning."""
    return {
        "input_tokens": b.input_total,
        "input_tokens_details": {
            "cached_tokens": b.cache_read,
            "cache_write_tokens": b.cache_write_5m + b.cache_write_1h,
        },
        "output_tokens": b.output,
        "output_tokens_details": {"reasoning_tokens": b.reasoning},
        "total_tokens": b.total,
    }


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def _reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    """A Chat server's reasoning_content as a reasoning item (its text, no summary)."""
    content = [{"type": "reasoning_text", "text": text}] if status == "completed" else []
    return {"type": "reasoning", "id": item_id, "summary": [], "content": content, "status": status}


def _call_item(item_id: str, call: ToolCall, status: str) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call.id,
        "name": call.name,
        "arguments": call.arguments,
        "status": status,
    }


def _response(
    request: dict[str, Any],
    model: str,
    status: str,
    output: list[dict[str, Any]],
    usage: Buckets | None,
    response_id: str | None = None,
) -> dict[str, Any]:
    """A response object, echoing the request's settings as a Responses server does."""
    tools = request.get("tools") if isinstance(request.get("tools"), list) else []
    return {
        "id": response_id or new_id("resp_"),
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": request.get("instructions"),
        "max_output_tokens": request.get("max_output_tokens"),
        "model": model,
        "output": output,
        "parallel_tool_calls": request.get("parallel_tool_calls", True),
        "previous_response_id": None,
        "store": request.get("store", True),
        "temperature": request.get("temperature"),
        "text": request.get("text") or {"format": {"type": "text"}},
        "tool_choice": request.get("tool_choice", "auto"),
        "tools": tools,
        "top_p": request.get("top_p"),
        "truncation": "disabled",
        "usage": usage_object(usage) if usage is not None else None,
        "metadata": request.get("metadata") or {},
    }


def _status(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def from_chat_response(
    obj: dict[str, Any], request: dict[str, Any], usage: Buckets | None = None
) -> dict[str, Any]:
    """A whole chat completion as a Responses object."""
    reply = read_reply(obj)
    output: list[dict[str, Any]] = []
    if reply.reasoning:
        output.append(_reasoning_item(new_id("rs_"), reply.reasoning, "completed"))
    if reply.text:
        output.append(_message_item(new_id("msg_"), reply.text, "completed"))
    for call in reply.tool_calls:
        output.append(_call_item(new_id("fc_"), call, "completed"))
    return _response(
        request, reply.model, _status(reply.finish_reason), output, usage or reply.usage or Buckets()
    )


class StreamTranslator:
    """Chat chunks in, Responses SSE events out, each with its ``sequence_number``."""

    def __init__(self, request: dict[str, Any], model: str = "") -> None:
        self.request = request
        self.id = new_id("resp_")
        self.reader = ChatStreamReader()
        self.model = model
        self.seq = 0
        self.started = False
        self.finished = False
        self.output: list[tuple[int, dict[str, Any]]] = []  # finished items, by output index
        self.open_text: tuple[int, str, list[str]] | None = None  # output index, item id, pieces
        self.open_reasoning: tuple[int, str, list[str]] | None = None
        self.calls: dict[int, tuple[int, str, ToolCall]] = {}  # chat index -> (output index, id, call)
        self.open_calls: list[int] = []
        self.finish_reason: str | None = None
        self.usage: Buckets | None = None

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return sse(kind, data)

    def _start(self) -> list[bytes]:
        if self.started:
            return []
        self.started = True
        response = _response(self.request, self.reader.model or self.model, "in_progress", [], None, self.id)
        return [
            self._event("response.created", response=response),
            self._event("response.in_progress", response=response),
        ]

    def _next_index(self) -> int:
        opened = (1 if self.open_text else 0) + (1 if self.open_reasoning else 0)
        return len(self.output) + opened + len(self.open_calls)

    def _close_reasoning(self) -> list[bytes]:
        if self.open_reasoning is None:
            return []
        index, item_id, pieces = self.open_reasoning
        self.open_reasoning = None
        text = "".join(pieces)
        item = _reasoning_item(item_id, text, "completed")
        self.output.append((index, item))
        where = {"item_id": item_id, "output_index": index, "content_index": 0}
        return [
            self._event("response.reasoning_text.done", **where, text=text),
            self._event("response.output_item.done", output_index=index, item=item),
        ]

    def _close_text(self) -> list[bytes]:
        if self.open_text is None:
            return []
        index, item_id, pieces = self.open_text
        self.open_text = None
        text = "".join(pieces)
        part = {"type": "output_text", "text": text, "annotations": []}
        item = _message_item(item_id, text, "completed")
        self.output.append((index, item))
        common = {"item_id": item_id, "output_index": index, "content_index": 0}
        return [
            self._event("response.output_text.done", **common, text=text, logprobs=[]),
            self._event("response.content_part.done", **common, part=part),
            self._event("response.output_item.done", output_index=index, item=item),
        ]

    def _close_calls(self) -> list[bytes]:
        out = []
        for chat_index in self.open_calls:
            index, item_id, call = self.calls[chat_index]
            item = _call_item(item_id, call, "completed")
            self.output.append((index, item))
            out.append(
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item_id,
                    output_index=index,
                    arguments=call.arguments,
                )
            )
            out.append(self._event("response.output_item.done", output_index=index, item=item))
        self.open_calls = []
        return out

    def feed(self, chunk: dict[str, Any]) -> bytes:
        facts = self.reader.read(chunk)
        out = self._start()
        if facts.reasoning:
            if self.open_reasoning is None:
                out += self._close_text() + self._close_calls()
                index, item_id = self._next_index(), new_id("rs_")
                self.open_reasoning = (index, item_id, [])
                added = _reasoning_item(item_id, "", "in_progress")
                out.append(self._event("response.output_item.added", output_index=index, item=added))
            index, item_id, pieces = self.open_reasoning
            pieces.append(facts.reasoning)
            out.append(
                self._event(
                    "response.reasoning_text.delta",
                    item_id=item_id,
                    output_index=index,
                    content_index=0,
                    delta=facts.reasoning,
                )
            )
        if facts.text:
            if self.open_text is None:
                out += self._close_reasoning() + self._close_calls()
                index, item_id = self._next_index(), new_id("msg_")
                self.open_text = (index, item_id, [])
                item = _message_item(item_id, "", "in_progress")
                part = {"type": "output_text", "text": "", "annotations": []}
                out.append(self._event("response.output_item.added", output_index=index, item=item))
                out.append(
                    self._event(
                        "response.content_part.added",
                        item_id=item_id,
                        output_index=index,
                        content_index=0,
                        part=part,
                    )
                )
            index, item_id, pieces = self.open_text
            pieces.append(facts.text)
            out.append(
                self._event(
                    "response.output_text.delta",
                    item_id=item_id,
                    output_index=index,
                    content_index=0,
                    delta=facts.text,
                    logprobs=[],
                )
            )
        for chat_index, call, piece in facts.tools:
            if call is not None:
                out += self._close_reasoning() + self._close_text()
                index, item_id = self._next_index(), new_id("fc_")
                self.calls[chat_index] = (index, item_id, call)
                self.open_calls.append(chat_index)
                out.append(
                    self._event(
                        "response.output_item.added",
                        output_index=index,
                        item=_call_item(item_id, call, "in_progress"),
                    )
                )
            if piece and chat_index in self.calls:
                index, item_id, known = self.calls[chat_index]
                known.arguments += piece
                out.append(
                    self._event(
                        "response.function_call_arguments.delta",
                        item_id=item_id,
                        output_index=index,
                        delta=piece,
                    )
                )
        if facts.finish_reason is not None:
            self.finish_reason = facts.finish_reason
        if facts.usage is not None:
            self.usage = facts.usage
        return b"".join(out)

    def finish(self, usage: Buckets | None = None, extra: dict[str, Any] | None = None) -> bytes:
        """The closing events: every open item done, then response.completed or .incomplete;
        ``extra`` extends the usage object."""
        if self.finished:
            return b""
        self.finished = True
        out = self._start() + self._close_reasoning() + self._close_text() + self._close_calls()
        status = _status(self.finish_reason)
        items = [item for _, item in sorted(self.output, key=lambda pair: pair[0])]
        model = self.reader.model or self.model
        response = _response(self.request, model, status, items, usage or self.usage or Buckets(), self.id)
        if extra:
            response["usage"].update(extra)
        out.append(self._event(f"response.{status}", response=response))
        return b"".join(out)

    def failed(self, code: str, message: str) -> bytes:
        """A terminal ``response.failed`` for a stream the upstream broke."""
        if self.finished:
            return b""
        self.finished = True
        out = self._start() + self._close_reasoning() + self._close_text() + self._close_calls()
        items = [item for _, item in sorted(self.output, key=lambda pair: pair[0])]
        response = _response(
            self.request, self.reader.model or self.model, "failed", items, self.usage, self.id
        )
        response["error"] = {"code": code, "message": message}
        out.append(self._event("response.failed", response=response))
        return b"".join(out)
