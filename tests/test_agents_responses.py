"""POST /v1/responses through the gateway with the official openai SDK: native (an upstream
that speaks Responses) and translated (Chat Completions only), text and function calls,
streamed and not, charges exact per bucket, errors as the SDK's own exceptions."""

from __future__ import annotations

from typing import Any

import anyio
import openai
import pytest

from quota_proxy.testing import RunningUpstream
from tests.agents_support import (
    CACHE,
    FUNCTION,
    PROMPT,
    REPLY,
    RESPONSES_PROMPT,
    SYSTEM,
    codex,
    extra_config,
    request_row,
    weighted,
)
from tests.conftest import GatewayFactory, GatewayHarness

pytestmark = pytest.mark.anyio
FUNDS = 1_000_000
CHAT_PROMPT = (2 + 3) + (3 + 3)  # instructions + input as two chat messages


@pytest.fixture
async def gw(make_gateway: GatewayFactory, upstream: RunningUpstream) -> GatewayHarness:
    harness: GatewayHarness = await make_gateway(routes=extra_config(upstream.base_url))
    await harness.account("acme", FUNDS)
    return harness


async def spent(gw: GatewayHarness) -> int:
    return FUNDS - await gw.balance("acme")


def extension(usage: Any) -> dict[str, Any]:
    return dict(usage.model_extra or {})


async def test_create_native_and_translated_charge_exactly(gw: GatewayHarness) -> None:
    client = codex(gw, await gw.key())
    raw = await client.responses.with_raw_response.create(
        model="quota/codex", instructions=SYSTEM, input=PROMPT, store=False
    )
    response = raw.parse()
    assert response.output_text.startswith("hello world") and response.status == "completed"
    assert response.usage is not None and response.usage.input_tokens == RESPONSES_PROMPT
    native = 3 * (RESPONSES_PROMPT + REPLY)
    assert extension(response.usage) == {"route_multiplier": "x3", "charged_quota_tokens": native}
    assert await spent(gw) == native
    sent = gw.upstream.app.requests[-1]
    assert sent.path == "/v1/responses" and sent.body["store"] is False  # never forced to true
    assert sent.body["model"] == "fake-codex" and sent.body["max_output_tokens"] == 64
    assert (await request_row(gw, raw.headers["x-quota-request-id"]))["charged"] == native

    response = await client.responses.create(
        model="quota/sonnet", instructions=SYSTEM, input=PROMPT, store=False
    )
    assert response.output_text.startswith("hello world") and response.object == "response"
    assert response.store is False
    assert response.usage is not None and response.usage.input_tokens == CHAT_PROMPT
    translated = 3 * (CHAT_PROMPT + REPLY)
    assert extension(response.usage)["charged_quota_tokens"] == translated
    assert await spent(gw) == native + translated
    assert gw.upstream.app.requests[-1].path == "/v1/chat/completions"
    await gw.verify()


async def test_stream_native_and_translated(gw: GatewayHarness) -> None:
    client = codex(gw, await gw.key())
    for model, prompt in (("quota/codex", RESPONSES_PROMPT), ("quota/sonnet", CHAT_PROMPT)):
        before = await spent(gw)
        kinds: list[str] = []
        async with client.responses.stream(model=model, instructions=SYSTEM, input=PROMPT) as stream:
            async for event in stream:
                kinds.append(event.type)
            final = await stream.get_final_response()
        assert kinds[0] == "response.created" and kinds[-1] == "response.completed", (model, kinds)
        assert "response.output_text.delta" in kinds
        assert final.output_text == "hello world this is a fake reply from"
        assert final.usage is not None and (final.usage.input_tokens, final.usage.output_tokens) == (
            prompt,
            REPLY,
        )
        assert extension(final.usage)["charged_quota_tokens"] == 3 * (prompt + REPLY)
        assert await spent(gw) - before == 3 * (prompt + REPLY), model


async def test_incomplete_when_capped(gw: GatewayHarness) -> None:
    client = codex(gw, await gw.key())
    for model in ("quota/codex", "quota/sonnet"):
        response = await client.responses.create(model=model, input=PROMPT, max_output_tokens=3)
        assert response.status == "incomplete", model
        assert response.incomplete_details is not None
        assert response.incomplete_details.reason == "max_output_tokens"
        assert response.usage is not None and response.usage.output_tokens == 3


async def test_function_calls_native_and_translated(gw: GatewayHarness) -> None:
    gw.upstream.app.options.tool_calls = True
    gw.upstream.app.options.reply_words = 2
    try:
        client = codex(gw, await gw.key())
        for model in ("quota/codex", "quota/sonnet"):
            response = await client.responses.create(model=model, input=PROMPT, tools=[FUNCTION])
            call = response.output[0]
            assert call.type == "function_call" and call.name == "read_file", model
            assert call.arguments == '{"input":"hello world"}'
            async with client.responses.stream(model=model, input=PROMPT, tools=[FUNCTION]) as stream:
                kinds = [event.type async for event in stream]
                final = await stream.get_final_response()
            assert "response.function_call_arguments.delta" in kinds
            assert (
                final.output[0].type == "function_call"
                and final.output[0].arguments == '{"input":"hello world"}'
            )
            # Codex's style: the whole transcript again, with the call and its output.
            transcript: Any = [
                {"role": "user", "content": [{"type": "input_text", "text": PROMPT}]},
                {
                    "type": "function_call",
                    "call_id": call.call_id,
                    "name": call.name,
                    "arguments": call.arguments,
                },
                {"type": "function_call_output", "call_id": call.call_id, "output": "x = 1"},
            ]
            answer = await client.responses.create(
                model=model, input=transcript, tools=[FUNCTION], store=False
            )
            assert answer.output[0].type == "message"
        chat = gw.upstream.app.requests[-1].body
        assert chat["messages"][-1] == {"role": "tool", "tool_call_id": call.call_id, "content": "x = 1"}
        assert chat["messages"][-2]["tool_calls"][0]["id"] == call.call_id
    finally:
        gw.upstream.app.options.tool_calls = False
        gw.upstream.app.options.reply_words = 8


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        # Responses: cached ⊂ input_tokens, writes split 30m/12h, reasoning ⊂ output_tokens.
        ("quota/cached-responses", weighted(2, RESPONSES_PROMPT, 1000, 200, 50, REPLY + 5)),
        # Chat: cached ⊂ prompt_tokens, one cache_write count (short-lived).
        ("quota/cached-chat", weighted(2, CHAT_PROMPT, 1000, 250, 0, REPLY + 5)),
    ],
)
async def test_cache_heavy_turn_is_billed_by_bucket(gw: GatewayHarness, model: str, expected: int) -> None:
    options = gw.upstream.app.options
    for name, value in CACHE.items():
        setattr(options, name, value)
    try:
        client = codex(gw, await gw.key())
        raw = await client.responses.with_raw_response.create(model=model, instructions=SYSTEM, input=PROMPT)
        response = raw.parse()
        assert response.usage is not None
        assert extension(response.usage)["charged_quota_tokens"] == expected
        row = await request_row(gw, raw.headers["x-quota-request-id"])
        assert (row["cache_read_tokens"], row["reasoning_tokens"], row["charged"]) == (1000, 5, expected)
        assert response.usage.input_tokens_details.cached_tokens == 1000
        assert response.usage.output_tokens_details.reasoning_tokens == 5
        async with client.responses.stream(model=model, instructions=SYSTEM, input=PROMPT) as stream:
            final = await stream.get_final_response()
        assert final.usage is not None and extension(final.usage)["charged_quota_tokens"] == expected
        assert await spent(gw) == 2 * expected
    finally:
        for name in CACHE:
            setattr(options, name, 0)
    await gw.verify()


async def test_stateful_requests_are_refused_on_a_translated_route(gw: GatewayHarness) -> None:
    client = codex(gw, await gw.key())
    with pytest.raises(openai.BadRequestError) as refused:
        await client.responses.create(model="quota/sonnet", input=PROMPT, previous_response_id="resp_123")
    assert "previous_response_id" in str(refused.value) and "cannot be translated" in str(refused.value)
    assert await spent(gw) == 0
    # A Responses upstream keeps its own state: the field goes through as sent.
    await client.responses.create(model="quota/codex", input=PROMPT, previous_response_id="resp_123")
    assert gw.upstream.app.requests[-1].body["previous_response_id"] == "resp_123"


async def test_errors_are_the_sdks_exception_classes(gw: GatewayHarness) -> None:
    with pytest.raises(openai.AuthenticationError):
        await codex(gw, "qta_live_" + "x" * 32).responses.create(model="quota/codex", input=PROMPT)
    client = codex(gw, await gw.key())
    with pytest.raises(openai.NotFoundError):
        await client.responses.create(model="gpt-9", input=PROMPT)
    with pytest.raises(openai.RateLimitError):
        await client.responses.create(
            model="quota/codex", input=PROMPT, extra_body={"fake": {"fail": "status:429"}}
        )
    with pytest.raises(openai.InternalServerError) as failed:
        await client.responses.create(
            model="quota/codex", input=PROMPT, extra_body={"fake": {"fail": "status:503"}}
        )
    assert failed.value.status_code == 502
    await gw.account("poor", 3)
    with pytest.raises(openai.APIStatusError) as poor:
        await codex(gw, await gw.key("poor")).responses.create(model="quota/codex", input=PROMPT)
    assert poor.value.status_code == 402
    assert poor.value.body["available_quota_tokens"] == 3  # type: ignore[index]
    assert await spent(gw) == 0


async def test_disconnect_mid_stream_stops_the_upstream_and_charges_what_was_sent(gw: GatewayHarness) -> None:
    fake = gw.upstream.app
    fake.options.chunk_delay_s = 0.05
    fake.options.reply_words = 40
    try:
        client = codex(gw, await gw.key())
        for model in ("quota/codex", "quota/sonnet"):
            before = await spent(gw)
            cancelled = fake.stats["streams_cancelled"]
            async with client.responses.stream(model=model, input=PROMPT) as stream:
                seen = 0
                async for event in stream:
                    if event.type == "response.output_text.delta":
                        seen += 1
                        if seen == 3:
                            break
            with anyio.fail_after(5):
                while fake.stats["streams_cancelled"] == cancelled or await spent(gw) == before:
                    await anyio.sleep(0.02)
            charged = await spent(gw) - before
            assert 0 < charged < 3 * (CHAT_PROMPT + 40), (model, charged)
    finally:
        fake.options.chunk_delay_s = 0.0
        fake.options.reply_words = 8
    await gw.verify()
