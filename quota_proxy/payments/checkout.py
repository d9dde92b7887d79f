"""Opening a checkout: the one path from "buy this pack" to a pending order with a payment
page, shared by `POST /v1/checkout` and the dashboard's Buy button."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from decimal import Decimal

from quota_proxy.config import Package
from quota_proxy.payments.stripe_checkout import PaymentProviderError, StripeCheckout
from quota_proxy.payments.stripe_events import PROVIDER
from quota_proxy.store.payments import Order, PaymentStore

logger = logging.getLogger("quota_proxy.payments")


class PaymentsDisabled(Exception):
    """No payment provider is configured ([payments.stripe] is absent)."""


def cents(price_usd: Decimal) -> int:
    return int(price_usd * 100)  # whole cents: checked when the config is read


@dataclass(frozen=True)
class Checkout:
    orders: PaymentStore
    stripe: StripeCheckout | None

    @property
    def enabled(self) -> bool:
        return self.stripe is not None

    async def open(self, account_id: int, package: Package) -> Order:
        """A pending order for the package, priced and sized from the config now, with its
        Checkout Session attached. PaymentProviderError (the order is then closed)."""
        if self.stripe is None:
            raise PaymentsDisabled()
        order = await self.orders.create_order(
            account_id, package.id, cents(package.price_usd), self.stripe.settings.currency,
            package.quota_tokens, PROVIDER,
        )
        try:
            session = await self.stripe.create_session(order, package)
        except PaymentProviderError as exc:
            await self.orders.abandon_order(order.public_id)
            logger.warning("checkout for order %s failed: %s", order.public_id, exc)
            raise
        await self.orders.attach_checkout(order.public_id, session.id, session.url)
        opened = await self.orders.order(order.public_id)
        assert opened is not None
        return opened
