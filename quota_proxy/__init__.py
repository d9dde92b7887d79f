"""quota-proxy: a self-hosted, OpenAI-compatible LLM gateway with prepaid balances.

Use it as a server (`quota-proxy serve`) or as an ASGI library::

    from quota_proxy import create_app
    app = create_app("quota-proxy.toml")

AuthMiddleware and MeteringMiddleware are public and can wrap another ASGI app that
serves OpenAI-compatible endpoints of its own; run the HoldKeeper given to the metering
middleware (`async with keeper.running():`) for as long as it serves.
"""

from quota_proxy.app import Gateway, create_app
from quota_proxy.auth import AuthMiddleware, KeyCache
from quota_proxy.config import (
    ConfigError,
    Route,
    Settings,
    StoreSettings,
    Upstream,
    load_settings,
    parse_settings,
)
from quota_proxy.holds import HoldKeeper
from quota_proxy.metering import MeteringMiddleware
from quota_proxy.routing import RouteTable
from quota_proxy.state import Billing
from quota_proxy.store import Store, open_store

__all__ = [
    "AuthMiddleware",
    "Billing",
    "ConfigError",
    "Gateway",
    "HoldKeeper",
    "KeyCache",
    "MeteringMiddleware",
    "Route",
    "RouteTable",
    "Settings",
    "Store",
    "StoreSettings",
    "Upstream",
    "create_app",
    "load_settings",
    "open_store",
    "parse_settings",
]

__version__ = "0.1.0"
