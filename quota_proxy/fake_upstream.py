"""The fake OpenAI-compatible upstream: an ASGI app and a way to serve it in-process.

Replies and usage are deterministic, so tests can assert exact charges. A request can
steer the fake through a ``"fake"`` object in its JSON body (the openai SDK's
``extra_body={"fake": {...}}``): be slow, omit usage, or fail the way real upstreams fail.

It lives below `quota_proxy.testing` (the public test kit, which re-exports it and adds
a command line) so that `quota-proxy demo` can serve it without importing test code.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields, replace
from typing import Any

import anyio
import orjson

from quota_proxy import fake_dialects
from quota_proxy.asgi import Receive, Scope, Send, send_bytes, until_disconnect
from quota_proxy.runner import RunningServer, run_server

Events = Iterator[tuple[bool, bytes]]
Endpoint = Callable[[dict[str, Any], "_Plan"], "bytes | Events"]

WORDS = ("hello", "world", "this", "is", "a", "fake", "reply", "from", "the", "test")
MODELS = ("fake-chat", "fake-embedding")
HUGE_WORDS = 1_200_000
HTML_PAGE = b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>\n"
FAIL_MODES = frozenset(
    {
        "malformed", "empty", "reset_mid_stream", "stall_after_headers", "malformed_sse", "no_usage", "huge",
        "html",  # a 200 HTML page, as a misconfigured reverse proxy in between sends
    }
)
_DONE = b"data: [DONE]\n\n"
_JSON = (b"content-type", b"application/json")
_SSE = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: (
        "invalid_request_error",
        "context_length_exceeded",
        "This model's maximum context length is 8192 tokens. Please reduce the length of the messages.",
    ),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Request not allowed."),
    404: (
        "invalid_request_error",
        "model_not_found",
        "The model does not exist or you do not have access to it.",
    ),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests. Please try again in 1s."),
}


@dataclass
class FakeUpstreamOptions:
    """Server-wide defaults; a request's ``fake`` object overrides any of them but api_key."""

    chunk_delay_s: float = 0.0
    first_byte_delay_s: float = 0.0
    reply_words: int = 8
    include_usage: bool = True
    api_key: str | None = None
    # Usage knobs every dialect reports in its own style (see quota_proxy.fake_dialects):
    # cache reads and writes on top of the counted prompt, reasoning inside the output.
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0  # short-lived (Anthropic 5m, OpenAI 30m)
    cache_write_1h_tokens: int = 0  # long-lived (Anthropic 1h, OpenAI 12h)
    reasoning_tokens: int = 0
    tool_calls: bool = False  # call the request's first tool instead of answering in text


@dataclass
class RecordedRequest:
    """One /v1 request as it arrived; ``body`` is the parsed JSON, or None if it was not JSON."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    query: str = ""


@dataclass
class _Plan:
    """How to answer one request: the defaults merged with its ``fake`` object."""

    options: FakeUpstreamOptions
    fail: str | None = None
    prompt_tokens: int | None = None


def _plan(defaults: FakeUpstreamOptions, body: dict[str, Any]) -> _Plan:
    fake = body.get("fake")
    if not isinstance(fake, dict):
        return _Plan(defaults)
    names = {f.name for f in fields(FakeUpstreamOptions)} - {"api_key"}
    options = replace(defaults, **{k: v for k, v in fake.items() if k in names})
    fail = fake.get("fail")
    if fail == "no_usage":
        options.include_usage = False
    if fail == "huge":
        options.reply_words = HUGE_WORDS
    if fail is not None and fail not in FAIL_MODES and not _status_of(fail):
        raise ValueError(f"fake.fail: unknown mode {fail!r}")
    return _Plan(options, fail, fake.get("prompt_tokens"))


def _status_of(fail: object) -> int | None:
    if isinstance(fail, str) and fail.startswith("status:") and fail[7:].isdigit():
        status = int(fail[7:])
        return status if 400 <= status <= 599 else None
    return None


def _error(status: int, message: str | None = None, code: str | None = None) -> bytes:
    default: tuple[str, str | None, str] = (
        ("server_error", None, "The server had an error while processing your request. Sorry about that!")
        if status >= 500
        else ("invalid_request_error", None, f"Fake failure with status {status}.")
    )
    kind, default_code, default_message = _ERRORS.get(status, default)
    error = {"message": message or default_message, "type": kind, "param": None, "code": code or default_code}
    return orjson.dumps({"error": error})


def _error_for(path: str, status: int, message: str | None = None, code: str | None = None) -> bytes:
    """An error in the dialect of the endpoint: Anthropic's shape under /v1/messages."""
    if path.startswith("/v1/messages"):
        return fake_dialects.anthropic_error(status, message or f"Fake failure with status {status}.")
    return _error(status, message, code)


def _words(text: object) -> int:
    return len(text.split()) if isinstance(text, str) else 0


def _chat_prompt_tokens(messages: object) -> int:
    total = 0
    for message in messages if isinstance(messages, list) else []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            total += sum(
                _words(p.get("text")) for p in content if isinstance(p, dict) and p.get("type") == "text"
            )
        else:
            total += _words(content)
        total += 3
    return total


def _input_tokens(value: object) -> int:
    """Words in a prompt or embedding input; token arrays count their length."""
    if isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            return len(value)
        return sum(_input_tokens(v) for v in value)
    return _words(value)


def _output(
    body: dict[str, Any], plan: _Plan, cap_fields: tuple[str, ...] = ("max_tokens", "max_completion_tokens")
) -> tuple[list[str], str]:
    """The reply words and finish_reason; ``huge`` ignores the cap so it stays huge."""
    count = max(0, int(plan.options.reply_words))
    caps = [body.get(k) for k in cap_fields]
    cap = min((c for c in caps if isinstance(c, int) and not isinstance(c, bool)), default=None)
    finish = "stop"
    if plan.fail != "huge" and cap is not None and cap < count:
        count, finish = max(cap, 0), "length"
    return [WORDS[i % len(WORDS)] for i in range(count)], finish


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _counts(plan: _Plan, prompt: int, words: int) -> fake_dialects.Counts:
    o = plan.options
    uncached = plan.prompt_tokens if isinstance(plan.prompt_tokens, int) else prompt
    return fake_dialects.Counts(
        uncached, o.cache_read_tokens, o.cache_write_tokens, o.cache_write_1h_tokens, words, o.reasoning_tokens
    )


def _event(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _generate(kind: str, body: dict[str, Any], plan: _Plan, prompt: int) -> bytes | Events:
    """Answer a chat or legacy completion, as one JSON body or as SSE events."""
    words, finish = _output(body, plan)
    usage: dict[str, Any] = fake_dialects.chat_usage(_counts(plan, prompt, len(words)))
    chat = kind == "chat"
    tool = fake_dialects.first_tool(body) if chat and plan.options.tool_calls else None
    base: dict[str, Any] = {
        "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": body.get("model"),
        "system_fingerprint": "fp_fake",
    }
    if body.get("stream") is True or plan.fail == "malformed_sse":
        options = body.get("stream_options")
        wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        return _stream_events(
            base, words, finish, usage if wants_usage and plan.options.include_usage else None, tool
        )
    text = " ".join(words)
    part: dict[str, Any] = (
        {"message": {"role": "assistant", "content": text, "refusal": None}} if chat else {"text": text}
    )
    if tool:
        call = {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                "function": {"name": tool, "arguments": fake_dialects.tool_arguments(words)}}
        part = {"message": {"role": "assistant", "content": None, "refusal": None, "tool_calls": [call]}}
        finish = "tool_calls"
    choice = {"index": 0, **part, "logprobs": None, "finish_reason": finish}
    reply: dict[str, Any] = {**base, "choices": [choice]}
    if plan.options.include_usage:
        reply["usage"] = usage
    return orjson.dumps(reply)


def _stream_events(
    base: dict[str, Any], words: list[str], finish: str, usage: dict[str, Any] | None, tool: str | None = None
) -> Events:
    """Yield (is_word, event) pairs in OpenAI's order; a usage chunk only when asked and supported."""
    chat = base["object"] == "chat.completion"
    base = {**base, "object": "chat.completion.chunk" if chat else "text_completion"}
    extra = {} if usage is None else {"usage": None}

    def chunk(part: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, **part, "logprobs": None, "finish_reason": finish_reason}
        return _event({**base, "choices": [choice], **extra})

    if chat:
        yield False, chunk({"delta": {"role": "assistant", "content": ""}})
    if tool:
        call_id = "call_" + uuid.uuid4().hex[:24]
        for n, piece in enumerate(fake_dialects.split_pieces(fake_dialects.tool_arguments(words))):
            call: dict[str, Any] = {"index": 0, "function": {"arguments": piece}}
            if n == 0:
                call = {"index": 0, "id": call_id, "type": "function", "function": {"name": tool, "arguments": piece}}
            yield True, chunk({"delta": {"tool_calls": [call]}})
        words, finish = [], "tool_calls"
    last = len(words) - 1
    for i, word in enumerate(words):
        text = word if i == last else word + " "
        yield True, chunk({"delta": {"content": text}} if chat else {"text": text})
    yield False, chunk({"delta": {}} if chat else {"text": ""}, finish)
    if usage is not None:
        yield False, _event({**base, "choices": [], "usage": usage})
    yield False, _DONE


def _embedding(text: object) -> list[float]:
    """Eight floats from a hash, each exact in float32 so base64 and float forms agree."""
    digest = hashlib.sha256(orjson.dumps(text)).digest()
    return [(b - 128) / 128 for b in digest[:8]]


class FakeUpstream:
    """The ASGI app: records every /v1 request and answers it like OpenAI would.

    ``stats`` counts requests and streams started, completed, and cancelled (the client
    left before the end); a ``reset_mid_stream`` stream is started but neither of the others.
    """

    def __init__(self, options: FakeUpstreamOptions | None = None) -> None:
        self.options = options or FakeUpstreamOptions()
        self.requests: list[RecordedRequest] = []
        self.stats: dict[str, int] = {}
        self.reset()
        self._routes: dict[tuple[str, str], Endpoint] = {
            ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/v1/completions"): self._completions,
            ("POST", "/v1/embeddings"): self._embeddings,
            ("GET", "/v1/models"): self._models,
            ("POST", "/v1/messages"): self._messages,
            ("POST", "/v1/messages/count_tokens"): self._count_tokens,
            ("POST", "/v1/responses"): self._responses,
        }

    def reset(self) -> None:
        self.requests.clear()
        self.stats.update(
            dict.fromkeys(("requests", "streams_started", "streams_completed", "streams_cancelled"), 0)
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        raw = await _read_body(receive)
        if path.startswith("/_fake/"):
            await self._control(method, path, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None
        query = scope.get("query_string", b"").decode("latin-1")
        self.requests.append(RecordedRequest(method, path, headers, body, query))
        self.stats["requests"] += 1
        if (
            self.options.api_key is not None
            and headers.get("authorization") != f"Bearer {self.options.api_key}"
            and headers.get("x-api-key") != self.options.api_key
        ):
            await send_bytes(send, 401, _error_for(path, 401))
            return
        endpoint = self._routes.get((method, path))
        if endpoint is None:
            known = any(p == path for _, p in self._routes)
            status = 405 if known else 404
            await send_bytes(send, status, _error_for(path, status, f"Invalid URL ({method} {path})", "unknown_url"))
            return
        if method == "POST" and not isinstance(body, dict):
            message = "We could not parse the JSON body of your request."
            await send_bytes(send, 400, _error_for(path, 400, message, "invalid_json"))
            return
        try:
            plan = _plan(self.options, body or {})
        except (TypeError, ValueError) as exc:
            await send_bytes(send, 400, _error_for(path, 400, str(exc), "invalid_fake"))
            return
        await until_disconnect(
            receive, send, lambda tracked: self._respond(endpoint, body or {}, plan, tracked, path)
        )

    async def _respond(
        self, endpoint: Endpoint, body: dict[str, Any], plan: _Plan, send: Send, path: str = ""
    ) -> None:
        await anyio.sleep(plan.options.first_byte_delay_s)
        status = _status_of(plan.fail)
        if status is not None:
            extra = [(b"retry-after", b"1")] if status == 429 else None
            await send_bytes(send, status, _error_for(path, status), extra)
            return
        if plan.fail == "html":
            await send_bytes(send, 200, HTML_PAGE, content_type=b"text/html; charset=utf-8")
            return
        result = endpoint(body, plan)
        if isinstance(result, bytes):
            await _deliver(send, result, plan.fail)
        else:
            await self._stream(send, result, plan)

    async def _stream(self, send: Send, events: Events, plan: _Plan) -> None:
        """Send each event as its own body message, so clients can observe the timing."""
        if plan.fail == "malformed_sse":
            events = itertools.chain(
                itertools.islice(events, 2), [(False, b"data: {not json\n\n"), (False, _DONE)]
            )
        elif plan.fail == "reset_mid_stream":
            events = itertools.islice(events, 2)
        await send({"type": "http.response.start", "status": 200, "headers": _SSE})
        self.stats["streams_started"] += 1
        try:
            data = b""
            for n, (is_word, data) in enumerate(events):
                if is_word:
                    await anyio.sleep(plan.options.chunk_delay_s)
                await send({"type": "http.response.body", "body": data, "more_body": data is not _DONE})
                if plan.fail == "stall_after_headers" and n == 0:
                    await anyio.sleep_forever()
            if data is not _DONE and plan.fail != "reset_mid_stream":
                # Anthropic and Responses streams end without [DONE]: close them here.
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except anyio.get_cancelled_exc_class():
            self.stats["streams_cancelled"] += 1
            raise
        if plan.fail != "reset_mid_stream":
            self.stats["streams_completed"] += 1

    def _chat(self, body: dict[str, Any], plan: _Plan) -> bytes | Events:
        return _generate("chat", body, plan, _chat_prompt_tokens(body.get("messages")))

    def _completions(self, body: dict[str, Any], plan: _Plan) -> bytes | Events:
        return _generate("text", body, plan, _input_tokens(body.get("prompt")))

    def _embeddings(self, body: dict[str, Any], plan: _Plan) -> bytes | Events:
        raw = body.get("input")
        single = isinstance(raw, str) or (
            isinstance(raw, list) and bool(raw) and all(isinstance(v, int) for v in raw)
        )
        inputs = [raw] if single else raw if isinstance(raw, list) else []
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for i, text in enumerate(inputs):
            vector = _embedding(text)
            encoded = base64.b64encode(struct.pack("<8f", *vector)).decode() if as_base64 else vector
            data.append({"object": "embedding", "index": i, "embedding": encoded})
        prompt = plan.prompt_tokens if isinstance(plan.prompt_tokens, int) else _input_tokens(raw)
        usage = {"prompt_tokens": prompt, "total_tokens": prompt}
        return orjson.dumps({"object": "list", "data": data, "model": body.get("model"), "usage": usage})

    def _messages(self, body: dict[str, Any], plan: _Plan) -> bytes | Events:
        words, finish = _output(body, plan, ("max_tokens",))
        tool = fake_dialects.first_tool(body) if plan.options.tool_calls else None
        counts = _counts(plan, fake_dialects.anthropic_prompt(body), len(words))
        return fake_dialects.anthropic_reply(body, words, finish, counts, tool)

    def _count_tokens(self, body: dict[str, Any], plan: _Plan) -> bytes | Events:
        counted = _counts(plan, fake_dialects.anthropic_prompt(body), 0).uncached
        return orjson.dumps({"input_tokens": counted})

    def _responses(self, body: dict[str, Any], plan: _Plan) -> bytes | Events:
        words, finish = _output(body, plan, ("max_output_tokens",))
        tool = fake_dialects.first_tool(body) if plan.options.tool_calls else None
        counts = _counts(plan, fake_dialects.responses_prompt(body), len(words))
        return fake_dialects.responses_reply(body, words, finish, counts, tool)

    def _models(self, body: dict[str, Any], plan: _Plan) -> bytes | Events:
        data = [
            {"id": m, "object": "model", "created": 1700000000, "owned_by": "quota-proxy-testing"}
            for m in MODELS
        ]
        return orjson.dumps({"object": "list", "data": data})

    async def _control(self, method: str, path: str, send: Send) -> None:
        if (method, path) == ("GET", "/_fake/requests"):
            await send_bytes(send, 200, orjson.dumps(self.requests))
        elif (method, path) == ("GET", "/_fake/stats"):
            await send_bytes(send, 200, orjson.dumps(self.stats))
        elif (method, path) == ("POST", "/_fake/reset"):
            self.reset()
            await send_bytes(send, 200, b'{"ok":true}')
        else:
            await send_bytes(send, 404, _error(404, f"Invalid URL ({method} {path})", "unknown_url"))


async def _deliver(send: Send, payload: bytes, fail: str | None) -> None:
    if fail == "empty":
        payload = b""
    elif fail == "malformed":
        payload = b'{"id": "chatcmpl-broken", "choices": [{"index": 0, "mess'
    if fail not in ("reset_mid_stream", "stall_after_headers"):
        await send_bytes(send, 200, payload)
        return
    await send({"type": "http.response.start", "status": 200, "headers": [_JSON]})
    if fail == "stall_after_headers":
        await anyio.sleep_forever()
    # Returning with the body unfinished makes the server drop the connection mid-body.
    await send({"type": "http.response.body", "body": payload[: len(payload) // 2], "more_body": True})


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def create_fake_upstream(options: FakeUpstreamOptions | None = None) -> FakeUpstream:
    return FakeUpstream(options)


@dataclass
class RunningUpstream(RunningServer):
    """A served fake: ``url`` is the root (the ``/_fake/...`` control endpoints), ``base_url`` the API."""

    app: FakeUpstream

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"



@asynccontextmanager
async def run_fake_upstream(
    options: FakeUpstreamOptions | None = None, *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[RunningUpstream]:
    """Serve a fake upstream in the running event loop, on a free port by default."""
    app = create_fake_upstream(options)
    async with run_server(app, host=host, port=port) as server:
        yield RunningUpstream(server.host, server.port, app)
