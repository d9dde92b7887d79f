from __future__ import annotations

import base64
import os
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import openai
import orjson
import pytest
from openai import AsyncOpenAI

from quota_proxy.testing import HUGE_WORDS, FakeUpstreamOptions, RunningUpstream, run_fake_upstream

REPO = Path(__file__).resolve().parent.parent
EIGHT_WORDS = "hello world this is a fake reply from"


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def upstream() -> AsyncIterator[RunningUpstream]:
    async with run_fake_upstream() as running:
        yield running


@pytest.fixture
def fake(upstream: RunningUpstream) -> RunningUpstream:
    upstream.app.reset()
    return upstream


@pytest.fixture
async def client(fake: RunningUpstream) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=fake.base_url, api_key="x", max_retries=0) as sdk:
        yield sdk


@pytest.fixture
async def http(fake: RunningUpstream) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=fake.url, timeout=5) as raw:
        yield raw


async def sse_data(http: httpx.AsyncClient, path: str, body: dict[str, Any]) -> list[str]:
    async with http.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]


async def eventually(predicate: Callable[[], bool]) -> None:
    with anyio.fail_after(3):
        while not predicate():
            await anyio.sleep(0.01)


USER = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say hi now"}]


@pytest.mark.anyio
async def test_chat_reply_has_openai_shape_and_deterministic_usage(
    client: AsyncOpenAI, fake: RunningUpstream
) -> None:
    reply = await client.chat.completions.create(model="some-model", messages=USER)  # type: ignore[arg-type]

    assert reply.id.startswith("chatcmpl-")
    assert reply.object == "chat.completion"
    assert reply.model == "some-model"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == EIGHT_WORDS
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (2 + 3 + 3 + 3, 8)
    assert reply.usage.total_tokens == 19
    [recorded] = fake.app.requests
    assert (recorded.method, recorded.path) == ("POST", "/v1/chat/completions")
    assert recorded.headers["authorization"] == "Bearer x"
    assert recorded.body["messages"] == USER


@pytest.mark.anyio
async def test_prompt_counts_text_parts_and_can_be_overridden(http: httpx.AsyncClient) -> None:
    parts = [{"type": "text", "text": "one two"}, {"type": "image_url", "image_url": {"url": "x y z"}}]
    body = {"model": "m", "messages": [{"role": "user", "content": parts}]}
    assert (await http.post("/v1/chat/completions", json=body)).json()["usage"]["prompt_tokens"] == 5

    body["fake"] = {"prompt_tokens": 1234, "reply_words": 2}
    usage = (await http.post("/v1/chat/completions", json=body)).json()["usage"]
    assert usage == {"prompt_tokens": 1234, "completion_tokens": 2, "total_tokens": 1236}


@pytest.mark.anyio
async def test_stream_without_include_usage_is_openais_exact_sequence(http: httpx.AsyncClient) -> None:
    body = {"model": "m", "messages": USER, "stream": True, "fake": {"reply_words": 3}}
    events = await sse_data(http, "/v1/chat/completions", body)

    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["delta"] for c in chunks] == [
        {"role": "assistant", "content": ""},
        {"content": "hello "},
        {"content": "world "},
        {"content": "this"},
        {},
    ]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, None, "stop"]
    assert all("usage" not in c and c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1


@pytest.mark.anyio
async def test_stream_with_include_usage_ends_with_a_usage_only_chunk(
    client: AsyncOpenAI, http: httpx.AsyncClient, fake: RunningUpstream
) -> None:
    body = {
        "model": "m",
        "messages": USER,
        "stream": True,
        "stream_options": {"include_usage": True},
        "fake": {"reply_words": 2},
    }
    events = await sse_data(http, "/v1/chat/completions", body)
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]" and len(chunks) == 5
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}

    stream = await client.chat.completions.create(
        model="m",
        messages=USER,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    sdk_chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in sdk_chunks if c.choices)
    assert text == EIGHT_WORDS
    assert sdk_chunks[-1].usage is not None and sdk_chunks[-1].usage.completion_tokens == 8
    assert fake.app.stats["streams_started"] == fake.app.stats["streams_completed"] == 2


@pytest.mark.anyio
async def test_no_usage_behaves_like_an_old_server(http: httpx.AsyncClient) -> None:
    for fake in ({"include_usage": False}, {"fail": "no_usage"}):
        body = {"model": "m", "messages": USER, "fake": fake}
        assert "usage" not in (await http.post("/v1/chat/completions", json=body)).json()
        body |= {"stream": True, "stream_options": {"include_usage": True}}
        events = await sse_data(http, "/v1/chat/completions", body)
        assert events[-1] == "[DONE]"
        assert all("usage" not in orjson.loads(e) for e in events[:-1])
        assert orjson.loads(events[-2])["choices"][0]["finish_reason"] == "stop"


@pytest.mark.anyio
async def test_chunks_arrive_as_they_are_produced(client: AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="m",
        messages=USER,  # type: ignore[arg-type]
        stream=True,
        extra_body={"fake": {"chunk_delay_s": 0.2, "reply_words": 2}},
    )
    arrivals = [time.monotonic() async for _ in stream]
    assert len(arrivals) == 4
    assert arrivals[1] - arrivals[0] >= 0.15
    assert arrivals[2] - arrivals[1] >= 0.15


@pytest.mark.anyio
async def test_first_byte_delay(client: AsyncOpenAI) -> None:
    started = time.monotonic()
    await client.chat.completions.create(
        model="m",
        messages=USER,  # type: ignore[arg-type]
        extra_body={"fake": {"first_byte_delay_s": 0.2}},
    )
    assert time.monotonic() - started >= 0.2


@pytest.mark.anyio
async def test_max_tokens_cuts_the_reply_with_finish_reason_length(
    client: AsyncOpenAI, http: httpx.AsyncClient
) -> None:
    reply = await client.chat.completions.create(model="m", messages=USER, max_tokens=3)  # type: ignore[arg-type]
    assert reply.choices[0].message.content == "hello world this"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 3

    body = {"model": "m", "messages": USER, "stream": True, "max_completion_tokens": 2}
    chunks = [orjson.loads(e) for e in (await sse_data(http, "/v1/chat/completions", body))[:-1]]
    assert [c["choices"][0]["delta"].get("content") for c in chunks] == ["", "hello ", "world", None]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.anyio
async def test_legacy_completions(client: AsyncOpenAI, http: httpx.AsyncClient) -> None:
    reply = await client.completions.create(model="legacy", prompt=["one two", "three"], max_tokens=4)
    assert reply.id.startswith("cmpl-") and reply.object == "text_completion"
    assert reply.model == "legacy"
    assert reply.choices[0].text == "hello world this is"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (3, 4)

    body = {"model": "legacy", "prompt": "a b", "stream": True, "stream_options": {"include_usage": True}}
    events = await sse_data(http, "/v1/completions", body | {"fake": {"reply_words": 2}})
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["text"] for c in chunks[:-1]] == ["hello ", "world", ""]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}


@pytest.mark.anyio
async def test_embeddings_in_float_and_base64(client: AsyncOpenAI, http: httpx.AsyncClient) -> None:
    reply = await client.embeddings.create(model="emb", input=["one two three", "four"])
    assert reply.model == "emb" and reply.usage.prompt_tokens == reply.usage.total_tokens == 4
    assert [d.index for d in reply.data] == [0, 1]
    assert all(len(d.embedding) == 8 for d in reply.data)

    raw = (await http.post("/v1/embeddings", json={"model": "emb", "input": "one two three"})).json()
    assert raw["object"] == "list" and raw["data"][0]["object"] == "embedding"
    assert raw["data"][0]["embedding"] == reply.data[0].embedding
    assert raw["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    body = {"model": "emb", "input": "one two three", "encoding_format": "base64"}
    packed = (await http.post("/v1/embeddings", json=body)).json()["data"][0]["embedding"]
    assert list(struct.unpack("<8f", base64.b64decode(packed))) == reply.data[0].embedding


@pytest.mark.anyio
async def test_models(client: AsyncOpenAI) -> None:
    models = [m.id async for m in client.models.list()]
    assert models == ["fake-chat", "fake-embedding"]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "error_type", "code"),
    [
        (400, "invalid_request_error", "context_length_exceeded"),
        (429, "requests", "rate_limit_exceeded"),
        (500, "server_error", None),
        (503, "server_error", None),
    ],
)
async def test_fail_with_status(
    http: httpx.AsyncClient, status: int, error_type: str, code: str | None
) -> None:
    body = {"model": "m", "messages": USER, "stream": True, "fake": {"fail": f"status:{status}"}}
    response = await http.post("/v1/chat/completions", json=body)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert (error["type"], error["code"]) == (error_type, code) and error["message"]
    assert response.headers.get("retry-after") == ("1" if status == 429 else None)


@pytest.mark.anyio
async def test_sdk_sees_fail_status_as_its_own_errors(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(
            model="m",
            messages=USER,  # type: ignore[arg-type]
            extra_body={"fake": {"fail": "status:400"}},
        )
    assert caught.value.code == "context_length_exceeded"
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(
            model="m",
            messages=USER,  # type: ignore[arg-type]
            extra_body={"fake": {"fail": "status:429"}},
        )


@pytest.mark.anyio
async def test_malformed_and_empty_bodies(http: httpx.AsyncClient) -> None:
    body = {"model": "m", "messages": USER, "fake": {"fail": "malformed"}}
    response = await http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(response.content)

    body["fake"] = {"fail": "empty"}
    response = await http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200 and response.content == b""


@pytest.mark.anyio
async def test_reset_mid_stream_is_a_read_error_not_a_clean_end(
    http: httpx.AsyncClient, fake: RunningUpstream
) -> None:
    body = {"model": "m", "messages": USER, "stream": True, "stream_options": {"include_usage": True}}
    body["fake"] = {"fail": "reset_mid_stream"}
    received: list[str] = []
    with pytest.raises(httpx.RemoteProtocolError):
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                received.append(line)
    data = [line for line in received if line.startswith("data: ")]
    assert len(data) == 2 and "[DONE]" not in "".join(data) and '"usage":{' not in "".join(data)
    assert fake.app.stats["streams_started"] == 1 and fake.app.stats["streams_completed"] == 0

    with pytest.raises(httpx.RemoteProtocolError):
        await http.post("/v1/chat/completions", json=body | {"stream": False})


@pytest.mark.anyio
async def test_stall_after_headers_until_the_client_leaves(fake: RunningUpstream) -> None:
    body = {"model": "m", "messages": USER, "stream": True, "fake": {"fail": "stall_after_headers"}}
    received: list[str] = []
    async with httpx.AsyncClient(base_url=fake.url, timeout=httpx.Timeout(5, read=0.3)) as http:
        with pytest.raises(httpx.ReadTimeout):
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    received.append(line)
    [first] = [line for line in received if line]
    assert orjson.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
    await eventually(lambda: fake.app.stats["streams_cancelled"] == 1)
    assert fake.app.stats["streams_completed"] == 0

    async with (
        httpx.AsyncClient(base_url=fake.url, timeout=httpx.Timeout(5, read=0.2)) as http,
        http.stream("POST", "/v1/chat/completions", json=body | {"stream": False}) as response,
    ):
        assert response.status_code == 200
        with pytest.raises(httpx.ReadTimeout):
            await response.aread()


@pytest.mark.anyio
async def test_malformed_sse(http: httpx.AsyncClient) -> None:
    body = {"model": "m", "messages": USER, "stream": True, "fake": {"fail": "malformed_sse"}}
    events = await sse_data(http, "/v1/chat/completions", body)
    assert len(events) == 4 and events[2:] == ["{not json", "[DONE]"]
    assert [orjson.loads(e)["object"] for e in events[:2]] == ["chat.completion.chunk"] * 2


@pytest.mark.anyio
async def test_huge_reply(http: httpx.AsyncClient) -> None:
    body = {"model": "m", "messages": USER, "max_tokens": 5, "fake": {"fail": "huge"}}
    response = await http.post("/v1/chat/completions", json=body)
    reply = response.json()
    content = reply["choices"][0]["message"]["content"]
    assert len(response.content) > 5_000_000
    assert reply["usage"]["completion_tokens"] == len(content.split()) == HUGE_WORDS


@pytest.mark.anyio
async def test_client_disconnect_is_counted_as_cancelled(client: AsyncOpenAI, fake: RunningUpstream) -> None:
    stream = await client.chat.completions.create(
        model="m",
        messages=USER,  # type: ignore[arg-type]
        stream=True,
        extra_body={"fake": {"chunk_delay_s": 0.05, "reply_words": 200}},
    )
    received = 0
    async for _ in stream:
        received += 1
        if received == 3:
            break
    await stream.close()
    await eventually(lambda: fake.app.stats["streams_cancelled"] == 1)
    assert fake.app.stats["streams_completed"] == 0
    assert fake.app.requests[0].body["fake"] == {"chunk_delay_s": 0.05, "reply_words": 200}


@pytest.mark.anyio
async def test_control_endpoints(http: httpx.AsyncClient) -> None:
    await http.post("/v1/chat/completions", json={"model": "m", "messages": USER, "stream": True})
    recorded = (await http.get("/_fake/requests")).json()
    assert [(r["method"], r["path"], r["body"]["stream"]) for r in recorded] == [
        ("POST", "/v1/chat/completions", True)
    ]
    stats = (await http.get("/_fake/stats")).json()
    assert stats == {"requests": 1, "streams_started": 1, "streams_completed": 1, "streams_cancelled": 0}
    assert (await http.post("/_fake/reset")).json() == {"ok": True}
    assert (await http.get("/_fake/requests")).json() == []
    assert (await http.get("/_fake/stats")).json()["requests"] == 0


@pytest.mark.anyio
async def test_bad_requests_get_openai_errors(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/nope", json={})
    assert response.status_code == 404 and response.json()["error"]["type"] == "invalid_request_error"
    assert (await http.get("/v1/chat/completions")).status_code == 405
    response = await http.post("/v1/chat/completions", content=b"{not json")
    assert response.status_code == 400 and "parse the JSON" in response.json()["error"]["message"]
    response = await http.post("/v1/chat/completions", json={"model": "m", "fake": {"fail": "typo"}})
    assert response.status_code == 400 and "typo" in response.json()["error"]["message"]


@pytest.mark.anyio
async def test_api_key_is_enforced_when_set() -> None:
    async with run_fake_upstream(FakeUpstreamOptions(api_key="sekrit")) as running:
        async with AsyncOpenAI(base_url=running.base_url, api_key="wrong", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError) as caught:
                await bad.models.list()
            assert caught.value.code == "invalid_api_key"
        async with AsyncOpenAI(base_url=running.base_url, api_key="sekrit", max_retries=0) as good:
            assert len([m async for m in good.models.list()]) == 2


def test_module_entry_point_prints_ready_and_serves() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "FAKE_KEY": "k-123"}
    command = [sys.executable, "-m", "quota_proxy.testing", "--port", "0", "--no-usage"]
    command += ["--reply-words", "3", "--api-key-env", "FAKE_KEY"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env) as proc:
        watchdog = threading.Timer(10, proc.kill)
        watchdog.start()
        try:
            assert proc.stdout is not None
            ready = proc.stdout.readline().split()
            assert ready[0] == "FAKE_UPSTREAM_READY" and ready[1].startswith("http://127.0.0.1:")
            headers = {"authorization": "Bearer k-123"}
            body = {"model": "m", "messages": USER}
            reply = httpx.post(f"{ready[1]}/chat/completions", json=body, headers=headers).json()
            assert reply["choices"][0]["message"]["content"] == "hello world this"
            assert "usage" not in reply
            proc.terminate()
            assert proc.wait(5) == 0
            assert proc.stdout.read() == ""
        finally:
            watchdog.cancel()


@pytest.mark.anyio
async def test_small_responses_do_not_wait_for_delayed_acks(http: httpx.AsyncClient) -> None:
    started = time.monotonic()
    for _ in range(20):
        await http.get("/v1/models")
    assert time.monotonic() - started < 0.4
