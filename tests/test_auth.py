"""Authentication and key restrictions against a real gateway (SPEC §2 keys, §3 auth)."""

from __future__ import annotations

import re
import time
from typing import Any

import anyio
import httpx
import openai
import orjson
import pytest

from tests.conftest import GatewayHarness

pytestmark = pytest.mark.anyio

CHAT = {"model": "quota/fast", "messages": [{"role": "user", "content": "hello there"}]}
REQUEST_ID = re.compile(r"^req_[0-9a-f]{8,}$")


def assert_error(response: httpx.Response, status: int, code: str, type_: str) -> dict[str, Any]:
    """The exact SPEC §3 error shape: JSON, the three fields, a non-empty message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert error["code"] == code
    assert error["type"] == type_
    assert isinstance(error["message"], str) and error["message"]
    assert REQUEST_ID.match(response.headers["x-quota-request-id"])
    return error


def assert_invalid_key(response: httpx.Response) -> None:
    error = assert_error(response, 401, "invalid_api_key", "authentication_error")
    assert set(error) == {"code", "message", "type"}


async def test_both_key_kinds_with_bearer_through_the_sdk(gateway: GatewayHarness) -> None:
    await gateway.account("acme", 1_000_000)
    balance = 1_000_000
    for kind, shape in (("live", r"qta_live_[0-9A-Za-z]{32}"), ("secret", r"sk-quota-[0-9A-Za-z]{40}")):
        key = await gateway.key("acme", kind)
        assert re.fullmatch(shape, key)
        raw = await gateway.openai(key).chat.completions.with_raw_response.create(
            model="quota/fast", messages=[{"role": "user", "content": "hello there"}]
        )
        assert raw.status_code == 200
        assert REQUEST_ID.match(raw.headers["x-quota-request-id"])
        reply = raw.parse()
        assert reply.choices[0].message.content
        assert reply.usage is not None
        # The key's account paid.
        balance -= reply.usage.model_dump()["charged_quota_tokens"]
        assert await gateway.balance("acme") == balance < 1_000_000
    await gateway.verify()


async def test_x_api_key_header_is_accepted_for_both_kinds(gateway: GatewayHarness) -> None:
    await gateway.account("acme", 1_000_000)
    http = gateway.http()
    for kind in ("live", "secret"):
        key = await gateway.key("acme", kind)
        response = await http.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": key})
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["charged_quota_tokens"] > 0
        models = await http.get("/v1/models", headers={"x-api-key": key})
        assert models.status_code == 200
        assert REQUEST_ID.match(models.headers["x-quota-request-id"])
    assert gateway.upstream.app.stats["requests"] == 2
    await gateway.verify()


async def test_missing_key_is_401(gateway: GatewayHarness) -> None:
    http = gateway.http()
    for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/v1/balance")):
        response = await http.request(method, path, json=CHAT if method == "POST" else None)
        assert_invalid_key(response)
    client = gateway.openai("qta_live_" + "0" * 32)  # well-formed, never issued
    with pytest.raises(openai.AuthenticationError) as caught:
        await client.chat.completions.create(model="quota/fast", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"
    assert REQUEST_ID.match(caught.value.response.headers["x-quota-request-id"])
    assert gateway.upstream.app.stats["requests"] == 0


BAD_KEY_HEADERS = [
    {"authorization": "Bearer qta_live_" + "A" * 32},  # unknown, well-formed
    {"authorization": "Bearer sk-quota-" + "A" * 40},  # unknown secret, well-formed
    {"x-api-key": "qta_live_" + "A" * 32},
    {"authorization": "Bearer qta_live_short"},  # malformed: too short
    {"authorization": "Bearer qta_live_" + "A" * 33},  # malformed: too long
    {"authorization": "Bearer qta_live_" + "!" * 32},  # malformed: not base62
    {"authorization": "Bearer sk-proj-" + "A" * 40},  # someone else's key format
    {"authorization": "Basic dXNlcjpwYXNz"},  # not a bearer scheme
    {"authorization": "Bearer"},  # scheme without a token
    {"x-api-key": ""},
]


async def test_unknown_or_malformed_key_is_401(gateway: GatewayHarness) -> None:
    await gateway.account("acme", 1_000_000)
    key = await gateway.key("acme")
    tampered = key[:-1] + ("a" if key[-1] != "a" else "b")  # a real key, one character changed
    http = gateway.http()
    for headers in [*BAD_KEY_HEADERS, {"authorization": f"Bearer {tampered}"}, {"x-api-key": key.upper()}]:
        response = await http.post("/v1/chat/completions", json=CHAT, headers=headers)
        assert_invalid_key(response)
    assert gateway.upstream.app.stats["requests"] == 0
    assert await gateway.balance("acme") == 1_000_000


async def test_revoked_key_stops_working_within_5_seconds(gateway: GatewayHarness) -> None:
    await gateway.account("acme", 1_000_000)
    key = await gateway.key("acme")
    other = await gateway.key("acme")
    http = gateway.http()
    auth = {"authorization": f"Bearer {key}"}
    assert (await http.get("/v1/models", headers=auth)).status_code == 200  # now cached as valid

    listed = gateway.cli("keys", "list", "--account", "acme", "--json")
    key_id = next(k["id"] for k in orjson.loads(listed.stdout) if key.startswith(k["prefix"]))
    # The CLI blocks this event loop while it runs; the gateway serves again afterwards.
    revoked = gateway.cli("keys", "revoke", key_id, "--json")
    assert orjson.loads(revoked.stdout)["revoked"] == key_id
    revoked_at = time.monotonic()

    last: httpx.Response | None = None
    with anyio.fail_after(8):
        while time.monotonic() - revoked_at < 5.0:
            last = await http.post("/v1/chat/completions", json=CHAT, headers=auth)
            if last.status_code == 401:
                break
            await anyio.sleep(0.1)
    assert last is not None
    assert_invalid_key(last)
    assert time.monotonic() - revoked_at < 5.0
    # The other key of the same account is untouched.
    still = await http.post("/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {other}"})
    assert still.status_code == 200
    await gateway.verify()


async def test_expired_key_is_401(gateway: GatewayHarness) -> None:
    await gateway.account("acme", 1_000_000)
    expired = await gateway.key("acme", expires="2020-01-01")
    future = await gateway.key("acme", expires="2999-01-01")
    http = gateway.http()
    response = await http.post(
        "/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {expired}"}
    )
    assert_invalid_key(response)
    assert gateway.upstream.app.stats["requests"] == 0
    ok = await http.post("/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {future}"})
    assert ok.status_code == 200, ok.text


async def test_key_restricted_to_routes(gateway: GatewayHarness) -> None:
    await gateway.account("acme", 1_000_000)
    key = await gateway.key("acme", routes=("quota/fast", "quota/half"))
    client = gateway.openai(key)

    reply = await client.chat.completions.create(
        model="quota/fast", messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.choices[0].message.content

    response = await gateway.http().post(
        "/v1/chat/completions",
        json={**CHAT, "model": "quota/sonnet"},
        headers={"authorization": f"Bearer {key}"},
    )
    error = assert_error(response, 403, "permission_denied", "permission_error")
    assert "quota/sonnet" in error["message"]
    assert gateway.upstream.app.stats["requests"] == 1  # only the allowed one went out

    with pytest.raises(openai.PermissionDeniedError):
        await client.chat.completions.create(
            model="quota/sonnet", messages=[{"role": "user", "content": "hi"}]
        )

    models = await client.models.list()
    assert sorted(m.id for m in models.data) == ["quota/fast", "quota/half"]

    # An unknown alias: the 404 lists only what this key may use.
    response = await gateway.http().post(
        "/v1/chat/completions",
        json={**CHAT, "model": "quota/nope"},
        headers={"authorization": f"Bearer {key}"},
    )
    error = assert_error(response, 404, "model_not_found", "invalid_request_error")
    assert "quota/fast" in error["message"] and "quota/half" in error["message"]
    assert "quota/sonnet" not in error["message"]
    await gateway.verify()


async def test_no_community_key_refuses_community_route(gateway: GatewayHarness) -> None:
    await gateway.account("acme", 1_000_000)
    strict = await gateway.key("acme", allow_community=False)
    relaxed = await gateway.key("acme")
    http = gateway.http()
    body = {**CHAT, "model": "quota/community"}

    response = await http.post(
        "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {strict}"}
    )
    assert_error(response, 403, "permission_denied", "permission_error")
    assert gateway.upstream.app.stats["requests"] == 0

    models = (await gateway.openai(strict).models.list()).data
    ids = {m.id for m in models}
    assert "quota/community" not in ids
    assert "quota/fast" in ids

    ok = await http.post("/v1/chat/completions", json=body, headers={"authorization": f"Bearer {relaxed}"})
    assert ok.status_code == 200, ok.text
    assert "quota/community" in {m.id for m in (await gateway.openai(relaxed).models.list()).data}


async def test_every_response_carries_a_request_id(gateway: GatewayHarness) -> None:
    await gateway.account("acme", 1_000_000)
    key = await gateway.key("acme")
    auth = {"authorization": f"Bearer {key}"}
    http = gateway.http()
    cases: list[tuple[str, str, dict[str, str], Any, int]] = [
        ("POST", "/v1/chat/completions", auth, CHAT, 200),
        ("POST", "/v1/chat/completions", {}, CHAT, 401),
        ("POST", "/v1/chat/completions", auth, {**CHAT, "model": "quota/nope"}, 404),
        ("POST", "/v1/chat/completions", auth, {"messages": []}, 400),
        ("GET", "/v1/models", auth, None, 200),
        ("GET", "/v1/nothing-here", auth, None, 404),
        ("GET", "/nothing-at-all", auth, None, 404),
        ("GET", "/v1/chat/completions", auth, None, 405),
        ("GET", "/healthz", {}, None, 200),
        ("GET", "/v1/packages", {}, None, 200),
    ]
    seen: set[str] = set()
    for method, path, headers, body, status in cases:
        response = await http.request(method, path, headers=headers, json=body)
        assert response.status_code == status, (method, path, response.text)
        request_id = response.headers.get("x-quota-request-id")
        assert request_id is not None and REQUEST_ID.match(request_id), (method, path)
        seen.add(request_id)
        if status >= 400:
            assert response.headers["content-type"].startswith("application/json"), (method, path)
            assert set(response.json()["error"]) >= {"code", "message", "type"}
    assert len(seen) == len(cases)  # one id per request

    # A stream carries it too, in its headers.
    async with http.stream(
        "POST", "/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth
    ) as streamed:
        assert streamed.status_code == 200
        assert REQUEST_ID.match(streamed.headers["x-quota-request-id"])
        await streamed.aread()
