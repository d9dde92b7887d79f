"""200 concurrent agent requests on an account funded for about ten: on /v1/messages and on
/v1/responses, native and translated, streamed and not, the balance is never overspent and
every charge is one ledger entry."""

from __future__ import annotations

from typing import Any

import anthropic
import anyio
import openai
import pytest

from quota_proxy.testing import RunningUpstream
from tests.agents_support import MESSAGES, PROMPT, claude, codex, extra_config, rows
from tests.conftest import GatewayFactory, GatewayHarness

pytestmark = pytest.mark.anyio
CAP = 64


@pytest.mark.parametrize("protocol", ["messages", "responses"])
async def test_concurrent_requests_never_overspend(
    make_gateway: GatewayFactory, upstream: RunningUpstream, protocol: str
) -> None:
    gw: GatewayHarness = await make_gateway(routes=extra_config(upstream.base_url))
    funds = 10 * 3 * (12 + CAP)  # about ten full answers on an x3 route
    account = await gw.account("acme", funds)
    key = await gw.key("acme")
    upstream.app.options.reply_words = 1000  # every answer runs to whatever cap it gets
    native, translated = (
        ("quota/claude", "quota/sonnet") if protocol == "messages" else ("quota/codex", "quota/sonnet")
    )
    client, oai = claude(gw, key), codex(gw, key)  # one connection pool each, as an agent has
    successes: dict[str, int] = {}
    refused: dict[str, int] = {}
    other: list[Any] = []

    async def one(i: int) -> None:
        model = native if i % 4 < 2 else translated
        stream = i % 2 == 1
        try:
            if protocol == "messages":
                if stream:
                    async with client.messages.stream(model=model, max_tokens=CAP, messages=MESSAGES) as s:
                        await s.get_final_message()
                        request_id = s.response.headers["x-quota-request-id"]
                else:
                    raw = await client.messages.with_raw_response.create(
                        model=model, max_tokens=CAP, messages=MESSAGES
                    )
                    request_id = raw.headers["x-quota-request-id"]
            else:
                if stream:
                    raw_s = await oai.responses.with_raw_response.create(
                        model=model, input=PROMPT, stream=True
                    )
                    kinds = [event.type async for event in raw_s.parse()]
                    assert kinds[-1] == "response.incomplete", kinds[-3:]  # every answer hits its cap
                    request_id = raw_s.headers["x-quota-request-id"]
                else:
                    raw_r = await oai.responses.with_raw_response.create(model=model, input=PROMPT)
                    request_id = raw_r.headers["x-quota-request-id"]
            successes[request_id] = i
        except (anthropic.APIStatusError, openai.APIStatusError) as exc:
            if exc.status_code == 402:
                refused[exc.response.headers["x-quota-request-id"]] = i
            else:
                other.append((i, exc))

    try:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i in range(200):
                    tg.start_soon(one, i)
    finally:
        upstream.app.options.reply_words = 8

    assert other == []
    assert len(successes) + len(refused) == 200
    assert len(successes) >= 10 and refused
    fresh = await gw.store.account(account.id)
    assert fresh is not None
    drop = funds - fresh.balance
    charges = await rows(
        gw, "SELECT amount, request_id FROM ledger WHERE account_id = ? AND kind = 'charge'", (account.id,)
    )
    assert -sum(c["amount"] for c in charges) == drop
    charge_ids = [c["request_id"] for c in charges]
    assert len(charge_ids) == len(set(charge_ids)) and set(charge_ids) == set(successes)
    assert not set(refused) & set(charge_ids)
    assert await gw.store.open_holds() == 0 and fresh.held == 0
    await gw.verify()
    assert fresh.balance >= 0, f"balance went to {fresh.balance} after {len(successes)} answers"
