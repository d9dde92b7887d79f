"""The JSON shapes of orders and alert settings, and the parsing of alert settings:
shared by the endpoints (api.payments, api.alerts) and the CLI (payments.admin)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from quota_proxy.errors import BadRequest
from quota_proxy.money import Money, format_usd, parse_decimal
from quota_proxy.store.alerts import AlertSettings
from quota_proxy.store.payments import Order
from quota_proxy.views import iso_time

MAX_THRESHOLDS = 10
MAX_URL = 2000


def order_view(order: Order, money: Money) -> dict[str, Any]:
    return {
        "object": "order",
        "order_id": order.public_id,
        "account": order.account_name,
        "status": order.status,
        "package": order.package_id,
        "price": format_usd(Decimal(order.amount_cents) / 100),
        "amount_cents": order.amount_cents,
        "currency": order.currency,
        "quota_tokens": order.quota_tokens,
        "amount": money.usd(order.quota_tokens),
        "provider": order.provider,
        "checkout_session_id": order.provider_ref,
        "checkout_url": order.checkout_url if order.status == "pending" else None,
        "paid_event_id": order.paid_event_id,
        "ledger_id": order.ledger_id,
        "refunded_cents": order.refunded_cents,
        "refunded_quota_tokens": order.refunded_tokens,
        "refund_ledger_ids": list(order.refund_ledger_ids),
        "created_at": iso_time(order.created_at),
        "updated_at": iso_time(order.updated_at),
    }


def parse_thresholds(raw: Any, name: str, money: Money) -> tuple[int, ...]:
    """Dollar amounts (numbers or "$5.00" strings) to distinct quota-token thresholds."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or len(raw) > MAX_THRESHOLDS:
        raise BadRequest(f"'{name}' must be a list of at most {MAX_THRESHOLDS} dollar amounts.", param=name)
    levels = set()
    for item in raw:
        if isinstance(item, str):
            item = item.strip().removeprefix("$")
        if isinstance(item, bool) or not isinstance(item, (int, Decimal, str)):
            raise BadRequest(f"'{name}' must hold dollar amounts.", param=name)
        try:
            tokens = money.quota_tokens_from_usd(parse_decimal(item))
        except (ValueError, ArithmeticError) as exc:
            raise BadRequest(f"'{name}': {exc}.", param=name) from None
        if tokens <= 0:
            raise BadRequest(f"'{name}': every threshold must be greater than 0.", param=name)
        levels.add(tokens)
    return tuple(sorted(levels, reverse=True))


def parse_url(raw: Any) -> str:
    if not isinstance(raw, str) or not raw.startswith(("http://", "https://")) or len(raw) > MAX_URL:
        raise BadRequest("'webhook_url' must be an http:// or https:// URL.", param="webhook_url")
    return raw


def alerts_view(settings: AlertSettings | None, money: Money) -> dict[str, Any]:
    if settings is None:
        return {
            "object": "alerts",
            "webhook_url": None,
            "signing_secret": None,
            "thresholds": [],
            "user_thresholds": [],
        }

    def levels(values: tuple[int, ...]) -> list[dict[str, Any]]:
        return [{"amount": money.usd(v), "amount_quota_tokens": v} for v in values]

    return {
        "object": "alerts",
        "webhook_url": settings.webhook_url,
        "signing_secret": settings.signing_secret,
        "thresholds": levels(settings.thresholds),
        "user_thresholds": levels(settings.user_thresholds),
    }
