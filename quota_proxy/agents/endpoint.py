"""POST /v1/messages and /v1/responses: the coding agents' APIs, metered by bucket.

One request reads top to bottom: validate and route -> rate limit -> hold the worst case
(prompt at the heaviest input-side weight + output cap at the output weight) -> forward
to the first upstream that answers (as sent, or translated to Chat Completions) -> relay,
reading the usage in the upstream's own dialect -> settle exactly once.
"""

from __future__ import annotations

import asyncio
import time

import anyio
import orjson

from quota_proxy.agents.exchange import Exchange
from quota_proxy.agents.request import AgentRequest, Mode, Protocol, parse, speaks
from quota_proxy.asgi import Receive, Scope, Send, read_body, send_bytes
from quota_proxy.config import Limits, LiveSettings
from quota_proxy.errors import (
    BadRequest,
    InsufficientBalance,
    RateLimited,
)
from quota_proxy.holds import HoldKeeper
from quota_proxy.http_client import UpstreamClient, UpstreamHTTPError
from quota_proxy.routing import RouteTable
from quota_proxy.state import Billing, RequestState, caller_key, request_state
from quota_proxy.store import InsufficientFunds, KeyRecord, Store, TooManyInFlight
from quota_proxy.usage import affordable_output, worst_case_hold

HOLD_ATTEMPTS = 3


class AgentApi:
    """The agent endpoints. Errors raised here reach the caller through the dispatcher,
    which renders them in Anthropic's shape on /v1/messages."""

    def __init__(
        self,
        client: UpstreamClient,
        store: Store,
        live: LiveSettings,
        routes: RouteTable,
        keeper: HoldKeeper,
    ) -> None:
        self.client = client
        self.store = store
        self.live = live  # read once per request: a reload never mixes two files in one
        self.routes = routes
        self.keeper = keeper  # our holds are its owner's, refreshed while we serve

    async def hello(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Claude Code probes ``{ANTHROPIC_BASE_URL}/api/hello`` before it starts."""
        await send_bytes(send, 200, b'{"status":"ok"}')

    async def messages(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._serve(scope, receive, send, Protocol.MESSAGES)

    async def responses(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._serve(scope, receive, send, Protocol.RESPONSES)

    async def _parse(
        self, scope: Scope, receive: Receive, protocol: Protocol, counting: bool = False
    ) -> AgentRequest:
        body = await read_body(scope, receive, self.live.current.server.max_body_bytes)
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise BadRequest("The request body is not valid JSON.") from None
        key = caller_key(scope)
        return parse(scope, payload, lambda model: self.routes.resolve(model, key), protocol, counting)

    async def count_tokens(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Anthropic's token counter: the upstream's own answer when it speaks Messages and
        has the endpoint, else the estimator's. Never held, never billed."""
        request = await self._parse(scope, receive, Protocol.MESSAGES, counting=True)
        request_state(scope).log["route"] = request.route.alias
        counted = await self._upstream_count(request)
        if counted is None:
            counted = orjson.dumps({"input_tokens": request.prompt_estimate})
        await send_bytes(send, 200, counted)

    async def _upstream_count(self, request: AgentRequest) -> bytes | None:
        """The upstream's count_tokens answer, or None when it has none to give (it does not
        speak Messages, lacks the endpoint, or fails): the caller still gets a count."""
        upstream = request.route.upstream
        if not speaks(upstream, Protocol.MESSAGES):
            return None
        body = {k: v for k, v in request.body.items() if k not in ("max_tokens", "stream")}
        body["model"] = request.route.model
        url = upstream.base_url + "/messages/count_tokens"
        if request.query:
            url += "?" + request.query.decode("latin-1")
        try:
            response = await self.client.send(
                url, orjson.dumps(body), request.headers_for(upstream, Mode.NATIVE),
                timeout=upstream.timeout_s, connect_timeout=upstream.connect_timeout_s,
            )  # fmt: skip
            try:
                raw = await response.aread()
            finally:
                await response.aclose()
        except UpstreamHTTPError:
            return None
        if response.status_code != 200:
            return None
        try:
            answer = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        ok = isinstance(answer, dict) and isinstance(answer.get("input_tokens"), int)
        return raw if ok else None

    async def _serve(self, scope: Scope, receive: Receive, send: Send, protocol: Protocol) -> None:
        request = await self._parse(scope, receive, protocol)
        state = request_state(scope)
        key = caller_key(scope)
        route = request.route
        state.log["route"] = route.alias
        if request.session_id:
            state.log["session_id"] = request.session_id
        billing = state.billing or Billing(key.account_id, key.account_id)
        limits = Limits(
            rpm=key.rpm or route.limits.rpm,
            tpm=key.tpm or route.limits.tpm,
            max_concurrent=key.max_concurrent or route.limits.max_concurrent,
        )
        await self._check_rate(key, limits)
        hold_id = await self._hold(state, request, billing, key, limits)
        exchange = Exchange(self.client, self.store, state, request, billing, key.id, hold_id)
        try:
            await exchange.run(receive, send)
        finally:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                with anyio.CancelScope(shield=True):
                    await exchange.settle_once()
            else:
                await exchange.settle_once()

    async def _check_rate(self, key: KeyRecord, limits: Limits) -> None:
        if not (limits.rpm or limits.tpm):
            return
        if not await self.store.count_request(key.id, limits.rpm, limits.tpm):
            error = RateLimited(
                f"This key's limit of {limits.rpm or '-'} requests / {limits.tpm or '-'} tokens per minute is reached."
            )
            error.headers.append((b"retry-after", str(60 - int(time.time()) % 60).encode()))
            raise error

    async def _hold(
        self, state: RequestState, request: AgentRequest, billing: Billing, key: KeyRecord, limits: Limits
    ) -> int:
        """Take the worst-case hold; in cap mode lower the output cap to what the balance affords."""
        route = request.route
        billing_settings = self.live.current.billing
        overdraft_cap = billing_settings.overdraft == "cap"
        mult, weights = route.multiplier.value, route.weights
        estimate = request.prompt_estimate
        cap = request.output_cap
        available = 0
        for _ in range(HOLD_ATTEMPTS):
            amount = worst_case_hold(estimate, cap, mult, weights)
            started = time.perf_counter()
            try:
                hold_id = await self.store.take_hold(
                    billing.charged_account_id, max(amount, 1), state.request_id, self.keeper.owner,
                    billing_settings.hold_ttl_s * 1000, key.id, limits.max_concurrent,
                )  # fmt: skip
            except InsufficientFunds as short:
                available = short.available
            except TooManyInFlight:
                error = RateLimited(f"This key may have {limits.max_concurrent} requests in flight at once.")
                error.headers.append((b"retry-after", b"1"))
                raise error from None
            else:
                state.log["hold_ms"] = round((time.perf_counter() - started) * 1000, 3)
                request.output_cap = cap
                return hold_id
            if not overdraft_cap:
                break
            cap = min(cap, affordable_output(available, estimate, mult, weights))
            if cap < 1:
                break
        least = 1 if overdraft_cap else request.output_cap
        raise InsufficientBalance(
            required=max(worst_case_hold(estimate, least, mult, weights), 1), available=available
        )
