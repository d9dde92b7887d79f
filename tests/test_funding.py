"""The Funding API (SPEC §1-§3, seed 002): grants, user balances, billing modes, isolation.

Everything runs against a real gateway on uvicorn, a real SQLite file and the fake
upstream; the HTTP calls go through httpx, the ledger is read back from the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import httpx
import pytest

from quota_proxy.admin import AdminError
from tests.conftest import GatewayHarness

pytestmark = pytest.mark.anyio

USD = 1_000_000  # quota tokens per dollar (the default rate)
GRANT = "/v1/funding/grant"


# -- helpers -------------------------------------------------------------------------


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def assert_error(resp: httpx.Response, status: int, code: str, type_: str) -> dict[str, Any]:
    """The SPEC's error body: JSON {"error": {"code", "message", "type", ...}}, never HTML."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    body = resp.json()
    assert list(body) == ["error"], body
    error = body["error"]
    assert error["code"] == code, body
    assert error["type"] == type_, body
    assert isinstance(error["message"], str) and error["message"], body
    assert "Traceback" not in resp.text
    return error


def assert_bad_request(resp: httpx.Response) -> dict[str, Any]:
    return assert_error(resp, 400, "bad_request", "invalid_request_error")


async def snapshot(h: GatewayHarness) -> tuple[Any, ...]:
    """Everything a refused request must leave alone: ledger, balances, holds, users, keys."""
    ledger = await h.rows("SELECT count(*), coalesce(sum(amount), 0) FROM ledger")
    accounts = list(
        await h.rows("SELECT id, kind, name, parent_id, billing_mode, balance, held FROM accounts ORDER BY id")
    )
    idem = await h.rows("SELECT account_id, key, request_hash FROM idempotency ORDER BY 1, 2")
    return ledger, accounts, idem


async def ledger_rows(h: GatewayHarness) -> list[tuple[Any, ...]]:
    return list(
        await h.rows(
            "SELECT l.public_id, a.kind, a.name, l.amount, l.balance_after, l.kind, "
            "l.idempotency_key, l.related_id, l.description, a.parent_id "
            "FROM ledger l JOIN accounts a ON a.id = l.account_id ORDER BY l.id"
        )
    )


async def setup_dev(
    h: GatewayHarness, name: str = "acme", quota_tokens: int = 10 * USD
) -> tuple[str, httpx.AsyncClient]:
    """A funded developer account with a secret key, and an httpx client on the gateway."""
    await h.account(name, quota_tokens)
    secret = await h.key(name, kind="secret")
    return secret, h.http()


async def grant(
    http: httpx.AsyncClient,
    key: str,
    user: str,
    amount: Any,
    idem: str | None = None,
    **extra: Any,
) -> httpx.Response:
    headers = auth(key)
    if idem is not None:
        headers["idempotency-key"] = idem
    return await http.post(GRANT, json={"external_user_id": user, "amount": amount, **extra}, headers=headers)


async def post_raw(http: httpx.AsyncClient, key: str, body: bytes, idem: str | None = None) -> httpx.Response:
    headers = {**auth(key), "content-type": "application/json"}
    if idem is not None:
        headers["idempotency-key"] = idem
    return await http.post(GRANT, content=body, headers=headers)


def assert_user_view(body: dict[str, Any], user: str, quota_tokens: int, balance: str, mode: str) -> None:
    assert {"external_user_id", "balance", "balance_quota_tokens", "billing_mode"} <= set(body), body
    assert body["external_user_id"] == user
    assert body["balance"] == balance
    assert body["balance_quota_tokens"] == quota_tokens
    assert type(body["balance_quota_tokens"]) is int
    assert body["billing_mode"] == mode


# -- a grant moves exactly the amount ------------------------------------------------


async def test_grant_moves_exactly_the_amount_with_two_linked_ledger_rows(gateway: GatewayHarness) -> None:
    secret, http = await setup_dev(gateway, "acme", 10 * USD)
    before = await ledger_rows(gateway)

    resp = await grant(http, secret, "user_123", 0.5, idem="funding-user123-jan2026", description="Welcome bonus")
    assert resp.status_code == 200, resp.text
    body = resp.json()

    assert await gateway.balance("acme") == 10 * USD - 500_000
    assert await gateway.balance("acme", user="user_123") == 500_000

    after = await ledger_rows(gateway)
    new = after[len(before):]
    assert after[: len(before)] == before
    assert len(new) == 2, new
    by_kind = {row[1]: row for row in new}
    dev_row, user_row = by_kind["developer"], by_kind["user"]
    # developer row: -X, user row: +X, both 'grant', each pointing at the other
    assert dev_row[2] == "acme" and dev_row[3] == -500_000 and dev_row[4] == 10 * USD - 500_000
    assert user_row[2] == "user_123" and user_row[3] == 500_000 and user_row[4] == 500_000
    assert dev_row[5] == user_row[5] == "grant"
    assert dev_row[7] == user_row[0]
    assert user_row[7] == dev_row[0]
    assert dev_row[0] != user_row[0]
    assert dev_row[6] == user_row[6] == "funding-user123-jan2026"
    assert dev_row[8] == user_row[8] == "Welcome bonus"
    assert user_row[0].startswith("ledg_") and dev_row[0].startswith("ledg_")
    # the response names the user's ledger row
    assert body["ledger_id"] == user_row[0]
    assert body["developer_ledger_id"] == dev_row[0]
    assert body["developer_balance_after_quota_tokens"] == 10 * USD - 500_000
    assert body["developer_balance_after"] == "$9.50"

    await gateway.verify()
    result = gateway.cli("ledger", "verify", "--json")
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["problems"] == [], report
    plain = gateway.cli("ledger", "verify")
    assert plain.returncode == 0 and "ok" in plain.stdout


async def test_grant_response_shape_and_dollar_formatting(gateway: GatewayHarness) -> None:
    secret, http = await setup_dev(gateway, "acme", 100 * USD)
    cases = [
        # amount sent, amount_granted, quota tokens, user before, user after
        (5, "$5.00", 5_000_000, "$0.00", "$5.00"),
        (0.5, "$0.50", 500_000, "$5.00", "$5.50"),
        (14.9844, "$14.9844", 14_984_400, "$5.50", "$20.4844"),
        (0.000001, "$0.000001", 1, "$20.4844", "$20.484401"),
    ]
    user_total = 0
    for sent, shown, tokens, before, after in cases:
        resp = await grant(http, secret, "user_123", sent)
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"].startswith("application/json")
        body = resp.json()
        assert {
            "external_user_id",
            "amount_granted",
            "balance_before",
            "balance_after",
            "ledger_id",
            "duplicate",
        } <= set(body), body
        assert body["external_user_id"] == "user_123"
        assert body["amount_granted"] == shown
        assert body["amount_granted_quota_tokens"] == tokens
        # balance_before / balance_after are the USER's, not the developer's ($100 pool)
        assert body["balance_before"] == before
        assert body["balance_after"] == after
        assert body["balance_before_quota_tokens"] == user_total
        user_total += tokens
        assert body["balance_after_quota_tokens"] == user_total
        for field in ("amount_granted_quota_tokens", "balance_before_quota_tokens", "balance_after_quota_tokens"):
            assert type(body[field]) is int, (field, body)
        assert body["duplicate"] is False
        assert isinstance(body["ledger_id"], str) and body["ledger_id"].startswith("ledg_")
        assert resp.headers.get("x-quota-request-id")
    await gateway.verify()


EXACT_AMOUNTS = [
    (b"0.1", 100_000),
    (b"0.2", 200_000),
    (b"0.3", 300_000),
    (b"1.000001", 1_000_001),
    (b"2.50", 2_500_000),
    (b"5e0", 5_000_000),
    (b"1E-6", 1),
    (b"7", 7_000_000),
]


async def test_amount_is_parsed_exactly(gateway: GatewayHarness) -> None:
    secret, http = await setup_dev(gateway, "acme", 100 * USD)
    total = 0
    for n, (raw_amount, tokens) in enumerate(EXACT_AMOUNTS):
        user = f"u{n}"
        resp = await post_raw(http, secret, b'{"external_user_id":"' + user.encode() + b'","amount":' + raw_amount + b"}")
        assert resp.status_code == 200, (raw_amount, resp.text)
        assert resp.json()["amount_granted_quota_tokens"] == tokens, raw_amount
        assert await gateway.balance("acme", user=user) == tokens, raw_amount
        total += tokens
    assert await gateway.balance("acme") == 100 * USD - total
    await gateway.verify()


# -- users: created on first grant, balances -----------------------------------------


async def test_user_created_on_first_grant_and_balance_views(gateway: GatewayHarness) -> None:
    secret, http = await setup_dev(gateway, "acme", 10 * USD)

    missing = await http.get("/v1/users/user_123/balance", headers=auth(secret))
    assert_error(missing, 404, "user_not_found", "invalid_request_error")
    missing = await http.get("/v1/balance", params={"external_user_id": "user_123"}, headers=auth(secret))
    assert_error(missing, 404, "user_not_found", "invalid_request_error")

    first = await grant(http, secret, "user_123", 1)
    assert first.status_code == 200 and first.json()["balance_before"] == "$0.00"
    second = await grant(http, secret, "user_123", 2.5)
    assert second.status_code == 200, second.text
    assert second.json()["balance_before"] == "$1.00"
    assert second.json()["balance_after"] == "$3.50"

    view = await http.get("/v1/users/user_123/balance", headers=auth(secret))
    assert view.status_code == 200, view.text
    assert_user_view(view.json(), "user_123", 3_500_000, "$3.50", "user")

    same = await http.get("/v1/balance", params={"external_user_id": "user_123"}, headers=auth(secret))
    assert same.status_code == 200, same.text
    assert same.json() == view.json()

    dev = await http.get("/v1/balance", headers=auth(secret))
    assert dev.status_code == 200
    assert dev.json()["balance_quota_tokens"] == 10 * USD - 3_500_000
    assert dev.json()["balance"] == "$6.50"

    # exactly one user account was created, under acme
    users = await gateway.store.list_users((await gateway.store.account_by_name("acme")).id)  # type: ignore[union-attr]
    assert [u.name for u in users] == ["user_123"]

    for path in ("/v1/users/nobody/balance",):
        assert_error(await http.get(path, headers=auth(secret)), 404, "user_not_found", "invalid_request_error")
    await gateway.verify()


# -- idempotency -----------------------------------------------------------------------


async def test_idempotent_replay_returns_first_response_and_grants_nothing(gateway: GatewayHarness) -> None:
    secret, http = await setup_dev(gateway, "acme", 10 * USD)
    first = await grant(http, secret, "user_123", 0.5, idem="k-1", description="Welcome bonus")
    assert first.status_code == 200, first.text
    state = await snapshot(gateway)

    for _ in range(2):
        again = await grant(http, secret, "user_123", 0.5, idem="k-1", description="Welcome bonus")
        assert again.status_code == 200, again.text
        assert again.json() == {**first.json(), "duplicate": True}
        assert await snapshot(gateway) == state

    assert await gateway.balance("acme", user="user_123") == 500_000
    assert await gateway.balance("acme") == 10 * USD - 500_000

    # a replay stays a replay after later grants moved the balance on
    later = await grant(http, secret, "user_123", 1, idem="k-2", description="Welcome bonus")
    assert later.status_code == 200 and later.json()["duplicate"] is False
    replay = await grant(http, secret, "user_123", 0.5, idem="k-1", description="Welcome bonus")
    assert replay.json() == {**first.json(), "duplicate": True}
    assert await gateway.balance("acme", user="user_123") == 1_500_000
    await gateway.verify()


async def test_same_key_different_body_is_409_and_changes_nothing(gateway: GatewayHarness) -> None:
    secret, http = await setup_dev(gateway, "acme", 10 * USD)
    body = {"external_user_id": "user_123", "amount": 0.5, "description": "Welcome bonus"}
    headers = {**auth(secret), "idempotency-key": "k-1"}
    first = await http.post(GRANT, json=body, headers=headers)
    assert first.status_code == 200, first.text
    state = await snapshot(gateway)

    for changed in (
        {"amount": 0.51},
        {"amount": 0.000001},
        {"external_user_id": "user_456"},
        {"description": "Another bonus"},
        {"description": None, "amount": 5},
    ):
        conflict = await http.post(GRANT, json={**body, **changed}, headers=headers)
        assert conflict.status_code == 409, (changed, conflict.text)
        assert_error(conflict, 409, "idempotency_conflict", "invalid_request_error")
        assert await snapshot(gateway) == state, changed

    # the original body still replays
    replay = await http.post(GRANT, json=body, headers=headers)
    assert replay.json() == {**first.json(), "duplicate": True}
    assert await gateway.balance("acme", user="user_123") == 500_000
    await gateway.verify()


async def test_idempotency_keys_are_scoped_to_the_developer(gateway: GatewayHarness) -> None:
    secret_a, http = await setup_dev(gateway, "alpha", 10 * USD)
    secret_b, _ = await setup_dev(gateway, "beta", 10 * USD)

    a = await grant(http, secret_a, "user_123", 0.5, idem="shared-key")
    assert a.status_code == 200 and a.json()["duplicate"] is False
    # the same key and body from another developer is a new grant, not a replay
    b = await grant(http, secret_b, "user_123", 0.5, idem="shared-key")
    assert b.status_code == 200, b.text
    assert b.json()["duplicate"] is False
    assert b.json()["ledger_id"] != a.json()["ledger_id"]
    # ...and a different body from another developer is no conflict either
    b2 = await grant(http, secret_b, "user_789", 2, idem="other-key")
    assert b2.status_code == 200
    a2 = await grant(http, secret_a, "user_555", 3, idem="other-key")
    assert a2.status_code == 200 and a2.json()["duplicate"] is False

    assert await gateway.balance("alpha") == 10 * USD - 3_500_000
    assert await gateway.balance("beta") == 10 * USD - 2_500_000
    assert await gateway.balance("alpha", user="user_123") == 500_000
    assert await gateway.balance("beta", user="user_123") == 500_000
    # each developer's replay still answers with its own first response
    ra = await grant(http, secret_a, "user_123", 0.5, idem="shared-key")
    rb = await grant(http, secret_b, "user_123", 0.5, idem="shared-key")
    assert ra.json() == {**a.json(), "duplicate": True}
    assert rb.json() == {**b.json(), "duplicate": True}
    await gateway.verify()


async def test_fifty_concurrent_grants_with_one_key_grant_once(gateway: GatewayHarness) -> None:
    secret, http = await setup_dev(gateway, "acme", 10 * USD)
    ledger_before = len(await ledger_rows(gateway))

    responses = await asyncio.wait_for(
        asyncio.gather(
            *(grant(http, secret, "user_123", 0.5, idem="burst-key", description="burst") for _ in range(50))
        ),
        timeout=30,
    )
    assert [r.status_code for r in responses] == [200] * 50, [r.text for r in responses if r.status_code != 200]
    bodies = [r.json() for r in responses]
    originals = [b for b in bodies if b["duplicate"] is False]
    assert len(originals) == 1, [b["duplicate"] for b in bodies]
    first = originals[0]
    for body in bodies:
        assert body == {**first, "duplicate": body["duplicate"]}
        assert body["duplicate"] in (True, False)
        assert body["amount_granted"] == "$0.50"
        assert body["balance_before_quota_tokens"] == 0
        assert body["balance_after_quota_tokens"] == 500_000

    rows = await ledger_rows(gateway)
    assert len(rows) == ledger_before + 2
    assert await gateway.balance("acme", user="user_123") == 500_000
    assert await gateway.balance("acme") == 10 * USD - 500_000
    await gateway.verify()


# -- bad input: 400 and nothing changes ------------------------------------------------

BAD_AMOUNTS = {
    "negative": b'{"external_user_id":"u1","amount":-1}',
    "negative-fraction": b'{"external_user_id":"u1","amount":-0.5}',
    "zero": b'{"external_user_id":"u1","amount":0}',
    "zero-float": b'{"external_user_id":"u1","amount":0.0}',
    "minus-zero": b'{"external_user_id":"u1","amount":-0.0}',
    "nan": b'{"external_user_id":"u1","amount":NaN}',
    "infinity": b'{"external_user_id":"u1","amount":Infinity}',
    "minus-infinity": b'{"external_user_id":"u1","amount":-Infinity}',
    "string": b'{"external_user_id":"u1","amount":"5"}',
    "true": b'{"external_user_id":"u1","amount":true}',
    "false": b'{"external_user_id":"u1","amount":false}',
    "null": b'{"external_user_id":"u1","amount":null}',
    "list": b'{"external_user_id":"u1","amount":[5]}',
    "object": b'{"external_user_id":"u1","amount":{"usd":5}}',
    "too-many-decimals": b'{"external_user_id":"u1","amount":0.0000001}',
    "sub-unit-fraction": b'{"external_user_id":"u1","amount":1.0000005}',
    "huge-exponent": b'{"external_user_id":"u1","amount":1e999999}',
    "tiny-exponent": b'{"external_user_id":"u1","amount":1e-999999}',
    "over-default-max": b'{"external_user_id":"u1","amount":10000.01}',
    "huge-integer": b'{"external_user_id":"u1","amount":' + b"9" * 400 + b"}",
    "missing": b'{"external_user_id":"u1"}',
}


async def test_bad_amount_is_400_and_changes_nothing(gateway: GatewayHarness) -> None:
    secret, http = await setup_dev(gateway, "acme", 10 * USD)
    state = await snapshot(gateway)
    failures = []
    for name, raw in BAD_AMOUNTS.items():
        resp = await post_raw(http, secret, raw, idem=f"bad-{name}")
        try:
            assert_bad_request(resp)
        except AssertionError as exc:
            failures.append((name, resp.status_code, resp.text[:200], str(exc)[:200]))
        if await snapshot(gateway) != state:
            failures.append((name, "state changed"))
            state = await snapshot(gateway)
    assert failures == []
    # a refused request does not consume its idempotency key
    ok = await grant(http, secret, "u1", 1, idem="bad-nan")
    assert ok.status_code == 200 and ok.json()["duplicate"] is False
    await gateway.verify()


async def test_amount_over_configured_maximum_is_400(make_gateway: Any) -> None:
    h: GatewayHarness = await make_gateway(funding={"max_grant_usd": 100})
    secret, http = await setup_dev(h, "acme", 300 * USD)
    state = await snapshot(h)
    for amount in (b"100.01", b"100.000001", b"101", b"1e3"):
        resp = await post_raw(h.http(), secret, b'{"external_user_id":"u1","amount":' + amount + b"}")
        assert_bad_request(resp)
        assert await snapshot(h) == state
    # the maximum itself is allowed
    ok = await grant(http, secret, "u1", 100)
    assert ok.status_code == 200, ok.text
    assert ok.json()["amount_granted"] == "$100.00"
    assert await h.balance("acme", user="u1") == 100 * USD
    await h.verify()


BAD_USER_IDS: dict[str, Any] = {
    "empty": "",
    "129-chars": "a" * 129,
    "slash": "a/b",
    "space": "a b",
    "unicode-accent": "usér",
    "unicode-cjk": "ユーザー",
    "arabic-digit": "user\u0663",
    "newline": "user_123\n",
    "tab": "user\t1",
    "integer": 123,
    "null": None,
    "list": ["user_123"],
    "bool": True,
}


async def test_bad_external_user_id_is_400(gateway: GatewayHarness) -> None:
    secret, http = await setup_dev(gateway, "acme", 10 * USD)
    state = await snapshot(gateway)
    failures = []
    for name, user in BAD_USER_IDS.items():
        resp = await http.post(GRANT, json={"external_user_id": user, "amount": 1}, headers=auth(secret))
        try:
            assert_bad_request(resp)
        except AssertionError as exc:
            failures.append((name, resp.status_code, resp.text[:200], str(exc)[:200]))
        if await snapshot(gateway) != state:
            failures.append((name, "state changed"))
            state = await snapshot(gateway)
    assert failures == []


async def test_missing_external_user_id_is_400_and_edge_ids_are_accepted(gateway: GatewayHarness) -> None:
    secret, http = await setup_dev(gateway, "acme", 10 * USD)
    state = await snapshot(gateway)
    assert_bad_request(await http.post(GRANT, json={"amount": 1}, headers=auth(secret)))
    assert await snapshot(gateway) == state
    for user in ("a" * 128, "A-z.0_9:@x", "x", "user@example.com"):
        resp = await grant(http, secret, user, 0.01)
        assert resp.status_code == 200, (user, resp.text)
        assert resp.json()["external_user_id"] == user
        view = await http.get(f"/v1/users/{user}/balance", headers=auth(secret))
        assert view.status_code == 200, view.text
        assert_user_view(view.json(), user, 10_000, "$0.01", "user")
    await gateway.verify()


async def test_description_limits(gateway: GatewayHarness) -> None:
    secret, http = await setup_dev(gateway, "acme", 10 * USD)
    state = await snapshot(gateway)
    assert_bad_request(await grant(http, secret, "u1", 1, description="x" * 501))
    assert_bad_request(await grant(http, secret, "u1", 1, description=123))
    assert_bad_request(await grant(http, secret, "u1", 1, description=["x"]))
    assert await snapshot(gateway) == state
    ok = await grant(http, secret, "u1", 1, description="x" * 500)
    assert ok.status_code == 200, ok.text
    rows = await ledger_rows(gateway)
    assert rows[-1][8] == "x" * 500
    await gateway.verify()


MALFORMED = {
    "empty": b"",
    "open-brace": b"{",
    "text": b"not json",
    "trailing-comma": b'{"external_user_id":"u1","amount":1,}',
    "missing-comma": b'{"external_user_id":"u1" "amount":1}',
    "array": b"[]",
    "string": b'"u1"',
    "number": b"1",
    "null": b"null",
    "bad-utf8": b'\xff\xfe{"external_user_id":"u1","amount":1}',
    "deep-nesting": b"[" * 100_000 + b"]" * 100_000,
}


async def test_malformed_json_is_400(gateway: GatewayHarness) -> None:
    secret, http = await setup_dev(gateway, "acme", 10 * USD)
    state = await snapshot(gateway)
    failures = []
    for name, raw in MALFORMED.items():
        resp = await post_raw(http, secret, raw)
        try:
            assert_bad_request(resp)
        except AssertionError as exc:
            failures.append((name, resp.status_code, resp.text[:200], str(exc)[:200]))
    assert failures == []
    assert await snapshot(gateway) == state


async def test_bad_idempotency_key_is_400(gateway: GatewayHarness) -> None:
    secret, http = await setup_dev(gateway, "acme", 10 * USD)
    state = await snapshot(gateway)
    assert_bad_request(await grant(http, secret, "u1", 1, idem="k" * 256))
    assert_bad_request(
        await http.post(
            GRANT, json={"external_user_id": "u1", "amount": 1}, headers={**auth(secret), "idempotency-key": b"caf\xe9"}
        )
    )
    assert await snapshot(gateway) == state
    ok = await grant(http, secret, "u1", 1, idem="k" * 255)
    assert ok.status_code == 200, ok.text
    replay = await grant(http, secret, "u1", 1, idem="k" * 255)
    assert replay.json()["duplicate"] is True
    assert await gateway.balance("acme", user="u1") == USD
    await gateway.verify()


# -- keys: secret only -----------------------------------------------------------------


async def test_live_key_is_403_and_no_key_is_401_on_user_endpoints(gateway: GatewayHarness) -> None:
    secret, http = await setup_dev(gateway, "acme", 10 * USD)
    live = await gateway.key("acme", kind="live")
    assert live.startswith("qta_live_") and secret.startswith("sk-quota-")
    assert (await grant(http, secret, "user_123", 1)).status_code == 200
    state = await snapshot(gateway)
    upstream_calls = len(gateway.upstream.app.requests)

    chat = {"model": "quota/fast", "messages": [{"role": "user", "content": "hello"}]}
    calls = [
        ("POST", GRANT, {"external_user_id": "user_123", "amount": 1}),
        ("GET", "/v1/users/user_123/balance", None),
        ("PATCH", "/v1/users/user_123", {"billing_mode": "developer"}),
        ("POST", "/v1/users/user_123/chat/completions", chat),
    ]
    for method, path, body in calls:
        denied = await http.request(method, path, json=body, headers=auth(live))
        assert_error(denied, 403, "permission_denied", "permission_error")
        denied = await http.request(method, path, json=body, headers={"x-api-key": live})
        assert_error(denied, 403, "permission_denied", "permission_error")
        anonymous = await http.request(method, path, json=body)
        assert_error(anonymous, 401, "invalid_api_key", "authentication_error")
        wrong = await http.request(method, path, json=body, headers=auth("sk-quota-" + "A" * 40))
        assert_error(wrong, 401, "invalid_api_key", "authentication_error")

    assert await snapshot(gateway) == state
    assert len(gateway.upstream.app.requests) == upstream_calls
    view = await http.get("/v1/users/user_123/balance", headers=auth(secret))
    assert view.json()["billing_mode"] == "user"


# -- the pool --------------------------------------------------------------------------


async def test_pool_smaller_than_amount_is_402_and_changes_nothing(gateway: GatewayHarness) -> None:
    secret, http = await setup_dev(gateway, "acme", 1 * USD)
    state = await snapshot(gateway)
    resp = await grant(http, secret, "user_123", 1.5, idem="too-much")
    error = assert_error(resp, 402, "insufficient_balance", "billing_error")
    assert error["required_quota_tokens"] == 1_500_000
    assert error["available_quota_tokens"] == 1_000_000
    assert await snapshot(gateway) == state
    assert_error(
        await http.get("/v1/users/user_123/balance", headers=auth(secret)), 404, "user_not_found", "invalid_request_error"
    )
    # exactly the whole pool fits
    ok = await grant(http, secret, "user_123", 1)
    assert ok.status_code == 200, ok.text
    assert await gateway.balance("acme") == 0
    short = await grant(http, secret, "user_123", 0.000001)
    error = assert_error(short, 402, "insufficient_balance", "billing_error")
    assert error["required_quota_tokens"] == 1 and error["available_quota_tokens"] == 0
    await gateway.verify()


async def test_pool_held_by_in_flight_request_counts_only_available(gateway: GatewayHarness) -> None:
    secret, http = await setup_dev(gateway, "acme", 1 * USD)
    dev = await gateway.store.account_by_name("acme")
    assert dev is not None
    hold = await gateway.store.take_hold(dev.id, 600_000, "req_test_in_flight", "test-owner", 60_000)
    try:
        state = await snapshot(gateway)
        resp = await grant(http, secret, "user_123", 0.5)
        error = assert_error(resp, 402, "insufficient_balance", "billing_error")
        assert error["required_quota_tokens"] == 500_000
        assert error["available_quota_tokens"] == 400_000
        assert await snapshot(gateway) == state

        ok = await grant(http, secret, "user_123", 0.4)
        assert ok.status_code == 200, ok.text
        fresh = await gateway.store.account(dev.id)
        assert fresh is not None and fresh.balance == 600_000 and fresh.held == 600_000
        assert_error(await grant(http, secret, "user_123", 0.000001), 402, "insufficient_balance", "billing_error")
        await gateway.verify()
    finally:
        await gateway.store.release_hold(hold)
    ok = await grant(http, secret, "user_123", 0.6)
    assert ok.status_code == 200, ok.text
    assert await gateway.balance("acme") == 0
    assert await gateway.balance("acme", user="user_123") == 1 * USD
    await gateway.verify()


async def test_concurrent_grants_never_overdraw_the_pool(gateway: GatewayHarness) -> None:
    secret, http = await setup_dev(gateway, "acme", 1 * USD)
    responses = await asyncio.wait_for(
        asyncio.gather(*(grant(http, secret, f"user_{n % 7}", 0.1, idem=f"drain-{n}") for n in range(30))),
        timeout=30,
    )
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 10 + [402] * 20, statuses
    for r in responses:
        if r.status_code == 402:
            assert_error(r, 402, "insufficient_balance", "billing_error")
    assert await gateway.balance("acme") == 0
    total = 0
    for n in range(7):
        with contextlib.suppress(AdminError):  # a user that no grant reached does not exist
            total += await gateway.balance("acme", user=f"user_{n}")
    assert total == 1 * USD
    await gateway.verify()


# -- isolation between developers -------------------------------------------------------


async def test_developers_cannot_see_grant_into_or_spend_each_others_users(gateway: GatewayHarness) -> None:
    secret_a, http = await setup_dev(gateway, "alpha", 10 * USD)
    secret_b, _ = await setup_dev(gateway, "beta", 10 * USD)
    chat = {"model": "quota/fast", "messages": [{"role": "user", "content": "hello"}]}

    assert (await grant(http, secret_a, "user_123", 1)).status_code == 200
    upstream_calls = len(gateway.upstream.app.requests)
    state = await snapshot(gateway)
    # beta sees no user_123
    for method, path, body, params in (
        ("GET", "/v1/users/user_123/balance", None, None),
        ("GET", "/v1/balance", None, {"external_user_id": "user_123"}),
        ("PATCH", "/v1/users/user_123", {"billing_mode": "developer"}, None),
        ("POST", "/v1/users/user_123/chat/completions", chat, None),
    ):
        resp = await http.request(method, path, json=body, params=params, headers=auth(secret_b))
        assert_error(resp, 404, "user_not_found", "invalid_request_error")
    assert await snapshot(gateway) == state
    assert len(gateway.upstream.app.requests) == upstream_calls

    # beta granting "user_123" makes beta's own user_123, alpha's is untouched
    b = await grant(http, secret_b, "user_123", 2)
    assert b.status_code == 200, b.text
    assert b.json()["balance_before"] == "$0.00" and b.json()["balance_after"] == "$2.00"
    assert await gateway.balance("alpha", user="user_123") == 1 * USD
    assert await gateway.balance("beta", user="user_123") == 2 * USD

    view_a = (await http.get("/v1/users/user_123/balance", headers=auth(secret_a))).json()
    view_b = (await http.get("/v1/users/user_123/balance", headers=auth(secret_b))).json()
    assert view_a["balance_quota_tokens"] == 1 * USD
    assert view_b["balance_quota_tokens"] == 2 * USD

    # beta's completion for user_123 spends beta's user_123 only
    spent = await http.post("/v1/users/user_123/chat/completions", json=chat, headers=auth(secret_b))
    assert spent.status_code == 200, spent.text
    charged = spent.json()["usage"]["charged_quota_tokens"]
    assert charged > 0
    assert await gateway.balance("beta", user="user_123") == 2 * USD - charged
    assert await gateway.balance("alpha", user="user_123") == 1 * USD
    assert await gateway.balance("alpha") == 9 * USD
    assert await gateway.balance("beta") == 8 * USD

    # a billing-mode change by beta does not touch alpha's user
    patched = await http.patch("/v1/users/user_123", json={"billing_mode": "developer"}, headers=auth(secret_b))
    assert patched.status_code == 200
    view_a = (await http.get("/v1/users/user_123/balance", headers=auth(secret_a))).json()
    assert view_a["billing_mode"] == "user"
    await gateway.verify()


# -- PATCH /v1/users/{id} ----------------------------------------------------------------


async def test_patch_billing_mode(gateway: GatewayHarness) -> None:
    secret, http = await setup_dev(gateway, "acme", 10 * USD)
    assert (await grant(http, secret, "user_123", 1.25)).status_code == 200

    resp = await http.patch("/v1/users/user_123", json={"billing_mode": "developer"}, headers=auth(secret))
    assert resp.status_code == 200, resp.text
    assert_user_view(resp.json(), "user_123", 1_250_000, "$1.25", "developer")
    view = await http.get("/v1/users/user_123/balance", headers=auth(secret))
    assert view.json() == resp.json()

    state = await snapshot(gateway)
    for bad in ({"billing_mode": "admin"}, {"billing_mode": "USER"}, {"billing_mode": None},
                {"billing_mode": 1}, {"billing_mode": ["user"]}, {}):
        assert_bad_request(await http.patch("/v1/users/user_123", json=bad, headers=auth(secret)))
    for raw in (b"{", b"[]", b""):
        assert_bad_request(
            await http.patch(
                "/v1/users/user_123", content=raw, headers={**auth(secret), "content-type": "application/json"}
            )
        )
    assert await snapshot(gateway) == state

    missing = await http.patch("/v1/users/nobody", json={"billing_mode": "user"}, headers=auth(secret))
    assert_error(missing, 404, "user_not_found", "invalid_request_error")
    bad_id = await http.patch("/v1/users/a%20b", json={"billing_mode": "user"}, headers=auth(secret))
    assert_bad_request(bad_id)
    assert await snapshot(gateway) == state

    back = await http.patch("/v1/users/user_123", json={"billing_mode": "user"}, headers=auth(secret))
    assert back.status_code == 200
    assert_user_view(back.json(), "user_123", 1_250_000, "$1.25", "user")
    await gateway.verify()


async def test_user_paths_with_bad_ids_are_400(gateway: GatewayHarness) -> None:
    secret, http = await setup_dev(gateway, "acme", 10 * USD)
    for user in ("a%20b", "us%C3%A9r", "a" * 129):
        resp = await http.get(f"/v1/users/{user}/balance", headers=auth(secret))
        assert_bad_request(resp)
        resp = await http.get("/v1/balance", params={"external_user_id": user.replace("%20", " ")}, headers=auth(secret))
        assert_bad_request(resp)
