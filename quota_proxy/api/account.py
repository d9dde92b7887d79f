"""Endpoints any key may call about its own account: models, balance, me; and public packages."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from quota_proxy.api.common import Services, external_user_id, query
from quota_proxy.asgi import Receive, Scope, Send, send_json
from quota_proxy.errors import UserNotFound
from quota_proxy.money import format_usd
from quota_proxy.state import caller_key
from quota_proxy.store import UsageTotal
from quota_proxy.views import account_summary, balance_view, key_summary, user_view

USAGE_DAYS = 30
TOP_USERS = 100  # /v1/me lists the app users who spent most; `quota-proxy usage` lists all
_CENT_PRECISION = Decimal("0.0001")


class AccountApi:
    def __init__(self, services: Services) -> None:
        self.s = services

    async def models(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = caller_key(scope)
        # Each alias, then each literal name in its `match` list (patterns cannot be listed).
        data = [
            {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": "quota-proxy",
                "description": r.description,
                "route_multiplier": str(r.multiplier),
                "streaming": r.stream,
                "tier": r.tier,
                "max_output_tokens": r.max_output_tokens,
                **({} if name == r.alias else {"route": r.alias}),
            }
            for r in self.s.routes.visible_to(key)
            for name in (r.alias, *(m for m in r.match if not any(c in m for c in "*?[")))
        ]
        await send_json(send, 200, {"object": "list", "data": data})

    async def balance(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = caller_key(scope)
        params = query(scope)
        money = self.s.money
        if "external_user_id" in params:
            user = await self.s.store.user(key.account_id, external_user_id(params["external_user_id"]))
            if user is None:
                raise UserNotFound()
            await send_json(send, 200, user_view(user, money))
            return
        account = await self.s.store.account(key.account_id)
        assert account is not None
        await send_json(send, 200, balance_view(account, money))

    async def me(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = caller_key(scope)
        money = self.s.money
        account = await self.s.store.account(key.account_id)
        assert account is not None
        summary = await self.s.store.usage_summary(key.account_id, USAGE_DAYS, TOP_USERS)
        total = _Totals()
        for row in summary.by_route:
            total.add(row)

        def view(rows: tuple[UsageTotal, ...], name: str) -> list[dict[str, Any]]:
            return [
                {name: r.name, **_Totals.of(r).view(money)}
                for r in rows
            ]

        await send_json(
            send,
            200,
            {
                "object": "me",
                "account": account_summary(account, money),
                "key": key_summary(key),
                "usage": {
                    "days": USAGE_DAYS,
                    **total.view(money),
                    "by_route": view(summary.by_route, "route"),
                    "by_day": view(summary.by_day, "day"),
                    "by_user": view(summary.by_user, "external_user_id"),
                    "by_user_limit": TOP_USERS,
                },
            },
        )

    async def packages(self, scope: Scope, receive: Receive, send: Send) -> None:
        money = self.s.money
        data = []
        for p in self.s.settings.packages:
            rate = money.rate_per_usd(p.quota_tokens, p.price_usd)
            per_million = (
                format_usd((p.price_usd * 1_000_000 / p.quota_tokens).quantize(_CENT_PRECISION))
                if p.quota_tokens
                else None
            )
            data.append(
                {
                    "id": p.id,
                    "object": "package",
                    "name": p.name,
                    "price": format_usd(p.price_usd),
                    "quota_tokens": p.quota_tokens,
                    "quota_tokens_per_usd": rate,
                    "usd_per_million_quota_tokens": per_million,
                }
            )
        await send_json(send, 200, {"object": "list", "data": data})


class _Totals:
    """Usage sums; input_tokens is uncached input, the cache buckets are apart from it, and
    reasoning is part of output (shown for information)."""

    FIELDS = (
        "requests", "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
        "cache_write_1h_tokens", "reasoning_tokens", "charged",
    )  # fmt: skip
    __slots__ = FIELDS
    requests: int
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    cache_write_1h_tokens: int
    reasoning_tokens: int
    charged: int

    def __init__(self) -> None:
        for name in self.FIELDS:
            setattr(self, name, 0)

    @classmethod
    def of(cls, row: UsageTotal) -> _Totals:
        totals = cls()
        totals.add(row)
        return totals

    def add(self, row: UsageTotal) -> None:
        for name in self.FIELDS:
            setattr(self, name, getattr(self, name) + getattr(row, name))

    def view(self, money: Any) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self.FIELDS if name != "charged"}
        return {**out, "charged_quota_tokens": self.charged, "charged": money.usd(self.charged)}
