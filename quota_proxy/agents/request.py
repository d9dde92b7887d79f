"""An agent-API request (Anthropic Messages or OpenAI Responses): validated, routed,
estimated, and written for each upstream it may go to — as sent when the upstream speaks
the caller's protocol, translated to Chat Completions when it does not."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson

from quota_proxy.asgi import Scope, header
from quota_proxy.config import Route, Upstream
from quota_proxy.errors import BadRequest, StreamNotSupported
from quota_proxy.protocols import anthropic, responses
from quota_proxy.tokens import estimate_prompt_tokens

ANTHROPIC_VERSION = b"2023-06-01"
SESSION_HEADERS = (b"x-claude-code-session-id", b"session_id", b"session-id", b"x-session-id")
_PASSED_HEADERS = (b"anthropic-version", b"anthropic-beta")


class Protocol(StrEnum):
    MESSAGES = "messages"
    RESPONSES = "responses"

    @property
    def cap_field(self) -> str:
        return "max_tokens" if self is Protocol.MESSAGES else "max_output_tokens"


class Mode(StrEnum):
    """How one upstream is spoken to: in the caller's own protocol, or translated to Chat."""

    NATIVE = "native"
    TRANSLATED = "translated"


def speaks(upstream: Upstream, protocol: Protocol) -> bool:
    if protocol is Protocol.MESSAGES:
        return upstream.api == "anthropic" or upstream.messages
    return upstream.api == "openai" and upstream.responses


def mode_for(upstream: Upstream, protocol: Protocol) -> Mode:
    if speaks(upstream, protocol):
        return Mode.NATIVE
    if upstream.api == "openai":
        return Mode.TRANSLATED
    raise BadRequest(
        f"The route's upstream {upstream.name!r} speaks the Anthropic Messages API only; "
        f"{protocol.value} requests cannot be sent to it. Use /v1/messages or another route."
    )


@dataclass(slots=True)
class AgentRequest:
    protocol: Protocol
    body: dict[str, Any]  # as the caller sent it
    route: Route
    stream: bool
    output_cap: int
    prompt_estimate: int
    session_id: str | None
    chat: dict[str, Any] | None  # the Chat Completions form, None if it cannot be translated
    untranslatable: BadRequest | None
    passed_headers: list[tuple[bytes, bytes]]
    query: bytes

    def upstream_call(self, upstream: Upstream) -> tuple[Mode, str, bytes, list[tuple[bytes, bytes]]]:
        """(mode, url, body, headers) for this upstream, with its model and the output cap."""
        mode = mode_for(upstream, self.protocol)
        if mode is Mode.NATIVE:
            body = dict(self.body)
            body["model"] = self.route.model
            body[self.protocol.cap_field] = self.output_cap
            if self.protocol is Protocol.MESSAGES:
                _fit_thinking(body, self.output_cap)
            path = "/messages" if self.protocol is Protocol.MESSAGES else "/responses"
        else:
            if self.chat is None:
                assert self.untranslatable is not None
                raise self.untranslatable
            body = copy.copy(self.chat)
            body["model"] = self.route.model
            body["max_tokens"] = self.output_cap
            path = "/chat/completions"
        url = upstream.base_url + path
        if mode is Mode.NATIVE and self.query:
            url += "?" + self.query.decode("latin-1")
        return mode, url, orjson.dumps(body), self.headers_for(upstream, mode)

    def headers_for(self, upstream: Upstream, mode: Mode) -> list[tuple[bytes, bytes]]:
        headers = [(b"content-type", b"application/json"), (b"accept-encoding", b"identity")]
        if mode is Mode.NATIVE and self.protocol is Protocol.MESSAGES:
            headers.extend(self.passed_headers)
            if not any(k == b"anthropic-version" for k, _ in self.passed_headers):
                headers.append((b"anthropic-version", ANTHROPIC_VERSION))
        if upstream.api_key:
            key = upstream.api_key.encode("latin-1")
            x_api_key = upstream.auth == "x-api-key" or (upstream.auth == "auto" and upstream.api == "anthropic")
            headers.append((b"x-api-key", key) if x_api_key else (b"authorization", b"Bearer " + key))
        return headers


MIN_THINKING_BUDGET = 1024


def _fit_thinking(body: dict[str, Any], cap: int) -> None:
    """Anthropic requires thinking.budget_tokens < max_tokens. When the gateway lowered
    max_tokens (the route's cap, or what the balance affords), the budget follows it down,
    and thinking is left out if even the smallest budget no longer fits."""
    thinking = body.get("thinking")
    if not isinstance(thinking, dict) or thinking.get("type") != "enabled":
        return
    budget = thinking.get("budget_tokens")
    if not isinstance(budget, int) or budget < cap:
        return
    if cap - 1 >= MIN_THINKING_BUDGET:
        body["thinking"] = {**thinking, "budget_tokens": cap - 1}
    else:
        del body["thinking"]


def parse(
    scope: Scope, payload: Any, route_of: Any, protocol: Protocol, counting: bool = False
) -> AgentRequest:
    """Validate the caller's body; ``route_of(model)`` resolves (and authorizes) the route.
    ``counting``: a count_tokens body, which has no output cap."""
    if not isinstance(payload, dict):
        raise BadRequest("The request body must be a JSON object.")
    model = payload.get("model")
    if model is None:
        raise BadRequest("Missing required parameter: 'model'.", param="model")
    if not isinstance(model, str):
        raise BadRequest("'model' must be a string.", param="model")
    route: Route = route_of(model)
    stream = payload.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false.", param="stream")
    if stream and not route.stream:
        raise StreamNotSupported(f"The route {route.alias!r} does not support streaming.")
    field = protocol.cap_field
    cap = payload.get(field)
    if counting:
        cap = None
    elif cap is None and protocol is Protocol.MESSAGES:
        raise BadRequest("Missing required parameter: 'max_tokens'.", param="max_tokens")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise BadRequest(f"'{field}' must be a positive integer.", param=field)
    if protocol is Protocol.MESSAGES:
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty array.", param="messages")
    elif not isinstance(payload.get("input"), (str, list)) or payload.get("input") in ("", []):
        raise BadRequest("'input' must be a non-empty string or array of items.", param="input")
    chat: dict[str, Any] | None = None
    refused: BadRequest | None = None
    try:
        translate = anthropic.to_chat_request if protocol is Protocol.MESSAGES else responses.to_chat_request
        chat = translate(payload)
    except BadRequest as error:
        refused = error
    if chat is not None:
        estimate = estimate_prompt_tokens(chat, "chat")
    else:
        # Not translatable (so only native upstreams take it): count the whole body's text.
        estimate = estimate_prompt_tokens(payload, "unknown")
    for upstream in route.upstreams:
        if mode_for(upstream, protocol) is Mode.TRANSLATED and refused is not None:
            raise refused
    session = None
    for name in SESSION_HEADERS:
        value = header(scope, name)
        if value:
            session = value.decode("latin-1")[:200]
            break
    passed = [(k, v) for k, v in scope["headers"] if k in _PASSED_HEADERS]
    return AgentRequest(
        protocol=protocol,
        body=payload,
        route=route,
        stream=stream,
        output_cap=min(cap or route.max_output_tokens, route.max_output_tokens),
        prompt_estimate=estimate,
        session_id=session,
        chat=chat,
        untranslatable=refused,
        passed_headers=passed,
        query=scope.get("query_string", b""),
    )
