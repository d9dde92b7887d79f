"""Redemption codes (issue 13): printed once, stored hashed, claimed once under concurrency,
wrong codes throttled. A real gateway and SQLite file; the CLI as a subprocess."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import anyio
import httpx
import pytest

from quota_proxy.payments.codes import code_digest, generate_code, normalise
from quota_proxy.store import payment_store
from quota_proxy.store.records import now_ms
from tests.conftest import GatewayHarness

pytestmark = pytest.mark.anyio

STARTER_TOKENS = 5_000_000


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def create_codes(h: GatewayHarness, *args: str) -> dict[str, Any]:
    result = await anyio.to_thread.run_sync(lambda: h.cli("codes", "create", *args, "--json"))
    data: dict[str, Any] = json.loads(result.stdout)
    return data


async def stored_bytes(h: GatewayHarness) -> bytes:
    """Everything the store holds: the SQLite file and its WAL, or every PostgreSQL table's
    rows as text."""
    path = h.settings.store.path
    if h.settings.store.url is None:
        return path.read_bytes() + path.with_name(path.name + "-wal").read_bytes()
    tables = await h.rows(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema() "
        "AND table_type = 'BASE TABLE'"
    )
    assert any(t[0] == "redemption_codes" for t in tables)
    dumped = [await h.rows(f"SELECT t::text FROM {t[0]} t") for t in tables]  # noqa: S608 - catalog names
    return "\n".join(r[0] for rows in dumped for r in rows).encode()


async def redeem(http: httpx.AsyncClient, key: str, code: Any) -> httpx.Response:
    return await http.post("/v1/redeem", json={"code": code}, headers=auth(key))


def test_codes_are_100_random_bits_and_forgive_typing() -> None:
    code = generate_code()
    assert len(code) == len("QP-XXXXX-XXXXX-XXXXX-XXXXX") and code.startswith("QP-")
    assert len({generate_code() for _ in range(1000)}) == 1000
    sloppy = code.lower().replace("-", " ").replace("0", "o").replace("1", "l")
    assert code_digest(sloppy) == code_digest(code)
    assert normalise("QP-ABCDE") is None and normalise("QP-UUUUU-UUUUU-UUUUU-UUUUU") is None


async def test_a_code_is_printed_once_stored_hashed_and_credits_once(gateway: GatewayHarness) -> None:
    h = gateway
    await h.account("acme", 0)
    live = await h.key("acme")  # any key of the account may redeem
    created = await create_codes(h, "--package", "starter", "--count", "3")
    codes = created["codes"]
    assert len(codes) == 3 and len(set(codes)) == 3
    # Only digests are kept: no code's text is anywhere in the store.
    raw = await stored_bytes(h)
    for code in codes:
        assert normalise(code).encode() not in raw  # type: ignore[union-attr]
        assert code.encode() not in raw
    listed = await anyio.to_thread.run_sync(lambda: h.cli("codes", "list", "--json"))
    assert "QP-" not in listed.stdout and len(json.loads(listed.stdout)) == 3

    http = h.http()
    first = await redeem(http, live, codes[0])
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["amount_quota_tokens"] == STARTER_TOKENS
    assert body["balance_quota_tokens"] == STARTER_TOKENS and body["balance"] == "$5.00"
    assert body["package"] == "starter" and body["ledger_id"].startswith("ledg_")
    entry = (await h.store.ledger((await h.store.account_by_name("acme")).id))[0]  # type: ignore[union-attr]
    assert (entry.kind, entry.amount, entry.related_id) == ("purchase", STARTER_TOKENS, body["code_id"])

    again = await redeem(http, live, codes[0])
    assert again.status_code == 400
    assert again.json()["error"] == {
        "code": "invalid_code", "message": "This code is unknown, already used or expired.",
        "type": "invalid_request_error",
    }
    sloppy = codes[1].lower().replace("-", "")
    assert (await redeem(http, live, sloppy)).status_code == 200
    assert await h.balance("acme") == 2 * STARTER_TOKENS
    await h.verify()


async def test_an_expired_or_unknown_code_credits_nothing(gateway: GatewayHarness) -> None:
    h = gateway
    await h.account("acme", 0)
    live = await h.key("acme")
    code = generate_code()
    digest = code_digest(code)
    assert digest is not None
    await payment_store(h.store).create_codes([digest], "starter", STARTER_TOKENS, now_ms() - 1)
    http = h.http()
    for attempt in (code, generate_code(), "not a code", 42):
        response = await redeem(http, live, attempt)
        expected = 400
        assert response.status_code == expected, response.text
        code_name = response.json()["error"]["code"]
        assert code_name == ("bad_request" if attempt == 42 else "invalid_code")
    assert await h.balance("acme") == 0
    await h.verify()


async def test_50_concurrent_redemptions_of_one_code_credit_once(gateway: GatewayHarness) -> None:
    h = gateway
    await h.account("acme", 0)
    await h.account("globex", 0)
    keys = [await h.key("acme"), await h.key("globex", kind="secret")]
    code = (await create_codes(h, "--package", "starter"))["codes"][0]
    http = h.http()
    responses = await asyncio.gather(*(redeem(http, keys[i % 2], code) for i in range(50)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] + [400] * 49, statuses
    assert {r.json()["error"]["code"] for r in responses if r.status_code == 400} == {"invalid_code"}
    total = await h.balance("acme") + await h.balance("globex")
    assert total == STARTER_TOKENS
    purchases = await h.rows("SELECT count(*) FROM ledger WHERE kind = 'purchase'")
    assert purchases[0][0] == 1
    await h.verify()
    verified = await anyio.to_thread.run_sync(lambda: h.cli("ledger", "verify", "--json"))
    assert '"ok": true' in verified.stdout


async def test_wrong_codes_are_throttled_per_account(gateway: GatewayHarness) -> None:
    h = gateway
    await h.account("acme", 0)
    await h.account("globex", 0)
    acme, globex = await h.key("acme"), await h.key("globex")
    good = (await create_codes(h, "--package", "starter"))["codes"][0]
    http = h.http()
    for _ in range(10):
        assert (await redeem(http, acme, generate_code())).status_code == 400
    throttled = await redeem(http, acme, good)  # even a good code waits now
    assert throttled.status_code == 429
    assert throttled.json()["error"]["code"] == "rate_limited"
    assert int(throttled.headers["retry-after"]) > 0
    assert await h.balance("acme") == 0
    # Another account is not affected, and its good code still works.
    assert (await redeem(http, globex, good)).status_code == 200
    await h.verify()


async def test_codes_create_refuses_an_unknown_package(gateway: GatewayHarness) -> None:
    result = await anyio.to_thread.run_sync(
        lambda: gateway.cli("codes", "create", "--package", "nope", check=False)
    )
    assert result.returncode == 1 and "no package 'nope'" in result.stderr
    assert result.stdout == ""
