"""Metering: estimate -> hold -> forward -> settle, around any OpenAI-compatible ASGI app.

MeteringMiddleware is public (SPEC §7): it wraps the upstream proxy here, and can wrap an
app that serves its own models. It needs scope["quota.key"] (set by AuthMiddleware) and
may be told who pays through scope["quota.billing"] (the user-billed endpoint does).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import anyio
import orjson

from quota_proxy.asgi import ASGIApp, Message, Receive, Scope, Send, read_body, replay_receive, send_bytes
from quota_proxy.config import Limits, Route, Settings
from quota_proxy.errors import (
    BadRequest,
    InsufficientBalance,
    QuotaError,
    RateLimited,
    StreamNotSupported,
    UpstreamError,
)
from quota_proxy.routing import RouteTable
from quota_proxy.sse import SSEMeter, choice_texts
from quota_proxy.store import InsufficientFunds, KeyRecord, Settlement, Store, TooManyInFlight
from quota_proxy.tokens import estimate_output_tokens, estimate_prompt_tokens
from quota_proxy.upstream import OUTCOME_KEY

ENDPOINT_KINDS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}
HOLD_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class Billing:
    """Who a request is attributed to, and whose balance pays for it."""

    account_id: int
    charged_account_id: int
    user_id: int | None = None


@dataclass(slots=True)
class Usage:
    input_tokens: int
    output_tokens: int
    estimated: bool


class MeteringMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        store: Store,
        settings: Settings,
        routes: RouteTable,
        owner: str,
    ) -> None:
        self.app = app
        self.store = store
        self.routes = routes
        self.owner = owner
        self.configure(settings)

    def configure(self, settings: Settings) -> None:
        self.max_body = settings.server.max_body_bytes
        self.overdraft_cap = settings.billing.overdraft == "cap"
        self.hold_ttl_ms = settings.billing.hold_ttl_s * 1000

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            body = await read_body(scope, receive, self.max_body)
            request = self._parse(scope, body)
        except QuotaError as error:
            await error.send(scope, receive, send)
            return
        scope.setdefault("quota.log", {})["route"] = request.route.alias
        try:
            await self._check_rate(request)
            hold_id, cap = await self._hold(scope, request)
        except QuotaError as error:
            await error.send(scope, receive, send)
            return
        request.apply(cap)
        scope["quota.route"] = request.route
        scope["quota.stream"] = request.stream
        metered = _MeteredResponse(self, scope, request, hold_id, send)
        try:
            await self.app(scope, replay_receive(request.dumps(), receive), metered.send)
        finally:
            outcome = scope.get(OUTCOME_KEY, "failed")
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # Shutting down mid-request: the settlement must still be written.
                with anyio.CancelScope(shield=True):
                    await metered.settle_once(outcome)
            else:
                await metered.settle_once(outcome)

    def _parse(self, scope: Scope, body: bytes) -> _MeteredRequest:
        kind = ENDPOINT_KINDS.get(scope["path"]) or _kind_by_suffix(scope["path"])
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise BadRequest("The request body is not valid JSON.") from None
        if not isinstance(payload, dict):
            raise BadRequest("The request body must be a JSON object.")
        model = payload.get("model")
        if model is None:
            raise BadRequest("Missing required parameter: 'model'.", param="model")
        if not isinstance(model, str):
            raise BadRequest("'model' must be a string.", param="model")
        key: KeyRecord = scope["quota.key"]
        route = self.routes.resolve(model, key)
        stream = payload.get("stream", False)
        if stream is None:
            stream = False
        if not isinstance(stream, bool):
            raise BadRequest("'stream' must be true or false.", param="stream")
        if stream and kind == "embeddings":
            raise BadRequest("Embeddings cannot be streamed.", param="stream")
        if stream and not route.stream:
            raise StreamNotSupported(f"The route {route.alias!r} does not support streaming.")
        options = payload.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise BadRequest("'stream_options' must be an object.", param="stream_options")
        wants_usage = bool(stream and options and options.get("include_usage") is True)
        _check_shape(payload, kind)
        cap_field, caller_cap = _caller_cap(payload, kind)
        choices = _choices(payload, kind)
        output_cap = 0 if kind == "embeddings" else min(caller_cap or route.max_output_tokens, route.max_output_tokens)
        return _MeteredRequest(
            payload=payload,
            kind=kind,
            route=route,
            stream=stream,
            wants_usage=wants_usage,
            prompt_estimate=estimate_prompt_tokens(payload, kind),
            output_cap=output_cap,
            choices=choices,
            cap_field=cap_field,
            billing=scope.get("quota.billing") or Billing(key.account_id, key.account_id),
            key_id=key.id,
            request_id=scope["quota.request_id"],
            limits=Limits(
                rpm=key.rpm or route.limits.rpm,
                tpm=key.tpm or route.limits.tpm,
                max_concurrent=key.max_concurrent or route.limits.max_concurrent,
            ),
        )

    async def _check_rate(self, request: _MeteredRequest) -> None:
        limits = request.limits
        if not (limits.rpm or limits.tpm) or request.key_id is None:
            return
        if not await self.store.count_request(request.key_id, limits.rpm, limits.tpm):
            error = RateLimited(
                f"This key's limit of {limits.rpm or '-'} requests / {limits.tpm or '-'} "
                "tokens per minute is reached."
            )
            error.headers.append((b"retry-after", str(60 - int(time.time()) % 60).encode()))
            raise error

    async def _hold(self, scope: Scope, request: _MeteredRequest) -> tuple[int, int]:
        """Take the worst-case hold; in cap mode lower the output cap to what the balance affords."""
        mult = request.route.multiplier
        cap = request.output_cap
        account = request.billing.charged_account_id
        available = 0
        log = scope.setdefault("quota.log", {})
        for _ in range(HOLD_ATTEMPTS):
            amount = mult.charge(request.prompt_estimate + cap * request.choices)
            started = time.perf_counter()
            try:
                hold_id = await self.store.take_hold(
                    account,
                    max(amount, 1),
                    request.request_id,
                    self.owner,
                    self.hold_ttl_ms,
                    request.key_id,
                    request.limits.max_concurrent,
                )
                log["hold_ms"] = round((time.perf_counter() - started) * 1000, 3)
                return hold_id, cap
            except InsufficientFunds as short:
                available = short.available
            except TooManyInFlight:
                error = RateLimited(
                    f"This key may have {request.limits.max_concurrent} requests in flight at once."
                )
                error.headers.append((b"retry-after", b"1"))
                raise error from None
            if not self.overdraft_cap or request.kind == "embeddings":
                break
            affordable = mult.affordable_tokens(available) - request.prompt_estimate
            cap = min(cap, affordable // request.choices)
            if cap < 1:
                break
        minimum = request.prompt_estimate + (0 if request.kind == "embeddings" else request.choices)
        required = mult.charge(request.prompt_estimate + request.output_cap * request.choices)
        if self.overdraft_cap:
            required = mult.charge(minimum)
        raise InsufficientBalance(required=max(required, 1), available=available)


def _kind_by_suffix(path: str) -> str:
    for suffix, kind in (("/chat/completions", "chat"), ("/embeddings", "embeddings")):
        if path.endswith(suffix):
            return kind
    return "completions"


def _check_shape(payload: dict[str, Any], kind: str) -> None:
    if kind == "chat":
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty array.", param="messages")
        if not all(isinstance(m, dict) for m in messages):
            raise BadRequest("Each message must be an object.", param="messages")
    elif kind == "completions":
        if not isinstance(payload.get("prompt"), (str, list)):
            raise BadRequest("'prompt' must be a string or an array.", param="prompt")
    elif not isinstance(payload.get("input"), (str, list)) or payload.get("input") in ("", []):
        raise BadRequest("'input' must be a non-empty string or array.", param="input")


def _caller_cap(payload: dict[str, Any], kind: str) -> tuple[str, int | None]:
    """Which output-cap field the caller used, and its value (validated)."""
    if kind == "embeddings":
        return "", None
    fields = ("max_completion_tokens", "max_tokens") if kind == "chat" else ("max_tokens",)
    chosen, value = fields[-1], None
    for field in fields:
        raw = payload.get(field)
        if raw is None:
            continue
        if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
            raise BadRequest(f"'{field}' must be a positive integer.", param=field)
        if value is None or raw < value:
            chosen, value = field, raw
    return chosen, value


def _choices(payload: dict[str, Any], kind: str) -> int:
    """How many completions one request may produce: n (or best_of) per prompt."""
    if kind == "embeddings":
        return 1
    per_prompt = 1
    for field in ("n", "best_of"):
        raw = payload.get(field)
        if raw is None:
            continue
        if isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= 128:
            raise BadRequest(f"'{field}' must be an integer from 1 to 128.", param=field)
        per_prompt = max(per_prompt, raw)
    prompts = 1
    prompt = payload.get("prompt")
    if (
        kind == "completions"
        and isinstance(prompt, list)
        and prompt
        and all(isinstance(p, (str, list)) for p in prompt)
    ):
        prompts = len(prompt)
    return per_prompt * prompts


@dataclass(slots=True)
class _MeteredRequest:
    payload: dict[str, Any]
    kind: str
    route: Route
    stream: bool
    wants_usage: bool
    prompt_estimate: int
    output_cap: int
    choices: int  # completions the upstream may write, each up to output_cap tokens
    cap_field: str
    billing: Billing
    key_id: int | None
    request_id: str
    limits: Limits

    def apply(self, cap: int) -> None:
        """Rewrite the body for the upstream: its model name, usage in streams, the output cap."""
        payload = self.payload
        payload["model"] = self.route.model
        if self.stream:
            options = dict(payload.get("stream_options") or {})
            options["include_usage"] = True
            payload["stream_options"] = options
        if self.kind != "embeddings":
            self.output_cap = cap
            payload[self.cap_field] = cap
            other = "max_tokens" if self.cap_field == "max_completion_tokens" else "max_completion_tokens"
            if payload.get(other) is not None:
                payload[other] = cap

    def dumps(self) -> bytes:
        return orjson.dumps(self.payload)

    def charge(self, usage: Usage) -> int:
        """The charge for this usage. Output past the cap the gateway sent is not billed:
        the hold covered the cap, so an upstream that ignores max_tokens cannot overdraw."""
        output = usage.output_tokens
        if self.kind != "embeddings":
            output = min(output, self.output_cap * self.choices)
        return self.route.multiplier.charge(usage.input_tokens + output)


class _MeteredResponse:
    """Watches the inner app's reply: extends usage, strips the hidden usage event, settles."""

    def __init__(
        self,
        middleware: MeteringMiddleware,
        scope: Scope,
        request: _MeteredRequest,
        hold_id: int,
        send: Send,
    ) -> None:
        self.m = middleware
        self.scope = scope
        self.request = request
        self.hold_id = hold_id
        self._send = send
        self.status = 0
        self.start: Message | None = None
        self.chunks: list[bytes] = []
        self.sse: SSEMeter | None = None
        self.usage: Usage | None = None
        self.settled = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            if self.status == 200 and self.request.stream and _is_event_stream(message):
                self.sse = SSEMeter(self._on_usage_event)
                await self._send(message)
            else:
                self.start = message
            return
        if message["type"] != "http.response.body":
            await self._send(message)
            return
        body = message.get("body", b"")
        more = message.get("more_body", False)
        if self.sse is not None:
            out = self.sse.feed(body) if body else b""
            if not more:
                out += self.sse.flush()
                await self.settle_once("ok")
            if out or not more:
                await self._send({"type": "http.response.body", "body": out, "more_body": more})
            return
        self.chunks.append(body)
        if not more:
            await self._finish_whole()

    async def _finish_whole(self) -> None:
        assert self.start is not None
        body = b"".join(self.chunks)
        if self.status != 200:
            await self.settle_once("upstream_error" if self.status >= 500 else "upstream_rejected")
            await self._send(self.start)
            await self._send({"type": "http.response.body", "body": body})
            return
        try:
            obj = orjson.loads(body)
            if not isinstance(obj, dict):
                raise ValueError
        except ValueError:
            await self.settle_once("upstream_malformed")
            await UpstreamError("The upstream model server sent a malformed reply.").send(
                self.scope, _no_receive, self._send
            )
            return
        usage = _read_usage(obj.get("usage"))
        if usage is None:
            text = choice_texts(obj)
            usage = Usage(self.request.prompt_estimate, estimate_output_tokens(text), True)
        self.usage = usage
        obj["usage"] = self._extended_usage(obj.get("usage"), usage)
        await self.settle_once("ok")
        headers = [(k, v) for k, v in self.start.get("headers", []) if k.lower() not in (b"content-length", b"content-type")]
        await send_bytes(self._send, 200, orjson.dumps(obj), headers)

    def _on_usage_event(self, event: dict[str, Any]) -> bytes | None:
        usage = _read_usage(event.get("usage"))
        if usage is None:
            return None  # a usage object without counts: not ours to meter or to drop
        self.usage = usage
        if self.request.wants_usage:
            event["usage"] = self._extended_usage(event["usage"], usage)
        elif event.get("choices"):
            # Usage riding on a content chunk: the caller keeps the chunk, not the usage.
            event["usage"] = None
        else:
            return b""
        return b"data: " + orjson.dumps(event) + b"\n\n"

    def _extended_usage(self, original: Any, usage: Usage) -> dict[str, Any]:
        extended = dict(original) if isinstance(original, dict) else {}
        if not isinstance(original, dict):
            extended["prompt_tokens"] = usage.input_tokens
            if self.request.kind != "embeddings":
                extended["completion_tokens"] = usage.output_tokens
            extended["total_tokens"] = usage.input_tokens + usage.output_tokens
        mult = self.request.route.multiplier
        extended["input_tokens"] = usage.input_tokens
        extended["output_tokens"] = usage.output_tokens
        extended["route_multiplier"] = str(mult)
        extended["charged_quota_tokens"] = self.request.charge(usage)
        if usage.estimated:
            extended["estimated"] = True
        return extended

    async def settle_once(self, outcome: str) -> None:
        if self.settled:
            return
        self.settled = True
        request = self.request
        usage = self.usage
        if usage is None and self.sse is not None:
            # A stream that ended without a usage event: count what the caller received.
            # Nothing received means nothing produced, and that is not charged.
            if outcome == "ok":
                outcome = self.scope.get(OUTCOME_KEY, "ok")
            output = estimate_output_tokens(self.sse.delivered_text())
            if output > 0:
                usage = Usage(request.prompt_estimate, output, True)
        if usage is None:
            usage = Usage(0, 0, False)
        mult = request.route.multiplier
        charged = request.charge(usage)
        billing = request.billing
        settlement = Settlement(
            request_id=request.request_id,
            account_id=billing.account_id,
            charged_account_id=billing.charged_account_id,
            user_id=billing.user_id,
            key_id=request.key_id,
            hold_id=self.hold_id,
            route=request.route.alias,
            upstream_model=request.route.model,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            multiplier=str(mult),
            charged=charged,
            estimated=usage.estimated,
            outcome=outcome,
            status=self.status or 0,
        )
        log = self.scope.setdefault("quota.log", {})
        log.update(
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            charged=charged,
            estimated=usage.estimated,
            outcome=outcome,
        )
        started = time.perf_counter()
        await self.m.store.settle(settlement)
        log["settle_ms"] = round((time.perf_counter() - started) * 1000, 3)


def _read_usage(raw: Any) -> Usage | None:
    """The upstream's usage object, or None when it is missing or not counts."""
    if not isinstance(raw, dict):
        return None
    prompt = _count(raw.get("prompt_tokens"))
    if prompt is None:
        return None
    completion = _count(raw.get("completion_tokens"))
    if completion is None:
        total = _count(raw.get("total_tokens"))
        completion = total - prompt if total is not None and total >= prompt else 0
    return Usage(prompt, completion, False)


def _count(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _is_event_stream(message: Message) -> bool:
    for key, value in message.get("headers", ()):
        if key.lower() == b"content-type":
            return bytes(value).startswith(b"text/event-stream")
    return False


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}
