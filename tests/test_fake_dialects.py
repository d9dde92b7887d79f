"""The fake upstream's Anthropic Messages and OpenAI Responses endpoints, read by the
official SDKs: the shapes must parse and the usage must be exact in each dialect."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from quota_proxy.testing import RunningUpstream, run_fake_upstream

CACHE = {"cache_read_tokens": 1000, "cache_write_tokens": 200, "cache_write_1h_tokens": 50}
TOOL = {
    "name": "read_file",
    "description": "Read a file",
    "input_schema": {"type": "object", "properties": {"input": {"type": "string"}}},
}
FUNCTION = {
    "type": "function",
    "name": "read_file",
    "description": "Read a file",
    "parameters": {"type": "object", "properties": {"input": {"type": "string"}}},
}


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def upstream() -> AsyncIterator[RunningUpstream]:
    async with run_fake_upstream() as running:
        yield running


@pytest.fixture
async def claude(upstream: RunningUpstream) -> AsyncIterator[anthropic.AsyncAnthropic]:
    upstream.app.reset()
    async with anthropic.AsyncAnthropic(base_url=upstream.url, api_key="x", max_retries=0) as sdk:
        yield sdk


@pytest.fixture
async def oai(upstream: RunningUpstream) -> AsyncIterator[openai.AsyncOpenAI]:
    upstream.app.reset()
    async with openai.AsyncOpenAI(base_url=upstream.base_url, api_key="x", max_retries=0) as sdk:
        yield sdk


MESSAGES: Any = [{"role": "user", "content": "say hi now"}]


@pytest.mark.anyio
async def test_messages_create_with_cache_usage(claude: anthropic.AsyncAnthropic) -> None:
    message = await claude.messages.create(
        model="m", max_tokens=100, system="be brief", messages=MESSAGES, extra_body={"fake": CACHE}
    )
    assert message.content[0].type == "text"
    assert message.content[0].text == "hello world this is a fake reply from"
    assert message.stop_reason == "end_turn"
    usage = message.usage
    # input_tokens is the uncached prompt only: 2 system words + 3 words + 3 per message.
    assert (usage.input_tokens, usage.cache_read_input_tokens, usage.cache_creation_input_tokens) == (
        8,
        1000,
        250,
    )
    assert usage.cache_creation is not None
    assert usage.cache_creation.ephemeral_5m_input_tokens == 200
    assert usage.cache_creation.ephemeral_1h_input_tokens == 50
    assert usage.output_tokens == 8


@pytest.mark.anyio
async def test_messages_stream_event_sequence_and_cumulative_usage(claude: anthropic.AsyncAnthropic) -> None:
    kinds: list[str] = []
    async with claude.messages.stream(
        model="m", max_tokens=3, messages=MESSAGES, extra_body={"fake": {"reasoning_tokens": 4}}
    ) as stream:
        async for event in stream:
            kinds.append(event.type)
        final = await stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 1
    assert "message_delta" in kinds
    assert final.stop_reason == "max_tokens"
    assert final.content[0].type == "text" and final.content[0].text == "hello world this"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (6, 3 + 4)


@pytest.mark.anyio
async def test_messages_tool_use_native(claude: anthropic.AsyncAnthropic, upstream: RunningUpstream) -> None:
    fake = {"tool_calls": True, "reply_words": 2}
    message = await claude.messages.create(
        model="m",
        max_tokens=100,
        messages=MESSAGES,
        tools=[TOOL],
        extra_body={"fake": fake},  # type: ignore[list-item]
    )
    assert message.stop_reason == "tool_use"
    block = message.content[0]
    assert block.type == "tool_use" and block.name == "read_file" and block.input == {"input": "hello world"}
    async with claude.messages.stream(
        model="m",
        max_tokens=100,
        messages=MESSAGES,
        tools=[TOOL],
        extra_body={"fake": fake},  # type: ignore[list-item]
    ) as stream:
        final = await stream.get_final_message()
    assert final.content[0].type == "tool_use" and final.content[0].input == {"input": "hello world"}


@pytest.mark.anyio
async def test_count_tokens_and_anthropic_errors(claude: anthropic.AsyncAnthropic) -> None:
    counted = await claude.messages.count_tokens(model="m", system="be brief", messages=MESSAGES)
    assert counted.input_tokens == 8
    with pytest.raises(anthropic.RateLimitError) as caught:
        await claude.messages.create(
            model="m", max_tokens=5, messages=MESSAGES, extra_body={"fake": {"fail": "status:429"}}
        )
    assert caught.value.body == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "Fake failure with status 429."},
    }


@pytest.mark.anyio
async def test_responses_create_with_cache_and_reasoning(oai: openai.AsyncOpenAI) -> None:
    response = await oai.responses.create(
        model="m",
        instructions="be brief",
        input="say hi now",
        extra_body={"fake": {**CACHE, "reasoning_tokens": 5}},
    )
    assert response.output_text == "hello world this is a fake reply from"
    usage = response.usage
    assert usage is not None
    # input_tokens includes cached and written tokens; output_tokens includes reasoning.
    assert usage.input_tokens == 2 + 3 + 3 + 3 + 1250
    assert usage.input_tokens_details.cached_tokens == 1000
    assert usage.output_tokens == 8 + 5 and usage.output_tokens_details.reasoning_tokens == 5


@pytest.mark.anyio
async def test_responses_stream_and_function_call(oai: openai.AsyncOpenAI) -> None:
    kinds: list[str] = []
    text = ""
    async with oai.responses.stream(model="m", input="say hi now", max_output_tokens=2) as stream:
        async for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                text += event.delta
            if event.type == "response.incomplete":
                assert event.response.usage is not None and event.response.usage.output_tokens == 2
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.incomplete"
    assert text == "hello world"
    fake = {"tool_calls": True, "reply_words": 2}
    async with oai.responses.stream(
        model="m",
        input="say hi now",
        tools=[FUNCTION],
        extra_body={"fake": fake},  # type: ignore[list-item]
    ) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_response()
    assert kinds[-1] == "response.completed"
    assert "response.function_call_arguments.delta" in kinds
    call = final.output[0]
    assert (
        call.type == "function_call"
        and call.name == "read_file"
        and call.arguments == '{"input":"hello world"}'
    )
    assert final.usage is not None and final.usage.output_tokens == 2


@pytest.mark.anyio
async def test_chat_reports_cache_and_tool_calls_when_asked(upstream: RunningUpstream) -> None:
    async with httpx.AsyncClient(base_url=upstream.base_url) as http:
        body = {"model": "m", "messages": MESSAGES, "fake": {**CACHE, "reasoning_tokens": 2}}
        usage = (await http.post("/chat/completions", json=body)).json()["usage"]
        assert usage["prompt_tokens"] == 6 + 1250
        assert usage["prompt_tokens_details"] == {"cached_tokens": 1000, "cache_write_tokens": 250}
        assert usage["completion_tokens"] == 10
        body = {
            "model": "m",
            "messages": MESSAGES,
            "tools": [{"type": "function", "function": TOOL}],
            "fake": {"tool_calls": True, "reply_words": 2},
        }
        reply = (await http.post("/chat/completions", json=body)).json()
        assert reply["choices"][0]["finish_reason"] == "tool_calls"
        assert (
            reply["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
            == '{"input":"hello world"}'
        )
