"""Alias -> Route, and which aliases a key may use."""

from __future__ import annotations

from collections.abc import Mapping

from quota_proxy.config import Route
from quota_proxy.errors import ModelNotFound, PermissionDenied
from quota_proxy.store.models import KeyRecord


class RouteTable:
    def __init__(self, routes: Mapping[str, Route]) -> None:
        self.routes = dict(routes)

    def replace(self, routes: Mapping[str, Route]) -> None:
        self.routes = dict(routes)

    def allowed(self, route: Route, key: KeyRecord) -> bool:
        if key.routes is not None and route.alias not in key.routes:
            return False
        return key.allow_community or route.tier != "community"

    def visible_to(self, key: KeyRecord) -> list[Route]:
        return [r for r in self.routes.values() if self.allowed(r, key)]

    def resolve(self, alias: str, key: KeyRecord) -> Route:
        route = self.routes.get(alias)
        if route is None:
            names = ", ".join(r.alias for r in self.visible_to(key)) or "none"
            raise ModelNotFound(f"The model {alias!r} does not exist. Available models: {names}.")
        if key.routes is not None and alias not in key.routes:
            raise PermissionDenied(f"This key may not use the route {alias!r}.")
        if route.tier == "community" and not key.allow_community:
            raise PermissionDenied(
                f"This key does not allow community routes, and {alias!r} is one."
            )
        return route
