"""Buying packs: Checkout (sk-quota- keys), the Stripe webhook (its signature only), orders,
and redemption codes (any key of the account).

The webhook answers so that Stripe does the right thing next: 2xx when the event is
handled for good (credited, a replay, or a mismatch that retrying cannot fix — logged),
400 for a bad signature, 5xx when a retry may succeed (the store was busy, or the event
outran our own record of the checkout).
"""

from __future__ import annotations

import logging

from quota_proxy.api.common import Services, require_secret
from quota_proxy.asgi import Receive, Scope, Send, header, read_body, send_json
from quota_proxy.config import Package
from quota_proxy.errors import BadRequest, NotFound, QuotaError, RateLimited
from quota_proxy.json_body import read_object
from quota_proxy.payments.checkout import Checkout, PaymentsDisabled
from quota_proxy.payments.codes import code_digest
from quota_proxy.payments.stripe_checkout import PaymentProviderError, SignatureInvalid
from quota_proxy.payments.stripe_events import (
    EXPIRED_TYPE,
    PAID_TYPES,
    PROVIDER,
    MalformedEvent,
    RefundEvent,
    SessionEvent,
    StripeEvent,
    session_mismatch,
)
from quota_proxy.payments.throttle import FailureThrottle
from quota_proxy.payments.views import order_view
from quota_proxy.state import caller_key, request_state
from quota_proxy.store.payments import (
    CodeRefused,
    EventOutcome,
    EventResult,
    RetryLater,
)

logger = logging.getLogger("quota_proxy.payments")

MAX_WEBHOOK_BYTES = 1_048_576
ORDERS_LIMIT = 100


class PackageNotFound(QuotaError):
    status, code, type = 404, "package_not_found", "invalid_request_error"


class PaymentsNotConfigured(QuotaError):
    status, code, type = 400, "payments_not_configured", "invalid_request_error"
    default_message = (
        "Card payments are not configured on this gateway ([payments.stripe]); "
        "ask its operator for a redemption code."
    )


class PaymentProviderFailed(QuotaError):
    status, code, type = 502, "payment_provider_error", "api_error"


class InvalidCode(QuotaError):
    status, code, type = 400, "invalid_code", "invalid_request_error"
    default_message = "This code is unknown, already used or expired."


class InvalidSignature(QuotaError):
    status, code, type = 400, "invalid_signature", "invalid_request_error"


class TryAgain(QuotaError):
    status, code, type = 503, "retry_later", "api_error"


class PaymentsApi:
    def __init__(self, services: Services, checkout: Checkout) -> None:
        self.s = services
        self.checkout_flow = checkout
        self.orders = checkout.orders
        self.stripe = checkout.stripe
        self.code_misses = FailureThrottle(limit=10, window_s=600)

    # -- checkout -------------------------------------------------------------------

    async def checkout(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = require_secret(scope)
        data = await read_object(scope, receive, self.s.settings.server.max_body_bytes)
        package_id = data.get("package")
        if not isinstance(package_id, str) or not package_id:
            raise BadRequest("Missing required parameter: 'package' (a package id).", param="package")
        package = self._package(package_id)
        try:
            order = await self.checkout_flow.open(key.account_id, package)
        except PaymentsDisabled:
            raise PaymentsNotConfigured() from None
        except PaymentProviderError as exc:
            raise PaymentProviderFailed(f"The payment provider failed: {exc}") from None
        request_state(scope).log.update(order=order.public_id, package=package.id)
        await send_json(send, 200, order_view(order, self.s.money))

    def _package(self, package_id: str) -> Package:
        for package in self.s.settings.packages:
            if package.id == package_id:
                return package
        known = ", ".join(p.id for p in self.s.settings.packages) or "none"
        raise PackageNotFound(f"No package {package_id!r}; available: {known}.", param="package")

    async def list_orders(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = require_secret(scope)
        orders = await self.orders.orders(key.account_id, ORDERS_LIMIT)
        await send_json(
            send, 200, {"object": "list", "data": [order_view(o, self.s.money) for o in orders]}
        )

    # -- redemption codes ------------------------------------------------------------

    async def redeem(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = caller_key(scope)
        wait = self.code_misses.retry_after(key.account_id)
        if wait is not None:
            error = RateLimited("Too many wrong codes; try again later.")
            error.headers.append((b"retry-after", str(max(1, round(wait))).encode()))
            raise error
        data = await read_object(scope, receive, self.s.settings.server.max_body_bytes)
        code = data.get("code")
        if not isinstance(code, str) or not code.strip():
            raise BadRequest("Missing required parameter: 'code'.", param="code")
        digest = code_digest(code)
        try:
            if digest is None:
                raise CodeRefused("unknown")
            redemption = await self.orders.redeem(key.account_id, digest)
        except CodeRefused as refused:
            # Used and expired codes are real codes, not guesses: only unknown ones count.
            if refused.reason == "unknown":
                self.code_misses.miss(key.account_id)
            request_state(scope).log["code"] = refused.reason
            raise InvalidCode() from None
        money = self.s.money
        request_state(scope).log.update(code=redemption.code_id, credited=redemption.quota_tokens)
        await send_json(
            send,
            200,
            {
                "object": "redemption",
                "code_id": redemption.code_id,
                "package": redemption.package_id,
                "amount": money.usd(redemption.quota_tokens),
                "amount_quota_tokens": redemption.quota_tokens,
                "ledger_id": redemption.ledger_id,
                "balance": money.usd(redemption.balance_after),
                "balance_quota_tokens": redemption.balance_after,
            },
        )

    # -- the Stripe webhook ----------------------------------------------------------

    async def stripe_webhook(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.stripe is None:
            raise NotFound("Stripe webhooks are not enabled on this gateway ([payments.stripe]).")
        body = await read_body(scope, receive, MAX_WEBHOOK_BYTES)
        signature = header(scope, b"stripe-signature")
        try:
            event = self.stripe.verify(body, signature.decode("latin-1") if signature else None)
        except SignatureInvalid as exc:
            logger.warning("stripe webhook refused: %s", exc)
            raise InvalidSignature(f"Stripe-Signature does not verify: {exc}") from None
        except MalformedEvent as exc:
            # Signed by Stripe but not a shape we know: retrying cannot help, so acknowledge it.
            logger.warning("stripe webhook: a signed event we cannot read: %s", exc)
            await send_json(send, 200, {"received": True, "outcome": EventOutcome.IGNORED.value})
            return
        log = request_state(scope).log
        log.update(event=event.event_id, event_type=event.type)
        try:
            result = await self._apply(event)
        except RetryLater as exc:
            logger.warning("stripe event %s: retry later: %s", event.event_id, exc)
            raise TryAgain(f"Not ready for this event yet: {exc}") from None
        log.update(outcome=result.outcome.value, order=result.order_id)
        if result.outcome is EventOutcome.MISMATCH:
            logger.warning(
                "stripe event %s (%s) credits nothing: %s", event.event_id, event.type, result.detail
            )
        elif result.outcome in (EventOutcome.CREDITED, EventOutcome.REFUNDED):
            logger.info(
                "stripe event %s: order %s %s (%s)",
                event.event_id, result.order_id, result.outcome.value, result.ledger_id,
            )
        await send_json(
            send,
            200,
            {"received": True, "event": event.event_id, "outcome": result.outcome.value,
             "order_id": result.order_id},
        )

    async def _apply(self, event: StripeEvent) -> EventResult:
        store = self.orders
        if isinstance(event, SessionEvent):
            if event.type in PAID_TYPES:
                if event.payment_status != "paid":
                    # Completed but not yet paid (a delayed method): async_payment_succeeded follows.
                    return await store.record_ignored(
                        PROVIDER, event.event_id, event.type, f"payment_status {event.payment_status!r}"
                    )
                return await store.apply_paid(
                    PROVIDER, event.event_id, event.type, event.order_ref, event.session_id, event.payment_intent,
                    lambda order: session_mismatch(order, event),
                )
            if event.type == EXPIRED_TYPE:
                return await store.apply_expired(
                    PROVIDER, event.event_id, event.type, event.order_ref, event.session_id
                )
        if isinstance(event, RefundEvent):
            if event.payment_intent is None:
                return await store.record_ignored(PROVIDER, event.event_id, event.type, "no payment_intent")
            return await store.apply_refund(
                PROVIDER, event.event_id, event.type, event.payment_intent, event.order_ref,
                event.amount_refunded, event.currency,
            )
        return EventResult(EventOutcome.IGNORED, detail=f"{event.type} is not handled")
