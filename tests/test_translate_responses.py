"""OpenAI Responses <-> Chat Completions translation (pure)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from quota_proxy.errors import BadRequest
from quota_proxy.protocols import responses as tr

EVENTS: TypeAdapter[ResponseStreamEvent] = TypeAdapter(ResponseStreamEvent)


def test_codex_style_transcript() -> None:
    """Codex sends the whole transcript with store: false: messages, reasoning items, calls, outputs."""
    body: dict[str, Any] = {
        "model": "quota/sonnet",
        "instructions": "You are Codex.",
        "store": False,
        "stream": True,
        "input": [
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "sandbox: on"}]},
            {"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "fix it"},
                {"type": "input_image", "image_url": "data:image/png;base64,AA", "detail": "low"},
            ]},
            {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "opaque"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Looking."}]},
            {"type": "function_call", "call_id": "call_1", "name": "shell", "arguments": '{"cmd":["ls"]}'},
            {"type": "function_call", "call_id": "call_2", "name": "shell", "arguments": '{"cmd":["pwd"]}'},
            {"type": "function_call_output", "call_id": "call_1", "output": "a.py"},
            {"type": "function_call_output", "call_id": "call_2", "output": "/src"},
        ],
        "tools": [{"type": "function", "name": "shell", "description": "Run", "parameters": {"type": "object"},
                   "strict": False}],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "max_output_tokens": 300,
        "reasoning": {"effort": "medium"},
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "abc",
    }  # fmt: skip
    chat = tr.to_chat_request(body)
    assert chat["messages"] == [
        {"role": "system", "content": "You are Codex."},
        {"role": "system", "content": "sandbox: on"},
        {"role": "user", "content": [
            {"type": "text", "text": "fix it"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA", "detail": "low"}},
        ]},
        {"role": "assistant", "content": "Looking.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "shell", "arguments": '{"cmd":["ls"]}'}},
            {"id": "call_2", "type": "function", "function": {"name": "shell", "arguments": '{"cmd":["pwd"]}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "a.py"},
        {"role": "tool", "tool_call_id": "call_2", "content": "/src"},
    ]  # fmt: skip
    assert chat["tools"] == [
        {"type": "function", "function": {"name": "shell", "parameters": {"type": "object"}, "description": "Run",
                                          "strict": False}}
    ]  # fmt: skip
    assert (
        chat["max_tokens"] == 300 and chat["parallel_tool_calls"] is False and chat["tool_choice"] == "auto"
    )
    assert chat["stream_options"] == {"include_usage": True}
    for dropped in ("store", "reasoning", "include", "prompt_cache_key"):
        assert dropped not in chat


def test_text_format_becomes_response_format() -> None:
    fmt = {"type": "json_schema", "name": "x", "schema": {"type": "object"}, "strict": True}
    chat = tr.to_chat_request({"model": "m", "input": "hi", "text": {"format": fmt}})
    assert chat["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "x", "schema": {"type": "object"}, "strict": True},
    }
    assert chat["messages"] == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("patch", "named"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"background": True}, "background"),
        ({"tools": [{"type": "web_search"}]}, "web_search"),
        ({"tools": [{"type": "custom", "name": "apply_patch"}]}, "custom"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "item_reference"),
        ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input_file"),
        ({"input": [{"type": "local_shell_call", "call_id": "c"}]}, "local_shell_call"),
    ],
)
def test_untranslatable_requests_are_refused_by_name(patch: dict[str, Any], named: str) -> None:
    body = {"model": "m", "input": "hi", **patch}
    with pytest.raises(BadRequest, match="cannot be translated") as caught:
        tr.to_chat_request(body)
    assert named in caught.value.message


def test_response_object_parses_in_the_sdk() -> None:
    chat = {
        "model": "qwen",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": "On it.",
            "tool_calls": [{"id": "call_9", "type": "function", "function": {"name": "shell", "arguments": "{}"}}],
        }}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 12, "prompt_tokens_details": {"cached_tokens": 64},
                  "completion_tokens_details": {"reasoning_tokens": 5}},
    }  # fmt: skip
    out = Response.model_validate(tr.from_chat_response(chat, {"model": "quota/sonnet", "store": False}))
    assert out.status == "completed" and out.output_text == "On it."
    call = out.output[1]
    assert call.type == "function_call" and call.call_id == "call_9" and call.name == "shell"
    assert out.usage is not None
    # Responses' input_tokens includes cached tokens, output_tokens includes reasoning.
    assert (out.usage.input_tokens, out.usage.input_tokens_details.cached_tokens) == (100, 64)
    assert (out.usage.output_tokens, out.usage.output_tokens_details.reasoning_tokens) == (12, 5)
    assert out.store is False
    cut = {**chat, "choices": [{"message": {"content": "x"}, "finish_reason": "length"}]}
    incomplete = tr.from_chat_response(cut, {})
    assert incomplete["status"] == "incomplete"
    assert incomplete["incomplete_details"] == {"reason": "max_output_tokens"}


def chunk(
    delta: dict[str, Any], finish: str | None = None, usage: dict[str, Any] | None = None
) -> dict[str, Any]:
    choices = [] if usage is not None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {"id": "c", "object": "chat.completion.chunk", "model": "qwen", "choices": choices, "usage": usage}


def parse(stream: bytes) -> list[dict[str, Any]]:
    events = []
    for block in stream.split(b"\n\n"):
        if block:
            name, data = block.split(b"\n")
            event = orjson.loads(data.removeprefix(b"data: "))
            assert name == b"event: " + event["type"].encode()
            events.append(event)
    return events


def test_stream_text_and_function_call() -> None:
    t = tr.StreamTranslator({"model": "quota/sonnet"})
    out = b"".join(
        [
            t.feed(chunk({"role": "assistant", "content": ""})),
            t.feed(chunk({"content": "Hi "})),
            t.feed(chunk({"content": "there."})),
            t.feed(chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                          "function": {"name": "shell", "arguments": '{"cmd"'}}]})),
            t.feed(chunk({"tool_calls": [{"index": 0, "function": {"arguments": ': "ls"}'}}]})),
            t.feed(chunk({}, "tool_calls")),
            t.feed(chunk({}, usage={"prompt_tokens": 30, "completion_tokens": 8})),
            t.finish(),
        ]
    )  # fmt: skip
    events = parse(out)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    kinds = [e["type"] for e in events]
    assert kinds == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed",
    ]  # fmt: skip
    for event in events:
        EVENTS.validate_python(event)
    done = Response.model_validate(events[-1]["response"])
    assert done.output_text == "Hi there."
    assert done.output[1].type == "function_call" and done.output[1].arguments == '{"cmd": "ls"}'
    assert done.usage is not None and (done.usage.input_tokens, done.usage.output_tokens) == (30, 8)
    assert events[0]["response"]["id"] == done.id
    assert b"[DONE]" not in out


def test_stream_cut_by_length_is_incomplete_and_failed_is_terminal() -> None:
    t = tr.StreamTranslator({})
    out = t.feed(chunk({"content": "a"})) + t.feed(chunk({}, "length")) + t.finish()
    assert parse(out)[-1]["type"] == "response.incomplete"
    broken = tr.StreamTranslator({})
    events = parse(broken.feed(chunk({"content": "a"})) + broken.failed("upstream_error", "gone"))
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["error"] == {"code": "upstream_error", "message": "gone"}
    assert broken.finish() == b""


def test_reasoning_content_becomes_a_reasoning_item() -> None:
    t = tr.StreamTranslator({})
    out = b"".join(
        [
            t.feed(chunk({"reasoning": "Think "})),
            t.feed(chunk({"reasoning": "hard."})),
            t.feed(chunk({"content": "Answer."})),
            t.feed(chunk({}, "stop")),
            t.feed(chunk({}, usage={"prompt_tokens": 5, "completion_tokens": 9,
                                    "completion_tokens_details": {"reasoning_tokens": 4}})),
            t.finish(),
        ]
    )  # fmt: skip
    events = parse(out)
    for event in events:
        EVENTS.validate_python(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    done = Response.model_validate(events[-1]["response"])
    reasoning, message = done.output
    assert reasoning.type == "reasoning" and reasoning.content is not None
    assert reasoning.content[0].text == "Think hard."
    assert message.type == "message" and done.output_text == "Answer."
    assert [e["output_index"] for e in events if e["type"] == "response.output_item.added"] == [0, 1]
    assert done.usage is not None and done.usage.output_tokens_details.reasoning_tokens == 4
    whole = tr.from_chat_response(
        {"choices": [{"message": {"content": "A.", "reasoning_content": "R."}, "finish_reason": "stop"}]}, {}
    )
    assert [item["type"] for item in whole["output"]] == ["reasoning", "message"]
