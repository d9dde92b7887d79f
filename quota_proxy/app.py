"""create_app(): the gateway as one ASGI app. Its lifespan owns the store, the upstream
client and the hold-keeping task; nothing is built at import time.

A request reads top to bottom:
RequestContext -> Auth -> dispatch -> Metering (hold) -> UpstreamProxy -> Metering (settle),
with the HoldKeeper refreshing this process's holds beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from quota_proxy.agents import AgentApi, AnthropicErrorShape, anthropic_models
from quota_proxy.alerts import AlertDispatcher
from quota_proxy.api.account import AccountApi
from quota_proxy.api.alerts import AlertsApi
from quota_proxy.api.common import Services
from quota_proxy.api.funding import FundingApi
from quota_proxy.api.ops import OpsApi
from quota_proxy.api.payments import PaymentsApi
from quota_proxy.api.usage import UsageApi
from quota_proxy.asgi import ASGIApp, Receive, Scope, Send, header, send_error
from quota_proxy.auth import AuthMiddleware, KeyCache
from quota_proxy.config import ConfigError, LiveSettings, Settings, default_config_path, load_settings
from quota_proxy.context import RequestContextMiddleware
from quota_proxy.dashboard import mount_dashboard
from quota_proxy.errors import MethodNotAllowed, NotFound, NotSupported, QuotaError
from quota_proxy.holds import HoldKeeper
from quota_proxy.http_client import UpstreamClient
from quota_proxy.logs import configure_logging
from quota_proxy.metering import MeteringMiddleware
from quota_proxy.metrics import Metrics
from quota_proxy.payments.checkout import Checkout
from quota_proxy.payments.stripe_checkout import StripeCheckout
from quota_proxy.routing import RouteTable
from quota_proxy.store import Store, alert_store, open_store, payment_store, supports_payments
from quota_proxy.upstream import UpstreamProxy, create_client

logger = logging.getLogger("quota_proxy")

# /api/hello: Claude Code's reachability probe of its base URL (HEAD and GET).
PUBLIC_PATHS = frozenset(
    {"/healthz", "/readyz", "/metrics", "/v1/packages", "/openapi.json", "/api/hello", "/webhooks/stripe"}
)


class Gateway:
    """The ASGI app. Build it with create_app()."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: Store | None = None,
        http_client: UpstreamClient | None = None,
        reload_on_sighup: bool = False,
    ) -> None:
        self.live = LiveSettings(settings)
        self.reload_on_sighup = reload_on_sighup
        self.store = store or open_store(settings.store)
        self._own_client = http_client is None
        self.http_client = http_client or create_client()
        self.keeper = HoldKeeper(self.store, self.live)
        self.routes = routes = RouteTable(self.live)
        keys = KeyCache(self.store)
        metrics = Metrics()
        self.store.observe_settlement_groups(metrics.observe_settlement_group)
        self.services = Services(self.live, self.store, routes, keys, metrics)
        proxy = UpstreamProxy(self.http_client, self.store.quiet)
        self.metering = inference = MeteringMiddleware(proxy, self.store, self.live, routes, self.keeper)
        self.agents = agents = AgentApi(proxy, self.store, self.live, routes, self.keeper)
        account = AccountApi(self.services)
        funding = FundingApi(self.services, inference)
        ops = OpsApi(self.services)
        stripe_settings = settings.payments.stripe
        self.stripe = (
            StripeCheckout(stripe_settings, settings.server.public_url or "", settings.dashboard.path)
            if stripe_settings is not None
            else None
        )
        # Orders, codes and alerts on the store's engine (store.payment_store / alert_store).
        self.checkout = Checkout(payment_store(self.store), self.stripe)
        payments = PaymentsApi(self.services, self.checkout)
        alerting = alert_store(self.store)
        alerts = AlertsApi(self.services, alerting)
        self.alert_dispatcher = AlertDispatcher(alerting, settings.alerts, settings.money)
        self._exact: dict[str, dict[str, ASGIApp]] = {
            "/v1/chat/completions": {"POST": inference},
            "/v1/completions": {"POST": inference},
            "/v1/embeddings": {"POST": inference},
            "/v1/messages": {"POST": agents.messages},
            "/v1/messages/count_tokens": {"POST": agents.count_tokens},
            "/v1/responses": {"POST": agents.responses},
            "/v1/models": {"GET": self._models},
            "/v1/balance": {"GET": account.balance},
            "/v1/me": {"GET": account.me},
            "/v1/usage": {"GET": UsageApi(self.services).usage},
            "/v1/packages": {"GET": account.packages},
            "/v1/funding/grant": {"POST": funding.grant},
            "/healthz": {"GET": ops.healthz},
            "/readyz": {"GET": ops.readyz},
            "/metrics": {"GET": ops.metrics},
            "/openapi.json": {"GET": ops.openapi},
            "/api/hello": {"GET": agents.hello, "HEAD": agents.hello},
            "/v1/checkout": {"POST": payments.checkout},
            "/v1/orders": {"GET": payments.list_orders},
            "/v1/redeem": {"POST": payments.redeem},
            "/webhooks/stripe": {"POST": payments.stripe_webhook},
            "/v1/alerts": {"GET": alerts.show, "PUT": alerts.update},
        }
        if not supports_payments(self.store):  # a library user's store: a clear 501, not a 500
            for path in PAYMENT_PATHS:
                self._exact[path] = dict.fromkeys(self._exact[path], _payments_not_supported)
        self._openai_models = account.models
        self._user_routes: dict[str, dict[str, Callable[..., Awaitable[None]]]] = {
            "balance": {"GET": funding.user_balance},
            "": {"PATCH": funding.update_user},
            "chat/completions": {"POST": funding.user_completion},
        }
        self._app: ASGIApp = AnthropicErrorShape(
            RequestContextMiddleware(
                mount_dashboard(
                    AuthMiddleware(self._dispatch, keys, PUBLIC_PATHS),
                    self.services,
                    proxy.cooling_down,
                    self.checkout if supports_payments(self.store) else None,  # a library store: no orders
                ),
                observers=(metrics.observe,),
            )
        )

    @property
    def settings(self) -> Settings:
        return self.live.current

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        await self._app(scope, receive, send)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        try:
            methods = self._exact.get(path)
            if methods is not None:
                handler = methods.get(method)
                if handler is None:
                    raise MethodNotAllowed()
                await handler(scope, receive, send)
                return
            if path.startswith("/v1/users/"):
                user_id, _, rest = path[len("/v1/users/") :].partition("/")
                user_methods = self._user_routes.get(rest)
                if user_methods is None or not user_id:
                    raise NotFound()
                user_handler = user_methods.get(method)
                if user_handler is None:
                    raise MethodNotAllowed()
                await user_handler(scope, receive, send, user_id)
                return
            raise NotFound()
        except QuotaError as error:
            await send_error(send, error)

    async def _models(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The model list in the caller's protocol: Anthropic's shape when it sends anthropic-version."""
        if header(scope, b"anthropic-version") is not None:
            await anthropic_models(self.routes, scope, send)
        else:
            await self._openai_models(scope, receive, send)

    def reload(self) -> bool:
        """Re-read the TOML file: routes, upstreams, packages and billing switch over for the
        next request; in-flight requests finish on what they started with. An invalid file
        is refused and the running config kept."""
        if self.settings.source is None:
            logger.warning("reload: this gateway was not built from a file; nothing to reload")
            return False
        try:
            new = load_settings(self.settings.source)
        except ConfigError as exc:
            logger.error("reload refused, keeping the running config: %s", "; ".join(exc.problems))
            return False
        if new.store.path != self.settings.store.path:
            logger.warning("reload: store.path changed; it takes effect at the next restart")
        self.live.current = new
        logger.warning(
            "config reloaded from %s: %d routes, %d packages",
            new.source,
            len(new.routes),
            len(new.packages),
        )
        return True

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Open the store and start the hold keeper; the app serves only inside this."""
        await self.store.open()
        if self.reload_on_sighup:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reload)
        try:
            alerting = self.alert_dispatcher.running() if supports_payments(self.store) else contextlib.nullcontext()
            async with self.keeper.running(), alerting:
                yield
        finally:
            self.services.metrics.flush()  # a worker's last second, into the shared files
            if self._own_client:
                await self.http_client.aclose()
            if self.stripe is not None:
                await self.stripe.aclose()
            await self.store.close()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        message = await receive()
        assert message["type"] == "lifespan.startup"
        try:
            async with self.running():
                await send({"type": "lifespan.startup.complete"})
                message = await receive()
        except Exception as exc:
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.failed", "message": str(exc)})
                return
            await send({"type": "lifespan.shutdown.failed", "message": str(exc)})
            return
        await send({"type": "lifespan.shutdown.complete"})


PAYMENT_PATHS = ("/v1/checkout", "/v1/orders", "/v1/redeem", "/webhooks/stripe", "/v1/alerts")


async def _payments_not_supported(scope: Scope, receive: Receive, send: Send) -> None:
    raise NotSupported(
        "Purchases, redemption codes and alerts need the SQLite or PostgreSQL store; "
        "this gateway runs on a custom store without them."
    )


def create_app(
    settings: Settings | str | os.PathLike[str] | None = None,
    *,
    store: Store | None = None,
    http_client: UpstreamClient | None = None,
) -> Gateway:
    """Build the gateway from Settings or a TOML path (default: $QUOTA_PROXY_CONFIG)."""
    if settings is None:
        settings = default_config_path()
    if not isinstance(settings, Settings):
        settings = load_settings(settings)
    return Gateway(settings, store=store, http_client=http_client)


def app_from_environment() -> Any:
    """The uvicorn factory used by `serve`: each worker loads the config itself, and a
    single-process gateway reloads it on SIGHUP (with workers, uvicorn's supervisor turns
    SIGHUP into a rolling restart of the workers)."""
    settings = load_settings(os.environ.get("QUOTA_PROXY_CONFIG") or default_config_path())
    log_level = os.environ.get("QUOTA_PROXY_LOG_LEVEL") or settings.server.log_level  # serve's --log-level
    configure_logging(log_level, settings.server.log_format)
    gateway = Gateway(settings, reload_on_sighup=True)
    # Everything built so far lives as long as the process: out of the collector's sight,
    # so its full collections (which otherwise walk every module, class and config object,
    # a pause inside whichever request triggers one) stay short.
    gc.collect()
    gc.freeze()
    return gateway
