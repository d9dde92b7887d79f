"""The pure parts of the purchase path: reading a Stripe event, and the checks a paid
session must pass against its order before anything is credited."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from quota_proxy.payments.stripe_events import (
    MalformedEvent,
    OtherEvent,
    RefundEvent,
    SessionEvent,
    parse_event,
    session_mismatch,
)
from quota_proxy.payments.throttle import FailureThrottle
from quota_proxy.store.payments import Order

ORDER = Order(
    id=1, public_id="ord_1", account_id=7, account_name="acme", package_id="starter", amount_cents=500,
    currency="usd", quota_tokens=5_000_000, provider="stripe", provider_ref="cs_test_1", payment_ref=None,
    status="pending", checkout_url="https://x", paid_event_id=None, ledger_id=None, refunded_cents=0,
    refunded_tokens=0, refund_ledger_ids=(), created_at=0, updated_at=0,
)


def session_event(**changes: Any) -> dict[str, Any]:
    session = {
        "id": "cs_test_1", "object": "checkout.session", "amount_total": 500, "currency": "USD",
        "client_reference_id": "ord_1", "metadata": {"order_id": "ord_1"}, "mode": "payment",
        "payment_status": "paid", "payment_intent": {"id": "pi_1"},
    }
    session.update(changes)
    return {"id": "evt_1", "type": "checkout.session.completed", "data": {"object": session}}


def test_a_paid_session_reads_into_typed_facts() -> None:
    event = parse_event(session_event())
    assert event == SessionEvent(
        event_id="evt_1", type="checkout.session.completed", session_id="cs_test_1", order_ref="ord_1",
        client_reference_id="ord_1", amount_total=500, currency="usd", payment_status="paid",
        mode="payment", payment_intent="pi_1",
    )
    assert session_mismatch(ORDER, event) is None


@pytest.mark.parametrize(
    ("changes", "order_changes", "reason"),
    [
        ({"amount_total": 499}, {}, "amount_total"),
        ({"amount_total": None}, {}, "amount_total"),
        ({"currency": "eur"}, {}, "currency"),
        ({"mode": "subscription"}, {}, "mode"),
        ({"id": "cs_test_other"}, {}, "is not the checkout"),
        ({"client_reference_id": "ord_2"}, {}, "client_reference_id"),
        ({}, {"provider": "paypal"}, "paypal"),
        ({}, {"provider_ref": None}, "is not the checkout"),
    ],
)
def test_a_session_that_disagrees_with_its_order_is_refused(
    changes: dict[str, Any], order_changes: dict[str, Any], reason: str
) -> None:
    event = parse_event(session_event(**changes))
    assert isinstance(event, SessionEvent)
    problem = session_mismatch(dataclasses.replace(ORDER, **order_changes), event)
    assert problem is not None and reason in problem


def test_a_session_without_references_is_judged_by_its_session_id() -> None:
    event = parse_event(session_event(client_reference_id=None, metadata={}))
    assert isinstance(event, SessionEvent) and event.order_ref is None
    assert session_mismatch(ORDER, event) is None  # the stored session id is the binding
    other = parse_event(session_event(client_reference_id=None, metadata={}, id="cs_test_2"))
    assert isinstance(other, SessionEvent)
    assert session_mismatch(ORDER, other) is not None


def test_refunds_and_other_events() -> None:
    refund = parse_event(
        {"id": "evt_2", "type": "charge.refunded", "data": {"object": {
            "id": "ch_1", "amount_refunded": 250, "currency": "USD", "payment_intent": "pi_1",
            "metadata": {"order_id": "ord_1"}}}}
    )
    assert refund == RefundEvent("evt_2", "charge.refunded", "ch_1", "pi_1", "ord_1", 250, "usd")
    assert parse_event({"id": "evt_3", "type": "invoice.paid", "data": {}}) == OtherEvent("evt_3", "invoice.paid")


@pytest.mark.parametrize(
    "event",
    [
        [],
        {"type": "checkout.session.completed"},
        {"id": "evt_1", "type": "checkout.session.completed", "data": {"object": {}}},
        {"id": "evt_1", "type": "charge.refunded", "data": {"object": {"id": "ch_1", "amount_refunded": "5"}}},
    ],
)
def test_malformed_events_are_refused(event: Any) -> None:
    with pytest.raises(MalformedEvent):
        parse_event(event)


def test_the_throttle_counts_misses_in_a_window() -> None:
    throttle = FailureThrottle(limit=3, window_s=0.2)
    for _ in range(3):
        assert throttle.retry_after("a") is None
        throttle.miss("a")
    wait = throttle.retry_after("a")
    assert wait is not None and 0 < wait <= 0.2
    assert throttle.retry_after("b") is None
    import time

    time.sleep(0.25)
    assert throttle.retry_after("a") is None
