"""Buying packs through Stripe Checkout (issue 13), end to end.

A real gateway on uvicorn with a real SQLite file; Stripe is the fake in
quota_proxy.testing_stripe, run as its own process, which the official `stripe` SDK
reaches through its documented base address (`[payments.stripe] api_base`) and which
signs and delivers webhook events the way Stripe does. `ledger verify` after each test.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from quota_proxy.config import ConfigError, load_settings
from quota_proxy.store import payment_store
from quota_proxy.store.payments import EventOutcome
from tests.conftest import GatewayFactory, GatewayHarness, closed_port, config_toml, run_cli

pytestmark = pytest.mark.anyio

API_KEY = "sk_test_fake_" + "a" * 24
WEBHOOK_SECRET = "whsec_fake_" + "b" * 32
STARTER_TOKENS = 5_000_000
STARTER_CENTS = 500


@dataclass
class FakeStripeProcess:
    url: str
    proc: subprocess.Popen[str]

    async def control(self, method: str, path: str, **body: Any) -> Any:
        async with httpx.AsyncClient(base_url=self.url, timeout=60) as client:
            response = await client.request(method, path, json=body if method != "GET" else None)
            assert response.status_code == 200, response.text
            return response.json()


@pytest.fixture
def fake_stripe() -> Iterator[FakeStripeProcess]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "quota_proxy.testing_stripe", "--api-key", API_KEY,
         "--webhook-secret", WEBHOOK_SECRET],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("FAKE_STRIPE_READY "), (line, proc.stderr.read() if proc.stderr else "")
        yield FakeStripeProcess(line.split()[1], proc)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def stripe_extra(api_base: str, key_env: str = "QP_TEST_STRIPE_KEY", hook_env: str = "QP_TEST_STRIPE_HOOK") -> str:
    return "\n".join(
        [
            "[payments.stripe]",
            f'secret_key_env = "{key_env}"',
            f'webhook_secret_env = "{hook_env}"',
            f'api_base = "{api_base}"',
            "[alerts]",
            "poll_interval_s = 0.1",
            "retry_base_s = 0.2",
        ]
    )


@dataclass
class Shop:
    """A gateway selling packs through the fake Stripe, and its two developer accounts."""

    h: GatewayHarness
    stripe: FakeStripeProcess
    http: httpx.AsyncClient
    secret: str  # acme's sk-quota- key
    other_secret: str  # globex's

    async def checkout(self, package: str = "starter", key: str | None = None) -> dict[str, Any]:
        response = await self.http.post("/v1/checkout", json={"package": package}, headers=auth(key or self.secret))
        assert response.status_code == 200, response.text
        data: dict[str, Any] = response.json()
        return data

    async def pay(self, order: dict[str, Any], deliver: bool = True) -> dict[str, Any]:
        result: dict[str, Any] = await self.stripe.control(
            "POST", f"/_test/sessions/{order['checkout_session_id']}/pay", deliver=deliver
        )
        return result

    async def deliver(self, event_id: str, **options: Any) -> list[int]:
        result = await self.stripe.control("POST", f"/_test/events/{event_id}/deliver", **options)
        statuses: list[int] = result["statuses"]
        return statuses

    async def emit(self, event_type: str, obj: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self.stripe.control("POST", "/_test/events", type=event_type, object=obj)
        return result

    async def order(self, order_id: str) -> dict[str, Any]:
        for key in (self.secret, self.other_secret):
            response = await self.http.get("/v1/orders", headers=auth(key))
            assert response.status_code == 200, response.text
            for order in response.json()["data"]:
                if order["order_id"] == order_id:
                    found: dict[str, Any] = order
                    return found
        raise AssertionError(f"no order {order_id}")

    async def purchases(self) -> list[tuple[Any, ...]]:
        return await self.h.rows(
            "SELECT a.name, l.amount, l.kind, l.related_id, l.idempotency_key FROM ledger l "
            "JOIN accounts a ON a.id = l.account_id WHERE l.kind IN ('purchase', 'refund') ORDER BY l.id"
        )


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture
async def shop(
    make_gateway: GatewayFactory, fake_stripe: FakeStripeProcess, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Shop]:
    monkeypatch.setenv("QP_TEST_STRIPE_KEY", API_KEY)
    monkeypatch.setenv("QP_TEST_STRIPE_HOOK", WEBHOOK_SECRET)
    h: GatewayHarness = await make_gateway(
        server={"public_url": "https://gateway.example.com"}, extra=stripe_extra(fake_stripe.url)
    )
    await fake_stripe.control("POST", "/_test/configure", webhook_url=f"{h.url}/webhooks/stripe")
    await h.account("acme", 0)
    await h.account("globex", 0)
    shop = Shop(h, fake_stripe, h.http(), await h.key("acme", kind="secret"), await h.key("globex", kind="secret"))
    yield shop
    await h.verify()  # what `quota-proxy ledger verify` runs; the CLI itself runs in cli_verify()


async def cli_verify(h: GatewayHarness) -> None:
    """`quota-proxy ledger verify`, in a thread: the gateway in this event loop keeps serving."""
    verified = await anyio.to_thread.run_sync(lambda: h.cli("ledger", "verify", "--json"))
    assert '"ok": true' in verified.stdout


# -- the purchase path ------------------------------------------------------------------


async def test_purchase_credits_exactly_the_orders_tokens(shop: Shop) -> None:
    order = await shop.checkout("starter")
    assert order["order_id"].startswith("ord_")
    assert order["status"] == "pending"
    assert order["quota_tokens"] == STARTER_TOKENS and order["amount_cents"] == STARTER_CENTS
    assert order["checkout_url"].startswith(shop.stripe.url + "/pay/cs_test_")

    # The session the SDK created on "Stripe": payment mode, one line priced from the pack,
    # the order id as its reference.
    sessions = (await shop.stripe.control("GET", "/_test/sessions"))["data"]
    assert len(sessions) == 1
    params, session = sessions[0]["params"], sessions[0]["session"]
    assert session["id"] == order["checkout_session_id"]
    assert params["mode"] == "payment"
    assert params["client_reference_id"] == order["order_id"]
    assert params["metadata"]["order_id"] == order["order_id"]
    assert len(params["line_items"]) == 1
    price = params["line_items"][0]["price_data"]
    assert (price["unit_amount"], price["currency"]) == ("500", "usd")
    order_page = f"https://gateway.example.com/dashboard/orders/{order['order_id']}"
    assert params["success_url"] == order_page + "?checkout=success"
    assert params["cancel_url"] == order_page + "?checkout=cancelled"

    assert await shop.h.balance("acme") == 0
    paid = await shop.pay(order)
    assert paid["statuses"] == [200]
    assert await shop.h.balance("acme") == STARTER_TOKENS
    assert await shop.h.balance("globex") == 0

    after = await shop.order(order["order_id"])
    assert after["status"] == "paid" and after["checkout_url"] is None
    event_id = paid["event"]["id"]
    assert await shop.purchases() == [("acme", STARTER_TOKENS, "purchase", order["order_id"], event_id)]
    entry = (await shop.h.store.ledger((await shop.h.store.account_by_name("acme")).id))[0]  # type: ignore[union-attr]
    assert after["ledger_id"] == entry.public_id
    assert order["order_id"] in entry.description and event_id in entry.description
    await cli_verify(shop.h)


async def test_tokens_come_from_the_order_not_the_config_at_payment_time(shop: Shop) -> None:
    order = await shop.checkout("pro")
    # The operator edits the pack between checkout and payment: the order keeps what was sold.
    text = shop.h.config_path.read_text().replace("quota_tokens = 22_000_000", "quota_tokens = 99_000_000")
    shop.h.config_path.write_text(text)
    assert shop.h.app.reload()
    await shop.pay(order)
    assert await shop.h.balance("acme") == 22_000_000


async def test_the_same_event_20_times_concurrently_and_later_credits_once(shop: Shop) -> None:
    order = await shop.checkout("starter")
    paid = await shop.pay(order, deliver=False)
    event_id = paid["event"]["id"]
    statuses = await shop.deliver(event_id, times=20, concurrent=True)
    assert statuses == [200] * 20, statuses
    later = await shop.deliver(event_id, times=3)
    assert later == [200] * 3
    assert await shop.h.balance("acme") == STARTER_TOKENS
    assert len(await shop.purchases()) == 1
    await cli_verify(shop.h)
    outcomes = await payment_store(shop.h.store).event_outcomes("stripe")
    assert outcomes == [(event_id, "credited", order["order_id"])]


async def test_paid_twice_by_two_event_types_credits_once(shop: Shop) -> None:
    order = await shop.checkout("starter")
    paid = await shop.pay(order)
    session = paid["event"]["data"]["object"]
    second = await shop.emit("checkout.session.async_payment_succeeded", session)
    assert second["statuses"] == [200]
    assert await shop.h.balance("acme") == STARTER_TOKENS


@pytest.mark.parametrize(
    "options",
    [
        {"signature": "forged"},
        {"signature": "none"},
        {"signature": "empty_secret"},
        {"timestamp_offset_s": -301},  # older than Stripe's 5-minute tolerance
        {"timestamp_offset_s": 3600},  # from the future
    ],
    ids=["forged", "missing", "empty-secret", "expired", "future"],
)
async def test_an_unverifiable_event_credits_nothing(shop: Shop, options: dict[str, Any]) -> None:
    order = await shop.checkout("starter")
    paid = await shop.pay(order, deliver=False)
    statuses = await shop.deliver(paid["event"]["id"], **options)
    assert statuses == [400]
    assert await shop.h.balance("acme") == 0
    assert (await shop.order(order["order_id"]))["status"] == "pending"
    assert await payment_store(shop.h.store).event_outcomes("stripe") == []
    # The refused delivery recorded nothing: the genuine one still credits.
    assert await shop.deliver(paid["event"]["id"]) == [200]
    assert await shop.h.balance("acme") == STARTER_TOKENS


async def test_an_unsigned_request_gets_a_json_400(shop: Shop) -> None:
    response = await shop.http.post("/webhooks/stripe", content=b'{"id": "evt_x", "type": "checkout.session.completed"}')
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_signature"


async def test_an_event_for_another_accounts_order_credits_nothing(shop: Shop) -> None:
    mine = await shop.checkout("starter", shop.secret)
    theirs = await shop.checkout("pro", shop.other_secret)
    paid = await shop.pay(mine, deliver=False)
    session = dict(paid["event"]["data"]["object"])
    # acme's paid session, relabelled to name globex's order (both references).
    session.update(metadata={"order_id": theirs["order_id"]}, client_reference_id=theirs["order_id"])
    result = await shop.emit("checkout.session.completed", session)
    assert result["statuses"] == [200]  # acknowledged, so Stripe stops; logged; nothing credited
    # and globex's amount with acme's references, too:
    session.update(metadata={"order_id": mine["order_id"]}, client_reference_id=theirs["order_id"])
    assert (await shop.emit("checkout.session.completed", session))["statuses"] == [200]
    assert await shop.h.balance("acme") == 0
    assert await shop.h.balance("globex") == 0
    assert (await shop.order(theirs["order_id"]))["status"] == "pending"
    outcomes = await payment_store(shop.h.store).event_outcomes("stripe")
    assert [o[1].split(":")[0] for o in outcomes] == ["mismatch", "mismatch"]


@pytest.mark.parametrize(
    "change", [{"amount_total": 1}, {"amount_total": 50_000}, {"currency": "eur"}, {"mode": "subscription"}]
)
async def test_a_wrong_amount_or_currency_credits_nothing(shop: Shop, change: dict[str, Any]) -> None:
    order = await shop.checkout("starter")
    paid = await shop.pay(order, deliver=False)
    session = {**paid["event"]["data"]["object"], **change}
    assert (await shop.emit("checkout.session.completed", session))["statuses"] == [200]
    assert await shop.h.balance("acme") == 0
    assert (await shop.order(order["order_id"]))["status"] == "pending"


async def test_an_order_of_another_provider_is_not_credited_by_stripe(shop: Shop) -> None:
    acme = await shop.h.store.account_by_name("acme")
    assert acme is not None
    payments = payment_store(shop.h.store)
    other = await payments.create_order(acme.id, "starter", STARTER_CENTS, "usd", STARTER_TOKENS, "paypal")
    await payments.attach_checkout(other.public_id, "cs_test_lookalike", "https://paypal.example/x")
    session = {
        "id": "cs_test_lookalike", "object": "checkout.session", "amount_total": STARTER_CENTS,
        "currency": "usd", "client_reference_id": other.public_id, "metadata": {"order_id": other.public_id},
        "mode": "payment", "payment_status": "paid", "status": "complete", "payment_intent": "pi_test_x",
    }
    assert (await shop.emit("checkout.session.completed", session))["statuses"] == [200]
    assert await shop.h.balance("acme") == 0
    assert (await payments.order(other.public_id)).status == "pending"  # type: ignore[union-attr]


async def test_a_paid_event_that_outran_our_record_of_the_checkout_still_credits_once(shop: Shop) -> None:
    """The process died between Stripe opening the session and our storing its id."""
    acme = await shop.h.store.account_by_name("acme")
    assert acme is not None
    payments = payment_store(shop.h.store)
    order = await payments.create_order(acme.id, "starter", STARTER_CENTS, "usd", STARTER_TOKENS, "stripe")
    session = {
        "id": "cs_test_unrecorded", "object": "checkout.session", "amount_total": STARTER_CENTS,
        "currency": "usd", "client_reference_id": order.public_id, "metadata": {"order_id": order.public_id},
        "mode": "payment", "payment_status": "paid", "status": "complete", "payment_intent": "pi_test_u",
    }
    # First a signed event with the wrong amount: it credits nothing and binds nothing.
    cheap = {**session, "id": "cs_test_cheap", "amount_total": 1}
    assert (await shop.emit("checkout.session.completed", cheap))["statuses"] == [200]
    unbound = await payments.order(order.public_id)
    assert unbound is not None and unbound.provider_ref is None and unbound.status == "pending"
    result = await shop.emit("checkout.session.completed", session)
    assert result["statuses"] == [200]
    assert await shop.deliver(result["event"]["id"], times=3, concurrent=True) == [200] * 3
    assert await shop.h.balance("acme") == STARTER_TOKENS
    paid = await payments.order(order.public_id)
    assert paid is not None and (paid.status, paid.provider_ref) == ("paid", "cs_test_unrecorded")
    # A later paid event for another session cannot credit the same order again.
    other = {**session, "id": "cs_test_second", "payment_intent": "pi_test_v"}
    assert (await shop.emit("checkout.session.completed", other))["statuses"] == [200]
    assert await shop.h.balance("acme") == STARTER_TOKENS


async def test_a_paid_session_without_references_is_found_by_its_session(shop: Shop) -> None:
    order = await shop.checkout("starter")
    paid = await shop.pay(order, deliver=False)
    bare = {**paid["event"]["data"]["object"], "client_reference_id": None, "metadata": {}}
    assert (await shop.emit("checkout.session.completed", bare))["statuses"] == [200]
    assert await shop.h.balance("acme") == STARTER_TOKENS
    assert (await shop.order(order["order_id"]))["status"] == "paid"


async def test_an_unpaid_completion_waits_for_async_payment_succeeded(shop: Shop) -> None:
    order = await shop.checkout("starter")
    paid = await shop.pay(order, deliver=False)
    unpaid = {**paid["event"]["data"]["object"], "payment_status": "unpaid"}
    assert (await shop.emit("checkout.session.completed", unpaid))["statuses"] == [200]
    assert await shop.h.balance("acme") == 0
    succeeded = await shop.emit("checkout.session.async_payment_succeeded", paid["event"]["data"]["object"])
    assert succeeded["statuses"] == [200]
    assert await shop.h.balance("acme") == STARTER_TOKENS


async def test_expired_session_closes_the_order(shop: Shop) -> None:
    order = await shop.checkout("starter")
    expired = await shop.stripe.control("POST", f"/_test/sessions/{order['checkout_session_id']}/expire")
    assert expired["statuses"] == [200]
    assert (await shop.order(order["order_id"]))["status"] == "expired"
    # A paid event arriving afterwards (reordered or forged) cannot revive it.
    session = {**expired["event"]["data"]["object"], "payment_status": "paid", "status": "complete"}
    assert (await shop.emit("checkout.session.completed", session))["statuses"] == [200]
    assert await shop.h.balance("acme") == 0
    assert (await shop.order(order["order_id"]))["status"] == "expired"


# -- refunds ----------------------------------------------------------------------------


async def _charge_of(shop: Shop, order: dict[str, Any]) -> str:
    sessions = (await shop.stripe.control("GET", "/_test/sessions"))["data"]
    intent = next(s["session"]["payment_intent"] for s in sessions if s["session"]["id"] == order["checkout_session_id"])
    charges = (await shop.stripe.control("GET", "/_test/charges"))["data"]
    charge_id: str = next(c["id"] for c in charges if c["payment_intent"] == intent)
    return charge_id


async def test_a_refund_takes_the_tokens_back_and_a_spent_balance_goes_negative(shop: Shop) -> None:
    order = await shop.checkout("starter")
    await shop.pay(order)
    acme = await shop.h.store.account_by_name("acme")
    assert acme is not None
    await shop.h.store.credit(acme.id, -4_000_000, "adjustment", "spent")  # most of it used up
    charge = await _charge_of(shop, order)

    half = await shop.stripe.control("POST", f"/_test/charges/{charge}/refund", amount=250)
    assert half["statuses"] == [200]
    assert await shop.h.balance("acme") == 1_000_000 - STARTER_TOKENS // 2
    assert (await shop.order(order["order_id"]))["status"] == "paid"
    assert await shop.deliver(half["event"]["id"], times=3) == [200] * 3  # replays take nothing more

    rest = await shop.stripe.control("POST", f"/_test/charges/{charge}/refund")
    assert rest["statuses"] == [200]
    assert await shop.h.balance("acme") == 1_000_000 - STARTER_TOKENS  # -4,000,000: below zero
    refunded = await shop.order(order["order_id"])
    assert refunded["status"] == "refunded"
    assert refunded["refunded_quota_tokens"] == STARTER_TOKENS and len(refunded["refund_ledger_ids"]) == 2
    # The older partial refund arriving late (cumulative 250) takes nothing.
    assert await shop.deliver(half["event"]["id"]) == [200]
    assert await shop.h.balance("acme") == 1_000_000 - STARTER_TOKENS
    kinds = [row[2] for row in await shop.purchases()]
    assert kinds == ["purchase", "refund", "refund"]

    # A negative balance refuses new requests until topped up.
    live = await shop.h.key("acme")
    refused = await shop.http.post(
        "/v1/chat/completions", headers=auth(live),
        json={"model": "quota/fast", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert refused.status_code == 402, refused.text
    assert refused.json()["error"]["code"] == "insufficient_balance"
    await cli_verify(shop.h)


async def test_partial_refunds_processed_concurrently_take_back_the_largest_once(shop: Shop) -> None:
    """25 cumulative partial refunds of one order (20, 40, … 500 cents), each processed twice,
    all at once: the events queue on the order (on PostgreSQL, its row lock), so what is taken
    back is the whole order, once, whatever the order they ran in, and none fails."""
    order = await shop.checkout("starter")
    await shop.pay(order)
    payments = payment_store(shop.h.store)
    [(intent,)] = await shop.h.rows("SELECT payment_ref FROM orders WHERE public_id = ?", (order["order_id"],))
    results = await asyncio.gather(*(
        payments.apply_refund("stripe", f"evt_refund_{i}", "charge.refunded", intent, None, 20 * i, "usd")
        for i in range(1, 26) for _ in range(2)
    ))
    outcomes = [r.outcome for r in results]
    assert outcomes.count(EventOutcome.DUPLICATE) == 25, outcomes
    assert EventOutcome.REFUNDED in outcomes and EventOutcome.MISMATCH not in outcomes
    assert await shop.h.balance("acme") == 0
    refunded = await shop.order(order["order_id"])
    assert refunded["status"] == "refunded" and refunded["refunded_quota_tokens"] == STARTER_TOKENS
    refunds = [row for row in await shop.purchases() if row[2] == "refund"]
    assert sum(-row[1] for row in refunds) == STARTER_TOKENS
    await cli_verify(shop.h)


async def test_a_refund_that_outruns_its_payment_is_retried_then_applied(shop: Shop) -> None:
    order = await shop.checkout("starter")
    paid = await shop.pay(order, deliver=False)  # Stripe's completed event is late
    charge = await _charge_of(shop, order)
    refund = await shop.stripe.control("POST", f"/_test/charges/{charge}/refund")
    assert refund["statuses"] == [503]  # not ours to judge yet: Stripe will deliver it again
    assert await shop.h.balance("acme") == 0
    assert await shop.deliver(paid["event"]["id"]) == [200]
    assert await shop.h.balance("acme") == STARTER_TOKENS
    assert await shop.deliver(refund["event"]["id"]) == [200]  # Stripe's retry
    assert await shop.h.balance("acme") == 0
    assert (await shop.order(order["order_id"]))["status"] == "refunded"
    assert await shop.deliver(paid["event"]["id"], times=2) == [200, 200]
    assert await shop.h.balance("acme") == 0


# -- the checkout endpoint's refusals ---------------------------------------------------------


async def test_checkout_refusals(shop: Shop) -> None:
    response = await shop.http.post("/v1/checkout", json={"package": "nope"}, headers=auth(shop.secret))
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "package_not_found"
    response = await shop.http.post("/v1/checkout", json={}, headers=auth(shop.secret))
    assert response.status_code == 400 and response.json()["error"]["code"] == "bad_request"
    live = await shop.h.key("acme")
    response = await shop.http.post("/v1/checkout", json={"package": "starter"}, headers=auth(live))
    assert response.status_code == 403
    response = await shop.http.post("/v1/checkout", json={"package": "starter"})
    assert response.status_code == 401
    assert (await shop.stripe.control("GET", "/_test/sessions"))["data"] == []


async def test_without_payments_configured_checkout_is_a_clear_error(gateway: GatewayHarness) -> None:
    await gateway.account("acme", 0)
    secret = await gateway.key("acme", kind="secret")
    http = gateway.http()
    response = await http.post("/v1/checkout", json={"package": "starter"}, headers=auth(secret))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "payments_not_configured" and "[payments.stripe]" in error["message"]
    response = await http.post("/webhooks/stripe", content=b"{}")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


async def test_stripe_refusing_the_checkout_is_a_502_and_the_order_is_closed(
    make_gateway: GatewayFactory, fake_stripe: FakeStripeProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QP_TEST_STRIPE_KEY", "sk_test_wrong")
    monkeypatch.setenv("QP_TEST_STRIPE_HOOK", WEBHOOK_SECRET)
    h: GatewayHarness = await make_gateway(
        server={"public_url": "https://gateway.example.com"}, extra=stripe_extra(fake_stripe.url)
    )
    await h.account("acme", 0)
    secret = await h.key("acme", kind="secret")
    response = await h.http().post("/v1/checkout", json={"package": "starter"}, headers=auth(secret))
    assert response.status_code == 502, response.text
    assert response.json()["error"]["code"] == "payment_provider_error"
    listed = await h.http().get("/v1/orders", headers=auth(secret))
    assert [o["status"] for o in listed.json()["data"]] == ["expired"]


# -- start-up ---------------------------------------------------------------------------------


@pytest.mark.parametrize("secret", [None, "", "   "], ids=["unset", "empty", "blank"])
def test_an_empty_webhook_secret_stops_start_up(tmp_path: Path, secret: str | None) -> None:
    config = tmp_path / "quota-proxy.toml"
    config.write_text(
        '[server]\npublic_url = "https://gw.example"\n[upstreams.u]\nbase_url = "http://127.0.0.1:9/v1"\n'
        '[routes."quota/fast"]\nupstream = "u"\nmodel = "m"\n' + stripe_extra("http://127.0.0.1:9", "QP_K", "QP_H")
    )
    env = {k: v for k, v in os.environ.items() if k not in ("QP_K", "QP_H")}
    env["QP_K"] = API_KEY
    if secret is not None:
        env["QP_H"] = secret
    with pytest.raises(ConfigError) as caught:
        load_settings(config, env=env)
    assert any("webhook_secret_env" in p and "QP_H" in p for p in caught.value.problems), caught.value.problems
    result = subprocess.run(
        [sys.executable, "-m", "quota_proxy", "serve", "--config", str(config), "--port", "0"],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert result.returncode != 0
    assert "webhook_secret_env" in result.stderr and "QP_H" in result.stderr
    env["QP_H"] = WEBHOOK_SECRET
    assert load_settings(config, env=env).payments.stripe is not None


def test_stripe_needs_a_public_url_and_whole_cent_prices(tmp_path: Path) -> None:
    config = tmp_path / "quota-proxy.toml"
    config.write_text(
        '[upstreams.u]\nbase_url = "http://127.0.0.1:9/v1"\n'
        '[routes."quota/fast"]\nupstream = "u"\nmodel = "m"\n'
        '[[packages]]\nid = "odd"\nprice_usd = 1.005\nquota_tokens = 1000\n' + stripe_extra("http://127.0.0.1:9", "QP_K", "QP_H")
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(config, env={"QP_K": API_KEY, "QP_H": WEBHOOK_SECRET})
    problems = "\n".join(caught.value.problems)
    assert "server.public_url" in problems and "whole cents" in problems


# -- orders on the command line ------------------------------------------------------------------


async def test_orders_list_on_the_command_line(shop: Shop) -> None:
    paid = await shop.checkout("starter")
    await shop.pay(paid)
    pending = await shop.checkout("pro")
    result = await anyio.to_thread.run_sync(lambda: shop.h.cli("orders", "list", "--account", "acme", "--json"))
    import json

    listed = json.loads(result.stdout)
    assert [(o["order_id"], o["status"]) for o in listed] == [
        (pending["order_id"], "pending"), (paid["order_id"], "paid")
    ]
    assert listed[1]["ledger_id"].startswith("ledg_")
    table = (await anyio.to_thread.run_sync(lambda: shop.h.cli("orders", "list", "--account", "acme"))).stdout
    assert paid["order_id"] in table and "paid" in table
    missing = await anyio.to_thread.run_sync(
        lambda: run_cli("--config", str(shop.h.config_path), "orders", "list", "--account", "nobody", check=False)
    )
    assert missing.returncode == 1


async def test_concurrent_checkouts_and_payments_credit_each_order_once(shop: Shop) -> None:
    orders = await asyncio.gather(*(shop.checkout("starter") for _ in range(8)))
    assert len({o["order_id"] for o in orders}) == 8
    results = await asyncio.gather(*(shop.pay(o) for o in orders))
    assert all(r["statuses"] == [200] for r in results)
    assert await shop.h.balance("acme") == 8 * STARTER_TOKENS


async def test_two_worker_processes_credit_a_storm_of_one_event_once(
    tmp_path: Path, upstream: Any, fake_stripe: FakeStripeProcess, store_overrides: dict[str, Any]
) -> None:
    """`serve --workers 2`: the duplicate deliveries race in separate processes on one store."""
    config = tmp_path / "quota-proxy.toml"
    config.write_text(
        config_toml(upstream.base_url, tmp_path / "quota.db", server={"public_url": "https://gw.example"},
                    extra=stripe_extra(fake_stripe.url), **store_overrides)
    )
    env = {**os.environ, "QP_TEST_STRIPE_KEY": API_KEY, "QP_TEST_STRIPE_HOOK": WEBHOOK_SECRET}

    def cli(*args: str) -> str:
        return run_cli("--config", str(config), *args, env=env).stdout

    await anyio.to_thread.run_sync(lambda: cli("accounts", "create", "acme"))
    secret = (await anyio.to_thread.run_sync(lambda: cli("keys", "create", "--account", "acme", "--kind", "secret"))).split()[0]
    port = closed_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "quota_proxy", "serve", "--config", str(config), "--port", str(port),
         "--workers", "2", "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            for _ in range(300):
                try:
                    if (await http.get("/readyz")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.05)
            await fake_stripe.control("POST", "/_test/configure", webhook_url=f"{url}/webhooks/stripe")
            created = await http.post("/v1/checkout", json={"package": "starter"}, headers=auth(secret))
            assert created.status_code == 200, created.text
            order = created.json()
            paid = await fake_stripe.control(
                "POST", f"/_test/sessions/{order['checkout_session_id']}/pay", deliver=False
            )
            statuses = await fake_stripe.control(
                "POST", f"/_test/events/{paid['event']['id']}/deliver", times=30, concurrent=True
            )
            assert statuses["statuses"] == [200] * 30
            balance = await http.get("/v1/balance", headers=auth(secret))
            assert balance.json()["balance_quota_tokens"] == STARTER_TOKENS
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if proc.stderr is not None:
            proc.stderr.close()
    verified = await anyio.to_thread.run_sync(lambda: cli("ledger", "verify", "--json"))
    assert '"ok": true' in verified
