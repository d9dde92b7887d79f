"""Low-balance alerts (issue 13): one signed POST per downward crossing, retried with backoff,
recorded so that a restart neither resends nor loses one; app users' balances alert to their
developer's URL. Gateways are real (in-process on uvicorn, or `quota-proxy serve` processes
killed and restarted); the receiver is a small HTTP server in the test."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson
import pytest

from quota_proxy.alerts import SIGNATURE_HEADER, backoff_s, sign, verify
from tests.conftest import GatewayHarness, closed_port, config_toml, run_cli

pytestmark = pytest.mark.anyio

USD = 1_000_000
FAST_ALERTS = "[alerts]\npoll_interval_s = 0.1\nretry_base_s = 0.2\ntimeout_s = 1\n"


@dataclass
class Receiver:
    """An HTTP endpoint that records what it is sent and answers `status`."""

    status: int = 200
    received: list[tuple[int, dict[str, str], bytes]] = field(default_factory=list)
    url: str = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            status = self.status
            self.received.append((status, headers, body))
            writer.write(f"HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".encode())
            await writer.drain()
        finally:
            writer.close()

    def delivered(self) -> list[dict[str, Any]]:
        return [orjson.loads(body) for status, _, body in self.received if status == 200]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    server = await asyncio.start_server(rec.handle, "127.0.0.1", 0)
    rec.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hooks/quota"
    async with server:
        yield rec
        server.close()


async def until(predicate: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


# -- pure parts ----------------------------------------------------------------------------


def test_signature_is_hmac_sha256_over_timestamp_dot_body() -> None:
    import hashlib
    import hmac

    body = b'{"id":"alrt_1"}'
    header = sign("qpsec_x", 1_700_000_000, body)
    expected = hmac.new(b"qpsec_x", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={expected}"
    now = int(time.time())
    assert verify("qpsec_x", sign("qpsec_x", now, body), body)
    assert not verify("qpsec_y", sign("qpsec_x", now, body), body)
    assert not verify("qpsec_x", sign("qpsec_x", now, body), body + b" ")
    assert not verify("qpsec_x", sign("qpsec_x", now - 600, body), body)


def test_backoff_doubles_and_is_capped() -> None:
    assert [backoff_s(n, 30) for n in (1, 2, 3)] == [30, 60, 120]
    assert backoff_s(40, 30) == 6 * 3600


# -- settings ---------------------------------------------------------------------------------


async def test_alert_settings_endpoint(gateway: GatewayHarness) -> None:
    h = gateway
    await h.account("acme", 10 * USD)
    secret, live = await h.key("acme", kind="secret"), await h.key("acme")
    http = h.http()
    empty = await http.get("/v1/alerts", headers=auth(secret))
    assert empty.status_code == 200 and empty.json()["webhook_url"] is None
    body = {"webhook_url": "https://example.com/hook", "thresholds": [5, "$1.50"], "user_thresholds": [0.25]}
    saved = await http.put("/v1/alerts", json=body, headers=auth(secret))
    assert saved.status_code == 200, saved.text
    data = saved.json()
    assert [t["amount_quota_tokens"] for t in data["thresholds"]] == [5 * USD, 1_500_000]
    assert [t["amount"] for t in data["user_thresholds"]] == ["$0.25"]
    assert data["signing_secret"].startswith("qpsec_")
    again = await http.put("/v1/alerts", json={**body, "thresholds": [2]}, headers=auth(secret))
    assert again.json()["signing_secret"] == data["signing_secret"]  # kept across updates
    for bad in ({"webhook_url": "ftp://x"}, {**body, "thresholds": [-1]}, {**body, "thresholds": "5"},
                {**body, "thresholds": [0.0000001]}, {**body, "extra": 1}):
        response = await http.put("/v1/alerts", json=bad, headers=auth(secret))
        assert response.status_code == 400, (bad, response.text)
        assert response.json()["error"]["code"] == "bad_request"
    assert (await http.put("/v1/alerts", json=body, headers=auth(live))).status_code == 403


# -- delivery ---------------------------------------------------------------------------------


async def test_an_app_users_crossing_alerts_the_developers_url(
    make_gateway: Any, receiver: Receiver
) -> None:
    h: GatewayHarness = await make_gateway(extra=FAST_ALERTS)
    await h.account("acme", 10 * USD)
    secret = await h.key("acme", kind="secret")
    http = h.http()
    settings = await http.put(
        "/v1/alerts", headers=auth(secret),
        json={"webhook_url": receiver.url, "thresholds": [1], "user_thresholds": [0.0001]},
    )
    signing_secret = settings.json()["signing_secret"]
    # The user gets 100 quota tokens ($0.0001): at the threshold, not below it.
    grant = await http.post(
        "/v1/funding/grant", headers=auth(secret), json={"external_user_id": "alice", "amount": 0.0001}
    )
    assert grant.status_code == 200, grant.text
    reply = await http.post(
        "/v1/users/alice/chat/completions", headers=auth(secret),
        json={"model": "quota/fast", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    )
    assert reply.status_code == 200, reply.text
    await until(lambda: len(receiver.delivered()) >= 1)
    await asyncio.sleep(0.5)  # more polls: nothing else is sent
    assert len(receiver.received) == 1
    status, headers, body = receiver.received[0]
    assert verify(signing_secret, headers[SIGNATURE_HEADER.lower()], body)
    event = orjson.loads(body)
    assert event["type"] == "balance.low" and event["id"].startswith("alrt_")
    data = event["data"]
    assert data["account"] == "acme" and data["external_user_id"] == "alice"
    assert data["threshold_quota_tokens"] == 100 and data["balance_before_quota_tokens"] == 100
    assert data["balance_quota_tokens"] < 100
    assert data["balance_quota_tokens"] == await h.balance("acme", user="alice")
    await h.verify()


def _serve(config: Path, port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "quota_proxy", "serve", "--config", str(config), "--port", str(port),
         "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


async def _ready(url: str, proc: subprocess.Popen[str]) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(300):
            if proc.poll() is not None:
                raise AssertionError(f"serve exited: {proc.stderr.read() if proc.stderr else ''}")
            try:
                if (await client.get(f"{url}/readyz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError("serve did not become ready")


def _kill(proc: subprocess.Popen[str], sig: int) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, sig)
    proc.wait(timeout=30)
    if proc.stderr is not None:
        proc.stderr.close()


async def test_an_alert_fires_once_per_crossing_and_survives_a_restart(
    tmp_path: Path, upstream: Any, receiver: Receiver, store_overrides: dict[str, Any]
) -> None:
    config = tmp_path / "quota-proxy.toml"
    config.write_text(config_toml(upstream.base_url, tmp_path / "quota.db", extra=FAST_ALERTS, **store_overrides))

    def cli(*args: str) -> Any:
        return json.loads(run_cli("--config", str(config), *args, "--json").stdout)

    await anyio.to_thread.run_sync(lambda: cli("accounts", "create", "acme", "--usd", "10"))
    secret = (await anyio.to_thread.run_sync(lambda: cli("keys", "create", "--account", "acme", "--kind", "secret")))["key"]
    port = closed_port()
    url = f"http://127.0.0.1:{port}"
    receiver.status = 500  # the developer's endpoint is down at first

    first = _serve(config, port)
    try:
        await _ready(url, first)
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            saved = await http.put(
                "/v1/alerts", headers=auth(secret), json={"webhook_url": receiver.url, "thresholds": [5, 2]}
            )
            assert saved.status_code == 200, saved.text
            # $10 -> $4 crosses $5 (not $2).
            grant = await http.post(
                "/v1/funding/grant", headers=auth(secret), json={"external_user_id": "u1", "amount": 6}
            )
            assert grant.status_code == 200, grant.text
        await until(lambda: len(receiver.received) >= 2)  # tried, failed, retried
    finally:
        _kill(first, signal.SIGKILL)  # no chance to tidy up
    failed_ids = {orjson.loads(body)["id"] for _, _, body in receiver.received}
    assert len(failed_ids) == 1

    receiver.status = 200
    second = _serve(config, port)
    try:
        await _ready(url, second)
        await until(lambda: len(receiver.delivered()) >= 1)
        await asyncio.sleep(1.0)
    finally:
        _kill(second, signal.SIGTERM)
    delivered = receiver.delivered()
    assert len(delivered) == 1, delivered
    assert delivered[0]["id"] in failed_ids  # the same alert, not a new one
    assert delivered[0]["data"]["threshold"] == "$5.00"
    assert delivered[0]["data"]["balance_quota_tokens"] == 4 * USD

    # A third start sends nothing more: delivered is recorded.
    attempts = len(receiver.received)
    third = _serve(config, port)
    try:
        await _ready(url, third)
        await asyncio.sleep(1.0)
        assert len(receiver.received) == attempts
        # Back above $5, then below again: a new crossing, a new alert.
        await anyio.to_thread.run_sync(lambda: cli("credit", "--account", "acme", "--usd", "3"))
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            grant = await http.post(
                "/v1/funding/grant", headers=auth(secret), json={"external_user_id": "u1", "amount": 2.5}
            )
            assert grant.status_code == 200
        await until(lambda: len(receiver.delivered()) >= 2)
        await asyncio.sleep(0.5)
    finally:
        _kill(third, signal.SIGTERM)
    delivered = receiver.delivered()
    assert len(delivered) == 2
    assert delivered[1]["id"] != delivered[0]["id"]
    assert delivered[1]["data"]["balance_quota_tokens"] == 4_500_000
    shown = await anyio.to_thread.run_sync(lambda: cli("alerts", "show", "--account", "acme"))
    assert sorted(d["status"] for d in shown["deliveries"]) == ["delivered", "delivered"]
    verified = await anyio.to_thread.run_sync(lambda: cli("ledger", "verify"))
    assert verified["ok"] is True
