"""The records the store hands out. Plain frozen dataclasses: no behaviour, no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Outcome(StrEnum):
    """How a metered request ended; the `requests.outcome` column accepts exactly these."""

    OK = "ok"
    CLIENT_DISCONNECTED = "client_disconnected"  # the caller left; charged what was delivered
    UPSTREAM_REJECTED = "upstream_rejected"  # an upstream 4xx passed through to the caller
    UPSTREAM_ERROR = "upstream_error"  # unreachable, 5xx, 401/403, timed out before the first byte
    UPSTREAM_MALFORMED = "upstream_malformed"  # a 200 that is not the JSON or event stream asked for
    UPSTREAM_BROKEN = "upstream_broken"  # the stream broke after it began
    FAILED = "failed"  # the gateway itself failed (a bug); logged with its traceback


@dataclass(frozen=True, slots=True)
class Account:
    id: int
    public_id: str
    kind: str  # "developer" | "user"
    name: str  # developer name, or the app user's external_user_id
    parent_id: int | None
    billing_mode: str
    balance: int
    held: int
    created_at: int

    @property
    def available(self) -> int:
        return self.balance - self.held


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: int
    public_id: str
    account_id: int
    account_name: str
    account_public_id: str
    kind: str  # "live" | "secret"
    name: str
    prefix: str
    routes: tuple[str, ...] | None
    allow_community: bool
    expires_at: int | None
    revoked_at: int | None
    created_at: int
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None

    def usable_at(self, now_ms: int) -> bool:
        if self.revoked_at is not None:
            return False
        return self.expires_at is None or now_ms < self.expires_at


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    id: int
    public_id: str
    account_id: int
    amount: int
    balance_after: int
    kind: str
    request_id: str | None
    idempotency_key: str | None
    related_id: str | None
    description: str
    created_at: int


@dataclass(frozen=True, slots=True)
class Settlement:
    """What one request cost, written in one statement by SqliteStore.settle()."""

    request_id: str
    account_id: int
    charged_account_id: int
    user_id: int | None
    key_id: int | None
    hold_id: int | None
    route: str
    upstream_model: str
    input_tokens: int
    output_tokens: int
    multiplier: str
    charged: int
    estimated: bool
    outcome: str
    status: int


@dataclass(frozen=True, slots=True)
class UsageRow:
    day: str
    route: str
    user: str | None
    requests: int
    input_tokens: int
    output_tokens: int
    charged: int


class StoreError(Exception):
    """Base of every error a store raises; on its own: the store cannot be used (file
    unreadable, schema newer than this code, …).

    StoreError
    ├── StoreUnavailable      the database cannot be reached now (connection lost, timeout)
    ├── InsufficientFunds     a hold or grant does not fit the available balance
    ├── TooManyInFlight       the key already has as many requests in flight as it may
    └── IdempotencyMismatch   an idempotency key reused with a different request
    """


class StoreUnavailable(StoreError):
    """The database cannot be reached now; the caller must fail closed and may retry later."""


class InsufficientFunds(StoreError):
    def __init__(self, available: int) -> None:
        self.available = available
        super().__init__(f"available {available}")


class TooManyInFlight(StoreError):
    """The key already has as many requests in flight as it may."""


class IdempotencyMismatch(StoreError):
    """The idempotency key was used before with a different request."""
