"""The Funding API: grants into app users' balances, their balances, and user-billed completions.

Secret keys (sk-quota-…) only. Grants are idempotent like Stripe's: the Idempotency-Key is
scoped to the developer account and stored with a hash of the request in the same
transaction as the grant, so a replay answers with the first result and grants nothing.
"""

from __future__ import annotations

import hashlib
import json
from decimal import Decimal
from typing import Any

import orjson

from quota_proxy.api.common import Services, external_user_id, json_object, require_secret, user_view
from quota_proxy.asgi import ASGIApp, Receive, Scope, Send, header, read_body, send_json
from quota_proxy.errors import (
    BadRequest,
    IdempotencyConflict,
    InsufficientBalance,
    UserNotFound,
)
from quota_proxy.money import Money, parse_decimal
from quota_proxy.state import Billing, request_state
from quota_proxy.store import IdempotencyMismatch, InsufficientFunds

MAX_DESCRIPTION = 500
MAX_IDEMPOTENCY_KEY = 255
BILLING_MODES = ("user", "developer")


def _reject_constant(name: str) -> Any:
    raise ValueError(name)


def parse_grant_body(body: bytes) -> dict[str, Any]:
    """JSON with exact decimals: 0.1 stays 0.1, NaN and Infinity are refused."""
    try:
        data = json.loads(body, parse_float=Decimal, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise BadRequest("The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise BadRequest("The request body must be a JSON object.")
    return data


class FundingApi:
    def __init__(self, services: Services, completions: ASGIApp) -> None:
        self.s = services
        self.completions = completions

    async def grant(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = require_secret(scope)
        body = await read_body(scope, receive, self.s.settings.server.max_body_bytes)
        data = parse_grant_body(body)
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
        data = await json_object(scope, receive, self.s.settings.server.max_body_bytes)
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


def grant_request_hash(external_user_id: str, amount: int, description: str) -> str:
    """What makes two grants "the same request" for an idempotency key."""
    return hashlib.sha256(orjson.dumps([external_user_id, amount, description])).hexdigest()


def grant_view(facts: dict[str, Any], duplicate: bool, money: Money) -> dict[str, Any]:
    usd = money.usd
    return {
        "object": "funding.grant",
        "external_user_id": facts["external_user_id"],
        "amount_granted": usd(facts["amount"]),
        "amount_granted_quota_tokens": facts["amount"],
        "balance_before": usd(facts["balance_before"]),
        "balance_before_quota_tokens": facts["balance_before"],
        "balance_after": usd(facts["balance_after"]),
        "balance_after_quota_tokens": facts["balance_after"],
        "ledger_id": facts["ledger_id"],
        "developer_ledger_id": facts["developer_ledger_id"],
        "developer_balance_after": usd(facts["developer_balance_after"]),
        "developer_balance_after_quota_tokens": facts["developer_balance_after"],
        "description": facts["description"],
        "duplicate": duplicate,
    }


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
