"""POST /v1/messages and /v1/responses: the coding agents' APIs, metered by bucket.

One request reads top to bottom: validate and route -> rate limit -> hold the worst case
(prompt at the heaviest input-side weight + output cap at the output weight) -> forward
to the first upstream that answers (as sent, or translated to Chat Completions) -> relay,
reading the usage in the upstream's own dialect -> settle exactly once.
"""

from __future__ import annotations

import orjson

from quota_proxy.agents.exchange import Exchange
from quota_proxy.agents.request import AgentRequest, Mode, Protocol, parse, speaks
from quota_proxy.asgi import Receive, Scope, Send, read_body, send_bytes
from quota_proxy.config import LiveSettings
from quota_proxy.errors import BadRequest
from quota_proxy.holds import HoldKeeper
from quota_proxy.http_client import UpstreamHTTPError
from quota_proxy.meter import HoldPolicy, HoldRequest, Meter, check_rate, limits_for
from quota_proxy.routing import RouteTable
from quota_proxy.state import Billing, caller_key, request_state
from quota_proxy.store import Store
from quota_proxy.upstream import UpstreamProxy


class AgentApi:
    """The agent endpoints. Errors raised here reach the caller through the dispatcher,
    which renders them in Anthropic's shape on /v1/messages."""

    def __init__(
        self,
        proxy: UpstreamProxy,
        store: Store,
        live: LiveSettings,
        routes: RouteTable,
        keeper: HoldKeeper,
    ) -> None:
        self.proxy = proxy  # shared with the chat path, so are its upstreams' cooldowns
        self.client = proxy.client
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
        limits = limits_for(key, route)
        await check_rate(self.store, key.id, limits)
        meter = await Meter.take(
            self.store, HoldPolicy.of(self.live.current.billing, self.keeper.owner),
            HoldRequest(request.prompt_estimate, request.output_cap), route, billing, key.id, state.request_id,
            limits, state.log,
        )  # fmt: skip
        request.output_cap = meter.output_cap  # in cap mode, lowered to what the balance affords
        exchange = Exchange(self.proxy, state, request, meter)
        try:
            await exchange.run(scope, receive, send)
        finally:
            exchange.settle_once()
