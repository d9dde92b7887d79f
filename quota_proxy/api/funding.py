"""The Funding API: grants into app users' balances, their balances, and user-billed completions.

Secret keys (sk-quota-…) only. Grants are idempotent like Stripe's: the Idempotency-Key is
scoped to the developer account and stored with a hash of the request in the same
transaction as the grant, so a replay answers with the first result and grants nothing.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from quota_proxy.api.common import Services, external_user_id, require_secret
from quota_proxy.asgi import ASGIApp, Receive, Scope, Send, header, send_json
from quota_proxy.errors import (
    BadRequest,
    IdempotencyConflict,
    InsufficientBalance,
    UserNotFound,
)
from quota_proxy.grants import grant_request_hash
from quota_proxy.json_body import read_object
from quota_proxy.money import parse_decimal
from quota_proxy.state import Billing, request_state
from quota_proxy.store import IdempotencyMismatch, InsufficientFunds
from quota_proxy.views import grant_view, user_view

MAX_DESCRIPTION = 500
MAX_IDEMPOTENCY_KEY = 255
BILLING_MODES = ("user", "developer")


class FundingApi:
    def __init__(self, services: Services, completions: ASGIApp) -> None:
        self.s = services
        self.completions = completions

    async def grant(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = require_secret(scope)
        # Exact decimals: a grant of 0.1 dollars is 0.1, never 0.1000000000000000055.
        data = await read_object(scope, receive, self.s.settings.server.max_body_bytes, exact=True)
        user_id = external_user_id(data.get("external_user_id"))
        amount = self._amount(data.get("amount", _MISSING))
        description = data.get("description")
        if description is None:
            description = ""
        if not isinstance(description, str) or len(description) > MAX_DESCRIPTION:
            raise BadRequest(
                f"'description' must be a string of at most {MAX_DESCRIPTION} characters.",
                param="description",
            )
        idem = header(scope, b"idempotency-key")
        idem_key = _idempotency_key(idem) if idem is not None else None
        request_hash = grant_request_hash(user_id, amount, description)
        try:
            facts, duplicate = await self.s.store.grant(
                key.account_id, user_id, amount, description, idem_key, request_hash
            )
        except IdempotencyMismatch:
            raise IdempotencyConflict() from None
        except InsufficientFunds as short:
            raise InsufficientBalance(
                required=amount,
                available=short.available,
                message="Your grant pool is too low for this grant.",
            ) from None
        request_state(scope).log.update(user=user_id, granted=amount, duplicate=duplicate)
        await send_json(send, 200, grant_view(facts, duplicate, self.s.money))

    def _amount(self, raw: Any) -> int:
        if raw is _MISSING:
            raise BadRequest("Missing required parameter: 'amount'.", param="amount")
        if isinstance(raw, bool) or not isinstance(raw, (int, Decimal)):
            raise BadRequest("'amount' must be a JSON number of dollars.", param="amount")
        try:
            dec = parse_decimal(raw)
        except ValueError as exc:
            raise BadRequest(f"'amount' {exc}.", param="amount") from None
        if dec <= 0:
            raise BadRequest("'amount' must be greater than 0.", param="amount")
        maximum = self.s.settings.funding.max_grant_usd
        if dec > maximum:
            raise BadRequest(
                f"'amount' must be at most {maximum} dollars per grant.", param="amount"
            )
        try:
            return self.s.money.quota_tokens_from_usd(dec)
        except (ValueError, ArithmeticError) as exc:
            raise BadRequest(f"'amount' {exc}.", param="amount") from None

    async def user_balance(self, scope: Scope, receive: Receive, send: Send, user_id: str) -> None:
        key = require_secret(scope)
        user = await self.s.store.user(key.account_id, external_user_id(user_id))
        if user is None:
            raise UserNotFound()
        await send_json(send, 200, user_view(user, self.s.money))

    async def update_user(self, scope: Scope, receive: Receive, send: Send, user_id: str) -> None:
        key = require_secret(scope)
        name = external_user_id(user_id)
        data = await read_object(scope, receive, self.s.settings.server.max_body_bytes)
        unknown = set(data) - {"billing_mode"}
        if unknown:
            raise BadRequest(f"Unknown field(s): {', '.join(sorted(unknown))}.")
        mode = data.get("billing_mode")
        if mode not in BILLING_MODES:
            raise BadRequest("'billing_mode' must be \"user\" or \"developer\".", param="billing_mode")
        user = await self.s.store.user(key.account_id, name)
        if user is None:
            raise UserNotFound()
        await self.s.store.set_billing_mode(user.id, mode)
        user = await self.s.store.user(key.account_id, name)
        assert user is not None
        await send_json(send, 200, user_view(user, self.s.money))

    async def user_completion(self, scope: Scope, receive: Receive, send: Send, user_id: str) -> None:
        key = require_secret(scope)
        user = await self.s.store.user(key.account_id, external_user_id(user_id))
        if user is None:
            raise UserNotFound()
        payer = user.id if user.billing_mode == "user" else key.account_id
        state = request_state(scope)
        state.billing = Billing(key.account_id, payer, user.id)
        state.log["user"] = user.name
        scope["path"] = "/v1/chat/completions"
        await self.completions(scope, receive, send)


_MISSING = object()


def _idempotency_key(raw: bytes) -> str:
    try:
        value = raw.decode("ascii")
    except UnicodeDecodeError:
        value = ""
    if not 1 <= len(value) <= MAX_IDEMPOTENCY_KEY or not value.isprintable():
        raise BadRequest(
            f"'Idempotency-Key' must be 1-{MAX_IDEMPOTENCY_KEY} printable ASCII characters."
        )
    return value
