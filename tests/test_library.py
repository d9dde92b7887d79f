"""quota_proxy as a library (SPEC §7): the public names, and the authentication and
metering middleware wrapped around an ASGI app of our own, served by uvicorn."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

import quota_proxy
from quota_proxy import (
    AuthMiddleware,
    HoldKeeper,
    KeyCache,
    MeteringMiddleware,
    RouteTable,
    Settings,
    Store,
    StoreSettings,
    admin,
    create_app,
    parse_settings,
)
from quota_proxy.context import RequestContextMiddleware
from quota_proxy.runner import run_server

pytestmark = pytest.mark.anyio

PUBLIC_NAMES = {
    "AuthMiddleware",
    "Billing",
    "ConfigError",
    "Gateway",
    "HoldKeeper",
    "KeyCache",
    "MeteringMiddleware",
    "Route",
    "RouteTable",
    "Settings",
    "Store",
    "StoreSettings",
    "Upstream",
    "create_app",
    "load_settings",
    "open_store",
    "parse_settings",
}
USAGE = {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
REPLY_TEXT = "served by my own model"


async def test_public_names() -> None:
    assert set(quota_proxy.__all__) == PUBLIC_NAMES
    for name in quota_proxy.__all__:
        assert getattr(quota_proxy, name) is not None, name
    assert isinstance(quota_proxy.__version__, str)
    assert (Path(quota_proxy.__file__).parent / "py.typed").exists()
    assert callable(create_app)


class MyModelServer:
    """A small pure-ASGI OpenAI-compatible app: a fixed chat completion, whole or streamed."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        if (scope["method"], scope["path"]) != ("POST", "/v1/chat/completions"):
            await self._send(send, 404, b'{"error": {"message": "no"}}', b"application/json")
            return
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body", False):
                break
        body = orjson.loads(raw)
        self.bodies.append(body)
        base = {"id": "chatcmpl-mine", "created": 1, "model": body["model"]}
        if not body.get("stream"):
            reply = {
                **base,
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": REPLY_TEXT},
                        "finish_reason": "stop",
                    }
                ],
                "usage": USAGE,
            }
            await self._send(send, 200, orjson.dumps(reply), b"application/json")
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        chunk = {**base, "object": "chat.completion.chunk"}
        events = [
            {
                **chunk,
                "choices": [
                    {"index": 0, "delta": {"role": "assistant", "content": REPLY_TEXT}, "finish_reason": None}
                ],
            },
            {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        ]
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append({**chunk, "choices": [], "usage": USAGE})
        for event in events:
            data = b"data: " + orjson.dumps(event) + b"\n\n"
            await send({"type": "http.response.body", "body": data, "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    @staticmethod
    async def _send(send: Any, status: int, body: bytes, content_type: bytes) -> None:
        await send(
            {"type": "http.response.start", "status": status, "headers": [(b"content-type", content_type)]}
        )
        await send({"type": "http.response.body", "body": body})


def settings_for(tmp_path: Path) -> Settings:
    return parse_settings(
        {
            "store": {"path": str(tmp_path / "library.db")},
            "upstreams": {"mine": {"base_url": "http://127.0.0.1:9/v1"}},  # never called
            "routes": {
                "lib/fast": {
                    "upstream": "mine",
                    "model": "my-model",
                    "multiplier": 2,
                    "max_output_tokens": 100,
                },
            },
        }
    )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with quota_proxy.open_store(StoreSettings(path=tmp_path / "library.db")) as opened:
        yield opened


async def test_metering_middleware_wraps_my_own_app(tmp_path: Path, store: Store) -> None:
    settings = settings_for(tmp_path)
    await admin.create_account(store, settings, "acme", 10_000)
    await admin.create_account(store, settings, "broke", None)
    key = (await admin.create_key(store, settings, "acme", "live", "", None, True, None))["key"]
    broke_key = (await admin.create_key(store, settings, "broke", "live", "", None, True, None))["key"]

    inner = MyModelServer()
    routes = RouteTable(settings.routes)
    keeper = HoldKeeper(store, settings, owner="library-test")
    metered = MeteringMiddleware(inner, store, settings, routes, keeper)
    app = RequestContextMiddleware(AuthMiddleware(metered, KeyCache(store)))

    async with keeper.running(), run_server(app) as server:
        base_url = f"{server.url}/v1"
        async with openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=10) as client:
            raw = await client.chat.completions.with_raw_response.create(
                model="lib/fast", messages=[{"role": "user", "content": "hello"}]
            )
            reply = raw.parse()
            assert raw.headers["x-quota-request-id"].startswith("req_")
            assert reply.choices[0].message.content == REPLY_TEXT
            assert reply.usage is not None
            usage = reply.usage.model_dump()
            assert usage["input_tokens"] == 7
            assert usage["output_tokens"] == 5
            assert usage["route_multiplier"] == "x2"
            assert usage["charged_quota_tokens"] == math.ceil(12 * 2) == 24
            # The middleware rewrote the alias and capped the output before my app saw it.
            assert inner.bodies[-1]["model"] == "my-model"
            assert inner.bodies[-1]["max_tokens"] == 100

            stream = await client.chat.completions.create(
                model="lib/fast", messages=[{"role": "user", "content": "hello"}], stream=True
            )
            chunks = [c async for c in stream]
            assert all(c.usage is None for c in chunks)  # the caller did not ask for usage
            assert "".join(c.choices[0].delta.content or "" for c in chunks) == REPLY_TEXT
            assert inner.bodies[-1]["stream_options"] == {"include_usage": True}

        account = await store.account_by_name("acme")
        assert account is not None
        assert account.balance == 10_000 - 24 - 24
        assert account.held == 0
        assert await store.verify_ledger() == []

        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            unauthenticated = await http.post(
                "/v1/chat/completions",
                json={"model": "lib/fast", "messages": [{"role": "user", "content": "x"}]},
            )
            assert unauthenticated.status_code == 401
            assert unauthenticated.json()["error"]["code"] == "invalid_api_key"
            broke = await http.post(
                "/v1/chat/completions",
                json={"model": "lib/fast", "messages": [{"role": "user", "content": "x"}]},
                headers={"authorization": f"Bearer {broke_key}"},
            )
            assert broke.status_code == 402
            assert broke.json()["error"]["code"] == "insufficient_balance"
            unknown = await http.post(
                "/v1/chat/completions",
                json={"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]},
                headers={"authorization": f"Bearer {key}"},
            )
            assert unknown.status_code == 404
            assert "lib/fast" in unknown.json()["error"]["message"]
    assert len(inner.bodies) == 2  # refused requests never reached my app
