from __future__ import annotations

import pytest

from tests.conftest import GatewayHarness

pytestmark = pytest.mark.anyio


async def test_chat_completion_is_charged(gateway: GatewayHarness) -> None:
    await gateway.account("acme", 1_000_000)
    key = await gateway.key("acme")
    client = gateway.openai(key)
    reply = await client.chat.completions.create(
        model="quota/sonnet", messages=[{"role": "user", "content": "hello there"}]
    )
    usage = reply.usage.model_dump()
    assert usage["route_multiplier"] == "x3"
    assert usage["charged_quota_tokens"] == 3 * (usage["prompt_tokens"] + usage["completion_tokens"])
    assert await gateway.balance("acme") == 1_000_000 - usage["charged_quota_tokens"]
    await gateway.verify()
