"""Sign-in, the invitation page (set a password) and sign-out.

Failed sign-ins are counted per email and per client address in fixed windows; past the
limit the password is not even checked, so guessing stays slow however it is spread.
"""

from __future__ import annotations

from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import Response

from quota_proxy.dashboard.security import (
    decoy_hash,
    hash_password,
    new_token,
    password_problem,
    same,
    token_digest,
    verify_password,
)
from quota_proxy.dashboard.web import (
    PRESESSION_COOKIE,
    SESSION_COOKIE,
    Form,
    PageError,
    clear_session_cookie,
    dashboard_of,
    posted,
    read_form,
    redirect,
    render,
    set_session_cookie,
    signed_in,
)
from quota_proxy.store.dashboard_models import ThrottleScope

ACCOUNT_LIMIT = 5  # failed sign-ins per email per window
ADDRESS_LIMIT = 20  # failed sign-ins per client address per window
WINDOW_MS = 15 * 60 * 1000
MAX_EMAIL = 254


def _address(request: Request) -> str:
    return request.client.host if request.client else ""


def _presession_page(request: Request, template: str, status: int = 200, **values: Any) -> Response:
    """A page with a form shown before sign-in: its CSRF token is a double-submit cookie."""
    token = request.cookies.get(PRESESSION_COOKIE) or new_token()
    dash = dashboard_of(request)
    response = render(request, template, status=status, form_token=token, **values)
    response.set_cookie(
        PRESESSION_COOKIE, token, path=dash.prefix, httponly=True, samesite="strict",
        secure=dash.secure(request),
    )
    return response


async def _presession_form(request: Request) -> Form:
    form = await read_form(request)
    if not same(form.get("csrf_token"), request.cookies.get(PRESESSION_COOKIE, "")):
        raise PageError(403, "This form has expired or did not come from this dashboard. "
                             "Reload the page and try again.")
    return form


async def signin_page(request: Request) -> Response:
    notice = "Your password is set. Sign in with it." if "welcome" in request.query_params else ""
    return _presession_page(request, "signin.html", notice=notice, email="")


async def signin(request: Request) -> Response:
    dash = dashboard_of(request)
    store = dash.store
    form = await _presession_form(request)
    email = form.get("email").lower()
    password = form.raw("password")

    def again(status: int, error: str) -> Response:
        return _presession_page(request, "signin.html", status=status, error=error, email=email)

    if not email or not password:
        return again(400, "Enter your email and your password.")
    if len(email) > MAX_EMAIL or "@" not in email:
        return again(400, "Enter the email address your invitation was sent to.")
    address = _address(request)
    if (
        await store.signin_failures(ThrottleScope.ACCOUNT, email, WINDOW_MS) >= ACCOUNT_LIMIT
        or await store.signin_failures(ThrottleScope.ADDRESS, address, WINDOW_MS) >= ADDRESS_LIMIT
    ):
        return again(429, "Too many failed sign-ins. Wait 15 minutes, then try again.")
    login = await store.login_by_email(email)
    usable = login is not None and login.disabled_at is None
    encoded = login.password_hash if login is not None and usable else decoy_hash()
    ok = await anyio.to_thread.run_sync(verify_password, password, encoded)
    if not (ok and usable and login is not None):
        await store.record_signin_failure(ThrottleScope.ACCOUNT, email, WINDOW_MS)
        await store.record_signin_failure(ThrottleScope.ADDRESS, address, WINDOW_MS)
        return again(401, "The email or the password is not right.")
    await store.clear_signin_failures(ThrottleScope.ACCOUNT, email)
    # A fresh session id at every sign-in; an older one this browser held ends now.
    old = request.cookies.get(SESSION_COOKIE)
    if old:
        await store.end_session(token_digest(old))
    token = new_token()
    settings = dash.services.settings.dashboard
    await store.create_session(
        login.id,
        token_digest(token),
        settings.session_idle_minutes * 60_000,
        settings.session_max_hours * 3_600_000,
        address,
    )
    response = redirect(dash, "")
    set_session_cookie(response, dash, request, token)
    return response


async def invitation_page(request: Request) -> Response:
    token = request.query_params.get("token", "")
    invitation = await dashboard_of(request).store.pending_invitation(token_digest(token)) if token else None
    if invitation is None:
        raise PageError(410, "This invitation link is not valid: it was used already, it expired, "
                             "or it was mistyped. Ask your operator for a new one.")
    return _presession_page(request, "invitation.html", invitation=invitation, token=token)


async def accept_invitation(request: Request) -> Response:
    dash = dashboard_of(request)
    form = await _presession_form(request)
    token = form.get("token")
    invitation = await dash.store.pending_invitation(token_digest(token)) if token else None
    if invitation is None:
        raise PageError(410, "This invitation link is not valid: it was used already, it expired, "
                             "or it was mistyped. Ask your operator for a new one.")
    problem = password_problem(form.raw("new_password"), form.raw("confirm_password"))
    if problem:
        return _presession_page(request, "invitation.html", status=400, invitation=invitation,
                                token=token, error=problem)
    encoded = await anyio.to_thread.run_sync(hash_password, form.raw("new_password"))
    if await dash.store.accept_invitation(token_digest(token), encoded) is None:
        raise PageError(410, "This invitation was used already. Sign in, or ask for a new one.")
    return redirect(dash, "signin?welcome=1")


async def signout(request: Request) -> Response:
    ctx = await signed_in(request)
    await posted(ctx)
    dash = ctx.dash
    await dash.store.end_session(token_digest(request.cookies.get(SESSION_COOKIE, "")))
    response = redirect(dash, "signin")
    clear_session_cookie(response, dash, request)
    return response
