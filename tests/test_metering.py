"""Metering against a real gateway and a real SQLite file: the charge formula, 402, the
overdraft cap, holds, and many concurrent requests on a small balance (SPEC §1, §4)."""

from __future__ import annotations

import math
from typing import Any

import anyio
import httpx
import openai
import orjson
import pytest

from quota_proxy.store import InsufficientFunds
from tests.conftest import GatewayFactory, GatewayHarness

pytestmark = pytest.mark.anyio

FUNDS = 1_000_000
LOW_BALANCE_MESSAGE = "Your Quota balance is too low for this route."


def messages(content: str = "one two") -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def chat(model: str = "quota/fast", content: str = "one two", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": messages(content), **extra}


async def db_rows(gateway: GatewayHarness, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    return await gateway.dict_rows(sql, params)


def assert_402(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 402, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"code", "message", "type", "required_quota_tokens", "available_quota_tokens"}
    assert error["code"] == "insufficient_balance"
    assert error["type"] == "billing_error"
    assert error["message"] == LOW_BALANCE_MESSAGE
    for field in ("required_quota_tokens", "available_quota_tokens"):
        assert isinstance(error[field], int) and not isinstance(error[field], bool)
    assert error["required_quota_tokens"] > error["available_quota_tokens"] >= 0
    return error


async def assert_books_clean(gateway: GatewayHarness) -> None:
    await gateway.settled()
    assert await gateway.store.open_holds() == 0
    account = await gateway.store.account_by_name("acme")
    assert account is not None and account.held == 0
    await gateway.verify()


# -- the charge formula ---------------------------------------------------------------


CHARGE_CASES = [
    # model, multiplier shown, reply words, expected charge for the fake's 5 prompt tokens
    ("quota/fast", "x1", 8, 13),  # (5 + 8) × 1
    ("quota/sonnet", "x3", 8, 39),  # (5 + 8) × 3
    ("quota/half", "x0.5", 8, 7),  # (5 + 8) × 0.5 = 6.5 -> 7
    ("quota/half", "x0.5", 9, 7),  # (5 + 9) × 0.5 = 7 exactly
]


async def test_charge_is_ceil_of_tokens_times_multiplier(gateway: GatewayHarness) -> None:
    account = await gateway.account("acme", FUNDS)
    client = gateway.openai(await gateway.key("acme"))
    balance = FUNDS
    for model, multiplier, reply_words, expected in CHARGE_CASES:
        raw = await client.chat.completions.with_raw_response.create(
            model=model, messages=messages(), extra_body={"fake": {"reply_words": reply_words}}
        )
        reply = raw.parse()
        assert reply.usage is not None
        usage = reply.usage.model_dump()
        assert (usage["input_tokens"], usage["output_tokens"]) == (5, reply_words)
        assert usage["route_multiplier"] == multiplier
        assert usage["charged_quota_tokens"] == expected, (model, reply_words)
        assert isinstance(usage["charged_quota_tokens"], int)
        balance -= expected
        assert await gateway.balance("acme") == balance

        entry = (await gateway.store.ledger(account.id, 1))[0]
        assert (entry.kind, entry.amount, entry.balance_after) == ("charge", -expected, balance)
        assert entry.request_id == raw.headers["x-quota-request-id"]
    await assert_books_clean(gateway)


async def test_one_token_at_half_rate_is_charged_one_not_zero(gateway: GatewayHarness) -> None:
    await gateway.account("acme", FUNDS)
    client = gateway.openai(await gateway.key("acme"))
    reply = await client.chat.completions.create(
        model="quota/half",
        messages=messages(),
        extra_body={"fake": {"reply_words": 0, "prompt_tokens": 1}},
    )
    assert reply.usage is not None
    assert reply.usage.model_dump()["charged_quota_tokens"] == math.ceil(1 * 0.5) == 1
    assert await gateway.balance("acme") == FUNDS - 1
    # Streaming uses the same formula: (3 + 4) × 0.5 = 3.5 -> 4.
    stream = await client.chat.completions.create(
        model="quota/half",
        messages=messages(),
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"fake": {"reply_words": 4, "prompt_tokens": 3}},
    )
    usage = [c.usage async for c in stream if c.usage is not None][0]
    assert usage.model_dump()["charged_quota_tokens"] == 4
    assert await gateway.balance("acme") == FUNDS - 5
    await assert_books_clean(gateway)


# -- refusing and capping -------------------------------------------------------------


async def test_empty_balance_is_402_and_nothing_is_forwarded(gateway: GatewayHarness) -> None:
    await gateway.account("acme", 0)
    key = await gateway.key("acme")
    http = gateway.http()
    auth = {"authorization": f"Bearer {key}"}
    for body in (chat(), chat("quota/sonnet", stream=True), chat("quota/half", max_tokens=1)):
        error = assert_402(await http.post("/v1/chat/completions", json=body, headers=auth))
        assert error["available_quota_tokens"] == 0
    embed = await http.post("/v1/embeddings", json={"model": "quota/fast", "input": "a b"}, headers=auth)
    assert_402(embed)
    with pytest.raises(openai.APIStatusError) as caught:
        await gateway.openai(key).chat.completions.create(model="quota/fast", messages=messages())
    assert caught.value.status_code == 402
    assert caught.value.code == "insufficient_balance"
    assert await gateway.balance("acme") == 0

    # A balance below the smallest answer: less than the prompt alone at x3.
    await gateway.account("poor", 5)
    poor = await gateway.key("poor")
    response = await http.post(
        "/v1/chat/completions", json=chat("quota/sonnet"), headers={"authorization": f"Bearer {poor}"}
    )
    error = assert_402(response)
    assert error["available_quota_tokens"] == 5
    # At least (the prompt the upstream will count + one output token) × 3.
    assert error["required_quota_tokens"] >= 3 * (5 + 1)
    assert await gateway.balance("poor") == 5

    assert gateway.upstream.app.stats["requests"] == 0
    await assert_books_clean(gateway)


async def test_overdraft_cap_lowers_max_tokens_to_what_the_balance_affords(gateway: GatewayHarness) -> None:
    for name, model, balance, mult in (("one", "quota/fast", 40, 1), ("three", "quota/sonnet", 120, 3)):
        await gateway.account(name, balance)
        client = gateway.openai(await gateway.key(name))
        # The reply would run to the cap: whatever cap the upstream gets, it uses all of it.
        reply = await client.chat.completions.create(
            model=model, messages=messages(), extra_body={"fake": {"reply_words": 1000}}
        )
        sent_cap = gateway.upstream.app.requests[-1].body["max_tokens"]
        assert 1 <= sent_cap < 64  # lowered below the route's max_output_tokens
        assert reply.usage is not None
        assert reply.usage.completion_tokens == sent_cap
        # Worst case (the prompt the upstream counts + the cap) fits the balance...
        assert mult * (5 + sent_cap) <= balance, model
        charged = reply.usage.model_dump()["charged_quota_tokens"]
        assert charged == mult * (5 + sent_cap)
        # ...so the balance never goes below zero.
        assert await gateway.balance(name) == balance - charged >= 0
    await gateway.settled()
    assert await gateway.store.open_holds() == 0
    await gateway.verify()


async def test_overdraft_refuse_answers_402_instead_of_capping(make_gateway: GatewayFactory) -> None:
    gateway: GatewayHarness = await make_gateway(billing={"overdraft": "refuse"})
    await gateway.account("acme", 40)
    key = await gateway.key("acme")
    response = await gateway.http().post(
        "/v1/chat/completions", json=chat(), headers={"authorization": f"Bearer {key}"}
    )
    error = assert_402(response)
    assert error["available_quota_tokens"] == 40
    assert error["required_quota_tokens"] >= 5 + 64  # the whole hold: prompt + route cap
    assert gateway.upstream.app.stats["requests"] == 0
    # A caller cap that fits goes through.
    ok = await gateway.http().post(
        "/v1/chat/completions", json=chat(max_tokens=8), headers={"authorization": f"Bearer {key}"}
    )
    assert ok.status_code == 200, ok.text
    assert gateway.upstream.app.requests[-1].body["max_tokens"] == 8
    assert await gateway.balance("acme") == 40 - 13
    await assert_books_clean(gateway)


async def test_upstream_5xx_charges_nothing(gateway: GatewayHarness) -> None:
    await gateway.account("acme", FUNDS)
    key = await gateway.key("acme")
    http = gateway.http()
    cases = [(f, s) for f in ("status:500", "status:502") for s in (False, True)]
    cases += [("malformed", False), ("empty", False)]  # the fake breaks whole bodies only
    for fail, stream in cases:
        response = await http.post(
            "/v1/chat/completions",
            json=chat("quota/sonnet", stream=stream, fake={"fail": fail}),
            headers={"authorization": f"Bearer {key}"},
        )
        assert response.status_code == 502, (fail, stream, response.text)
        rows = await db_rows(
            gateway, "SELECT * FROM requests WHERE request_id = ?", (response.headers["x-quota-request-id"],)
        )
        assert [r["charged"] for r in rows] in ([], [0])
    assert await gateway.balance("acme") == FUNDS
    account = await gateway.store.account_by_name("acme")
    assert account is not None
    assert [e.kind for e in await gateway.store.ledger(account.id, 100)] == ["credit"]
    await assert_books_clean(gateway)


async def test_an_upstream_ignoring_the_cap_cannot_overdraw_the_balance(gateway: GatewayHarness) -> None:
    """SPEC §4: a balance ends below zero only by the upstream's prompt count beyond the
    gateway's estimate. An upstream that ignores max_tokens must not overdraw it."""
    await gateway.account("acme", 500)
    key = await gateway.key("acme")
    response = await gateway.http().post(
        "/v1/chat/completions",
        json=chat(fake={"fail": "huge"}),  # ~1.2 million output tokens, whatever the cap
        headers={"authorization": f"Bearer {key}"},
    )
    assert gateway.upstream.app.requests[-1].body["max_tokens"] <= 64
    assert response.status_code in (200, 502)
    balance = await gateway.balance("acme")
    # The prompt ("one two" = 5 tokens for the fake) was estimated at least as high as the
    # upstream counted it, so the floor is zero.
    assert balance >= 0, f"one request overdrew a 500-token balance to {balance}"
    await assert_books_clean(gateway)


# -- holds ----------------------------------------------------------------------------


async def test_no_holds_remain_after_requests_finish(gateway: GatewayHarness) -> None:
    await gateway.account("acme", FUNDS)
    key = await gateway.key("acme")
    client = gateway.openai(key)
    await client.chat.completions.create(model="quota/fast", messages=messages())
    stream = await client.chat.completions.create(model="quota/sonnet", messages=messages(), stream=True)
    async for _ in stream:
        pass
    await client.embeddings.create(model="quota/half", input="one two three")
    await client.completions.create(model="quota/fast", prompt="one two")
    with pytest.raises(openai.APIStatusError):
        await client.chat.completions.create(
            model="quota/fast", messages=messages(), extra_body={"fake": {"fail": "status:500"}}
        )
    with pytest.raises(openai.APIStatusError):
        await client.chat.completions.create(
            model="quota/fast", messages=messages(), extra_body={"fake": {"fail": "status:400"}}
        )
    with pytest.raises(openai.APIStatusError):
        await client.chat.completions.create(model="quota/down", messages=messages())
    await gateway.settled()
    assert await gateway.store.open_holds() == 0
    account = await gateway.store.account_by_name("acme")
    assert account is not None
    assert account.held == 0
    assert account.available == account.balance
    await gateway.verify()


async def test_an_open_hold_limits_what_requests_may_spend(gateway: GatewayHarness) -> None:
    account = await gateway.account("acme", 1_000)
    key = await gateway.key("acme")
    http = gateway.http()
    hold = await gateway.store.take_hold(account.id, 995, "req_other", "another-process", 60_000)
    response = await http.post(
        "/v1/chat/completions", json=chat(), headers={"authorization": f"Bearer {key}"}
    )
    error = assert_402(response)
    assert error["available_quota_tokens"] == 5
    assert gateway.upstream.app.stats["requests"] == 0
    # A hold that has not expired survives the sweep.
    assert await gateway.store.release_expired_holds() == 0
    assert await gateway.store.available(account.id) == 5
    await gateway.store.release_hold(hold)
    ok = await http.post("/v1/chat/completions", json=chat(), headers={"authorization": f"Bearer {key}"})
    assert ok.status_code == 200
    await assert_books_clean(gateway)


async def test_holds_fit_the_available_balance_and_expire(gateway: GatewayHarness) -> None:
    account = await gateway.account("acme", 1_000)
    store = gateway.store
    first = await store.take_hold(account.id, 600, "req_a", "me", 60_000)
    with pytest.raises(InsufficientFunds) as caught:
        await store.take_hold(account.id, 401, "req_b", "me", 60_000)
    assert caught.value.available == 400
    await store.release_hold(first)

    # A crashed process's hold: already past its expiry.
    await store.take_hold(account.id, 700, "req_crashed", "crashed-process", -1_000)
    assert await store.available(account.id) == 300
    assert await store.open_holds() == 1
    assert await store.release_expired_holds() == 1
    assert await store.available(account.id) == 1_000
    assert await gateway.balance("acme") == 1_000
    await assert_books_clean(gateway)


# -- concurrency ----------------------------------------------------------------------


async def test_concurrent_requests_never_overspend(gateway: GatewayHarness) -> None:
    per_request = 5 + 64  # prompt + the route's output cap, on an x1 route
    funds = 10 * per_request
    account = await gateway.account("acme", funds)
    key = await gateway.key("acme")
    client = gateway.openai(key)
    fake = {"reply_words": 1000}  # every answer runs to whatever cap it gets

    successes: dict[str, int] = {}  # request id -> index
    refused: dict[str, int] = {}
    other: list[tuple[int, Any]] = []

    async def one(i: int) -> None:
        try:
            if i % 2:
                raw = await client.chat.completions.with_raw_response.create(
                    model="quota/fast", messages=messages(), extra_body={"fake": fake}
                )
                reply = raw.parse()
                assert reply.usage is not None
            else:
                raw = await client.chat.completions.with_raw_response.create(
                    model="quota/fast", messages=messages(), stream=True, extra_body={"fake": fake}
                )
                chunks = [c async for c in raw.parse()]
                assert chunks and chunks[-1].choices
            successes[raw.headers["x-quota-request-id"]] = i
        except openai.APIStatusError as exc:
            if exc.status_code == 402:
                refused[exc.response.headers["x-quota-request-id"]] = i
            else:
                other.append((i, exc))

    with anyio.fail_after(45):
        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(one, i)

    assert other == []
    assert len(successes) + len(refused) == 200
    assert len(successes) >= 10  # the balance paid for at least the ten full-size answers
    assert refused  # and it could not pay for all 200

    fresh = await gateway.store.account(account.id)
    assert fresh is not None
    drop = funds - fresh.balance

    charges = await db_rows(
        gateway,
        "SELECT amount, request_id FROM ledger WHERE account_id = ? AND kind = 'charge'",
        (account.id,),
    )
    assert -sum(c["amount"] for c in charges) == drop
    requests = await db_rows(
        gateway, "SELECT request_id, charged FROM requests WHERE account_id = ?", (account.id,)
    )
    by_id: dict[str, list[int]] = {}
    for row in requests:
        by_id.setdefault(row["request_id"], []).append(row["charged"])
    charge_ids = [c["request_id"] for c in charges]
    assert len(charge_ids) == len(set(charge_ids))  # no request charged twice
    for request_id in successes:
        assert len(by_id.get(request_id, [])) == 1, request_id
        assert by_id[request_id][0] > 0, request_id
        assert charge_ids.count(request_id) == 1, request_id
    for request_id in refused:
        assert sum(by_id.get(request_id, [])) == 0, request_id
        assert request_id not in charge_ids
    assert set(charge_ids) == set(successes)
    assert sum(charged for rows in by_id.values() for charged in rows) == drop

    await gateway.settled()

    assert await gateway.store.open_holds() == 0
    assert fresh.held == 0
    verify = gateway.cli("ledger", "verify", "--json", check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert orjson.loads(verify.stdout)["ok"] is True
    # Last, the money: concurrent requests together never spent more than the balance held.
    assert fresh.balance >= 0, f"balance went to {fresh.balance} after {len(successes)} answers"


async def test_a_caller_who_leaves_while_its_hold_waits_is_not_forwarded(gateway: GatewayHarness) -> None:
    """The hold waits for the store's write lock (taken here by another connection, as a
    busy database would); the caller gives up meanwhile. Once the hold is taken the gateway
    sees the caller gone: nothing reaches the upstream and nothing is charged."""
    if gateway.settings.store.url is not None:
        pytest.skip("locks the SQLite file")
    import sqlite3

    await gateway.account("acme", 1_000_000)
    key = await gateway.key("acme")
    # One answered request first, so a kept-alive upstream connection is ready: the
    # request would then go out at once, without waiting for anything.
    first = await gateway.openai(key).chat.completions.create(model="quota/fast", messages=messages())
    spent = int((first.usage.model_extra or {})["charged_quota_tokens"])
    blocker = sqlite3.connect(gateway.settings.store.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=0.3) as http:
            with pytest.raises(httpx.ReadTimeout):
                await http.post("/v1/chat/completions", json=chat(), headers={"authorization": f"Bearer {key}"})
        await anyio.sleep(0.3)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    for _ in range(100):  # the hold is taken once the lock is free, then the request ends
        rows = await gateway.rows("SELECT outcome, charged FROM requests ORDER BY created_at, rowid")
        if len(rows) == 2:
            break
        await anyio.sleep(0.05)
    assert rows == [("ok", spent), ("client_disconnected", 0)]
    assert gateway.upstream.app.stats["requests"] == 1
    assert await gateway.balance("acme") == 1_000_000 - spent
    await assert_books_clean(gateway)
