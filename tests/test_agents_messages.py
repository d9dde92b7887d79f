"""POST /v1/messages through the gateway with the official anthropic SDK: native (an
upstream that speaks Messages) and translated (a Chat-Completions-only upstream), text and
tools, streamed and not, charges exact per bucket, errors as the SDK's own exceptions."""

from __future__ import annotations

from typing import Any

import anthropic
import anyio
import httpx
import orjson
import pytest

from quota_proxy.testing import RunningUpstream
from tests.agents_support import (
    CACHE,
    CHAT_PROMPT,
    MESSAGES,
    MESSAGES_PROMPT,
    REPLY,
    SYSTEM,
    TOOL,
    claude,
    extra_config,
    request_row,
    weighted,
)
from tests.conftest import GatewayFactory, GatewayHarness

pytestmark = pytest.mark.anyio
FUNDS = 1_000_000


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
    client = claude(gw, await gw.key())
    raw = await client.messages.with_raw_response.create(
        model="quota/claude", max_tokens=100, system=SYSTEM, messages=MESSAGES
    )
    message = await raw.parse()
    assert message.content[0].type == "text" and message.content[0].text.startswith("hello world")
    assert message.usage.input_tokens == MESSAGES_PROMPT and message.usage.output_tokens == REPLY
    native = 3 * (MESSAGES_PROMPT + REPLY)
    assert extension(message.usage) == {"route_multiplier": "x3", "charged_quota_tokens": native}
    assert await spent(gw) == native
    row = await request_row(gw, raw.headers["x-quota-request-id"])
    assert (row["charged"], row["outcome"], row["estimated"]) == (native, "ok", 0)

    # quota/sonnet's upstream speaks Chat Completions only: translated both ways.
    message = await client.messages.create(
        model="quota/sonnet", max_tokens=100, system=SYSTEM, messages=MESSAGES
    )
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "text" and message.content[0].text.startswith("hello world")
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (CHAT_PROMPT, REPLY)
    translated = 3 * (CHAT_PROMPT + REPLY)
    assert extension(message.usage)["charged_quota_tokens"] == translated
    assert await spent(gw) == native + translated
    sent = gw.upstream.app.requests[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.body["messages"][0] == {"role": "system", "content": SYSTEM}
    assert sent.body["model"] == "fake-sonnet" and sent.body["max_tokens"] == 64
    await gw.verify()


async def test_stream_native_and_translated(gw: GatewayHarness) -> None:
    client = claude(gw, await gw.key())
    for model, prompt in (("quota/claude", MESSAGES_PROMPT), ("quota/sonnet", CHAT_PROMPT)):
        before = await spent(gw)
        kinds: list[str] = []
        async with client.messages.stream(
            model=model, max_tokens=5, system=SYSTEM, messages=MESSAGES
        ) as stream:
            async for event in stream:
                kinds.append(event.type)
            final = await stream.get_final_message()
        assert kinds[0] == "message_start" and kinds[-1] == "message_stop", (model, kinds)
        assert "message_delta" in kinds and "content_block_stop" in kinds
        assert final.content[0].type == "text" and final.content[0].text == "hello world this is a"
        assert final.stop_reason == "max_tokens"
        assert (final.usage.input_tokens, final.usage.output_tokens) == (prompt, 5)
        assert await spent(gw) - before == 3 * (prompt + 5), model


async def test_tool_use_native_and_translated(gw: GatewayHarness) -> None:
    gw.upstream.app.options.tool_calls = True
    gw.upstream.app.options.reply_words = 2
    try:
        client = claude(gw, await gw.key())
        for model in ("quota/claude", "quota/sonnet"):
            message = await client.messages.create(
                model=model, max_tokens=50, messages=MESSAGES, tools=[TOOL]
            )
            assert message.stop_reason == "tool_use", model
            block = message.content[0]
            assert (
                block.type == "tool_use"
                and block.name == "read_file"
                and block.input == {"input": "hello world"}
            )
            async with client.messages.stream(
                model=model, max_tokens=50, messages=MESSAGES, tools=[TOOL]
            ) as stream:
                final = await stream.get_final_message()
            assert final.stop_reason == "tool_use"
            assert final.content[0].type == "tool_use" and final.content[0].input == {"input": "hello world"}
            # The tool's answer goes back and the model replies in text.
            follow = [
                *MESSAGES,
                {"role": "assistant", "content": [{"type": "tool_use", "id": block.id, "name": block.name,
                                                   "input": block.input}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block.id, "content": "x = 1"}]},
            ]  # fmt: skip
            answer = await client.messages.create(model=model, max_tokens=50, messages=follow, tools=[TOOL])
            assert answer.content[0].type == "text" and answer.stop_reason == "end_turn"
        translated = gw.upstream.app.requests[-1].body
        assert translated["messages"][-1] == {"role": "tool", "tool_call_id": block.id, "content": "x = 1"}
        assert translated["tools"][0]["function"]["name"] == "read_file"
    finally:
        gw.upstream.app.options.tool_calls = False
        gw.upstream.app.options.reply_words = 8


@pytest.mark.parametrize(
    ("model", "buckets"),
    [
        # Anthropic reports every bucket apart, the 1-hour writes too.
        ("quota/cached-claude", (MESSAGES_PROMPT, 1000, 200, 50, REPLY + 5)),
        # Chat reports cached ⊂ prompt_tokens and one cache_write count (short-lived).
        ("quota/cached-chat", (CHAT_PROMPT, 1000, 250, 0, REPLY + 5)),
    ],
)
async def test_cache_heavy_turn_is_billed_by_bucket(
    gw: GatewayHarness, model: str, buckets: tuple[int, int, int, int, int]
) -> None:
    expected = weighted(2, *buckets)
    options = gw.upstream.app.options
    for name, value in CACHE.items():
        setattr(options, name, value)
    try:
        client = claude(gw, await gw.key())
        raw = await client.messages.with_raw_response.create(
            model=model, max_tokens=50, system=SYSTEM, messages=MESSAGES
        )
        message = await raw.parse()
        assert extension(message.usage)["charged_quota_tokens"] == expected
        row = await request_row(gw, raw.headers["x-quota-request-id"])
        stored = tuple(row[k] for k in ("input_tokens", "cache_read_tokens", "cache_write_tokens",
                                        "cache_write_1h_tokens", "output_tokens"))  # fmt: skip
        assert stored == buckets and row["reasoning_tokens"] == 5 and row["charged"] == expected
        assert message.usage.cache_read_input_tokens == 1000
        async with client.messages.stream(
            model=model, max_tokens=50, system=SYSTEM, messages=MESSAGES
        ) as stream:
            final = await stream.get_final_message()
        assert final.usage.cache_read_input_tokens == 1000
        assert await spent(gw) == 2 * expected
        async with httpx.AsyncClient(base_url=gw.url) as http:
            me = (await http.get("/v1/me", headers={"x-api-key": await gw.key()})).json()["usage"]
        assert (me["cache_read_tokens"], me["reasoning_tokens"], me["charged_quota_tokens"]) == (
            2000,
            10,
            2 * expected,
        )
    finally:
        for name in CACHE:
            setattr(options, name, 0)
    await gw.verify()


async def test_errors_are_the_sdks_exception_classes(gw: GatewayHarness) -> None:
    with pytest.raises(anthropic.AuthenticationError) as auth:
        await claude(gw, "qta_live_" + "x" * 32).messages.create(
            model="quota/claude", max_tokens=5, messages=MESSAGES
        )
    assert auth.value.body["type"] == "error"  # type: ignore[index]
    assert auth.value.body["error"]["code"] == "invalid_api_key"  # type: ignore[index]
    client = claude(gw, await gw.key())
    with pytest.raises(anthropic.NotFoundError) as missing:
        await client.messages.create(model="claude-opus-9", max_tokens=5, messages=MESSAGES)
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    with pytest.raises(anthropic.RateLimitError):
        await client.messages.create(
            model="quota/claude", max_tokens=5, messages=MESSAGES, extra_body={"fake": {"fail": "status:429"}}
        )
    with pytest.raises(anthropic.InternalServerError) as upstream_failed:
        await client.messages.create(
            model="quota/claude", max_tokens=5, messages=MESSAGES, extra_body={"fake": {"fail": "status:500"}}
        )
    assert upstream_failed.value.status_code == 502
    with pytest.raises(anthropic.BadRequestError) as bad:
        await client.messages.create(model="quota/claude", max_tokens=0, messages=MESSAGES)
    assert bad.value.body["error"]["code"] == "bad_request"  # type: ignore[index]
    assert await spent(gw) == 0
    await gw.account("poor", 3)
    with pytest.raises(anthropic.APIStatusError) as poor:
        await claude(gw, await gw.key("poor")).messages.create(
            model="quota/claude", max_tokens=5, messages=MESSAGES
        )
    assert poor.value.status_code == 402
    error = poor.value.body["error"]  # type: ignore[index]
    assert error["type"] == "billing_error" and error["code"] == "insufficient_balance"
    assert error["available_quota_tokens"] == 3 and error["required_quota_tokens"] > 3


async def test_untranslatable_block_is_refused_on_a_translated_route(gw: GatewayHarness) -> None:
    client = claude(gw, await gw.key())
    document: Any = [
        {
            "role": "user",
            "content": [
                {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}
            ],
        }
    ]
    with pytest.raises(anthropic.BadRequestError, match="cannot be translated"):
        await client.messages.create(model="quota/sonnet", max_tokens=5, messages=document)
    assert await spent(gw) == 0
    # A Messages upstream takes it as sent.
    await client.messages.create(model="quota/claude", max_tokens=5, messages=document)
    assert gw.upstream.app.requests[-1].body["messages"] == document


async def test_count_tokens_never_changes_a_balance(gw: GatewayHarness) -> None:
    client = claude(gw, await gw.key())
    native = await client.messages.count_tokens(model="quota/claude", system=SYSTEM, messages=MESSAGES)
    assert native.input_tokens == MESSAGES_PROMPT  # the upstream's own count
    estimated = await client.messages.count_tokens(model="quota/sonnet", system=SYSTEM, messages=MESSAGES)
    assert estimated.input_tokens > 0  # the estimator's
    # An Anthropic-speaking server without the endpoint (404) or failing: the estimator answers.
    for fail in ("status:404", "status:500"):
        fallback = await client.messages.count_tokens(
            model="quota/claude", system=SYSTEM, messages=MESSAGES, extra_body={"fake": {"fail": fail}}
        )
        assert fallback.input_tokens == estimated.input_tokens
    assert await spent(gw) == 0
    assert await request_count(gw) == 0


async def request_count(gw: GatewayHarness) -> int:
    from tests.agents_support import rows

    return int((await rows(gw, "SELECT count(*) AS n FROM requests"))[0]["n"])


async def test_headers_query_aliases_and_models(gw: GatewayHarness) -> None:
    key = await gw.key()
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        reply = await http.post(
            "/v1/messages?beta=true",
            headers={"x-api-key": key, "anthropic-version": "2023-06-01", "anthropic-beta": "interleaved-thinking-2025-05-14",
                     "x-claude-code-session-id": "sess-1"},
            json={"model": "claude-sonnet-4-5-20250929", "max_tokens": 5, "messages": MESSAGES},
        )  # fmt: skip
        assert reply.status_code == 200, reply.text
        sent = gw.upstream.app.requests[-1]
        assert sent.path == "/v1/messages" and sent.query == "beta=true"
        assert sent.headers["anthropic-beta"] == "interleaved-thinking-2025-05-14"
        assert sent.headers["anthropic-version"] == "2023-06-01"
        assert sent.body["model"] == "fake-claude"  # the alias pattern found quota/claude
        assert "authorization" not in sent.headers and "x-api-key" not in sent.headers  # no key configured
        row = await request_row(gw, reply.headers["x-quota-request-id"])
        assert row["session_id"] == "sess-1" and row["route"] == "quota/claude"
        by_session = orjson.loads(gw.cli("usage", "--account", "acme", "--by", "session", "--json").stdout)
        assert [(r["session"], r["requests"]) for r in by_session["rows"]] == [("sess-1", 1)]
        assert by_session["rows"][0]["charged_quota_tokens"] == row["charged"]
        listed = (
            await http.get("/v1/models", headers={"x-api-key": key, "anthropic-version": "2023-06-01"})
        ).json()
        ids = [m["id"] for m in listed["data"]]
        assert "quota/claude" in ids and "claude-haiku-4-5" in ids and "claude-sonnet-*" not in ids
        assert listed["has_more"] is False and listed["data"][0]["type"] == "model"
        openai_shape = (await http.get("/v1/models", headers={"authorization": f"Bearer {key}"})).json()
        assert openai_shape["object"] == "list"
        alias = {m["id"]: m.get("route") for m in openai_shape["data"]}
        assert alias["quota/claude"] is None and alias["claude-haiku-4-5"] == "quota/claude"
        assert "claude-sonnet-*" not in alias
        # Claude Code's reachability probe needs no key.
        assert (await http.head("/api/hello")).status_code == 200
        assert (await http.get("/api/hello")).json() == {"status": "ok"}


async def test_disconnect_mid_stream_stops_the_upstream_and_charges_what_was_sent(gw: GatewayHarness) -> None:
    fake = gw.upstream.app
    fake.options.chunk_delay_s = 0.05
    fake.options.reply_words = 40
    try:
        client = claude(gw, await gw.key())
        for model in ("quota/claude", "quota/sonnet"):
            before = await spent(gw)
            cancelled = fake.stats["streams_cancelled"]
            async with client.messages.stream(model=model, max_tokens=60, messages=MESSAGES) as stream:
                seen = 0
                async for event in stream:
                    if event.type == "content_block_delta":
                        seen += 1
                        if seen == 3:
                            break
            with anyio.fail_after(5):
                while fake.stats["streams_cancelled"] == cancelled or await spent(gw) == before:
                    await anyio.sleep(0.02)
            charged = await spent(gw) - before
            assert 0 < charged < 3 * (MESSAGES_PROMPT + CHAT_PROMPT + 40), (model, charged)
    finally:
        fake.options.chunk_delay_s = 0.0
        fake.options.reply_words = 8
    await gw.verify()


async def test_each_upstream_gets_its_own_auth_style(
    make_gateway: GatewayFactory, upstream: RunningUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QP_TEST_UPSTREAM_KEY", "sekrit")
    keyed = f"""
[upstreams.keyed-claude]
base_url = "{upstream.base_url}"
api = "anthropic"
api_key_env = "QP_TEST_UPSTREAM_KEY"
[upstreams.keyed-chat]
base_url = "{upstream.base_url}"
api_key_env = "QP_TEST_UPSTREAM_KEY"
[routes."quota/keyed-claude"]
upstream = "keyed-claude"
model = "m"
[routes."quota/keyed-chat"]
upstream = "keyed-chat"
model = "m"
[upstreams.bearer-claude]
base_url = "{upstream.base_url}"
api = "anthropic"
auth = "bearer"
api_key_env = "QP_TEST_UPSTREAM_KEY"
[routes."quota/bearer-claude"]
upstream = "bearer-claude"
model = "m"
"""
    gw: GatewayHarness = await make_gateway(routes=keyed)
    await gw.account("acme", FUNDS)
    upstream.app.options.api_key = "sekrit"
    try:
        client = claude(gw, await gw.key())
        await client.messages.create(model="quota/keyed-claude", max_tokens=5, messages=MESSAGES)
        sent = upstream.app.requests[-1].headers
        assert sent["x-api-key"] == "sekrit" and "authorization" not in sent
        assert sent["anthropic-version"]  # the SDK's own, passed through
        await client.messages.create(model="quota/keyed-chat", max_tokens=5, messages=MESSAGES)
        sent = upstream.app.requests[-1].headers
        assert sent["authorization"] == "Bearer sekrit" and "x-api-key" not in sent
        assert "anthropic-version" not in sent
        await client.messages.create(model="quota/bearer-claude", max_tokens=5, messages=MESSAGES)
        sent = upstream.app.requests[-1].headers
        assert sent["authorization"] == "Bearer sekrit" and "x-api-key" not in sent
        assert sent["anthropic-version"]
    finally:
        upstream.app.options.api_key = None


async def test_translated_stream_without_usage_is_estimated_and_closed(gw: GatewayHarness) -> None:
    gw.upstream.app.options.include_usage = False  # an old Chat server: no usage chunk
    try:
        client = claude(gw, await gw.key())
        async with client.messages.stream(model="quota/sonnet", max_tokens=50, messages=MESSAGES) as stream:
            events = [event async for event in stream]
            final = await stream.get_final_message()
        assert [e.type for e in events][-2:] == ["message_delta", "message_stop"]
        assert final.content[0].type == "text" and final.content[0].text.startswith("hello world")
        last = events[-2]
        assert last.type == "message_delta"
        assert extension(last.usage)["estimated"] is True
        charged = extension(last.usage)["charged_quota_tokens"]
        assert charged > 0 and await spent(gw) == charged
    finally:
        gw.upstream.app.options.include_usage = True


async def test_native_stream_broken_mid_way_ends_with_an_error_event(gw: GatewayHarness) -> None:
    key = await gw.key()
    body = {"model": "quota/claude", "max_tokens": 20, "stream": True, "messages": MESSAGES,
            "fake": {"fail": "reset_mid_stream"}}  # fmt: skip
    async with (
        httpx.AsyncClient(base_url=gw.url, timeout=10) as http,
        http.stream("POST", "/v1/messages", json=body, headers={"x-api-key": key}) as reply,
    ):
        assert reply.status_code == 200
        lines = [line async for line in reply.aiter_lines() if line.startswith("event: ")]
    assert lines[0] == "event: message_start" and lines[-1] == "event: error"
    with pytest.raises(anthropic.BadRequestError) as refused:
        await claude(gw, key).messages.create(
            model="quota/opus", max_tokens=5, messages=MESSAGES, stream=True
        )
    assert refused.value.body["error"]["code"] == "stream_not_supported"  # type: ignore[index]


async def test_a_200_that_is_not_an_event_stream_falls_back(
    make_gateway: GatewayFactory, upstream: RunningUpstream
) -> None:
    # An upstream whose every POST is answered 200 with a JSON body (the fake's reset endpoint).
    routes = (
        extra_config(upstream.base_url)
        + f"""
[upstreams.not-a-stream]
base_url = "{upstream.url}/_fake/reset?path="
api = "anthropic"
[routes."quota/falls-back"]
upstreams = ["not-a-stream", "claude"]
model = "fake-claude"
[routes."quota/only-bad"]
upstream = "not-a-stream"
model = "fake-claude"
"""
    )
    gw: GatewayHarness = await make_gateway(routes=routes)
    await gw.account("acme", FUNDS)
    client = claude(gw, await gw.key())
    async with client.messages.stream(model="quota/falls-back", max_tokens=5, messages=MESSAGES) as stream:
        final = await stream.get_final_message()
    assert final.content[0].type == "text" and final.usage.output_tokens == 5
    assert [r.path for r in upstream.app.requests] == ["/v1/messages"]
    charged = await spent(gw)
    assert charged == 1 * (MESSAGES_PROMPT - 2 + 5)  # no system prompt here (its 2 words)
    with pytest.raises(anthropic.InternalServerError) as failed:
        async with client.messages.stream(model="quota/only-bad", max_tokens=5, messages=MESSAGES) as stream:
            await stream.get_final_message()
    assert failed.value.status_code == 502
    assert await spent(gw) == charged
