"""A gateway built by a library user on their own Store (neither engine) has no orders, codes
or alerts: those endpoints answer a clear JSON 501 `not_supported`, never a 500, and the rest
of the gateway works."""

from __future__ import annotations

from typing import Any

import pytest

from quota_proxy.store import Store, supports_payments
from tests.conftest import GatewayFactory

pytestmark = pytest.mark.anyio


class LibraryStore:
    """A user's store: every call goes to the configured engine, but it is neither class."""

    def __init__(self, inner: Store) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


async def test_payment_endpoints_say_not_supported(make_gateway: GatewayFactory) -> None:
    h = await make_gateway(wrap_store=LibraryStore)
    assert not supports_payments(h.store)
    await h.account("acme", 1000)
    auth = {"authorization": f"Bearer {await h.key('acme', 'secret')}"}
    http = h.http()
    calls = [
        ("POST", "/v1/checkout", {"package": "starter"}),
        ("GET", "/v1/orders", None),
        ("POST", "/v1/redeem", {"code": "QP-AAAAA-AAAAA-AAAAA-AAAAA"}),
        ("GET", "/v1/alerts", None),
        ("PUT", "/v1/alerts", {"webhook_url": "https://hooks.example/a", "thresholds": [1]}),
        ("POST", "/webhooks/stripe", {}),
    ]
    for method, path, body in calls:
        response = await http.request(method, path, json=body, headers=auth)
        assert response.status_code == 501, (path, response.text)
        error = response.json()["error"]
        assert (error["code"], error["type"]) == ("not_supported", "api_error")
        assert "SQLite or PostgreSQL store" in error["message"]
    balance = await http.get("/v1/balance", headers=auth)
    assert balance.status_code == 200 and balance.json()["balance_quota_tokens"] == 1000
