"""Anthropic Messages <-> Chat Completions translation (pure)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from pydantic import TypeAdapter

from quota_proxy.errors import BadRequest
from quota_proxy.protocols import anthropic as tr
from quota_proxy.usage import Buckets

EVENTS: TypeAdapter[RawMessageStreamEvent] = TypeAdapter(RawMessageStreamEvent)


def test_request_system_turns_images_tools_and_results() -> None:
    body: dict[str, Any] = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 100,
        "system": [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"},
                    },
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "s"},
                    {"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "toolu_1", "name": "read", "input": {"path": "a.py"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "content": [{"type": "text", "text": "x = 1"}],
                    },
                    {"type": "text", "text": "and now?"},
                ],
            },
        ],
        "tools": [{"name": "read", "description": "Read", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "stop_sequences": ["END"],
        "temperature": 0.2,
        "top_k": 5,
        "metadata": {"user_id": "u1"},
        "stream": True,
    }
    chat = tr.to_chat_request(body)
    assert chat["messages"] == [
        {"role": "system", "content": "You are terse."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ],
        },
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "read", "arguments": '{"path":"a.py"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "x = 1"},
        {"role": "user", "content": "and now?"},
    ]
    assert chat["tools"] == [
        {
            "type": "function",
            "function": {"name": "read", "parameters": {"type": "object"}, "description": "Read"},
        }
    ]
    assert chat["tool_choice"] == "required" and chat["parallel_tool_calls"] is False
    assert chat["stop"] == ["END"] and chat["max_tokens"] == 100 and chat["user"] == "u1"
    assert chat["stream_options"] == {"include_usage": True}
    assert "top_k" not in chat


@pytest.mark.parametrize(
    "patch",
    [
        {"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
        {"tools": [{"type": "web_search_20250305", "name": "web_search"}]},
        {"mcp_servers": [{"url": "x"}]},
        {
            "messages": [
                {"role": "user", "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}]}
            ]
        },
    ],
)
def test_untranslatable_requests_are_refused(patch: dict[str, Any]) -> None:
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], **patch}
    with pytest.raises(BadRequest, match="cannot be translated"):
        tr.to_chat_request(body)


def test_response_text_tool_use_stop_reason_and_usage() -> None:
    chat = {
        "id": "chatcmpl-1",
        "model": "qwen-coder",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Reading.",
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "read", "arguments": '{"p":1}'}}
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {
            "prompt_tokens": 100,
            "completion_tokens": 7,
            "prompt_tokens_details": {"cached_tokens": 60},
        },
    }
    out = tr.from_chat_response(chat)
    message = Message.model_validate(out)
    assert message.stop_reason == "tool_use"
    assert message.content[0].type == "text" and message.content[0].text == "Reading."
    assert message.content[1].type == "tool_use" and message.content[1].input == {"p": 1}
    # Anthropic's input_tokens excludes the cached ones.
    assert (
        message.usage.input_tokens,
        message.usage.cache_read_input_tokens,
        message.usage.output_tokens,
    ) == (40, 60, 7)
    assert (
        tr.from_chat_response(
            {**chat, "choices": [{"message": {"content": "x"}, "finish_reason": "length"}]}
        )["stop_reason"]
        == "max_tokens"
    )


def chunk(
    delta: dict[str, Any], finish: str | None = None, usage: dict[str, Any] | None = None
) -> dict[str, Any]:
    choices = [] if usage is not None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {"id": "c", "object": "chat.completion.chunk", "model": "qwen", "choices": choices, "usage": usage}


def parse(stream: bytes) -> list[dict[str, Any]]:
    events = []
    for block in stream.split(b"\n\n"):
        if not block:
            continue
        name, data = block.split(b"\n")
        event = orjson.loads(data.removeprefix(b"data: "))
        assert name == b"event: " + event["type"].encode()
        events.append(event)
    return events


def test_stream_text_then_tool_call_in_sdk_types() -> None:
    t = tr.StreamTranslator()
    out = b"".join(
        [
            t.feed(chunk({"role": "assistant", "content": ""})),
            t.feed(chunk({"content": "Let me "})),
            t.feed(chunk({"content": "check."})),
            t.feed(
                chunk(
                    {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "c1",
                                "type": "function",
                                "function": {"name": "read", "arguments": ""},
                            }
                        ]
                    }
                )
            ),
            t.feed(chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"path":'}}]})),
            t.feed(chunk({"tool_calls": [{"index": 0, "function": {"arguments": ' "a.py"}'}}]})),
            t.feed(chunk({}, "tool_calls")),
            t.feed(
                chunk(
                    {},
                    usage={
                        "prompt_tokens": 50,
                        "completion_tokens": 9,
                        "prompt_tokens_details": {"cached_tokens": 20},
                    },
                )
            ),
            t.finish(),
        ]
    )
    events = parse(out)
    kinds = [e["type"] for e in events]
    assert kinds == [
        "message_start",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop",
    ]  # fmt: skip
    typed = [EVENTS.validate_python(e) for e in events]  # every event parses as the SDK's type
    text = "".join(
        e.delta.text for e in typed if e.type == "content_block_delta" and e.delta.type == "text_delta"
    )
    args = "".join(
        e.delta.partial_json
        for e in typed
        if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
    )
    assert text == "Let me check." and orjson.loads(args) == {"path": "a.py"}
    assert [e["index"] for e in events if e["type"] == "content_block_delta"] == [0, 0, 1, 1]
    assert events[5]["content_block"] == {"type": "tool_use", "id": "c1", "name": "read", "input": {}}
    final = events[-2]
    assert final["delta"]["stop_reason"] == "tool_use"
    usage = final["usage"]
    assert (usage["input_tokens"], usage["cache_read_input_tokens"], usage["output_tokens"]) == (30, 20, 9)
    assert t.finish() == b""


def test_stream_usage_override_and_empty_stream() -> None:
    t = tr.StreamTranslator(model="fallback")
    events = parse(t.finish(Buckets(input=3, output=0)))
    assert [e["type"] for e in events] == ["message_start", "message_delta", "message_stop"]
    assert events[0]["message"]["model"] == "fallback"
    assert events[1]["usage"]["input_tokens"] == 3
    assert events[1]["delta"]["stop_reason"] == "end_turn"


def test_tool_result_images_follow_the_tool_messages() -> None:
    shot = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA"}}
    body = {"model": "m", "max_tokens": 5, "messages": [
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "shot:"}, shot]},
        ]},
    ]}  # fmt: skip
    assert tr.to_chat_request(body)["messages"] == [
        {"role": "tool", "tool_call_id": "t1", "content": "shot:"},
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}],
        },
    ]


@pytest.mark.parametrize(("cap", "expected"), [(8192, 8191), (4000, 3999), (1024, None)])
def test_a_lowered_cap_lowers_the_thinking_budget(cap: int, expected: int | None) -> None:
    from quota_proxy.agents.request import _fit_thinking

    body: dict[str, Any] = {"max_tokens": cap, "thinking": {"type": "enabled", "budget_tokens": 31999}}
    _fit_thinking(body, cap)
    assert (body["thinking"]["budget_tokens"] if "thinking" in body else None) == expected
    kept: dict[str, Any] = {"thinking": {"type": "enabled", "budget_tokens": 2000}}
    _fit_thinking(kept, 8192)
    assert kept["thinking"]["budget_tokens"] == 2000


def test_reasoning_content_becomes_a_thinking_block() -> None:
    t = tr.StreamTranslator()
    out = b"".join(
        [
            t.feed(chunk({"reasoning_content": "Let me "})),
            t.feed(chunk({"reasoning_content": "think."})),
            t.feed(chunk({"content": "Done."})),
            t.feed(chunk({}, "stop")),
            t.finish(),
        ]
    )
    events = parse(out)
    typed = [EVENTS.validate_python(e) for e in events]
    starts = [e["content_block"]["type"] for e in events if e["type"] == "content_block_start"]
    assert starts == ["thinking", "text"]
    thinking = "".join(
        e.delta.thinking
        for e in typed
        if e.type == "content_block_delta" and e.delta.type == "thinking_delta"
    )
    assert thinking == "Let me think."
    whole = tr.from_chat_response(
        {"choices": [{"message": {"content": "Done.", "reasoning_content": "Hmm."}, "finish_reason": "stop"}]}
    )
    message = Message.model_validate(whole)
    assert message.content[0].type == "thinking" and message.content[0].thinking == "Hmm."
    assert message.content[1].type == "text"
