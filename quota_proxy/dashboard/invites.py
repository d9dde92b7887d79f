"""Invitations: a one-time, expiring link with which a person sets a dashboard password.

The token is shown once (printed by the CLI, or shown on the operator's page) and stored
only as a digest; it works once, until it expires.
"""

from __future__ import annotations

import re
import socket
import time
from dataclasses import dataclass

from quota_proxy.config import Settings
from quota_proxy.dashboard.security import new_token, token_digest
from quota_proxy.store import DashboardStore
from quota_proxy.store.dashboard_models import Invitation, Role

EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s]{1,189}\.[^@\s.]{1,63}")


class InviteError(Exception):
    """A mistake in the invitation's request, said as a sentence."""


@dataclass(frozen=True, slots=True)
class CreatedInvitation:
    invitation: Invitation
    link: str


def server_url(settings: Settings) -> str:
    """Where people reach the gateway: [server] public_url, else http://host:port."""
    if settings.server.public_url:
        return settings.server.public_url
    host = settings.server.host
    if host in ("", "0.0.0.0", "::"):  # listening everywhere: name this machine
        host = socket.getfqdn()
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{settings.server.port}"


async def invite(
    store: DashboardStore, settings: Settings, account_name: str, email: str, role: str, base_url: str
) -> CreatedInvitation:
    email = email.strip().lower()
    if EMAIL.fullmatch(email) is None:
        raise InviteError(f"{email!r} is not an email address.")
    try:
        parsed_role = Role(role)
    except ValueError:
        raise InviteError("The role must be developer or operator.") from None
    account = await store.account_by_name(account_name)
    if account is None:
        raise InviteError(f"There is no account named {account_name!r}.")
    token = new_token()
    hours = settings.dashboard.invitation_hours
    expires_at = int(time.time() * 1000) + hours * 3_600_000
    invitation = await store.create_invitation(
        account.id, email, parsed_role, token_digest(token), expires_at
    )
    link = f"{base_url.rstrip('/')}{settings.dashboard.path}/invitation?token={token}"
    return CreatedInvitation(invitation, link)
