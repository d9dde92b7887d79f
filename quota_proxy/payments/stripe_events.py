"""A verified Stripe event, read into typed facts; and the checks a paid session must pass
against the order it names before anything is credited. Pure functions, unit-tested."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from quota_proxy.store.payments import Order

PROVIDER = "stripe"
PAID_TYPES = ("checkout.session.completed", "checkout.session.async_payment_succeeded")
EXPIRED_TYPE = "checkout.session.expired"
REFUNDED_TYPE = "charge.refunded"


class MalformedEvent(Exception):
    """A correctly signed body that is not the event shape we know."""


@dataclass(frozen=True, slots=True)
class SessionEvent:
    event_id: str
    type: str
    session_id: str
    order_ref: str | None  # metadata.order_id, else client_reference_id
    client_reference_id: str | None
    amount_total: int | None
    currency: str | None
    payment_status: str | None
    mode: str | None
    payment_intent: str | None


@dataclass(frozen=True, slots=True)
class RefundEvent:
    event_id: str
    type: str
    charge_id: str
    payment_intent: str | None
    order_ref: str | None
    amount_refunded: int
    currency: str


@dataclass(frozen=True, slots=True)
class OtherEvent:
    event_id: str
    type: str


StripeEvent = SessionEvent | RefundEvent | OtherEvent


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def parse_event(event: Any) -> StripeEvent:
    if not isinstance(event, dict):
        raise MalformedEvent("the event is not an object")
    event_id, event_type = _str(event.get("id")), _str(event.get("type"))
    if event_id is None or event_type is None:
        raise MalformedEvent("the event has no id or type")
    data = event.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    if event_type in (*PAID_TYPES, EXPIRED_TYPE):
        if not isinstance(obj, dict) or _str(obj.get("id")) is None:
            raise MalformedEvent(f"{event_type} without a session object")
        metadata = _metadata(obj)
        client_ref = _str(obj.get("client_reference_id"))
        currency = _str(obj.get("currency"))
        return SessionEvent(
            event_id=event_id,
            type=event_type,
            session_id=obj["id"],
            order_ref=_str(metadata.get("order_id")) or client_ref,
            client_reference_id=client_ref,
            amount_total=_int(obj.get("amount_total")),
            currency=currency.lower() if currency else None,
            payment_status=_str(obj.get("payment_status")),
            mode=_str(obj.get("mode")),
            payment_intent=_payment_intent(obj.get("payment_intent")),
        )
    if event_type == REFUNDED_TYPE:
        if not isinstance(obj, dict) or _str(obj.get("id")) is None:
            raise MalformedEvent(f"{event_type} without a charge object")
        refunded, currency = _int(obj.get("amount_refunded")), _str(obj.get("currency"))
        if refunded is None or refunded < 0 or currency is None:
            raise MalformedEvent(f"{event_type} without amount_refunded or currency")
        metadata = _metadata(obj)
        return RefundEvent(
            event_id=event_id,
            type=event_type,
            charge_id=obj["id"],
            payment_intent=_payment_intent(obj.get("payment_intent")),
            order_ref=_str(metadata.get("order_id")),
            amount_refunded=refunded,
            currency=currency.lower(),
        )
    return OtherEvent(event_id, event_type)


def _metadata(obj: dict[str, Any]) -> dict[str, Any]:
    metadata = obj.get("metadata")
    return metadata if isinstance(metadata, dict) else {}


def _payment_intent(value: Any) -> str | None:
    """An id, or an expanded object's id."""
    if isinstance(value, dict):
        return _str(value.get("id"))
    return _str(value)


def session_mismatch(order: Order, event: SessionEvent) -> str | None:
    """Why this paid session may not credit this order, or None if it may.

    The provider, the session the order was opened with, both references, the mode, the
    amount and the currency must all agree: a signed event about someone else's order, a
    cheaper session or another provider's order credits nothing.
    """
    if order.provider != PROVIDER:
        return f"order {order.public_id} is paid through {order.provider!r}, not stripe"
    if order.provider_ref != event.session_id:
        return f"session {event.session_id} is not the checkout of order {order.public_id}"
    if event.client_reference_id not in (None, order.public_id):
        return f"client_reference_id {event.client_reference_id!r} does not name order {order.public_id}"
    if event.mode not in (None, "payment"):
        return f"mode {event.mode!r} is not payment"
    if event.amount_total != order.amount_cents:
        return f"amount_total {event.amount_total} != the order's {order.amount_cents}"
    if event.currency != order.currency:
        return f"currency {event.currency!r} != the order's {order.currency!r}"
    return None
