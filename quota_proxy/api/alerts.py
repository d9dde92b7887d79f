"""Low-balance alert settings (sk-quota- keys): where alerts go and at which balances.

PUT /v1/alerts {"webhook_url", "thresholds": [dollars…], "user_thresholds": [dollars…]}
replaces them; GET /v1/alerts shows them with the signing secret and the latest deliveries.
`thresholds` watch the developer's own balance, `user_thresholds` each app user's.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from quota_proxy.api.common import Services, require_secret
from quota_proxy.api.funding import parse_grant_body
from quota_proxy.asgi import Receive, Scope, Send, read_body, send_json
from quota_proxy.errors import BadRequest
from quota_proxy.money import Money, parse_decimal
from quota_proxy.store.alerts import AlertSettings, AlertStore

MAX_THRESHOLDS = 10
MAX_URL = 2000


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
            amount = parse_decimal(item)
            tokens = money.quota_tokens_from_usd(amount)
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
        return {"object": "alerts", "webhook_url": None, "signing_secret": None,
                "thresholds": [], "user_thresholds": []}

    def levels(values: tuple[int, ...]) -> list[dict[str, Any]]:
        return [{"amount": money.usd(v), "amount_quota_tokens": v} for v in values]

    return {
        "object": "alerts",
        "webhook_url": settings.webhook_url,
        "signing_secret": settings.signing_secret,
        "thresholds": levels(settings.thresholds),
        "user_thresholds": levels(settings.user_thresholds),
    }


class AlertsApi:
    def __init__(self, services: Services, alerts: AlertStore) -> None:
        self.s = services
        self.alerts = alerts

    async def show(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = require_secret(scope)
        view = alerts_view(await self.alerts.get(key.account_id), self.s.money)
        view["deliveries"] = await self.alerts.deliveries(key.account_id, 50)
        await send_json(send, 200, view)

    async def update(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = require_secret(scope)
        data = parse_grant_body(await read_body(scope, receive, self.s.settings.server.max_body_bytes))
        unknown = set(data) - {"webhook_url", "thresholds", "user_thresholds"}
        if unknown:
            raise BadRequest(f"Unknown field(s): {', '.join(sorted(unknown))}.")
        url = parse_url(data.get("webhook_url"))
        money = self.s.money
        thresholds = parse_thresholds(data.get("thresholds"), "thresholds", money)
        user_thresholds = parse_thresholds(data.get("user_thresholds"), "user_thresholds", money)
        saved = await self.alerts.set(key.account_id, url, thresholds, user_thresholds)
        await send_json(send, 200, alerts_view(saved, money))
