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
    SESSION = "session"  # an agent session (x-session-id and the like)


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
    input_tokens: int  # uncached input
    cache_read_tokens: int
    cache_write_tokens: int  # 5-minute and 1-hour cache writes together
    output_tokens: int
    charged: int


@dataclass(frozen=True, slots=True)
class DayRouteCharge:
    day: str
    route: str
    charged: int


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
