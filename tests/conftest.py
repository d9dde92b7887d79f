"""Shared fixtures: a real fake upstream, a real gateway on uvicorn, a real SQLite file.

`gateway` starts quota-proxy in the test's event loop on 127.0.0.1 in front of the fake
upstream, with a TOML file written to tmp_path (so CLI tests can use the same config).
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
import orjson
import pytest

from quota_proxy import admin
from quota_proxy.app import Gateway, create_app
from quota_proxy.config import Limits, Settings, load_settings
from quota_proxy.runner import run_server
from quota_proxy.store import Account, Store, open_store
from quota_proxy.testing import RunningUpstream, run_fake_upstream


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    """asyncio on uvloop, the loop `quota-proxy serve` runs on."""
    return "asyncio", {"use_uvloop": True}


def closed_port() -> int:
    """A port with nothing listening on it (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config_toml(upstream_url: str, store_path: Path, **overrides: Any) -> str:
    """The test config: routes with multipliers 1, 3 and 0.5, a non-streaming route,
    a community route, and a route to an upstream that is down."""
    billing = overrides.get("billing", {})
    server = overrides.get("server", {})
    funding = overrides.get("funding", {})
    extra_routes = overrides.get("routes", "")
    # The tests read the store from outside the gateway the moment an answer arrives, and
    # the in-process harness blocks its own loop in CLI calls: groups commit at once here
    # (tests/test_group_commit.py covers the wait for a quiet moment).
    store = {"settle_delay_ms": 0, **(overrides.get("store") or {"path": str(store_path)})}
    lines = [
        "[server]",
        *(f"{k} = {_toml(v)}" for k, v in server.items()),
        "[store]",
        *(f"{k} = {_toml(v)}" for k, v in store.items()),
        "[billing]",
        *(f"{k} = {_toml(v)}" for k, v in billing.items()),
        "[funding]",
        *(f"{k} = {_toml(v)}" for k, v in funding.items()),
        "[upstreams.fake]",
        f'base_url = "{upstream_url}"',
        "timeout_s = 5",
        "[upstreams.down]",
        f'base_url = "http://127.0.0.1:{closed_port()}/v1"',
        "timeout_s = 2",
        '[routes."quota/fast"]',
        'upstream = "fake"',
        'model = "fake-fast"',
        "multiplier = 1",
        "max_output_tokens = 64",
        'description = "Quick tasks"',
        '[routes."quota/sonnet"]',
        'upstream = "fake"',
        'model = "fake-sonnet"',
        "multiplier = 3",
        "max_output_tokens = 64",
        '[routes."quota/half"]',
        'upstream = "fake"',
        'model = "fake-half"',
        "multiplier = 0.5",
        "max_output_tokens = 64",
        '[routes."quota/opus"]',
        'upstream = "fake"',
        'model = "fake-opus"',
        "multiplier = 8",
        "stream = false",
        "max_output_tokens = 64",
        '[routes."quota/community"]',
        'upstream = "fake"',
        'model = "fake-community"',
        "multiplier = 1",
        'tier = "community"',
        "max_output_tokens = 64",
        '[routes."quota/down"]',
        'upstream = "down"',
        'model = "nothing"',
        "multiplier = 1",
        "max_output_tokens = 64",
        extra_routes,
        "[[packages]]",
        'id = "starter"',
        'name = "Starter"',
        "price_usd = 5",
        "quota_tokens = 5_000_000",
        "[[packages]]",
        'id = "pro"',
        'name = "Pro"',
        "price_usd = 20",
        "quota_tokens = 22_000_000",
        overrides.get("extra", ""),  # whole tables appended as written, e.g. [payments.stripe]
    ]
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return orjson.dumps(value).decode()
    return str(value)


@dataclass
class GatewayHarness:
    """A running gateway and the handles a test needs to drive and inspect it."""

    settings: Settings
    config_path: Path
    app: Gateway
    url: str
    upstream: RunningUpstream
    _clients: list[Any] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def store(self) -> Store:
        return self.app.store

    async def account(self, name: str = "acme", quota_tokens: int = 1_000_000) -> Account:
        await admin.create_account(self.store, self.settings, name, quota_tokens or None)
        return await admin.developer(self.store, name)

    async def key(self, account: str = "acme", kind: str = "live", **options: Any) -> str:
        data = await admin.create_key(
            self.store,
            self.settings,
            account,
            kind,
            options.get("name", ""),
            options.get("routes"),
            options.get("allow_community", True),
            options.get("expires"),
            Limits(options.get("rpm"), options.get("tpm"), options.get("max_concurrent")),
        )
        return str(data["key"])

    def openai(self, key: str) -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=30)
        self._clients.append(client)
        return client

    def http(self) -> httpx.AsyncClient:
        client = httpx.AsyncClient(base_url=self.url, timeout=30)
        self._clients.append(client)
        return client

    async def settled(self) -> None:
        """Settlements commit in groups just after the reply went out: wait for this
        gateway's to commit before reading around the store (the store's own reads do)."""
        writer = getattr(self.store, "settlements", None)
        if writer is not None:
            await writer.drain()

    async def balance(self, name: str = "acme", user: str | None = None) -> int:
        await self.settled()
        account = await admin.developer(self.store, name)
        if user is not None:
            account = await admin.app_user(self.store, account, user)
        fresh = await self.store.account(account.id)
        assert fresh is not None
        return fresh.balance

    async def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Rows read around the store, as an operator's database shell would (`?` placeholders)."""
        return [tuple(r) for r in await self._fetch(sql, params)]

    async def dict_rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        return [dict(r) for r in await self._fetch(sql, params)]

    async def _fetch(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        store = self.settings.store
        await self.settled()
        if store.url is None:
            db = self.store.db  # type: ignore[attr-defined]
            db.row_factory = sqlite3.Row
            try:
                return list(await db.execute_fetchall(sql, params))
            finally:
                db.row_factory = None
        numbered = iter(range(1, len(params) + 1))
        conn = await asyncpg.connect(store.url)
        try:
            return list(await conn.fetch(re.sub(r"\?", lambda _: f"${next(numbered)}", sql), *params))
        finally:
            await conn.close()

    async def verify(self) -> None:
        await self.settled()
        assert await self.store.verify_ledger() == []

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_cli("--config", str(self.config_path), *args, check=check)


def run_cli(*args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "quota_proxy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"quota-proxy {' '.join(args)} failed: {result.stderr}")
    return result


GatewayFactory = Callable[..., Any]


@pytest.fixture
async def upstream() -> AsyncIterator[RunningUpstream]:
    async with run_fake_upstream() as running:
        yield running


@pytest.fixture
async def make_gateway(tmp_path: Path, upstream: RunningUpstream) -> AsyncIterator[GatewayFactory]:
    """Start a gateway with optional config overrides: `await make_gateway(billing={...})`."""
    async with AsyncExitStack() as stack:
        count = 0

        async def start(**overrides: Any) -> GatewayHarness:
            nonlocal count
            count += 1
            config_path = tmp_path / f"quota-proxy-{count}.toml"
            store_path = tmp_path / f"quota-{count}.db"
            if "store" not in overrides and os.environ.get("QUOTA_TEST_STORE") == "postgres":
                # The whole gateway suite on PostgreSQL: QUOTA_TEST_STORE=postgres pytest …
                from tests.pgserver import fresh_database

                url = await stack.enter_async_context(fresh_database("gw"))
                overrides["store"] = {"url": url, "pool_size": 4}
            wrap = overrides.pop("wrap_store", None)
            config_path.write_text(config_toml(upstream.base_url, store_path, **overrides))
            settings = load_settings(config_path)
            # wrap_store: a library user's own Store around the configured one.
            app = create_app(settings, store=wrap(open_store(settings.store)) if wrap else None)
            # A test that needs the URL up front (public_url) names the port; else a free one.
            port = overrides.get("server", {}).get("port", 0)
            server = await stack.enter_async_context(run_server(app, lifespan="on", port=port))
            harness = GatewayHarness(settings, config_path, app, server.url, upstream)
            stack.push_async_callback(_close_clients, harness)
            return harness

        yield start


async def _close_clients(harness: GatewayHarness) -> None:
    for client in harness._clients:
        if isinstance(client, httpx.AsyncClient):
            await client.aclose()
        else:
            await client.close()


@pytest.fixture
async def store_overrides() -> AsyncIterator[dict[str, Any]]:
    """config_toml overrides for the engine under test, for tests that write their own config
    (several processes, restarts): none on SQLite; a fresh database with QUOTA_TEST_STORE=postgres."""
    if os.environ.get("QUOTA_TEST_STORE") != "postgres":
        yield {}
        return
    from tests.pgserver import fresh_database

    async with fresh_database("procs") as url:
        yield {"store": {"url": url, "pool_size": 4}}


@pytest.fixture
async def gateway(make_gateway: GatewayFactory) -> GatewayHarness:
    harness: GatewayHarness = await make_gateway()
    return harness
