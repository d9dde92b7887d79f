"""Streaming through a real gateway on uvicorn: relay timing, the hidden or extended usage
chunk, metering of streams, disconnects and broken upstream streams (SPEC §3, §4)."""

from __future__ import annotations

import time
from typing import Any

import anyio
import httpx
import openai
import orjson
import pytest

from quota_proxy.runner import run_server
from quota_proxy.testing import RunningUpstream
from tests.conftest import GatewayFactory, GatewayHarness

pytestmark = pytest.mark.anyio

FUNDS = 1_000_000
PROMPT = "hello there"
PROMPT_TOKENS = 2 + 3  # the fake counts words + 3 per message
EIGHT_WORDS = "hello world this is a fake reply from"
MESSAGES = [{"role": "user", "content": PROMPT}]


async def setup(gateway: GatewayHarness) -> tuple[str, httpx.AsyncClient, dict[str, str]]:
    await gateway.account("acme", FUNDS)
    key = await gateway.key("acme")
    return key, gateway.http(), {"authorization": f"Bearer {key}"}


def chat(model: str = "quota/fast", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, "stream": True, **extra}


async def request_row(gateway: GatewayHarness, request_id: str) -> dict[str, Any] | None:
    """The settled request, read around the store."""
    rows = await gateway.dict_rows("SELECT * FROM requests WHERE request_id = ?", (request_id,))
    return rows[0] if rows else None


async def settled_row(gateway: GatewayHarness, request_id: str, within_s: float = 3.0) -> dict[str, Any]:
    deadline = time.monotonic() + within_s
    while True:
        row = await request_row(gateway, request_id)
        if row is not None:
            return row
        assert time.monotonic() < deadline, f"request {request_id} was not settled within {within_s}s"
        await anyio.sleep(0.05)


def data_payloads(raw: bytes) -> list[str]:
    return [line[len("data:") :].strip() for line in raw.decode().splitlines() if line.startswith("data:")]


def normalized(payloads: list[str]) -> list[Any]:
    """Events without the per-request id/created and the optional `"usage": null`."""
    out: list[Any] = []
    for payload in payloads:
        if payload == "[DONE]":
            out.append(payload)
            continue
        event = orjson.loads(payload)
        event.pop("id", None)
        event.pop("created", None)
        if "usage" in event and event["usage"] is None:
            del event["usage"]
        out.append(event)
    return out


async def test_chunks_are_relayed_as_they_arrive(gateway: GatewayHarness) -> None:
    key, _, _ = await setup(gateway)
    client = gateway.openai(key)
    started = time.monotonic()
    stream = await client.chat.completions.create(
        model="quota/fast",
        messages=MESSAGES,
        stream=True,
        extra_body={"fake": {"chunk_delay_s": 0.3, "reply_words": 5}},
    )
    arrivals: list[float] = []
    texts: list[str] = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - started)
            texts.append(chunk.choices[0].delta.content)
    total = time.monotonic() - started
    assert "".join(texts) == "hello world this is a"
    assert len(arrivals) == 5
    # The upstream waits 0.3 s before each word: a buffering gateway would deliver them together.
    assert arrivals[1] - arrivals[0] >= 0.2
    assert all(b - a >= 0.15 for a, b in zip(arrivals, arrivals[1:], strict=False))  # none bunched up
    assert arrivals[0] < 0.8
    assert total >= 1.4
    assert arrivals[0] < total / 2


async def test_usage_chunk_is_hidden_when_the_caller_did_not_ask(gateway: GatewayHarness) -> None:
    key, http, auth = await setup(gateway)
    upstream = gateway.upstream

    # Through the SDK: no chunk carries usage, and the text is the upstream's.
    stream = await gateway.openai(key).chat.completions.create(
        model="quota/fast", messages=MESSAGES, stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert all(chunk.usage is None for chunk in chunks)
    assert all(chunk.choices for chunk in chunks)  # the usage-only chunk has choices == []
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == EIGHT_WORDS
    assert upstream.app.requests[-1].body["stream_options"] == {"include_usage": True}

    # Byte level: the same events as the upstream sends a caller that did not ask for usage.
    response = await http.post("/v1/chat/completions", json=chat(), headers=auth)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    through_gateway = data_payloads(response.content)
    async with httpx.AsyncClient(base_url=upstream.base_url, timeout=10) as direct:
        plain = await direct.post(
            "/chat/completions",
            json={"model": "fake-fast", "messages": MESSAGES, "stream": True, "max_tokens": 64},
        )
    direct_events = data_payloads(plain.content)
    assert through_gateway[-1] == "[DONE]"
    assert normalized(through_gateway) == normalized(direct_events)
    assert all('"usage":{' not in p.replace(" ", "") for p in through_gateway)

    # Hidden, yet metered from the upstream's usage: exact, not estimated.
    charged = FUNDS - await gateway.balance("acme")
    assert charged == 2 * (PROMPT_TOKENS + 8)
    row = await request_row(gateway, response.headers["x-quota-request-id"])
    assert row is not None
    assert row["charged"] == PROMPT_TOKENS + 8
    assert row["estimated"] == 0
    await gateway.verify()


async def test_usage_chunk_is_extended_when_the_caller_asked(gateway: GatewayHarness) -> None:
    key, http, auth = await setup(gateway)
    raw = await gateway.openai(key).chat.completions.with_raw_response.create(
        model="quota/sonnet",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    stream = raw.parse()
    chunks = [chunk async for chunk in stream]
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1
    last = chunks[-1]
    assert last is usage_chunks[0]
    assert last.choices == []
    usage = last.usage.model_dump()
    assert usage["prompt_tokens"] == PROMPT_TOKENS
    assert usage["completion_tokens"] == 8
    assert usage["input_tokens"] == PROMPT_TOKENS
    assert usage["output_tokens"] == 8
    assert usage["route_multiplier"] == "x3"
    assert usage["charged_quota_tokens"] == 3 * (PROMPT_TOKENS + 8)
    assert not usage.get("estimated")
    # The stream's charge is what its usage chunk said.
    assert await gateway.balance("acme") == FUNDS - usage["charged_quota_tokens"]
    row = await settled_row(gateway, raw.headers["x-quota-request-id"])
    assert row["charged"] == usage["charged_quota_tokens"]
    assert (row["input_tokens"], row["output_tokens"]) == (PROMPT_TOKENS, 8)
    assert row["outcome"] == "ok"

    # Raw bytes: the usage event comes last, right before [DONE].
    response = await http.post(
        "/v1/chat/completions", json=chat(stream_options={"include_usage": True}), headers=auth
    )
    payloads = data_payloads(response.content)
    assert payloads[-1] == "[DONE]"
    usage_event = orjson.loads(payloads[-2])
    assert usage_event["choices"] == []
    assert usage_event["usage"]["charged_quota_tokens"] == PROMPT_TOKENS + 8
    assert usage_event["usage"]["route_multiplier"] == "x1"
    await gateway.settled()
    assert await gateway.store.open_holds() == 0
    await gateway.verify()


async def test_client_disconnect_stops_the_upstream_and_charges_what_was_produced(
    gateway: GatewayHarness,
) -> None:
    _, http, auth = await setup(gateway)
    upstream = gateway.upstream.app
    body = chat(fake={"chunk_delay_s": 0.2, "reply_words": 50})
    full_charge = PROMPT_TOKENS + 50  # what the whole reply would cost on this x1 route

    content_chunks = 0
    with anyio.fail_after(10):
        async with http.stream("POST", "/v1/chat/completions", json=body, headers=auth) as response:
            assert response.status_code == 200
            request_id = response.headers["x-quota-request-id"]
            async for line in response.aiter_lines():
                if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                    content_chunks += 1
                    if content_chunks == 2:
                        break
    # Leaving the block closed the connection mid-stream.
    closed_at = time.monotonic()
    while upstream.stats["streams_cancelled"] < 1:
        assert time.monotonic() - closed_at < 1.5, "the upstream kept streaming after the caller left"
        await anyio.sleep(0.02)
    assert upstream.stats["streams_completed"] == 0

    row = await settled_row(gateway, request_id)
    assert 0 < row["charged"] < full_charge
    assert row["estimated"] == 1
    assert row["outcome"] == "client_disconnected"
    assert FUNDS - await gateway.balance("acme") == row["charged"]
    await gateway.settled()
    assert await gateway.store.open_holds() == 0
    await gateway.verify()


async def test_disconnect_before_the_first_byte_stops_the_upstream(gateway: GatewayHarness) -> None:
    """A caller who gives up on a stream while the upstream is still silent (a long prefill)
    frees its hold and stops the upstream at once, not when the upstream finally answers."""
    _, http, auth = await setup(gateway)
    upstream = gateway.upstream.app
    body = chat(fake={"first_byte_delay_s": 1.5, "reply_words": 20})
    with anyio.move_on_after(0.3):
        async with http.stream("POST", "/v1/chat/completions", json=body, headers=auth) as response:
            await response.aread()
    left_at = time.monotonic()
    assert upstream.stats["requests"] == 1
    while await gateway.store.open_holds():
        assert time.monotonic() - left_at < 0.7, "the hold outlived the caller"
        await anyio.sleep(0.02)
    await anyio.sleep(max(0.0, 1.8 - (time.monotonic() - left_at)))
    # The upstream was cancelled before it began to stream.
    assert upstream.stats["streams_started"] == 0
    assert FUNDS - await gateway.balance("acme") < PROMPT_TOKENS + 20
    await gateway.verify()


async def test_upstream_reset_mid_stream_ends_with_an_error_event(gateway: GatewayHarness) -> None:
    key, http, auth = await setup(gateway)
    response = await http.post(
        "/v1/chat/completions", json=chat(fake={"fail": "reset_mid_stream"}), headers=auth
    )
    assert response.status_code == 200  # the stream had begun
    payloads = data_payloads(response.content)
    assert "[DONE]" not in payloads
    events = [orjson.loads(p) for p in payloads]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[1]["choices"][0]["delta"]["content"] == "hello "
    last = events[-1]
    assert set(last) == {"error"}
    assert last["error"]["code"] == "upstream_error"
    assert last["error"]["type"] == "api_error"
    assert last["error"]["message"]
    assert response.content.endswith(b"\n\n")

    # Charged for the delivered part only, as an estimate.
    row = await settled_row(gateway, response.headers["x-quota-request-id"])
    assert row["charged"] > 0
    assert row["charged"] < PROMPT_TOKENS + 8
    assert row["estimated"] == 1
    assert FUNDS - await gateway.balance("acme") == row["charged"]

    # The SDK surfaces the error event as an exception after the delivered chunks.
    stream = await gateway.openai(key).chat.completions.create(
        model="quota/fast", messages=MESSAGES, stream=True, extra_body={"fake": {"fail": "reset_mid_stream"}}
    )
    seen: list[str] = []
    with pytest.raises(openai.APIError):
        async for chunk in stream:
            seen.append(chunk.choices[0].delta.content or "")
    assert "".join(seen) == "hello "
    await gateway.settled()
    assert await gateway.store.open_holds() == 0
    await gateway.verify()


async def test_malformed_sse_passes_through_without_crashing(gateway: GatewayHarness) -> None:
    key, http, auth = await setup(gateway)
    response = await http.post(
        "/v1/chat/completions", json=chat(fake={"fail": "malformed_sse"}), headers=auth
    )
    assert response.status_code == 200
    payloads = data_payloads(response.content)
    assert payloads[2:] == ["{not json", "[DONE]"]
    assert orjson.loads(payloads[1])["choices"][0]["delta"]["content"] == "hello "
    row = await settled_row(gateway, response.headers["x-quota-request-id"])
    assert row["estimated"] == 1
    assert FUNDS - await gateway.balance("acme") == row["charged"]

    # The gateway is still fine.
    assert (await http.get("/healthz")).status_code == 200
    reply = await gateway.openai(key).chat.completions.create(model="quota/fast", messages=MESSAGES)
    assert reply.choices[0].message.content == EIGHT_WORDS
    await gateway.settled()
    assert await gateway.store.open_holds() == 0
    await gateway.verify()


async def test_stream_without_usage_from_an_old_upstream_is_charged_an_estimate(
    gateway: GatewayHarness,
) -> None:
    key, _, _ = await setup(gateway)
    raw = await gateway.openai(key).chat.completions.with_raw_response.create(
        model="quota/sonnet",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"fake": {"include_usage": False}},
    )
    chunks = [chunk async for chunk in raw.parse()]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == EIGHT_WORDS
    row = await settled_row(gateway, raw.headers["x-quota-request-id"])
    assert row["estimated"] == 1
    assert row["output_tokens"] > 0
    assert row["charged"] == 3 * (row["input_tokens"] + row["output_tokens"])
    assert row["charged"] > 0
    assert FUNDS - await gateway.balance("acme") == row["charged"]
    await gateway.settled()
    assert await gateway.store.open_holds() == 0
    await gateway.verify()


async def test_upstream_stalling_mid_stream_ends_with_a_timeout_event(
    make_gateway: GatewayFactory, upstream: RunningUpstream
) -> None:
    routes = "\n".join(
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
    gateway: GatewayHarness = await make_gateway(routes=routes)
    _, http, auth = await setup(gateway)
    with anyio.fail_after(5):
        response = await http.post(
            "/v1/chat/completions",
            json=chat("quota/slow", fake={"fail": "stall_after_headers"}),
            headers=auth,
        )
    assert response.status_code == 200
    payloads = data_payloads(response.content)
    last = orjson.loads(payloads[-1])
    assert last["error"]["code"] == "upstream_timeout"
    assert "[DONE]" not in payloads
    await settled_row(gateway, response.headers["x-quota-request-id"])
    await gateway.settled()
    assert await gateway.store.open_holds() == 0
    assert await gateway.balance("acme") >= 0
    await gateway.verify()


class SplittingUpstream:
    """A small OpenAI-compatible upstream that streams the way some real servers do:
    model "split" cuts its events at arbitrary byte boundaries; model "final-usage" puts
    the usage object on the last content chunk (finish_reason set), not on a chunk of its own."""

    WORDS = ["alpha ", "beta ", "gamma ", "delta"]
    USAGE = {"prompt_tokens": 6, "completion_tokens": 4, "total_tokens": 10}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body", False):
                break
        body = orjson.loads(raw)
        wants_usage = (body.get("stream_options") or {}).get("include_usage") is True
        base = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": body["model"]}
        events = [
            {
                **base,
                "choices": [
                    {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                ],
            }
        ]
        events += [
            {**base, "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]}
            for w in self.WORDS
        ]
        final = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        if body["model"] == "final-usage":
            if wants_usage:
                final["usage"] = self.USAGE
            events.append(final)
        else:
            events.append(final)
            if wants_usage:
                events.append({**base, "choices": [], "usage": self.USAGE})
        stream = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        step = 7 if body["model"] == "split" else len(stream)
        for i in range(0, len(stream), step):
            await send({"type": "http.response.body", "body": stream[i : i + step], "more_body": True})
            await anyio.sleep(0)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def test_streams_from_other_upstream_shapes_keep_their_content(make_gateway: GatewayFactory) -> None:
    async with run_server(SplittingUpstream()) as mini:
        routes = "\n".join(
            [
                "[upstreams.mini]",
                f'base_url = "{mini.url}/v1"',
                "timeout_s = 5",
                '[routes."mini/split"]',
                'upstream = "mini"',
                'model = "split"',
                "multiplier = 1",
                '[routes."mini/final-usage"]',
                'upstream = "mini"',
                'model = "final-usage"',
                "multiplier = 1",
            ]
        )
        gateway: GatewayHarness = await make_gateway(routes=routes)
        key, _, _ = await setup(gateway)
        client = gateway.openai(key)
        expected_text = "".join(SplittingUpstream.WORDS)
        spent = 0
        for alias in ("mini/split", "mini/final-usage"):
            for asked in (False, True):
                options: Any = {"include_usage": True} if asked else openai.NOT_GIVEN
                stream = await client.chat.completions.create(
                    model=alias, messages=MESSAGES, stream=True, stream_options=options
                )
                chunks = [c async for c in stream]
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                assert text == expected_text, (alias, asked)
                finishes = [
                    c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
                ]
                assert finishes == ["stop"], (alias, asked)  # the final chunk survived
                usages = [c.usage.model_dump() for c in chunks if c.usage is not None]
                if asked:
                    assert len(usages) == 1, (alias, asked)
                    assert usages[0]["charged_quota_tokens"] == 10
                else:
                    assert usages == [], (alias, asked)
                spent += 10  # metered from the upstream's usage either way
                assert FUNDS - await gateway.balance("acme") == spent, (alias, asked)
        await gateway.settled()
        assert await gateway.store.open_holds() == 0
        await gateway.verify()


class CountlessUsageUpstream:
    """Streams content chunks that carry a usage object without counts (as some servers
    send progress stats): the caller must keep every chunk, and the charge is estimated."""

    WORDS = ["one ", "two ", "three"]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body", False):
            pass
        base = {"id": "chatcmpl-y", "object": "chat.completion.chunk", "created": 1, "model": "m"}
        events = [
            {**base, "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}],
             "usage": {"note": "progress"}}
            for w in self.WORDS
        ]
        events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for event in events:
            await send({"type": "http.response.body", "body": b"data: " + orjson.dumps(event) + b"\n\n",
                        "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


async def test_chunks_with_a_countless_usage_object_are_kept_and_estimated(
    make_gateway: GatewayFactory,
) -> None:
    async with run_server(CountlessUsageUpstream()) as mini:
        routes = f'[upstreams.mini]\nbase_url = "{mini.url}/v1"\n[routes."mini/x"]\nupstream = "mini"\nmodel = "m"\n'
        gateway: GatewayHarness = await make_gateway(routes=routes)
        key, _, _ = await setup(gateway)
        stream = await gateway.openai(key).chat.completions.create(
            model="mini/x", messages=MESSAGES, stream=True
        )
        chunks = [c async for c in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "".join(CountlessUsageUpstream.WORDS)
        spent = FUNDS - await gateway.balance("acme")
        assert spent > 0
        rows = await gateway.rows("SELECT estimated, charged FROM requests WHERE route = 'mini/x'")
        assert rows == [(1, spent)]
        await gateway.verify()
