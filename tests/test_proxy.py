"""The proxy path against a real gateway and the real fake upstream: rewriting, header
hygiene, the usage extension, /v1/models, and the SPEC §3 error mapping."""

from __future__ import annotations

import math
import re
from typing import Any

import httpx
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletion

from quota_proxy.testing import RunningUpstream
from tests.conftest import GatewayFactory, GatewayHarness

pytestmark = pytest.mark.anyio

REQUEST_ID = re.compile(r"^req_[0-9a-f]{8,}$")
ALIASES = ("quota/fast", "quota/sonnet", "quota/half", "quota/opus", "quota/community", "quota/down")
FUNDS = 1_000_000


def chat(model: str = "quota/fast", content: str = "hello there", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


async def setup(gateway: GatewayHarness) -> tuple[str, httpx.AsyncClient, dict[str, str]]:
    await gateway.account("acme", FUNDS)
    key = await gateway.key("acme")
    return key, gateway.http(), {"authorization": f"Bearer {key}"}


def assert_error(response: httpx.Response, status: int, code: str, type_: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    assert REQUEST_ID.match(response.headers["x-quota-request-id"])
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert {"code", "message", "type"} <= set(error)
    assert error["code"] == code
    assert error["type"] == type_
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in response.text
    return error


async def assert_not_charged(gateway: GatewayHarness) -> None:
    assert await gateway.balance("acme") == FUNDS
    await gateway.settled()
    assert await gateway.store.open_holds() == 0
    await gateway.verify()


# -- rewriting and hygiene ------------------------------------------------------------


async def test_alias_is_rewritten_to_the_route_model(gateway: GatewayHarness) -> None:
    key, _, _ = await setup(gateway)
    reply = await gateway.openai(key).chat.completions.create(
        model="quota/sonnet",
        messages=[{"role": "user", "content": "hello there"}],
        temperature=0.25,
        user="end-user-1",
    )
    sent = gateway.upstream.app.requests[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.body["model"] == "fake-sonnet"
    # Everything else the caller sent arrives unchanged.
    assert sent.body["messages"] == [{"role": "user", "content": "hello there"}]
    assert sent.body["temperature"] == 0.25
    assert sent.body["user"] == "end-user-1"
    # The reply keeps the model as the upstream sent it.
    assert reply.model == "fake-sonnet"
    # Apart from the usage extension, the body is the upstream's.
    body = (
        await gateway.http().post(
            "/v1/chat/completions", json=chat("quota/sonnet"), headers={"authorization": f"Bearer {key}"}
        )
    ).json()
    assert body["id"].startswith("chatcmpl-")
    assert (body["object"], body["model"], body["system_fingerprint"]) == (
        "chat.completion",
        "fake-sonnet",
        "fp_fake",
    )
    assert body["choices"] == [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "hello world this is a fake reply from",
                "refusal": None,
            },
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert {"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13}.items() <= body["usage"].items()


async def test_upstream_never_sees_the_callers_credentials_or_cookies(gateway: GatewayHarness) -> None:
    key, http, _ = await setup(gateway)
    response = await http.post(
        "/v1/chat/completions",
        json=chat(),
        headers={
            "authorization": f"Bearer {key}",
            "x-api-key": key,
            "cookie": "session=s3cr3t; other=1",
            "proxy-authorization": "Basic Zm9vOmJhcg==",
        },
    )
    assert response.status_code == 200, response.text
    await gateway.openai(key).chat.completions.create(
        model="quota/fast", messages=[{"role": "user", "content": "hi"}]
    )
    requests = gateway.upstream.app.requests
    assert len(requests) == 2
    for sent in requests:
        assert "authorization" not in sent.headers  # the fake upstream has no key configured
        assert "x-api-key" not in sent.headers
        assert "cookie" not in sent.headers
        assert "proxy-authorization" not in sent.headers
        for name, value in sent.headers.items():
            assert key not in value, name
            assert "s3cr3t" not in value, name


async def test_stream_usage_and_max_tokens_are_injected(gateway: GatewayHarness) -> None:
    key, _, _ = await setup(gateway)
    client = gateway.openai(key)
    messages = [{"role": "user", "content": "hi"}]
    upstream = gateway.upstream.app

    await client.chat.completions.create(model="quota/fast", messages=messages)
    assert upstream.requests[-1].body["max_tokens"] == 64  # the route's max_output_tokens

    await client.chat.completions.create(model="quota/fast", messages=messages, max_tokens=5000)
    assert upstream.requests[-1].body["max_tokens"] == 64

    reply = await client.chat.completions.create(model="quota/fast", messages=messages, max_tokens=3)
    assert upstream.requests[-1].body["max_tokens"] == 3
    assert reply.usage is not None and reply.usage.completion_tokens == 3

    await client.chat.completions.create(model="quota/fast", messages=messages, max_completion_tokens=900)
    sent = upstream.requests[-1].body
    assert sent["max_completion_tokens"] == 64
    assert sent.get("max_tokens") in (None, 64)

    await client.completions.create(model="quota/fast", prompt="one two", max_tokens=10_000)
    assert upstream.requests[-1].body["max_tokens"] == 64

    # A stream asks the upstream for usage, whether or not the caller did.
    stream = await client.chat.completions.create(model="quota/fast", messages=messages, stream=True)
    async for _ in stream:
        pass
    sent = upstream.requests[-1].body
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["max_tokens"] == 64
    await gateway.verify()


# -- other endpoints ------------------------------------------------------------------


async def test_completions_through_the_sdk_with_usage_extension(gateway: GatewayHarness) -> None:
    key, _, _ = await setup(gateway)
    reply = await gateway.openai(key).completions.create(
        model="quota/half", prompt="one two three", max_tokens=8
    )
    sent = gateway.upstream.app.requests[-1]
    assert sent.path == "/v1/completions"
    assert sent.body["model"] == "fake-half"
    assert reply.choices[0].text
    assert reply.usage is not None
    usage = reply.usage.model_dump()
    assert usage["prompt_tokens"] == 3 and usage["completion_tokens"] == 8
    assert usage["input_tokens"] == 3
    assert usage["output_tokens"] == 8
    assert usage["route_multiplier"] == "x0.5"
    assert usage["charged_quota_tokens"] == math.ceil((3 + 8) * 0.5) == 6
    assert await gateway.balance("acme") == FUNDS - 6
    await gateway.verify()


async def test_embeddings_through_the_sdk_charge_input_tokens_only(gateway: GatewayHarness) -> None:
    key, _, _ = await setup(gateway)
    reply = await gateway.openai(key).embeddings.create(
        model="quota/sonnet", input=["alpha beta gamma", "delta epsilon"]
    )
    sent = gateway.upstream.app.requests[-1]
    assert sent.path == "/v1/embeddings"
    assert sent.body["model"] == "fake-sonnet"
    assert "max_tokens" not in sent.body
    assert len(reply.data) == 2 and len(reply.data[0].embedding) == 8
    usage = reply.usage.model_dump()
    assert usage["prompt_tokens"] == 5
    assert usage["input_tokens"] == 5
    assert usage["output_tokens"] == 0
    assert usage["route_multiplier"] == "x3"
    assert usage["charged_quota_tokens"] == 15
    assert await gateway.balance("acme") == FUNDS - 15
    await gateway.verify()


async def test_models_lists_the_routes_with_their_extensions(gateway: GatewayHarness) -> None:
    key, http, auth = await setup(gateway)
    response = await http.get("/v1/models", headers=auth)
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    models = {m["id"]: m for m in body["data"]}
    assert set(models) == set(ALIASES)
    for model in models.values():
        assert model["object"] == "model"
        assert isinstance(model["description"], str)
        assert isinstance(model["streaming"], bool)
        assert model["tier"] in ("trusted", "community")
        assert re.fullmatch(r"x\d+(\.\d+)?", model["route_multiplier"])
    assert models["quota/fast"]["description"] == "Quick tasks"
    assert models["quota/fast"]["route_multiplier"] == "x1"
    assert models["quota/sonnet"]["route_multiplier"] == "x3"
    assert models["quota/half"]["route_multiplier"] == "x0.5"
    assert models["quota/opus"]["route_multiplier"] == "x8"
    assert models["quota/opus"]["streaming"] is False
    assert models["quota/fast"]["streaming"] is True
    assert models["quota/community"]["tier"] == "community"
    assert models["quota/fast"]["tier"] == "trusted"
    # The SDK reads the same list.
    sdk_models = await gateway.openai(key).models.list()
    assert {m.id for m in sdk_models.data} == set(ALIASES)
    assert gateway.upstream.app.stats["requests"] == 0  # served by the gateway itself


# -- request errors (nothing forwarded, nothing charged) -----------------------------


async def test_unknown_alias_is_404_listing_the_aliases(gateway: GatewayHarness) -> None:
    key, http, auth = await setup(gateway)
    response = await http.post("/v1/chat/completions", json=chat("gpt-4o"), headers=auth)
    error = assert_error(response, 404, "model_not_found", "invalid_request_error")
    for alias in ALIASES:
        assert alias in error["message"]
    with pytest.raises(openai.NotFoundError) as caught:
        await gateway.openai(key).chat.completions.create(
            model="quota/nope", messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.code == "model_not_found"
    assert gateway.upstream.app.stats["requests"] == 0
    await assert_not_charged(gateway)


async def test_malformed_requests_are_400(gateway: GatewayHarness) -> None:
    key, http, auth = await setup(gateway)
    json_headers = {**auth, "content-type": "application/json"}
    cases: list[tuple[bytes, str]] = [
        (b'{"model": "quota/fast", "messages": [', "malformed JSON"),
        (b"", "empty body"),
        (b"not json at all", "not JSON"),
        (b'[{"model": "quota/fast"}]', "a JSON array"),
        (b'"quota/fast"', "a JSON string"),
        (b"42", "a JSON number"),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', "missing model"),
        (b'{"model": 7, "messages": [{"role": "user", "content": "hi"}]}', "model not a string"),
        (b'{"model": "quota/fast"}', "missing messages"),
        (b'{"model": "quota/fast", "messages": []}', "empty messages"),
        (
            b'{"model": "quota/fast", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}',
            "negative max_tokens",
        ),
        (
            b'{"model": "quota/fast", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}',
            "stream not a bool",
        ),
    ]
    for body, what in cases:
        response = await http.post("/v1/chat/completions", content=body, headers=json_headers)
        error = assert_error(response, 400, "bad_request", "invalid_request_error")
        if what == "missing model":
            assert "model" in error["message"]
    # The SDK, sent a body without a model, sees a 400 naming it.
    with pytest.raises(openai.BadRequestError) as caught:
        await gateway.openai(key).post(
            "/chat/completions",
            body={"messages": [{"role": "user", "content": "hi"}]},
            cast_to=ChatCompletion,
        )
    assert caught.value.code == "bad_request"
    assert "model" in caught.value.message
    assert gateway.upstream.app.stats["requests"] == 0
    await assert_not_charged(gateway)


async def test_body_over_max_body_bytes_is_413(make_gateway: GatewayFactory) -> None:
    gateway: GatewayHarness = await make_gateway(server={"max_body_bytes": 2000})
    _, http, auth = await setup(gateway)
    big = chat(content="word " * 1000)  # ~5 kB
    response = await http.post("/v1/chat/completions", json=big, headers=auth)
    assert_error(response, 413, "payload_too_large", "invalid_request_error")

    # Without a Content-Length (chunked), the limit holds while reading.
    payload = orjson.dumps(big)

    async def chunks() -> Any:
        for i in range(0, len(payload), 500):
            yield payload[i : i + 500]

    response = await http.post(
        "/v1/chat/completions", content=chunks(), headers={**auth, "content-type": "application/json"}
    )
    assert_error(response, 413, "payload_too_large", "invalid_request_error")

    small = await http.post("/v1/chat/completions", json=chat(), headers=auth)
    assert small.status_code == 200
    assert gateway.upstream.app.stats["requests"] == 1
    await gateway.verify()


async def test_stream_on_a_non_streaming_route_is_400(gateway: GatewayHarness) -> None:
    key, http, auth = await setup(gateway)
    response = await http.post("/v1/chat/completions", json=chat("quota/opus", stream=True), headers=auth)
    assert_error(response, 400, "stream_not_supported", "invalid_request_error")
    with pytest.raises(openai.BadRequestError) as caught:
        await gateway.openai(key).chat.completions.create(
            model="quota/opus", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    assert caught.value.code == "stream_not_supported"
    assert gateway.upstream.app.stats["requests"] == 0
    # The same route without stream works.
    ok = await http.post("/v1/chat/completions", json=chat("quota/opus"), headers=auth)
    assert ok.status_code == 200
    assert ok.json()["usage"]["route_multiplier"] == "x8"


async def test_unknown_path_and_wrong_method_are_json_never_html(gateway: GatewayHarness) -> None:
    _, http, auth = await setup(gateway)
    cases = [
        ("GET", "/v1/unknown", 404, "not_found"),
        ("POST", "/v1/chat/completion", 404, "not_found"),
        ("GET", "/", 404, "not_found"),
        ("GET", "/v1/chat/completions", 405, "method_not_allowed"),
        ("DELETE", "/v1/models", 405, "method_not_allowed"),
        ("PUT", "/v1/embeddings", 405, "method_not_allowed"),
    ]
    for method, path, status, code in cases:
        response = await http.request(method, path, headers=auth)
        assert response.status_code == status, (method, path, response.text)
        assert response.headers["content-type"].startswith("application/json")
        assert "<html" not in response.text.lower()
        assert response.json()["error"]["code"] == code
        assert REQUEST_ID.match(response.headers["x-quota-request-id"])
    # Without a key too: still JSON, never an HTML page.
    for method, path in (("GET", "/nope"), ("POST", "/v1/whatever")):
        response = await http.request(method, path)
        assert response.status_code in (401, 404)
        assert response.headers["content-type"].startswith("application/json")
        assert "error" in response.json()
    assert gateway.upstream.app.stats["requests"] == 0


# -- upstream errors ------------------------------------------------------------------


async def test_upstream_connection_refused_is_502(gateway: GatewayHarness) -> None:
    key, http, auth = await setup(gateway)
    response = await http.post("/v1/chat/completions", json=chat("quota/down"), headers=auth)
    assert_error(response, 502, "upstream_error", "api_error")
    with pytest.raises(openai.InternalServerError) as caught:
        await gateway.openai(key).chat.completions.create(
            model="quota/down", messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.status_code == 502
    async with http.stream(
        "POST", "/v1/chat/completions", json=chat("quota/down", stream=True), headers=auth
    ) as r:
        await r.aread()
        assert_error(r, 502, "upstream_error", "api_error")
    await assert_not_charged(gateway)


async def test_upstream_5xx_and_auth_failures_are_502(gateway: GatewayHarness) -> None:
    _, http, auth = await setup(gateway)
    for status in (500, 503, 401, 403):
        for stream in (False, True):
            body = chat(stream=stream, fake={"fail": f"status:{status}"})
            response = await http.post("/v1/chat/completions", json=body, headers=auth)
            error = assert_error(response, 502, "upstream_error", "api_error")
            # The upstream's complaint about the gateway's credentials is not the caller's business.
            assert "Incorrect API key" not in error["message"]
    assert gateway.upstream.app.stats["requests"] == 8
    await assert_not_charged(gateway)


async def test_upstream_400_and_429_are_passed_through(gateway: GatewayHarness) -> None:
    key, http, auth = await setup(gateway)
    for stream in (False, True):
        response = await http.post(
            "/v1/chat/completions", json=chat(stream=stream, fake={"fail": "status:400"}), headers=auth
        )
        assert response.status_code == 400
        assert REQUEST_ID.match(response.headers["x-quota-request-id"])
        assert response.json() == {
            "error": {
                "message": "This model's maximum context length is 8192 tokens. "
                "Please reduce the length of the messages.",
                "type": "invalid_request_error",
                "param": None,
                "code": "context_length_exceeded",
            }
        }
    with pytest.raises(openai.BadRequestError) as caught:
        await gateway.openai(key).chat.completions.create(
            model="quota/fast",
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"fake": {"fail": "status:400"}},
        )
    assert caught.value.code == "context_length_exceeded"

    # 429 too, with its Retry-After.
    response = await http.post("/v1/chat/completions", json=chat(fake={"fail": "status:429"}), headers=auth)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    assert REQUEST_ID.match(response.headers["x-quota-request-id"])
    await assert_not_charged(gateway)


def slow_route(upstream: RunningUpstream) -> str:
    return "\n".join(
        [
            "[upstreams.slow]",
            f'base_url = "{upstream.base_url}"',
            "timeout_s = 0.5",
            '[routes."quota/slow"]',
            'upstream = "slow"',
            'model = "fake-slow"',
            "multiplier = 1",
            "max_output_tokens = 64",
        ]
    )


async def test_upstream_silent_before_first_byte_is_504(
    make_gateway: GatewayFactory, upstream: RunningUpstream
) -> None:
    gateway: GatewayHarness = await make_gateway(routes=slow_route(upstream))
    _, http, auth = await setup(gateway)
    for stream in (False, True):
        body = chat("quota/slow", stream=stream, fake={"first_byte_delay_s": 3})
        response = await http.post("/v1/chat/completions", json=body, headers=auth)
        assert_error(response, 504, "upstream_timeout", "api_error")
        assert response.elapsed.total_seconds() < 2.5
    # The same route answers when the upstream is quick.
    ok = await http.post("/v1/chat/completions", json=chat("quota/slow"), headers=auth)
    assert ok.status_code == 200
    assert ok.json()["model"] == "fake-slow"
    charged = ok.json()["usage"]["charged_quota_tokens"]
    assert await gateway.balance("acme") == FUNDS - charged
    await gateway.settled()
    assert await gateway.store.open_holds() == 0
    await gateway.verify()


async def test_unusable_upstream_reply_is_502(gateway: GatewayHarness) -> None:
    key, http, auth = await setup(gateway)
    # A truncated JSON body, an empty body, a connection dropped halfway through the body.
    for fail in ("malformed", "empty", "reset_mid_stream"):
        response = await http.post("/v1/chat/completions", json=chat(fake={"fail": fail}), headers=auth)
        assert_error(response, 502, "upstream_error", "api_error")
        with pytest.raises(openai.APIStatusError) as caught:
            await gateway.openai(key).chat.completions.create(
                model="quota/fast",
                messages=[{"role": "user", "content": "hi"}],
                extra_body={"fake": {"fail": fail}},
            )
        assert caught.value.status_code == 502
    await assert_not_charged(gateway)
