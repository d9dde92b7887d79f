"""Shared setup for the agent-API tests: upstreams that speak each protocol (all served by
the one fake), routes on them, and the fake's exact counts per dialect."""

from __future__ import annotations

import sqlite3
from fractions import Fraction
from math import ceil
from typing import Any

import anthropic
import openai

from tests.conftest import GatewayHarness

SYSTEM = "be brief"
PROMPT = "say hi now"
MESSAGES: Any = [{"role": "user", "content": PROMPT}]
# The fake counts words + 3 per message: Anthropic keeps the system prompt outside the
# messages; Chat (and the Responses instructions) make it one more message.
MESSAGES_PROMPT = 2 + 3 + 3  # "be brief" + "say hi now" + 3
CHAT_PROMPT = (2 + 3) + (3 + 3)
RESPONSES_PROMPT = (2 + 3) + (3 + 3)
REPLY = 8  # the fake's default reply: eight words

CACHE = {
    "cache_read_tokens": 1000,
    "cache_write_tokens": 200,
    "cache_write_1h_tokens": 50,
    "reasoning_tokens": 5,
}
WEIGHTS = {"cache_read": Fraction(1, 10), "cache_write_5m": Fraction(5, 4), "cache_write_1h": Fraction(2)}

TOOL: Any = {
    "name": "read_file",
    "description": "Read a file",
    "input_schema": {"type": "object", "properties": {"input": {"type": "string"}}},
}
FUNCTION: Any = {
    "type": "function",
    "name": "read_file",
    "description": "Read a file",
    "parameters": {"type": "object", "properties": {"input": {"type": "string"}}},
}


def extra_config(base_url: str) -> str:
    """Upstreams of each kind (one fake serves them all) and routes on them."""
    weights = "\n".join(f"{k} = {float(v)}" for k, v in WEIGHTS.items())
    return f"""
[upstreams.claude]
base_url = "{base_url}"
api = "anthropic"
timeout_s = 5
[upstreams.responses]
base_url = "{base_url}"
responses = true
timeout_s = 5
[upstreams.all-three]
base_url = "{base_url}"
responses = true
messages = true
timeout_s = 5
[routes."quota/vllm"]
upstream = "all-three"
model = "fake-vllm"
multiplier = 3
max_output_tokens = 64
[routes."quota/claude"]
upstream = "claude"
model = "fake-claude"
multiplier = 3
max_output_tokens = 64
match = ["claude-sonnet-*", "claude-haiku-4-5"]
[routes."quota/codex"]
upstream = "responses"
model = "fake-codex"
multiplier = 3
max_output_tokens = 64
[routes."quota/cached-chat"]
upstream = "fake"
model = "fake-cached"
multiplier = 2
max_output_tokens = 64
[routes."quota/cached-chat".weights]
{weights}
[routes."quota/cached-claude"]
upstream = "claude"
model = "fake-cached"
multiplier = 2
max_output_tokens = 64
[routes."quota/cached-claude".weights]
{weights}
[routes."quota/cached-responses"]
upstream = "responses"
model = "fake-cached"
multiplier = 2
max_output_tokens = 64
[routes."quota/cached-responses".weights]
{weights}
"""


def claude(gateway: GatewayHarness, key: str) -> anthropic.AsyncAnthropic:
    client = anthropic.AsyncAnthropic(base_url=gateway.url, api_key=key, max_retries=0, timeout=30)
    gateway._clients.append(client)
    return client


def codex(gateway: GatewayHarness, key: str) -> openai.AsyncOpenAI:
    return gateway.openai(key)


def weighted(
    multiplier: int, uncached: int, cache_read: int, write_5m: int, write_1h: int, output: int
) -> int:
    w = WEIGHTS
    total = uncached + w["cache_read"] * cache_read + w["cache_write_5m"] * write_5m
    return ceil(multiplier * (total + w["cache_write_1h"] * write_1h + output))


async def rows(gateway: GatewayHarness, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    """Rows read from the SQLite file directly, once the gateway's settlements have committed."""
    await gateway.settled()
    con = sqlite3.connect(f"file:{gateway.settings.store.path}?mode=ro", uri=True)
    try:
        con.row_factory = sqlite3.Row
        return [dict(r) for r in con.execute(sql, params).fetchall()]
    finally:
        con.close()


async def request_row(gateway: GatewayHarness, request_id: str) -> dict[str, Any]:
    found = await rows(gateway, "SELECT * FROM requests WHERE request_id = ?", (request_id,))
    assert len(found) == 1, found
    return found[0]
