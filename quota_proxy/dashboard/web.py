"""What every dashboard page shares: the signed-in context, form parsing, CSRF checks,
rendering, and the errors a page answers with."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from quota_proxy.api.common import Services
from quota_proxy.dashboard.security import csrf_for, same, token_digest
from quota_proxy.money import Money
from quota_proxy.payments.checkout import Checkout
from quota_proxy.store import DashboardStore
from quota_proxy.store.dashboard_models import DashboardSession, Role

SESSION_COOKIE = "qp_session"
PRESESSION_COOKIE = "qp_csrf"  # double-submit token for the forms shown before sign-in
MAX_FORM_BYTES = 64 * 1024


class PageError(Exception):
    """Answer with an error page: the status and a sentence for a person."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(message)


class SignInRequired(Exception):
    """No live session: send the browser to the sign-in page."""


# Upstream name -> seconds of cooldown left, as this process sees it.
Cooldowns = Callable[[], dict[str, float]]


@dataclass
class Dashboard:
    """The state the pages share; lives on the Starlette app as app.state.dashboard."""

    services: Services
    env: jinja2.Environment
    prefix: str
    cooldowns: Cooldowns = dict
    checkout: Checkout | None = None  # buying packs; None or disabled: no Buy button

    @property
    def store(self) -> DashboardStore:
        return self.services.store  # type: ignore[return-value]  # mounted only if supports_dashboard

    @property
    def money(self) -> Money:
        return self.services.money

    def url(self, path: str = "") -> str:
        return f"{self.prefix}/{path.lstrip('/')}" if path else f"{self.prefix}/"

    def secure(self, request: Request) -> bool:
        mode = self.services.settings.dashboard.secure_cookies
        if mode == "always":
            return True
        if mode == "never":
            return False
        public = self.services.settings.server.public_url or ""
        return request.url.scheme == "https" or public.startswith("https://")


@dataclass(frozen=True)
class Ctx:
    """A signed-in request: who it is and the CSRF token its forms carry."""

    request: Request
    dash: Dashboard
    session: DashboardSession
    csrf: str

    @property
    def account_id(self) -> int:
        return self.session.account_id

    @property
    def operator(self) -> bool:
        return self.session.role is Role.OPERATOR


class Form:
    """An application/x-www-form-urlencoded body."""

    def __init__(self, fields: dict[str, list[str]]) -> None:
        self.fields = fields

    def get(self, name: str, default: str = "") -> str:
        values = self.fields.get(name)
        return values[-1].strip() if values else default

    def raw(self, name: str) -> str:
        """Unstripped (passwords)."""
        values = self.fields.get(name)
        return values[-1] if values else ""

    def getlist(self, name: str) -> list[str]:
        return [v.strip() for v in self.fields.get(name, []) if v.strip()]


def dashboard_of(request: Request) -> Dashboard:
    dash: Dashboard = request.app.state.dashboard
    return dash


async def read_form(request: Request) -> Form:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in ("", "application/x-www-form-urlencoded"):
        raise PageError(400, "This form must be sent as application/x-www-form-urlencoded.")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise PageError(413, "This form is too large.")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise PageError(400, "This form is not UTF-8 text.") from None
    return Form(parse_qs(text, keep_blank_values=True))


async def signed_in(request: Request, *, operator: bool = False) -> Ctx:
    dash = dashboard_of(request)
    token = request.cookies.get(SESSION_COOKIE, "")
    session = await dash.store.live_session(token_digest(token)) if token else None
    if session is None:
        raise SignInRequired()
    ctx = Ctx(request, dash, session, csrf_for(token))
    if operator and not ctx.operator:
        raise PageError(403, "This page is for operators.")
    return ctx


async def posted(ctx: Ctx) -> Form:
    """The form of a state-changing request, refused (403) without the session's CSRF token."""
    form = await read_form(ctx.request)
    if not same(form.get("csrf_token"), ctx.csrf):
        raise PageError(403, "This form has expired or did not come from this dashboard. "
                             "Reload the page and try again.")
    return form


def render(
    request: Request, template: str, ctx: Ctx | None = None, status: int = 200, **values: Any
) -> HTMLResponse:
    dash = dashboard_of(request)
    page = dash.env.get_template(template).render(
        ctx=ctx, url=dash.url, usd=dash.money.usd, csrf=ctx.csrf if ctx else "", **values
    )
    return HTMLResponse(page, status_code=status, headers={"cache-control": "no-store"})


def redirect(dash: Dashboard, path: str) -> RedirectResponse:
    return RedirectResponse(dash.url(path), status_code=303)


def when(ms: int | None) -> str:
    if ms is None:
        return ""
    moment = dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def number(n: int) -> str:
    return f"{n:,}"


def set_session_cookie(response: Response, dash: Dashboard, request: Request, token: str) -> None:
    response.set_cookie(
        SESSION_COOKIE, token, path=dash.prefix, httponly=True, samesite="lax",
        secure=dash.secure(request),
    )


def clear_session_cookie(response: Response, dash: Dashboard, request: Request) -> None:
    response.delete_cookie(
        SESSION_COOKIE, path=dash.prefix, httponly=True, samesite="lax", secure=dash.secure(request)
    )
