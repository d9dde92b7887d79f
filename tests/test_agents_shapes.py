"""The requests the agents themselves send, as they send them: a Claude Code turn (system
blocks with cache_control, thinking, beta headers, ?beta=true, its session header) and a
Codex turn (instructions, a developer message, reasoning items, function tools,
store: false, its session_id header) — natively and translated, streamed, metered."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest

from quota_proxy.testing import RunningUpstream
from tests.agents_support import extra_config, request_row
from tests.conftest import GatewayFactory, GatewayHarness

pytestmark = pytest.mark.anyio

CLAUDE_CODE_HEADERS = {
    "anthropic-version": "2023-06-01",
    "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,fine-grained-tool-streaming-2025-05-14",
    "x-app": "cli",
    "user-agent": "claude-cli/2.0.0 (external, cli)",
    "x-claude-code-session-id": "cc-session-7",
}


def claude_code_body(model: str) -> dict[str, Any]:
    return {
        "model": model,
        "max_tokens": 32000,
        "stream": True,
        "temperature": 1,
        "metadata": {"user_id": "user_abc_account_def_session_cc-session-7"},
        "thinking": {"type": "enabled", "budget_tokens": 31999},
        "system": [
            {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude."},
            {"type": "text", "text": "Work in the repository.", "cache_control": {"type": "ephemeral"}},
        ],
        "tools": [
            {"name": "Read", "description": "Read a file", "input_schema": {
                "type": "object", "properties": {"file_path": {"type": "string"}}, "required": ["file_path"],
                "additionalProperties": False, "$schema": "http://json-schema.org/draft-07/schema#"}},
            {"name": "Bash", "description": "Run a command", "input_schema": {
                "type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}},
        ],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "<system-reminder>context</system-reminder>"},
                {"type": "text", "text": "fix the failing test", "cache_control": {"type": "ephemeral"}},
            ]},
        ],
    }  # fmt: skip


def codex_body(model: str) -> dict[str, Any]:
    return {
        "model": model,
        "instructions": "You are Codex, a coding agent.",
        "input": [
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "sandbox on"}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "<environment_context/>"}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "list the files"}]},
            {"type": "reasoning", "id": "rs_1", "summary": [], "content": None, "encrypted_content": "gAAAA"},
            {"type": "function_call", "name": "shell", "arguments": "{\"command\":[\"ls\"]}", "call_id": "call_1"},
            {"type": "function_call_output", "call_id": "call_1", "output": "README.md\nsrc"},
        ],
        "tools": [{"type": "function", "name": "shell", "description": "Runs a shell command", "strict": False,
                   "parameters": {"type": "object", "properties": {"command": {"type": "array",
                                  "items": {"type": "string"}}}, "required": ["command"]}}],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "reasoning": {"effort": "medium", "summary": "auto"},
        "store": False,
        "stream": True,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "0199-codex-conversation",
    }  # fmt: skip


def events(raw: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in raw.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "data" in lines:
            out.append((lines.get("event", ""), orjson.loads(lines["data"])))
    return out


@pytest.fixture
async def gw(make_gateway: GatewayFactory, upstream: RunningUpstream) -> GatewayHarness:
    harness: GatewayHarness = await make_gateway(routes=extra_config(upstream.base_url))
    await harness.account("acme", 1_000_000)
    return harness


# native (x-api-key upstream), native (an upstream serving all three APIs), translated
@pytest.mark.parametrize("model", ["claude-sonnet-4-5-20250929", "quota/vllm", "quota/sonnet"])
async def test_a_claude_code_turn(gw: GatewayHarness, model: str) -> None:
    key = await gw.key()
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        reply = await http.post(
            "/v1/messages?beta=true", json=claude_code_body(model),
            headers={**CLAUDE_CODE_HEADERS, "authorization": f"Bearer {key}"},
        )  # fmt: skip
    assert reply.status_code == 200, reply.text
    stream = events(reply.text)
    assert stream[0][0] == "message_start" and stream[-1][0] == "message_stop"
    final = stream[-2][1]
    assert final["type"] == "message_delta" and final["usage"]["charged_quota_tokens"] > 0
    sent = gw.upstream.app.requests[-1]
    if model != "quota/sonnet":
        assert sent.path == "/v1/messages" and sent.query == "beta=true"
        assert sent.headers["anthropic-beta"] == CLAUDE_CODE_HEADERS["anthropic-beta"]
        # quota/claude caps output at 64: max_tokens and the thinking budget come down with it,
        # which here leaves no room for thinking at all.
        assert sent.body["max_tokens"] == 64 and "thinking" not in sent.body
        assert sent.body["system"] == claude_code_body(model)["system"]
    else:
        assert sent.path == "/v1/chat/completions"
        assert sent.body["messages"][0]["content"].startswith("You are Claude Code")
        assert [t["function"]["name"] for t in sent.body["tools"]] == ["Read", "Bash"]
    row = await request_row(gw, reply.headers["x-quota-request-id"])
    assert row["session_id"] == "cc-session-7" and row["charged"] == final["usage"]["charged_quota_tokens"]


@pytest.mark.parametrize("model", ["quota/codex", "quota/vllm", "quota/sonnet"])  # native, native, translated
async def test_a_codex_turn(gw: GatewayHarness, model: str) -> None:
    key = await gw.key()
    headers = {"authorization": f"Bearer {key}", "session_id": "codex-9", "originator": "codex_cli_rs"}
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        reply = await http.post("/v1/responses", json=codex_body(model), headers=headers)
    assert reply.status_code == 200, reply.text
    stream = events(reply.text)
    assert stream[0][0] == "response.created" and stream[-1][0] == "response.completed"
    assert "[DONE]" not in reply.text
    usage = stream[-1][1]["response"]["usage"]
    assert usage["charged_quota_tokens"] == 3 * (usage["input_tokens"] + usage["output_tokens"])
    sent = gw.upstream.app.requests[-1]
    if model != "quota/sonnet":
        assert sent.body["store"] is False and sent.body["input"] == codex_body(model)["input"]
    else:
        roles = [m["role"] for m in sent.body["messages"]]
        assert roles == ["system", "system", "user", "user", "assistant", "tool"]
    row = await request_row(gw, reply.headers["x-quota-request-id"])
    assert row["session_id"] == "codex-9"
