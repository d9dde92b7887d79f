"""Records of the dashboard's sign-in and reporting queries. Plain frozen dataclasses."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Role(StrEnum):
    DEVELOPER = "developer"
    OPERATOR = "operator"


class ThrottleScope(StrEnum):
    ACCOUNT = "account"  # failed sign-ins for one email
    ADDRESS = "address"  # failed sign-ins from one client address


class UsageGroup(StrEnum):
    DAY = "day"
    ROUTE = "route"
    KEY = "key"
    USER = "user"


@dataclass(frozen=True, slots=True)
class Login:
    id: int
    public_id: str
    email: str
    account_id: int
    account_name: str
    role: Role
    password_hash: str
    created_at: int
    disabled_at: int | None


@dataclass(frozen=True, slots=True)
class Invitation:
    id: int
    public_id: str
    email: str
    account_id: int
    account_name: str
    role: Role
    created_at: int
    expires_at: int
    used_at: int | None


@dataclass(frozen=True, slots=True)
class DashboardSession:
    id: int
    public_id: str
    login_id: int
    email: str
    role: Role
    account_id: int
    account_name: str
    created_at: int
    last_seen_at: int
    idle_timeout_ms: int
    expires_at: int
    revoked_at: int | None
    address: str


@dataclass(frozen=True, slots=True)
class UsageLine:
    """One row of a usage report: the group's label and its sums."""

    label: str
    requests: int
    input_tokens: int
    output_tokens: int
    charged: int


@dataclass(frozen=True, slots=True)
class DayRouteCharge:
    day: str
    route: str
    charged: int


@dataclass(frozen=True, slots=True)
class LedgerLine:
    """A ledger entry with what its charge was for (None for non-charges)."""

    id: int
    public_id: str
    amount: int
    balance_after: int
    kind: str
    request_id: str | None
    idempotency_key: str | None
    description: str
    created_at: int
    route: str | None
    upstream_model: str | None
    input_tokens: int | None
    output_tokens: int | None
    multiplier: str | None
    estimated: bool | None
    outcome: str | None


@dataclass(frozen=True, slots=True)
class OpenHold:
    account_name: str
    amount: int
    request_id: str
    created_at: int
    expires_at: int


@dataclass(frozen=True, slots=True)
class UpstreamErrors:
    route: str
    outcome: str
    count: int
    last_at: int
