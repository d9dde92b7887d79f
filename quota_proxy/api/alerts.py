"""Low-balance alert settings (sk-quota- keys): where alerts go and at which balances.

PUT /v1/alerts {"webhook_url", "thresholds": [dollars…], "user_thresholds": [dollars…]}
replaces them; GET /v1/alerts shows them with the signing secret and the latest deliveries.
`thresholds` watch the developer's own balance, `user_thresholds` each app user's.
"""

from __future__ import annotations

from quota_proxy.api.common import Services, require_secret
from quota_proxy.asgi import Receive, Scope, Send, send_json
from quota_proxy.errors import BadRequest
from quota_proxy.json_body import read_object
from quota_proxy.payments.views import alerts_view, parse_thresholds, parse_url
from quota_proxy.store.alerts import AlertStore


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
        data = await read_object(scope, receive, self.s.settings.server.max_body_bytes, exact=True)
        unknown = set(data) - {"webhook_url", "thresholds", "user_thresholds"}
        if unknown:
            raise BadRequest(f"Unknown field(s): {', '.join(sorted(unknown))}.")
        url = parse_url(data.get("webhook_url"))
        money = self.s.money
        thresholds = parse_thresholds(data.get("thresholds"), "thresholds", money)
        user_thresholds = parse_thresholds(data.get("user_thresholds"), "user_thresholds", money)
        saved = await self.alerts.set(key.account_id, url, thresholds, user_thresholds)
        await send_json(send, 200, alerts_view(saved, money))
