"""POST /v1/chat/completions metered by bucket: cached tokens are inside prompt_tokens, so a
cache-heavy turn on a route with cache weights costs less than its prompt_tokens — exactly."""

from __future__ import annotations

import pytest

from quota_proxy.testing import RunningUpstream
from tests.agents_support import (
    CACHE,
    CHAT_PROMPT,
    MESSAGES,
    REPLY,
    SYSTEM,
    extra_config,
    request_row,
    weighted,
)
from tests.conftest import GatewayFactory, GatewayHarness

pytestmark = pytest.mark.anyio
FUNDS = 1_000_000


async def test_cache_heavy_chat_turn_is_billed_by_bucket(
    make_gateway: GatewayFactory, upstream: RunningUpstream
) -> None:
    gw: GatewayHarness = await make_gateway(routes=extra_config(upstream.base_url))
    await gw.account("acme", FUNDS)
    client = gw.openai(await gw.key())
    messages = [{"role": "system", "content": SYSTEM}, *MESSAGES]
    expected = weighted(2, CHAT_PROMPT, 1000, 250, 0, REPLY + 5)
    raw = await client.chat.completions.with_raw_response.create(
        model="quota/cached-chat", messages=messages, extra_body={"fake": CACHE}
    )
    reply = raw.parse()
    assert reply.usage is not None and reply.usage.prompt_tokens == CHAT_PROMPT + 1250
    extra = reply.usage.model_extra or {}
    assert extra["charged_quota_tokens"] == expected
    assert (extra["input_tokens"], extra["cache_read_tokens"], extra["cache_write_tokens"]) == (
        CHAT_PROMPT,
        1000,
        250,
    )
    row = await request_row(gw, raw.headers["x-quota-request-id"])
    assert (row["input_tokens"], row["cache_read_tokens"], row["cache_write_tokens"]) == (
        CHAT_PROMPT,
        1000,
        250,
    )
    assert (row["output_tokens"], row["reasoning_tokens"], row["charged"]) == (REPLY + 5, 5, expected)

    stream = await client.chat.completions.create(
        model="quota/cached-chat", messages=messages, stream=True, stream_options={"include_usage": True},
        extra_body={"fake": CACHE},
    )  # fmt: skip
    chunks = [chunk async for chunk in stream]
    usage = chunks[-1].usage
    assert usage is not None and (usage.model_extra or {})["charged_quota_tokens"] == expected
    assert FUNDS - await gw.balance("acme") == 2 * expected
    # On a route without weights the seed's rule holds: every bucket weighs 1.
    plain = await client.chat.completions.create(
        model="quota/sonnet", messages=messages, extra_body={"fake": CACHE}
    )
    assert plain.usage is not None
    assert (plain.usage.model_extra or {})["charged_quota_tokens"] == 3 * (CHAT_PROMPT + 1250 + REPLY + 5)
    await gw.verify()
