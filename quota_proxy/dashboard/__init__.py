"""The web dashboard: a Starlette app mounted under [dashboard] path, beside the gateway.

`mount_dashboard()` puts it in front of the gateway's own dispatcher with one prefix test,
so the inference hot path never goes through Starlette.
"""

from __future__ import annotations

import logging
from importlib import resources

import jinja2
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route

from quota_proxy.api.common import Services
from quota_proxy.asgi import ASGIApp, Message, Receive, Scope, Send
from quota_proxy.dashboard import developer, operator, signin, users
from quota_proxy.dashboard.security import SECURITY_HEADERS
from quota_proxy.dashboard.web import (
    Cooldowns,
    Dashboard,
    PageError,
    SignInRequired,
    number,
    redirect,
    render,
    when,
)
from quota_proxy.payments.checkout import Checkout
from quota_proxy.store import supports_dashboard

__all__ = ["create_dashboard", "mount_dashboard"]

logger = logging.getLogger("quota_proxy.dashboard")

STATIC_FILES = {
    "style.css": "text/css; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "icon.svg": "image/svg+xml",
}


def _static_route(name: str, media_type: str) -> Route:
    body = resources.files("quota_proxy.dashboard").joinpath("static", name).read_bytes()

    async def serve(request: Request) -> Response:
        return Response(body, media_type=media_type, headers={"cache-control": "public, max-age=300"})

    return Route(f"/static/{name}", serve, methods=["GET"])


async def _page_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, PageError)
    return render(request, "error.html", status=exc.status, message=exc.message)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = "There is no such page." if exc.status_code == 404 else str(exc.detail)
    return render(request, "error.html", status=exc.status_code, message=message)


async def _sign_in(request: Request, exc: Exception) -> Response:
    dash: Dashboard = request.app.state.dashboard
    return redirect(dash, "signin")


def create_dashboard(
    services: Services, cooldowns: Cooldowns = dict, checkout: Checkout | None = None
) -> Starlette:
    prefix = services.settings.dashboard.path
    # Read through importlib.resources, so templates load the same from a wheel, a source tree
    # or the single executable.
    folder = resources.files("quota_proxy.dashboard").joinpath("templates")
    templates = {t.name: t.read_text(encoding="utf-8") for t in folder.iterdir() if t.name.endswith(".html")}
    env = jinja2.Environment(
        loader=jinja2.DictLoader(templates),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = when
    env.filters["number"] = number
    routes = [
        Route("/", developer.overview, methods=["GET"]),
        Route("/alerts", developer.save_alerts, methods=["POST"]),
        Route("/signin", signin.signin_page, methods=["GET"]),
        Route("/signin", signin.signin, methods=["POST"]),
        Route("/invitation", signin.invitation_page, methods=["GET"]),
        Route("/invitation", signin.accept_invitation, methods=["POST"]),
        Route("/signout", signin.signout, methods=["POST"]),
        Route("/keys", developer.keys, methods=["GET"]),
        Route("/keys", developer.create_key, methods=["POST"]),
        Route("/keys/new", developer.new_key_form, methods=["GET"]),
        Route("/keys/{key_id}/revoke", developer.revoke_key_confirm, methods=["GET"]),
        Route("/keys/{key_id}/revoke", developer.revoke_key, methods=["POST"]),
        Route("/usage", developer.usage, methods=["GET"]),
        Route("/usage.csv", developer.usage_export, methods=["GET"]),
        Route("/users", users.users, methods=["GET"]),
        Route("/users/grant", users.grant, methods=["POST"]),
        Route("/users/{external_id}", users.user_page, methods=["GET"]),
        Route("/users/{external_id}/billing-mode", users.set_billing_mode, methods=["POST"]),
        Route("/ledger", developer.ledger, methods=["GET"]),
        Route("/ledger.csv", developer.ledger_export, methods=["GET"]),
        Route("/packages", developer.packages, methods=["GET"]),
        Route("/packages/buy", developer.buy, methods=["POST"]),
        Route("/orders/{order_id}", developer.order_page, methods=["GET"]),
        Route("/accounts", operator.accounts, methods=["GET"]),
        Route("/accounts", operator.create_account, methods=["POST"]),
        Route("/accounts/operations", operator.operations, methods=["GET"]),
        Route("/accounts/invitations", operator.invitations, methods=["GET"]),
        Route("/accounts/invitations", operator.create_invitation, methods=["POST"]),
        Route("/accounts/sessions/{session_id}/revoke", operator.revoke_session, methods=["POST"]),
        Route("/accounts/{account_id}", operator.account_page, methods=["GET"]),
        Route("/accounts/{account_id}/credit", operator.credit, methods=["POST"]),
        *(_static_route(name, media) for name, media in STATIC_FILES.items()),
    ]
    app = Starlette(
        routes=[Mount(prefix, routes=routes)],
        exception_handlers={
            PageError: _page_error,
            SignInRequired: _sign_in,
            HTTPException: _http_error,
        },
    )
    app.state.dashboard = Dashboard(services, env, prefix, cooldowns, checkout)
    return app


class _SecurityHeaders:
    """Adds the CSP and friends to every dashboard response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class _PrefixDispatch:
    """Requests under the dashboard's path go to the dashboard, every other to the gateway."""

    def __init__(self, gateway: ASGIApp, dashboard: ASGIApp, prefix: str) -> None:
        self.gateway = gateway
        self.dashboard = dashboard
        self.prefix = prefix
        self.prefix_slash = prefix + "/"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] == "http" and (path == self.prefix or path.startswith(self.prefix_slash)):
            if path == self.prefix:
                scope = {**scope, "path": self.prefix_slash, "raw_path": self.prefix_slash.encode()}
            await self.dashboard(scope, receive, send)
            return
        await self.gateway(scope, receive, send)


def mount_dashboard(
    gateway: ASGIApp, services: Services, cooldowns: Cooldowns = dict, checkout: Checkout | None = None
) -> ASGIApp:
    """The gateway with the dashboard in front of it, or the gateway alone when disabled.

    cooldowns tells the operator's page which upstreams are cooling down after a failure."""
    settings = services.settings.dashboard
    if not settings.enabled:
        return gateway
    if not supports_dashboard(services.store):
        logger.warning("the dashboard is off: this store has no dashboard queries")
        return gateway
    dashboard = _SecurityHeaders(create_dashboard(services, cooldowns, checkout))
    return _PrefixDispatch(gateway, dashboard, settings.path)
