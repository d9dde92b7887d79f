"""Alias -> Route, and which aliases a key may use."""

from __future__ import annotations

from collections.abc import Mapping
from fnmatch import fnmatchcase

from quota_proxy.config import LiveSettings, Route, Settings
from quota_proxy.errors import ModelNotFound, PermissionDenied
from quota_proxy.store.models import KeyRecord


class RouteTable:
    """The routes of the running settings (a LiveSettings: a reload shows at the next
    lookup), or a fixed mapping."""

    def __init__(self, routes: Mapping[str, Route] | LiveSettings) -> None:
        self.live = routes if isinstance(routes, LiveSettings) else LiveSettings(Settings(routes=dict(routes)))

    @property
    def routes(self) -> Mapping[str, Route]:
        return self.live.current.routes

    def allowed(self, route: Route, key: KeyRecord) -> bool:
        if key.routes is not None and route.alias not in key.routes:
            return False
        return key.allow_community or route.tier != "community"

    def visible_to(self, key: KeyRecord) -> list[Route]:
        return [r for r in self.routes.values() if self.allowed(r, key)]

    def find(self, model: str) -> Route | None:
        """The route named ``model``, else the first whose ``match`` list names or matches it."""
        route = self.routes.get(model)
        if route is not None:
            return route
        for candidate in self.routes.values():
            if any(fnmatchcase(model, pattern) for pattern in candidate.match):
                return candidate
        return None

    def resolve(self, alias: str, key: KeyRecord) -> Route:
        route = self.find(alias)
        if route is None:
            names = ", ".join(r.alias for r in self.visible_to(key)) or "none"
            raise ModelNotFound(f"The model {alias!r} does not exist. Available models: {names}.")
        if key.routes is not None and route.alias not in key.routes:
            raise PermissionDenied(f"This key may not use the route {route.alias!r}.")
        if route.tier == "community" and not key.allow_community:
            raise PermissionDenied(
                f"This key does not allow community routes, and {route.alias!r} is one."
            )
        return route
