"""What the JSON endpoints share: the services they use, body and query parsing, key checks."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import orjson

from quota_proxy.asgi import Receive, Scope, read_body
from quota_proxy.auth import KeyCache
from quota_proxy.config import Settings
from quota_proxy.errors import BadRequest, PermissionDenied
from quota_proxy.keys import KIND_SECRET
from quota_proxy.metrics import Metrics
from quota_proxy.money import Money
from quota_proxy.routing import RouteTable
from quota_proxy.store import Account, KeyRecord, Store

EXTERNAL_USER_ID = re.compile(r"[A-Za-z0-9._:@-]{1,128}")


@dataclass(slots=True)
class Services:
    settings: Settings
    store: Store
    routes: RouteTable
    money: Money
    keys: KeyCache
    metrics: Metrics


async def json_object(scope: Scope, receive: Receive, limit: int) -> dict[str, Any]:
    body = await read_body(scope, receive, limit)
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise BadRequest("The request body must be a JSON object.")
    return data


def query(scope: Scope) -> dict[str, str]:
    raw = scope.get("query_string", b"").decode("latin-1")
    return {k: v[-1] for k, v in parse_qs(raw, keep_blank_values=True).items()}


def require_secret(scope: Scope) -> KeyRecord:
    key: KeyRecord = scope["quota.key"]
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


def user_view(user: Account, money: Money) -> dict[str, Any]:
    return {
        "object": "user",
        "external_user_id": user.name,
        "balance": money.usd(user.balance),
        "balance_quota_tokens": user.balance,
        "available_quota_tokens": user.available,
        "billing_mode": user.billing_mode,
    }
