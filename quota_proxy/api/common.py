"""What the JSON endpoints share: the services they use, query parsing, key and user-id checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from quota_proxy.asgi import Scope
from quota_proxy.auth import KeyCache
from quota_proxy.config import LiveSettings, Settings
from quota_proxy.errors import BadRequest, PermissionDenied
from quota_proxy.grants import EXTERNAL_USER_ID
from quota_proxy.keys import KIND_SECRET
from quota_proxy.metrics import Metrics
from quota_proxy.money import Money
from quota_proxy.routing import RouteTable
from quota_proxy.state import caller_key
from quota_proxy.store import KeyRecord, Store


@dataclass(slots=True)
class Services:
    live: LiveSettings
    store: Store
    routes: RouteTable
    keys: KeyCache
    metrics: Metrics

    @property
    def settings(self) -> Settings:
        return self.live.current

    @property
    def money(self) -> Money:
        return self.live.current.money


def query(scope: Scope) -> dict[str, str]:
    raw = scope.get("query_string", b"").decode("latin-1")
    return {k: v[-1] for k, v in parse_qs(raw, keep_blank_values=True).items()}


def require_secret(scope: Scope) -> KeyRecord:
    key = caller_key(scope)
    if key.kind != KIND_SECRET:
        raise PermissionDenied("This endpoint needs a secret key (sk-quota-…).")
    return key


def external_user_id(value: Any) -> str:
    if not isinstance(value, str) or EXTERNAL_USER_ID.fullmatch(value) is None:
        raise BadRequest(
            "'external_user_id' must be 1-128 characters of A-Z, a-z, 0-9 and . _ : @ -",
            param="external_user_id",
        )
    return value

