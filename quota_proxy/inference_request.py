"""The OpenAI inference request, parsed and validated: pure, no I/O, no money.

Metering asks three things of a request before it may take a hold: which endpoint kind it
is, how many tokens it may cost at most (prompt estimate, output cap, completions per
request), and whether it streams. Everything the gateway does not need stays in `payload`
untouched and goes to the upstream as the caller sent it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson

from quota_proxy.errors import BadRequest
from quota_proxy.json_body import parse_object
from quota_proxy.tokens import estimate_prompt_tokens

MAX_CHOICES = 128


class Kind(StrEnum):
    CHAT = "chat"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"


_KINDS = {
    "/v1/chat/completions": Kind.CHAT,
    "/v1/completions": Kind.COMPLETIONS,
    "/v1/embeddings": Kind.EMBEDDINGS,
}


def endpoint_kind(path: str) -> Kind:
    """The kind of an inference path (`/v1/…`, or a mount that ends the same way)."""
    kind = _KINDS.get(path)
    if kind is not None:
        return kind
    if path.endswith("/chat/completions"):
        return Kind.CHAT
    if path.endswith("/embeddings"):
        return Kind.EMBEDDINGS
    return Kind.COMPLETIONS


@dataclass(slots=True)
class InferenceRequest:
    kind: Kind
    payload: dict[str, Any]  # the caller's JSON object, rewritten in place for the upstream
    model: str  # the alias the caller asked for
    stream: bool
    wants_usage: bool  # the caller asked for the usage event of a stream
    cap_field: str  # the output-cap field the caller used ("" for embeddings)
    caller_cap: int | None  # the caller's own output cap, if any
    choices: int  # completions the upstream may write, each up to the output cap
    prompt_estimate: int

    def rewrite(self, upstream_model: str, output_cap: int) -> bytes:
        """The body for the upstream: its model name, usage in streams, the output cap."""
        payload = self.payload
        payload["model"] = upstream_model
        if self.stream:
            options = dict(payload.get("stream_options") or {})
            options["include_usage"] = True
            payload["stream_options"] = options
        if self.kind is not Kind.EMBEDDINGS:
            payload[self.cap_field] = output_cap
            other = "max_tokens" if self.cap_field == "max_completion_tokens" else "max_completion_tokens"
            if payload.get(other) is not None:
                payload[other] = output_cap
        return orjson.dumps(payload)


def parse_inference_request(path: str, body: bytes) -> InferenceRequest:
    """Validate what metering relies on; raise BadRequest with the offending param otherwise."""
    kind = endpoint_kind(path)
    payload = parse_object(body)
    model = payload.get("model")
    if model is None:
        raise BadRequest("Missing required parameter: 'model'.", param="model")
    if not isinstance(model, str):
        raise BadRequest("'model' must be a string.", param="model")
    stream = payload.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false.", param="stream")
    if stream and kind is Kind.EMBEDDINGS:
        raise BadRequest("Embeddings cannot be streamed.", param="stream")
    options = payload.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object.", param="stream_options")
    _check_shape(payload, kind)
    cap_field, caller_cap = _caller_cap(payload, kind)
    return InferenceRequest(
        kind=kind,
        payload=payload,
        model=model,
        stream=stream,
        wants_usage=bool(stream and options and options.get("include_usage") is True),
        cap_field=cap_field,
        caller_cap=caller_cap,
        choices=_choices(payload, kind),
        prompt_estimate=estimate_prompt_tokens(payload, kind),
    )


def _check_shape(payload: dict[str, Any], kind: Kind) -> None:
    if kind is Kind.CHAT:
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty array.", param="messages")
        if not all(isinstance(m, dict) for m in messages):
            raise BadRequest("Each message must be an object.", param="messages")
    elif kind is Kind.COMPLETIONS:
        if not isinstance(payload.get("prompt"), (str, list)):
            raise BadRequest("'prompt' must be a string or an array.", param="prompt")
    elif not isinstance(payload.get("input"), (str, list)) or payload.get("input") in ("", []):
        raise BadRequest("'input' must be a non-empty string or array.", param="input")


def _caller_cap(payload: dict[str, Any], kind: Kind) -> tuple[str, int | None]:
    """Which output-cap field the caller used, and its value (validated)."""
    if kind is Kind.EMBEDDINGS:
        return "", None
    fields = ("max_completion_tokens", "max_tokens") if kind is Kind.CHAT else ("max_tokens",)
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


def _choices(payload: dict[str, Any], kind: Kind) -> int:
    """How many completions one request may produce: n (or best_of) per prompt."""
    if kind is Kind.EMBEDDINGS:
        return 1
    per_prompt = 1
    for field in ("n", "best_of"):
        raw = payload.get(field)
        if raw is None:
            continue
        if isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= MAX_CHOICES:
            raise BadRequest(f"'{field}' must be an integer from 1 to {MAX_CHOICES}.", param=field)
        per_prompt = max(per_prompt, raw)
    prompts = 1
    prompt = payload.get("prompt")
    if (
        kind is Kind.COMPLETIONS
        and isinstance(prompt, list)
        and prompt
        and all(isinstance(p, (str, list)) for p in prompt)
    ):
        prompts = len(prompt)
    return per_prompt * prompts
