"""RequestState: what one request's middleware layers learn about it, typed, at one scope key.

The outermost middleware creates it; every later layer reads and fills its own fields.
`request_state()` creates it on first use too, so a library user who mounts only the
metering middleware gets a working request id and log record.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from quota_proxy.asgi import Scope
from quota_proxy.keys import time_ordered_hex
from quota_proxy.store.models import KeyRecord

STATE_KEY = "quota.state"


def new_request_id() -> str:
    """'req_' and 24 hex digits, in creation order (keys.time_ordered_hex says why)."""
    return "req_" + time_ordered_hex()


@dataclass(frozen=True, slots=True)
class Billing:
    """Who a request is attributed to, and whose balance pays for it."""

    account_id: int
    charged_account_id: int
    user_id: int | None = None


@dataclass(slots=True)
class RequestState:
    request_id: str
    started: float  # time.perf_counter() when the request arrived
    log: dict[str, Any] = field(default_factory=dict)  # the access-log record, filled as we go
    key: KeyRecord | None = None  # set by AuthMiddleware
    billing: Billing | None = None  # who pays, when not the key's own account
    # The upstream's own time before the gateway could answer: a whole reply, or a stream's
    # first bytes. Set before the response starts, so the overhead header can subtract it.
    upstream_s: float = 0.0

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started


def request_state(scope: Scope) -> RequestState:
    state: RequestState | None = scope.get(STATE_KEY)
    if state is None:
        state = RequestState(new_request_id(), time.perf_counter())
        scope[STATE_KEY] = state
    return state


def caller_key(scope: Scope) -> KeyRecord:
    """The authenticated key; endpoints behind AuthMiddleware only."""
    key = request_state(scope).key
    if key is None:
        raise LookupError("no authenticated key: mount the endpoint behind AuthMiddleware")
    return key
