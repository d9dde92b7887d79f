"""Stripe through its official SDK: Checkout Sessions out, signed webhook events in.

The SDK's errors are translated here, once: a refused or unreachable Stripe becomes
PaymentProviderError, a bad signature SignatureInvalid.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from quota_proxy.config import Package
from quota_proxy.payments.settings import StripeSettings
from quota_proxy.payments.stripe_events import StripeEvent, parse_event
from quota_proxy.store.payments import Order

if TYPE_CHECKING:
    import stripe

STRIPE_TIMEOUT_S = 20.0


class PaymentProviderError(Exception):
    """Stripe refused the request or could not be reached."""


class SignatureInvalid(Exception):
    """The webhook's Stripe-Signature does not verify (missing, forged, too old, unparsable)."""


@dataclass(frozen=True, slots=True)
class CheckoutSession:
    id: str
    url: str


def _httpx_client(timeout: float) -> stripe.HTTPXClient:
    """The SDK's httpx transport, sending its form body as `content=`: it passes `data=` a
    string, which httpx deprecates (and a DeprecationWarning there fails the request)."""
    import stripe

    class HTTPXClient(stripe.HTTPXClient):
        def _get_request_args_kwargs(
            self, method: str, url: str, headers: Mapping[str, str], post_data: Any
        ) -> list[Any]:
            args, kwargs = super()._get_request_args_kwargs(method, url, headers, post_data)
            data = kwargs.pop("data", None)
            if data:
                kwargs["content"] = data
            return [args, kwargs]

    return HTTPXClient(timeout=timeout)


class StripeCheckout:
    """The official SDK, imported only where Stripe is configured (it is ~25 MB of a
    gateway's memory, which most gateways never use)."""

    provider = "stripe"

    def __init__(self, settings: StripeSettings, public_url: str, dashboard_path: str = "/dashboard") -> None:
        self.settings = settings
        self.public_url = public_url.rstrip("/")
        self.dashboard_path = dashboard_path.rstrip("/")
        import stripe

        self.client = stripe.StripeClient(
            settings.secret_key,
            base_addresses={"api": settings.api_base},
            http_client=_httpx_client(STRIPE_TIMEOUT_S),
            max_network_retries=2,
        )

    def session_params(self, order: Order, package: Package) -> dict[str, Any]:
        """What the Checkout Session is created with; the order id is its reference, three times
        (client_reference_id, metadata, and the PaymentIntent's metadata for refunds)."""
        order_page = f"{self.public_url}{self.dashboard_path}/orders/{order.public_id}"
        return {
            "mode": "payment",
            "line_items": [
                {
                    "quantity": 1,
                    "price_data": {
                        "currency": order.currency,
                        "unit_amount": order.amount_cents,
                        "product_data": {
                            "name": f"{package.name} ({order.quota_tokens:,} quota tokens)",
                        },
                    },
                }
            ],
            "client_reference_id": order.public_id,
            "metadata": {"order_id": order.public_id, "package": package.id},
            "payment_intent_data": {"metadata": {"order_id": order.public_id}},
            "success_url": f"{order_page}?checkout=success",
            "cancel_url": f"{order_page}?checkout=cancelled",
        }

    async def create_session(self, order: Order, package: Package) -> CheckoutSession:
        import stripe

        try:
            session = await self.client.v1.checkout.sessions.create_async(
                self.session_params(order, package),  # type: ignore[arg-type]
                {"idempotency_key": f"checkout-{order.public_id}"},
            )
        except stripe.StripeError as exc:
            raise PaymentProviderError(
                f"Stripe refused the checkout ({exc.http_status}): {exc.user_message or exc}"
            ) from None
        if not session.id or not session.url:
            raise PaymentProviderError("Stripe returned a checkout session without an id or url")
        return CheckoutSession(session.id, session.url)

    def verify(self, payload: bytes, signature: str | None) -> StripeEvent:
        """The event, if Stripe-Signature verifies against the endpoint secret within the tolerance
        (the SDK refuses old timestamps; far-future ones are refused here too)."""
        if _timestamp(signature) > time.time() + self.settings.webhook_tolerance_s:
            raise SignatureInvalid("Timestamp outside the tolerance zone")
        import stripe

        try:
            event = stripe.Webhook.construct_event(
                payload,
                signature,
                self.settings.webhook_secret,
                tolerance=self.settings.webhook_tolerance_s,
            )
        except stripe.SignatureVerificationError as exc:
            raise SignatureInvalid(str(exc).split(" (")[0]) from None
        except ValueError:  # not JSON, or not an event
            raise SignatureInvalid("the payload is not a Stripe event") from None
        return parse_event(event.to_dict())

    async def aclose(self) -> None:
        http_client = self.client._requestor._client
        if http_client is not None:
            await http_client.close_async()  # type: ignore[no-untyped-call]


def _timestamp(signature: str | None) -> int:
    for part in (signature or "").split(","):
        name, _, value = part.partition("=")
        if name.strip() == "t" and value.strip().isdigit():
            return int(value)
    return 0
