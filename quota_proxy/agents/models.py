"""GET /v1/models in Anthropic's list shape, for callers that send ``anthropic-version``."""

from __future__ import annotations

from typing import Any

from quota_proxy.asgi import Scope, Send, send_json
from quota_proxy.routing import RouteTable
from quota_proxy.state import caller_key
from quota_proxy.store import KeyRecord

_EPOCH = "1970-01-01T00:00:00Z"


def _is_pattern(name: str) -> bool:
    return any(c in name for c in "*?[")


def anthropic_model_list(routes: RouteTable, key: KeyRecord) -> dict[str, Any]:
    """Each route the key may use, and each literal name in its ``match`` list."""
    data: list[dict[str, Any]] = []
    for route in routes.visible_to(key):
        for name in (route.alias, *(m for m in route.match if not _is_pattern(m))):
            data.append({
                "type": "model",
                "id": name,
                "display_name": route.description or route.alias,
                "created_at": _EPOCH,
                "route": route.alias,
                "route_multiplier": str(route.multiplier),
            })  # fmt: skip
    return {
        "data": data,
        "has_more": False,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


async def anthropic_models(routes: RouteTable, scope: Scope, send: Send) -> None:
    await send_json(send, 200, anthropic_model_list(routes, caller_key(scope)))
