"""User-billed completions (SPEC §2, §3 Funding API, §4) and the funding CLI.

A real gateway on uvicorn in front of the fake upstream; completions go through the
official openai SDK pointed at /v1/users/{external_user_id}, so the SDK posts to
/v1/users/{id}/chat/completions exactly as an app would.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import GatewayHarness

pytestmark = pytest.mark.anyio

USD = 1_000_000
REPLY = "hello world this is a fake reply from"  # the fake upstream's 8-word reply
MESSAGES = [{"role": "user", "content": "hello there"}]


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@asynccontextmanager
async def user_client(h: GatewayHarness, key: str, user: str) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=f"{h.base_url}/users/{user}", api_key=key, max_retries=0, timeout=30)
    try:
        yield client
    finally:
        await client.close()


async def setup(
    h: GatewayHarness, dev_tokens: int = 10 * USD, user: str = "user_123", grant_usd: Any = 1
) -> tuple[str, httpx.AsyncClient]:
    """Developer 'acme' with a secret key, and a user funded by a real grant."""
    await h.account("acme", dev_tokens)
    secret = await h.key("acme", kind="secret")
    http = h.http()
    if grant_usd is not None:
        resp = await http.post(
            "/v1/funding/grant", json={"external_user_id": user, "amount": grant_usd}, headers=auth(secret)
        )
        assert resp.status_code == 200, resp.text
    return secret, http


async def set_mode(http: httpx.AsyncClient, key: str, user: str, mode: str) -> None:
    resp = await http.patch(f"/v1/users/{user}", json={"billing_mode": mode}, headers=auth(key))
    assert resp.status_code == 200, resp.text
    assert resp.json()["billing_mode"] == mode


async def charge_rows(h: GatewayHarness) -> list[tuple[Any, ...]]:
    """(account kind, account name, amount, request_id) of every charge in the ledger."""
    return list(
        await h.rows(
            "SELECT a.kind, a.name, l.amount, l.request_id FROM ledger l "
            "JOIN accounts a ON a.id = l.account_id WHERE l.kind = 'charge' ORDER BY l.id"
        )
    )


async def usage_by_user(http: httpx.AsyncClient, key: str) -> dict[str, dict[str, Any]]:
    me = await http.get("/v1/me", headers=auth(key))
    assert me.status_code == 200, me.text
    return {row["external_user_id"]: row for row in me.json()["usage"]["by_user"]}


def cli_usage_by_user(h: GatewayHarness, account: str) -> dict[str | None, dict[str, int]]:
    data = json.loads(h.cli("usage", "--account", account, "--json").stdout)
    totals: dict[str | None, dict[str, int]] = {}
    for row in data["rows"]:
        t = totals.setdefault(row["user"], {"requests": 0, "charged_quota_tokens": 0})
        t["requests"] += row["requests"]
        t["charged_quota_tokens"] += row["charged_quota_tokens"]
    return totals


# -- who pays ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["user", "developer"])
async def test_completion_charges_per_billing_mode_and_is_attributed_to_user(
    gateway: GatewayHarness, mode: str
) -> None:
    secret, http = await setup(gateway, 10 * USD, "user_123", 1)
    if mode == "developer":
        await set_mode(http, secret, "user_123", "developer")
    dev_before = await gateway.balance("acme")
    user_before = await gateway.balance("acme", user="user_123")
    assert (dev_before, user_before) == (9 * USD, 1 * USD)

    async with user_client(gateway, secret, "user_123") as client:
        raw = await client.chat.completions.with_raw_response.create(model="quota/sonnet", messages=MESSAGES)
        reply = raw.parse()
    request_id = raw.headers["x-quota-request-id"]
    assert reply.choices[0].message.content == REPLY
    usage = reply.usage.model_dump()
    assert usage["route_multiplier"] == "x3"
    charged = usage["charged_quota_tokens"]
    assert charged == 3 * (usage["prompt_tokens"] + usage["completion_tokens"]) > 0

    if mode == "user":
        assert await gateway.balance("acme", user="user_123") == user_before - charged
        assert await gateway.balance("acme") == dev_before
        payer = ("user", "user_123")
    else:
        assert await gateway.balance("acme") == dev_before - charged
        assert await gateway.balance("acme", user="user_123") == user_before
        payer = ("developer", "acme")
    assert await charge_rows(gateway) == [(*payer, -charged, request_id)]
    assert gateway.upstream.app.requests[-1].body["model"] == "fake-sonnet"

    # attribution: the user, in /v1/me and in the CLI's usage report
    by_user = await usage_by_user(http, secret)
    assert set(by_user) == {"user_123"}
    assert by_user["user_123"]["requests"] == 1
    assert by_user["user_123"]["charged_quota_tokens"] == charged
    cli = cli_usage_by_user(gateway, "acme")
    assert cli == {"user_123": {"requests": 1, "charged_quota_tokens": charged}}

    view = (await http.get("/v1/users/user_123/balance", headers=auth(secret))).json()
    assert view["billing_mode"] == mode
    await gateway.verify()
    await gateway.settled()
    assert await gateway.store.open_holds() == 0


@pytest.mark.parametrize("mode", ["user", "developer"])
async def test_streaming_through_user_endpoint(gateway: GatewayHarness, mode: str) -> None:
    secret, http = await setup(gateway, 10 * USD, "user_123", 1)
    if mode == "developer":
        await set_mode(http, secret, "user_123", "developer")
    dev_before = await gateway.balance("acme")
    user_before = await gateway.balance("acme", user="user_123")

    total = 0
    async with user_client(gateway, secret, "user_123") as client:
        # with usage asked for: the last chunk carries the charge
        stream = await client.chat.completions.create(
            model="quota/fast", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage is not None:
                usage = chunk.usage.model_dump()
        assert text == REPLY
        assert usage is not None and usage["route_multiplier"] == "x1"
        first_charge = usage["charged_quota_tokens"]
        assert first_charge == usage["prompt_tokens"] + usage["completion_tokens"] > 0
        total += first_charge

        # without usage asked for: no usage chunk reaches the caller, still charged
        stream = await client.chat.completions.create(model="quota/half", messages=MESSAGES, stream=True)
        text = ""
        async for chunk in stream:
            assert chunk.usage is None
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
        assert text == REPLY

    rows = await charge_rows(gateway)
    assert len(rows) == 2
    payer = ("user", "user_123") if mode == "user" else ("developer", "acme")
    assert all(row[:2] == payer for row in rows), rows
    assert rows[0][2] == -first_charge
    total += -rows[1][2]
    if mode == "user":
        assert await gateway.balance("acme", user="user_123") == user_before - total
        assert await gateway.balance("acme") == dev_before
    else:
        assert await gateway.balance("acme") == dev_before - total
        assert await gateway.balance("acme", user="user_123") == user_before
    by_user = await usage_by_user(http, secret)
    assert by_user["user_123"]["requests"] == 2
    assert by_user["user_123"]["charged_quota_tokens"] == total
    await gateway.verify()
    await gateway.settled()
    assert await gateway.store.open_holds() == 0


# -- refusals ------------------------------------------------------------------------------


async def test_user_balance_too_low_is_402_and_upstream_not_called(gateway: GatewayHarness) -> None:
    # 1 quota token: not even one output token on an x3 route
    secret, http = await setup(gateway, 10 * USD, "user_123", 0.000001)
    calls = len(gateway.upstream.app.requests)
    async with user_client(gateway, secret, "user_123") as client:
        for stream in (False, True):
            with pytest.raises(openai.APIStatusError) as caught:
                await client.chat.completions.create(model="quota/sonnet", messages=MESSAGES, stream=stream)
            err = caught.value
            assert err.status_code == 402
            body = err.response.json()
            assert body["error"]["code"] == "insufficient_balance"
            assert body["error"]["type"] == "billing_error"
            assert body["error"]["message"] == "Your Quota balance is too low for this route."
            assert body["error"]["available_quota_tokens"] == 1
            assert body["error"]["required_quota_tokens"] > 1
    assert len(gateway.upstream.app.requests) == calls
    assert await gateway.balance("acme", user="user_123") == 1
    assert await gateway.balance("acme") == 10 * USD - 1
    assert await charge_rows(gateway) == []
    # the developer's money does not cover a user-mode user
    await gateway.verify()
    await gateway.settled()
    assert await gateway.store.open_holds() == 0


async def test_user_balance_below_the_prompt_is_402_and_not_forwarded(gateway: GatewayHarness) -> None:
    """1 quota token cannot pay for any prompt plus one output token on an x1 route (SPEC §4:
    below the smallest answer the gateway answers 402 and forwards nothing)."""
    secret, http = await setup(gateway, 10 * USD, "user_123", 0.000001)
    calls = len(gateway.upstream.app.requests)
    async with user_client(gateway, secret, "user_123") as client:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(
                model="quota/fast",
                messages=[{"role": "user", "content": "please summarise the following paragraph for me"}],
            )
    assert caught.value.status_code == 402
    assert caught.value.response.json()["error"]["code"] == "insufficient_balance"
    assert len(gateway.upstream.app.requests) == calls
    assert await gateway.balance("acme", user="user_123") == 1
    await gateway.verify()


async def test_developer_mode_402_when_developer_pool_is_empty(gateway: GatewayHarness) -> None:
    secret, http = await setup(gateway, 1 * USD, "user_123", 1)  # grants the whole pool away
    await set_mode(http, secret, "user_123", "developer")
    calls = len(gateway.upstream.app.requests)
    async with user_client(gateway, secret, "user_123") as client:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(model="quota/fast", messages=MESSAGES)
    assert caught.value.status_code == 402
    assert caught.value.response.json()["error"]["available_quota_tokens"] == 0
    assert len(gateway.upstream.app.requests) == calls
    assert await gateway.balance("acme", user="user_123") == 1 * USD
    await gateway.verify()


async def test_unknown_and_bad_user_ids(gateway: GatewayHarness) -> None:
    secret, http = await setup(gateway, 10 * USD, "user_123", 1)
    calls = len(gateway.upstream.app.requests)
    async with user_client(gateway, secret, "nobody") as client:
        with pytest.raises(openai.NotFoundError) as caught:
            await client.chat.completions.create(model="quota/fast", messages=MESSAGES)
        body = caught.value.response.json()
        assert body["error"]["code"] == "user_not_found"
        assert body["error"]["type"] == "invalid_request_error"
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="quota/fast", messages=MESSAGES, stream=True)
    for bad in ("a b", "usér", "a" * 129):
        async with user_client(gateway, secret, bad) as client:
            with pytest.raises(openai.BadRequestError) as bad_request:
                await client.chat.completions.create(model="quota/fast", messages=MESSAGES)
            body = bad_request.value.response.json()
            assert body["error"]["code"] == "bad_request", (bad, body)
            assert body["error"]["type"] == "invalid_request_error"
    assert len(gateway.upstream.app.requests) == calls
    assert await charge_rows(gateway) == []
    await gateway.verify()


# -- concurrency ---------------------------------------------------------------------------


async def _fire(
    client: openai.AsyncOpenAI, n: int, messages: list[dict[str, Any]], extra_body: dict[str, Any] | None
) -> tuple[str, int | None, str | None]:
    """One request: ('ok', charged, request id) or ('402', None, None); anything else fails."""
    kwargs: dict[str, Any] = {"model": "quota/fast", "messages": messages}
    if extra_body is not None:
        kwargs["extra_body"] = extra_body
    if n % 3 != 0:
        kwargs["max_tokens"] = 4  # a small hold, so several requests hold the balance at once
    try:
        if n % 2 == 0:
            raw = await client.chat.completions.with_raw_response.create(**kwargs)
            reply = raw.parse()
            assert reply.choices[0].message.content
            return "ok", reply.usage.model_dump()["charged_quota_tokens"], raw.headers["x-quota-request-id"]
        raw = await client.chat.completions.with_raw_response.create(
            stream=True, stream_options={"include_usage": True}, **kwargs
        )
        charged = None
        async for chunk in raw.parse():
            if chunk.usage is not None:
                charged = chunk.usage.model_dump()["charged_quota_tokens"]
        assert charged is not None
        return "ok", charged, raw.headers["x-quota-request-id"]
    except openai.APIStatusError as exc:
        assert exc.status_code == 402, (exc.status_code, exc.response.text)
        assert exc.response.json()["error"]["code"] == "insufficient_balance"
        return "402", None, None


async def _concurrent_user_spend(
    h: GatewayHarness, messages: list[dict[str, Any]], extra_body: dict[str, Any] | None
) -> None:
    granted = 60  # about 5 requests' worth: each costs ~12 quota tokens on x1
    secret, http = await setup(h, 10 * USD, "user_123", 0.00006)
    assert await h.balance("acme", user="user_123") == granted
    dev_before = await h.balance("acme")
    calls = len(h.upstream.app.requests)

    async with user_client(h, secret, "user_123") as client:
        results = await asyncio.wait_for(
            asyncio.gather(*(_fire(client, n, messages, extra_body) for n in range(60))), timeout=40
        )
    successes = [r for r in results if r[0] == "ok"]
    assert successes, "no request succeeded"
    assert len(successes) < len(results)  # 60 requests cannot all fit in 60 quota tokens
    print("concurrent user spend:", len(successes), "ok,", len(results) - len(successes), "402")
    assert len(h.upstream.app.requests) - calls == len(successes)  # a 402 is never forwarded

    final = await h.balance("acme", user="user_123")
    rows = await charge_rows(h)
    assert final >= 0, f"user balance went below zero: {final} (charges {[-r[2] for r in rows]})"
    reported = sum(r[1] for r in successes if r[1] is not None)
    assert reported == granted - final
    # every success charged exactly once, to the user, with the amount it reported
    assert sorted((rid, -c) for rid, c in ((r[2], r[1]) for r in successes)) == sorted(
        (row[3], row[2]) for row in rows
    )
    assert all(row[:2] == ("user", "user_123") for row in rows)
    assert len({row[3] for row in rows}) == len(rows) == len(successes)
    assert await h.balance("acme") == dev_before
    await h.verify()
    await h.settled()
    assert await h.store.open_holds() == 0


async def test_concurrent_user_completions_never_overdraw_user(gateway: GatewayHarness) -> None:
    """60 concurrent user-billed completions (streaming and not) on a balance for ~5."""
    messages = [{"role": "user", "content": "antidisestablishmentarianism floccinaucinihilipilification"}]
    await _concurrent_user_spend(gateway, messages, None)


async def test_concurrent_user_holds_are_atomic(gateway: GatewayHarness) -> None:
    """The same burst with the upstream reporting a 0-token prompt, so the charge can never
    exceed the output-cap hold: isolates the hold arithmetic from the prompt estimator."""
    await _concurrent_user_spend(gateway, MESSAGES, {"fake": {"prompt_tokens": 0}})


# -- CLI ----------------------------------------------------------------------------------


async def test_cli_grant_users_and_balance(gateway: GatewayHarness) -> None:
    await gateway.account("acme", 10 * USD)
    secret = await gateway.key("acme", kind="secret")
    http = gateway.http()

    args = ("grant", "--account", "acme", "--user", "user_cli", "--usd", "1", "--idempotency-key", "cli-k1")
    first = json.loads(gateway.cli(*args, "--json").stdout)
    assert first["external_user_id"] == "user_cli"
    assert first["amount_granted"] == "$1.00"
    assert first["amount_granted_quota_tokens"] == USD
    assert first["balance_before"] == "$0.00" and first["balance_after"] == "$1.00"
    assert first["duplicate"] is False
    assert first["ledger_id"].startswith("ledg_")

    replay = json.loads(gateway.cli(*args, "--json").stdout)
    assert replay == {**first, "duplicate": True}
    assert await gateway.balance("acme", user="user_cli") == USD
    assert await gateway.balance("acme") == 9 * USD

    # the same key with a different amount is refused, with nothing granted
    conflict = gateway.cli("grant", "--account", "acme", "--user", "user_cli", "--usd", "2",
                           "--idempotency-key", "cli-k1", "--json", check=False)
    assert conflict.returncode != 0
    assert conflict.stdout.strip() == "" or "error" in json.loads(conflict.stdout)
    assert await gateway.balance("acme", user="user_cli") == USD

    # the API replays a CLI grant made with the same key and body
    api = await http.post("/v1/funding/grant", json={"external_user_id": "user_cli", "amount": 1},
                          headers={**auth(secret), "idempotency-key": "cli-k1"})
    assert api.status_code == 200, api.text
    assert api.json()["duplicate"] is True and api.json()["ledger_id"] == first["ledger_id"]

    gateway.cli("grant", "--account", "acme", "--user", "user_two", "--usd", "0.25", "--json")
    users = json.loads(gateway.cli("users", "list", "--account", "acme", "--json").stdout)
    assert [u["external_user_id"] for u in users] == ["user_cli", "user_two"]
    assert [(u["balance"], u["balance_quota_tokens"], u["billing_mode"]) for u in users] == [
        ("$1.00", USD, "user"),
        ("$0.25", 250_000, "user"),
    ]

    shown = json.loads(gateway.cli("users", "show", "--account", "acme", "--user", "user_cli", "--json").stdout)
    assert shown["external_user_id"] == "user_cli"
    assert shown["balance"] == "$1.00" and shown["balance_quota_tokens"] == USD
    assert shown["billing_mode"] == "user"

    moded = json.loads(
        gateway.cli("users", "set-mode", "--account", "acme", "--user", "user_cli", "developer", "--json").stdout
    )
    assert moded["billing_mode"] == "developer"
    view = await http.get("/v1/users/user_cli/balance", headers=auth(secret))
    assert view.json()["billing_mode"] == "developer"

    bal = json.loads(gateway.cli("balance", "--account", "acme", "--user", "user_cli", "--json").stdout)
    assert bal["external_user_id"] == "user_cli"
    assert bal["balance"] == "$1.00" and bal["balance_quota_tokens"] == USD
    assert bal["billing_mode"] == "developer"

    # the running gateway honours the mode the CLI set: the developer pays
    dev_before = await gateway.balance("acme")
    async with user_client(gateway, secret, "user_cli") as client:
        reply = await client.chat.completions.create(model="quota/fast", messages=MESSAGES)
    charged = reply.usage.model_dump()["charged_quota_tokens"]
    assert await gateway.balance("acme") == dev_before - charged
    assert await gateway.balance("acme", user="user_cli") == USD

    missing = gateway.cli("users", "show", "--account", "acme", "--user", "nobody", "--json", check=False)
    assert missing.returncode != 0
    bad = gateway.cli("grant", "--account", "acme", "--user", "a b", "--usd", "1", "--json", check=False)
    assert bad.returncode != 0
    assert await gateway.balance("acme") == dev_before - charged
    verify = json.loads(gateway.cli("ledger", "verify", "--json").stdout)
    assert verify["ok"] is True
    await gateway.verify()
