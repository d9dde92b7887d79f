"""Seeded fuzz of every chat field with odd values, on every route kind, through both
inference endpoints: the gateway answers 200 or a 4xx in the SPEC's shape, never a 5xx,
and the ledger stays exact."""

from __future__ import annotations

import os
import random

import pytest

from tests.conftest import GatewayHarness

pytestmark = pytest.mark.anyio

# Literal JSON texts, so that numbers Python cannot hold (1e400) reach the gateway as sent.
ODD_VALUES = [
    "null", "true", "false", "0", "-0", "1", "-1", "9223372036854775808", "-9223372036854775809", "1e400",
    "-1e400", "1.5", "-0.0", "4.9e-324", "1e308", "1E+2", "0.0000000000000000000001", "1" + "0" * 400,
    '"1e400"', '""', '"x"', '"\\u0000"', '"\\ud800"', "[]", "[null]", '[1, "a"]', "{}",
    '{"include_usage": "yes"}', '{"include_usage": true}', '{"include_usage": 1e400}', '{"a": {"b": []}}',
    "128", "129", "1e-7", '[{"type": "function"}]', '[{"type": "function", "function": {"name": 1}}]',
]
FIELDS = [
    "temperature", "top_p", "tools", "tool_choice", "stop", "stream_options", "user", "max_completion_tokens",
    "max_tokens", "n", "best_of", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
    "top_logprobs", "seed", "response_format", "stream", "parallel_tool_calls", "metadata", "store",
]
ROUTES = ["quota/fast", "quota/opus", "quota/half", "quota/community", "quota/down"]


def _value(rng: random.Random, depth: int = 0) -> str:
    """A JSON text: one of the odd literals, or a small random array or object of them."""
    roll = rng.random()
    if depth < 2 and roll < 0.15:
        return "[" + ", ".join(_value(rng, depth + 1) for _ in range(rng.randint(0, 3))) + "]"
    if depth < 2 and roll < 0.3:
        names = ["type", "function", "name", "include_usage", "content", "role", "arguments", "x"]
        items = (f'"{rng.choice(names)}": {_value(rng, depth + 1)}' for _ in range(rng.randint(0, 3)))
        return "{" + ", ".join(items) + "}"
    return rng.choice(ODD_VALUES)


def _message(rng: random.Random) -> str:
    if rng.random() < 0.7:
        return '{"role": "user", "content": "hi"}'
    fields = {"role": _value(rng), "content": _value(rng)}
    for extra in ("name", "tool_calls", "tool_call_id", "refusal"):
        if rng.random() < 0.2:
            fields[extra] = _value(rng)
    return "{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}"


def _cases(seed: int, count: int) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        route = rng.choice(ROUTES)
        messages = ", ".join(_message(rng) for _ in range(rng.randint(1, 3)))
        parts = [f'"model": "{route}"', f'"messages": [{messages}]']
        for field in rng.sample(FIELDS, rng.randint(1, 4)):
            parts.append(f'"{field}": {_value(rng)}')
        cases.append((route, ("{" + ", ".join(parts) + "}").encode()))
    return cases


async def test_odd_field_values_never_500(gateway: GatewayHarness) -> None:
    await gateway.account("acme", 50_000_000)
    secret = await gateway.key(kind="secret")
    http = gateway.http()
    headers = {"authorization": f"Bearer {secret}", "content-type": "application/json"}
    grant = await http.post(
        "/v1/funding/grant",
        headers={**headers, "idempotency-key": "fuzz-1"},
        json={"external_user_id": "u1", "amount": 5},
    )
    assert grant.status_code == 200, grant.text
    before = await gateway.balance()
    failures = []
    for route, body in _cases(seed=int(os.environ.get("FUZZ_SEED", "9")), count=int(os.environ.get("FUZZ_CASES", "400"))):
        for path in ("/v1/chat/completions", "/v1/users/u1/chat/completions"):
            response = await http.post(path, content=body, headers=headers)
            if response.status_code >= 500 and route != "quota/down":
                failures.append((path, body, response.status_code, response.text))
            else:
                assert response.headers["content-type"].startswith("application/json") or response.status_code == 200
                if response.status_code >= 400:
                    assert "error" in response.json()
    assert failures == []
    assert await gateway.balance() <= before
    await gateway.verify()
