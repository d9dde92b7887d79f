"""One request's money as a small state machine: a hold is taken, then settled once.

    (start) --take()--> HELD --settle(outcome, usage)--> SETTLED

`take()` reserves the worst case (the prompt estimate plus every completion's output cap);
in `overdraft = "cap"` mode it lowers the output cap until the hold fits. `settle()` hands
the charge, the hold's release and the usage to the store as one settlement (journaled at
once, committed with the next group); a second call is a no-op, so every exit path may call
it, and it never waits, so a cancelled request still settles.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum
from typing import Any

from quota_proxy.config import BillingSettings, Limits, Route
from quota_proxy.errors import InsufficientBalance, RateLimited
from quota_proxy.inference_request import InferenceRequest, Kind
from quota_proxy.state import Billing
from quota_proxy.store import InsufficientFunds, KeyRecord, Settlement, Store, TooManyInFlight
from quota_proxy.store.models import Outcome
from quota_proxy.usage import Buckets, affordable_output, charge, worst_case_hold

HOLD_ATTEMPTS = 4  # one after committing pending settlements, then cap mode's lowered cap


@dataclass(slots=True)
class Usage:
    """What the upstream reported it used (or what was estimated). A value, not changed once
    built; not frozen, for the cost of a frozen __init__ on every request (see Buckets)."""

    input_tokens: int  # uncached input: the cache buckets are apart from it
    output_tokens: int  # reasoning included
    estimated: bool
    cache_read: int = 0
    cache_write_5m: int = 0
    cache_write_1h: int = 0
    reasoning: int = 0  # part of output_tokens, kept as information

    @classmethod
    def of(cls, b: Buckets, estimated: bool = False) -> Usage:
        return cls(b.input, b.output, estimated, b.cache_read, b.cache_write_5m, b.cache_write_1h, b.reasoning)

    @property
    def buckets(self) -> Buckets:
        return Buckets(
            self.input_tokens, self.cache_read, self.cache_write_5m, self.cache_write_1h, self.output_tokens,
            self.reasoning,
        )  # fmt: skip


NO_USAGE = Usage(0, 0, False)


class MeterState(Enum):
    HELD = "held"
    SETTLED = "settled"


@dataclass(frozen=True, slots=True)
class HoldPolicy:
    """The billing settings a hold depends on (swapped whole on reload)."""

    overdraft_cap: bool
    hold_ttl_ms: int
    owner: str  # whose holds these are: the HoldKeeper refreshes its owner's

    @classmethod
    def of(cls, billing: BillingSettings, owner: str) -> HoldPolicy:
        return cls(billing.overdraft == "cap", billing.hold_ttl_s * 1000, owner)


@dataclass(frozen=True, slots=True)
class HoldRequest:
    """What a hold needs to know of a request, whatever API it came in on: the worst case
    is the prompt estimate plus `choices` completions of up to `output_cap` tokens each."""

    prompt_estimate: int
    output_cap: int  # the cap sent upstream before the balance is asked (the route's at most)
    choices: int = 1
    embeddings: bool = False  # no output side: nothing to lower in cap mode


def limits_for(key: KeyRecord, route: Route) -> Limits:
    """The key's own limits where it has them, else the route's."""
    if not (key.rpm or key.tpm or key.max_concurrent):
        return route.limits  # the usual case, without building a copy per request
    return Limits(
        rpm=key.rpm or route.limits.rpm,
        tpm=key.tpm or route.limits.tpm,
        max_concurrent=key.max_concurrent or route.limits.max_concurrent,
    )


async def check_rate(store: Store, key_id: int, limits: Limits) -> None:
    """Count this request against the key's per-minute limits; 429 when one is reached.

    Tokens and requests in flight are counted when a request settles (its hold goes then):
    with either limit, this process's pending settlements commit first, so a caller whose
    previous answer arrived is not counted as still waiting for it."""
    if limits.tpm or limits.max_concurrent:
        await store.commit_pending()
    if not (limits.rpm or limits.tpm):
        return
    if not await store.count_request(key_id, limits.rpm, limits.tpm):
        error = RateLimited(
            f"This key's limit of {limits.rpm or '-'} requests / {limits.tpm or '-'} "
            "tokens per minute is reached."
        )
        error.headers.append((b"retry-after", str(60 - int(time.time()) % 60).encode()))
        raise error


class Meter:
    """The money of one request: what was held, and the one settlement."""

    __slots__ = ("store", "hold", "route", "billing", "key_id", "request_id", "hold_id", "output_cap", "state", "log")

    def __init__(
        self,
        store: Store,
        hold: HoldRequest,
        route: Route,
        billing: Billing,
        key_id: int | None,
        request_id: str,
        hold_id: int,
        output_cap: int,
        log: dict[str, Any],
    ) -> None:
        self.store = store
        self.hold = hold
        self.route = route
        self.billing = billing
        self.key_id = key_id
        self.request_id = request_id
        self.hold_id = hold_id
        self.output_cap = output_cap  # per completion, as lowered to fit the balance
        self.state = MeterState.HELD
        self.log = log

    @classmethod
    async def take(
        cls,
        store: Store,
        policy: HoldPolicy,
        hold: HoldRequest,
        route: Route,
        billing: Billing,
        key_id: int | None,
        request_id: str,
        limits: Limits,
        log: dict[str, Any],
    ) -> Meter:
        """Take the worst-case hold; in cap mode lower the output cap to what the balance affords."""
        mult, weights = route.multiplier.value, route.weights
        cap = full_cap = hold.output_cap
        account = billing.charged_account_id
        available = 0
        drained = False
        for _ in range(HOLD_ATTEMPTS):
            amount = worst_case_hold(hold.prompt_estimate, cap * hold.choices, mult, weights)
            started = time.perf_counter()
            try:
                hold_id = await store.take_hold(
                    account,
                    max(amount, 1),
                    request_id,
                    policy.owner,
                    policy.hold_ttl_ms,
                    key_id,
                    limits.max_concurrent,
                )
            except InsufficientFunds as short:
                if not drained:
                    # The holds of answered requests whose settlements still wait for their
                    # group may be what refused it: commit them and ask again, once.
                    drained = True
                    if await store.commit_pending():
                        continue
                available = short.available
            except TooManyInFlight:
                error = RateLimited(f"This key may have {limits.max_concurrent} requests in flight at once.")
                error.headers.append((b"retry-after", b"1"))
                raise error from None
            else:
                log["hold_ms"] = round((time.perf_counter() - started) * 1000, 3)
                return cls(store, hold, route, billing, key_id, request_id, hold_id, cap, log)
            if not policy.overdraft_cap or hold.embeddings:
                break
            affordable = affordable_output(available, hold.prompt_estimate, mult, weights)
            cap = min(cap, affordable // hold.choices)
            if cap < 1:
                break
        if not policy.overdraft_cap:
            least = full_cap * hold.choices
        elif hold.embeddings:
            least = 0
        else:
            least = hold.choices
        required = worst_case_hold(hold.prompt_estimate, least, mult, weights)
        raise InsufficientBalance(required=max(required, 1), available=available)

    def charge(self, usage: Usage) -> int:
        """The charge for this usage. Output past the cap the gateway sent is not billed:
        the hold covered the cap, so an upstream that ignores max_tokens cannot overdraw."""
        billed = usage.buckets
        cap = self.output_cap * self.hold.choices
        if not self.hold.embeddings and billed.output > cap:
            billed = billed.with_output(cap)
        return charge(billed, self.route.multiplier.value, self.route.weights)

    def settle(self, outcome: Outcome, usage: Usage, status: int, session_id: str | None = None) -> None:
        """Charge for `usage` and release the hold, once. Every API's settlement is written here:
        journaled before it returns (so before the caller has the end of the answer), committed
        with the next group, never awaited on the response path."""
        if self.state is MeterState.SETTLED:
            return
        self.state = MeterState.SETTLED
        charged = self.charge(usage)
        billing = self.billing
        settlement = Settlement(
            request_id=self.request_id,
            account_id=billing.account_id,
            charged_account_id=billing.charged_account_id,
            user_id=billing.user_id,
            key_id=self.key_id,
            hold_id=self.hold_id,
            route=self.route.alias,
            upstream_model=self.route.model,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            multiplier=str(self.route.multiplier),
            charged=charged,
            estimated=usage.estimated,
            outcome=outcome,
            status=status,
            cache_read_tokens=usage.cache_read,
            cache_write_tokens=usage.cache_write_5m,
            cache_write_1h_tokens=usage.cache_write_1h,
            reasoning_tokens=usage.reasoning,
            session_id=session_id,
            created_at=int(time.time() * 1000),
        )
        self.log.update(
            input_tokens=usage.input_tokens + usage.cache_read + usage.cache_write_5m + usage.cache_write_1h,
            output_tokens=usage.output_tokens,
            cache_read_tokens=usage.cache_read,
            cache_write_tokens=usage.cache_write_5m + usage.cache_write_1h,
            charged=charged,
            estimated=usage.estimated,
            outcome=str(outcome),
        )
        started = time.perf_counter()
        self.store.settle_later(settlement)  # journaled now, committed with the next group
        self.log["settle_ms"] = round((time.perf_counter() - started) * 1000, 3)


def hold_request(request: InferenceRequest, route: Route) -> HoldRequest:
    """An OpenAI inference request's worst case on this route."""
    return HoldRequest(
        request.prompt_estimate, output_cap(request, route), request.choices, request.kind is Kind.EMBEDDINGS
    )


def output_cap(request: InferenceRequest, route: Route) -> int:
    """The output cap sent upstream: the caller's, never above the route's."""
    if request.kind is Kind.EMBEDDINGS:
        return 0
    return min(request.caller_cap or route.max_output_tokens, route.max_output_tokens)
