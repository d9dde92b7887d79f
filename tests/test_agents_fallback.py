"""The agent endpoints and the chat path try upstreams through one attempt loop on one
UpstreamProxy: an upstream that failed an agent request cools down for chat requests too
(and the other way round), and every failed attempt is counted once in /metrics."""

from __future__ import annotations

import re

import pytest

from quota_proxy.testing import RunningUpstream
from tests.agents_support import MESSAGES, REPLY, claude, extra_config
from tests.conftest import GatewayFactory, GatewayHarness

pytestmark = pytest.mark.anyio


async def down_failures(gw: GatewayHarness, route: str) -> int:
    """Failed attempts at the "down" upstream counted for `route` (0 when none yet)."""
    text = (await gw.http().get("/metrics")).text
    pattern = (
        rf'^quota_upstream_errors_total{{kind="[^"]+",route="{re.escape(route)}",upstream="down"}} (\S+)$'
    )
    return sum(int(float(m.group(1))) for m in re.finditer(pattern, text, re.M))


async def test_agent_and_chat_requests_share_cooldowns(
    make_gateway: GatewayFactory, upstream: RunningUpstream
) -> None:
    routes = extra_config(upstream.base_url) + """
[routes."quota/agent-fallback"]
upstreams = ["down", "claude"]
model = "fake-claude"
[routes."quota/chat-fallback"]
upstreams = ["down", "fake"]
model = "fake-fast"
"""  # fmt: skip
    gw: GatewayHarness = await make_gateway(routes=routes)
    await gw.account("acme", 1_000_000)
    key = await gw.key()

    message = await claude(gw, key).messages.create(
        model="quota/agent-fallback", max_tokens=64, messages=MESSAGES
    )
    assert message.usage.output_tokens == REPLY  # "down" failed, "claude" answered
    assert await down_failures(gw, "quota/agent-fallback") == 1

    # "down" is cooling down now, for the chat path as well: tried last, so not tried at all.
    reply = await gw.openai(key).chat.completions.create(
        model="quota/chat-fallback", messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.choices[0].message.content
    assert await down_failures(gw, "quota/chat-fallback") == 0

    # And for the agent path again.
    await claude(gw, key).messages.create(model="quota/agent-fallback", max_tokens=64, messages=MESSAGES)
    assert await down_failures(gw, "quota/agent-fallback") == 1
    assert [r.path for r in upstream.app.requests].count("/v1/messages") == 2
