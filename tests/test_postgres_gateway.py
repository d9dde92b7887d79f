"""The gateway on PostgreSQL fails closed: while the database is away an inference request
is a JSON 503 store_unavailable and nothing reaches the upstream; /readyz says so; when the
database is back the same gateway serves again, by itself."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.conftest import GatewayFactory
from tests.pgserver import allow_connections, fresh_database

pytestmark = pytest.mark.anyio

CHAT = {"model": "quota/fast", "messages": [{"role": "user", "content": "one two"}]}


@pytest.fixture
async def database() -> AsyncIterator[str]:
    async with fresh_database("failclosed") as url:
        yield url


async def test_an_outage_fails_closed_and_heals(make_gateway: GatewayFactory, database: str) -> None:
    gateway = await make_gateway(store={"url": database, "pool_size": 2, "connect_timeout_s": 2})
    await gateway.account("acme", 1_000_000)
    auth = {"authorization": f"Bearer {await gateway.key('acme')}"}
    http = gateway.http()
    assert (await http.post("/v1/chat/completions", json=CHAT, headers=auth)).status_code == 200
    forwarded = len(gateway.upstream.app.requests)

    name = database.rpartition("/")[2]
    await allow_connections(name, False)
    try:
        refused = [await http.post("/v1/chat/completions", json=CHAT, headers=auth) for _ in range(3)]
        ready = await http.get("/readyz")
    finally:
        await allow_connections(name, True)
    for response in refused:
        assert response.status_code == 503, response.text
        error: dict[str, Any] = response.json()["error"]
        assert (error["code"], error["type"]) == ("store_unavailable", "api_error")
        assert response.headers["x-quota-request-id"]
    assert ready.status_code == 503 and ready.json()["error"]["code"] == "store_unavailable"
    assert len(gateway.upstream.app.requests) == forwarded  # nothing forwarded unmetered

    healed = await http.post("/v1/chat/completions", json=CHAT, headers=auth)
    assert healed.status_code == 200, healed.text
    assert (await http.get("/readyz")).status_code == 200
    await gateway.verify()
