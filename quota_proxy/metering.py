"""Metering: parse -> rate limit -> hold -> forward -> settle, around an OpenAI-compatible app.

MeteringMiddleware is public (SPEC §7): it wraps the gateway's upstream hop here, and can
wrap an ASGI app that serves its own models. It needs the caller's key in the RequestState
(AuthMiddleware puts it there) and may be told who pays (`RequestState.billing`; the
user-billed endpoint sets it). Whoever mounts it owns the HoldKeeper it is given and runs
`async with keeper.running():` while it serves, so long requests keep their holds.
"""

from __future__ import annotations

from quota_proxy.asgi import ASGIApp, Message, Receive, Scope, Send, read_body, replay_receive, send_error
from quota_proxy.config import LiveSettings, Settings
from quota_proxy.errors import QuotaError, StreamNotSupported
from quota_proxy.holds import HoldKeeper
from quota_proxy.inference_request import InferenceRequest, parse_inference_request
from quota_proxy.meter import (
    NO_USAGE,
    HoldPolicy,
    Meter,
    check_rate,
    hold_request,
    limits_for,
)
from quota_proxy.reply import MeteredReply
from quota_proxy.routing import RouteTable
from quota_proxy.state import Billing, RequestState, request_state
from quota_proxy.store import Store
from quota_proxy.store.models import Outcome
from quota_proxy.upstream import Exchange, Hop, HopResult

__all__ = ["Billing", "MeteringMiddleware"]


class MeteringMiddleware:
    def __init__(
        self,
        app: Hop | ASGIApp,
        store: Store,
        settings: Settings | LiveSettings,
        routes: RouteTable,
        keeper: HoldKeeper,
    ) -> None:
        self.hop: Hop | AsgiHop = app if isinstance(app, Hop) else AsgiHop(app)
        self.store = store
        self.routes = routes
        self.keeper = keeper
        self.live = settings if isinstance(settings, LiveSettings) else LiveSettings(settings)
        self._policy: tuple[Settings, HoldPolicy] | None = None

    def _hold_policy(self, settings: Settings) -> HoldPolicy:
        """The hold policy of these settings (rebuilt only when a reload swapped them)."""
        if self._policy is None or self._policy[0] is not settings:
            self._policy = (settings, HoldPolicy.of(settings.billing, self.keeper.owner))
        return self._policy[1]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if isinstance(self.hop, AsgiHop):
                await self.hop.app(scope, receive, send)
            return
        state = request_state(scope)
        settings = self.live.current  # one snapshot for the whole request
        try:
            body = await read_body(scope, receive, settings.server.max_body_bytes)
            request = parse_inference_request(scope["path"], body)
            meter = await self._open(state, request, self._hold_policy(settings))
        except QuotaError as error:
            await send_error(send, error)
            return
        reply = MeteredReply(scope, meter, request, send)
        outcome = Outcome.FAILED
        exchange = Exchange(meter.route, request.rewrite(meter.route.model, meter.output_cap), request.stream)
        try:
            result = await self.hop.forward(scope, receive, reply.send, exchange)
            outcome = Outcome.UPSTREAM_MALFORMED if reply.malformed else result.outcome
        finally:
            meter.settle(outcome, reply.final_usage() or NO_USAGE, reply.status)
        # The reply's last message goes out only now: whoever has the whole answer can
        # already see what it cost.
        await reply.send_last()

    async def _open(self, state: RequestState, request: InferenceRequest, policy: HoldPolicy) -> Meter:
        """Resolve the route, count the request against the key's limits, take the hold."""
        key = state.key
        if key is None:
            raise LookupError("MeteringMiddleware needs AuthMiddleware in front of it")
        route = self.routes.resolve(request.model, key)
        state.log["route"] = route.alias
        if request.stream and not route.stream:
            raise StreamNotSupported(f"The route {route.alias!r} does not support streaming.")
        limits = limits_for(key, route)
        await check_rate(self.store, key.id, limits)
        billing = state.billing or Billing(key.account_id, key.account_id)
        return await Meter.take(
            self.store, policy, hold_request(request, route), route, billing, key.id, state.request_id, limits,
            state.log,
        )  # fmt: skip


class AsgiHop:
    """An ASGI app that serves models itself, as the hop: it gets the rewritten body, and
    how it ended is read off its status (200 ok, 4xx rejected, 5xx an upstream error)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def forward(self, scope: Scope, receive: Receive, send: Send, exchange: Exchange) -> HopResult:
        status = 0

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, replay_receive(exchange.body, receive), watch)
        if status == 0:
            return HopResult(Outcome.CLIENT_DISCONNECTED)
        if status < 400:
            return HopResult(Outcome.OK)
        return HopResult(Outcome.UPSTREAM_REJECTED if status < 500 else Outcome.UPSTREAM_ERROR)
