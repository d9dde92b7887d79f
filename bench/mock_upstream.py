"""A fast OpenAI-compatible mock upstream for benchmarks: raw asyncio protocol on uvloop.

    python bench/mock_upstream.py --port 9100 [--chunk-delay-ms 0]

No framework: an asyncio.Protocol parses HTTP/1.1 (keep-alive, Content-Length bodies,
pipelined requests answered in order) and answers

  POST /v1/chat/completions   non-streaming JSON, or SSE when "stream": true — 20 content
                              chunks, a finish chunk, the usage chunk when
                              stream_options.include_usage is true, then `data: [DONE]`;
                              usage is deterministic (prompt 42, completion 20 tokens)
  POST /v1/messages           Anthropic Messages: a message with usage {input_tokens 42,
                              output_tokens 20}, or when "stream": true the SSE sequence
                              message_start (usage), content_block_start, 20
                              content_block_delta text deltas, content_block_stop,
                              message_delta (stop_reason, usage.output_tokens), message_stop
  POST /v1/responses          OpenAI Responses: a response object with usage {input_tokens,
                              output_tokens, total_tokens}, or streamed: response.created,
                              response.in_progress, output_item.added, content_part.added,
                              20 response.output_text.delta, output_text.done,
                              content_part.done, output_item.done, response.completed (usage)
  GET  /v1/models             one model
  GET  /stats                 counters: {"chat": n, "messages": n, "responses": n,
                              "calls": n (all three), "stream": n (streamed replies of any
                              of them), "open_streams": n, ...}

Every reply's text is the same 20 words, ending with "never lost.".

The delay between stream chunks comes from --chunk-delay-ms, or per request from a
`"mock_chunk_delay_ms"` field in the JSON body (gateways pass unknown fields through).
It is the physical limit the gateway is measured against, so it does as little as it can:
replies are pre-rendered templates with the model name and an id spliced in (for Messages
and Responses: rendered once per model name, with a fixed-width id replaced per request).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from typing import Any

import orjson

PROMPT_TOKENS = 42
COMPLETION_TOKENS = 20
CHUNKS = 20
WORDS = ("Quota", " tokens", " flow", " through", " the", " gateway", " like", " water",
         " through", " a", " narrow", " pipe", ",", " measured", " drop", " by", " drop",
         " and", " never", " lost.")

STATS: dict[str, int] = {
    "chat": 0, "messages": 0, "responses": 0, "calls": 0, "stream": 0, "delayed_streams": 0, "open_streams": 0, "other": 0, "connections": 0, "bad_requests": 0,
}
DEFAULT_DELAY_S = 0.0


def _usage() -> dict[str, int]:
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": COMPLETION_TOKENS,
        "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
    }


def _completion(model: str, rid: str) -> bytes:
    return orjson.dumps(
        {
            "id": rid,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(WORDS)},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": _usage(),
            "system_fingerprint": "fp_mock",
        }
    )


def _event(obj: dict[str, Any]) -> bytes:
    data = b"data: " + orjson.dumps(obj) + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


def _stream_frames(model: str, rid: str, include_usage: bool) -> list[bytes]:
    """Every chunked-encoding frame of one stream, in order (one per SSE event)."""
    created = int(time.time())
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": "fp_mock"}
    frames = []
    for i in range(CHUNKS):
        delta: dict[str, str] = {"content": WORDS[i % len(WORDS)]}
        if i == 0:
            delta = {"role": "assistant", **delta}
        frames.append(_event({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}))
    frames.append(_event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    if include_usage:
        frames.append(_event({**base, "choices": [], "usage": _usage()}))
    done = b"data: [DONE]\n\n"
    frames.append(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
    return frames


# ---- Anthropic Messages and OpenAI Responses: templates rendered once per model -----------
#
# Ids are fixed-width, so a template's chunk sizes stay right when the placeholder id is
# replaced by the request's own (bytes.replace, the only per-request work besides the parse).

ID_WIDTH = 12
_MSG_PH = b"msg_mock" + b"X" * ID_WIDTH
_RESP_PH = b"resp_mock" + b"X" * ID_WIDTH
_ITEM_PH = b"item_mock" + b"X" * ID_WIDTH
TEXT = "".join(WORDS)
_TEMPLATE_CACHE: dict[tuple[str, str], tuple[bytes, list[bytes]]] = {}
_MAX_CACHED_MODELS = 64


def _named_event(name: str, obj: dict[str, Any]) -> bytes:
    data = b"event: " + name.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


def _last_frame(frame: bytes) -> bytes:
    return frame + b"0\r\n\r\n"


def _messages_templates(model: str) -> tuple[bytes, list[bytes]]:
    """(JSON reply, stream frames) of an Anthropic Messages answer, with _MSG_PH as its id."""
    mid = _MSG_PH.decode()
    message: dict[str, Any] = {"id": mid, "type": "message", "role": "assistant", "model": model,
                               "content": [], "stop_reason": None, "stop_sequence": None}
    reply = orjson.dumps({**message, "content": [{"type": "text", "text": TEXT}], "stop_reason": "end_turn",
                          "usage": {"input_tokens": PROMPT_TOKENS, "output_tokens": COMPLETION_TOKENS}})
    frames = [
        _named_event("message_start", {"type": "message_start", "message": {
            **message, "usage": {"input_tokens": PROMPT_TOKENS, "output_tokens": 1}}}),
        _named_event("content_block_start", {"type": "content_block_start", "index": 0,
                                             "content_block": {"type": "text", "text": ""}}),
    ]
    for i in range(CHUNKS):
        frames.append(_named_event("content_block_delta", {
            "type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": WORDS[i % len(WORDS)]}}))
    frames.append(_named_event("content_block_stop", {"type": "content_block_stop", "index": 0}))
    frames.append(_named_event("message_delta", {
        "type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": COMPLETION_TOKENS}}))
    frames.append(_last_frame(_named_event("message_stop", {"type": "message_stop"})))
    return reply, frames


def _responses_templates(model: str) -> tuple[bytes, list[bytes]]:
    """(JSON reply, stream frames) of an OpenAI Responses answer, ids _RESP_PH and _ITEM_PH."""
    rid, item_id = _RESP_PH.decode(), _ITEM_PH.decode()
    usage = {"input_tokens": PROMPT_TOKENS, "output_tokens": COMPLETION_TOKENS,
             "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS}
    part = {"type": "output_text", "text": TEXT, "annotations": []}
    item = {"type": "message", "id": item_id, "status": "completed", "role": "assistant", "content": [part]}

    def response(status: str, output: list[Any], use: Any) -> dict[str, Any]:
        return {"id": rid, "object": "response", "created_at": int(time.time()), "status": status,
                "error": None, "incomplete_details": None, "model": model, "output": output,
                "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "usage": use}

    reply = orjson.dumps(response("completed", [item], usage))
    seq = iter(range(1_000_000))

    def event(kind: str, **fields: Any) -> bytes:
        return _named_event(kind, {"type": kind, "sequence_number": next(seq), **fields})

    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    opening = response("in_progress", [], None)
    frames = [
        event("response.created", response=opening),
        event("response.in_progress", response=opening),
        event("response.output_item.added", output_index=0,
              item={**item, "status": "in_progress", "content": []}),
        event("response.content_part.added", **where, part={**part, "text": ""}),
    ]
    for i in range(CHUNKS):
        frames.append(event("response.output_text.delta", **where, delta=WORDS[i % len(WORDS)], logprobs=[]))
    frames.append(event("response.output_text.done", **where, text=TEXT, logprobs=[]))
    frames.append(event("response.content_part.done", **where, part=part))
    frames.append(event("response.output_item.done", output_index=0, item=item))
    frames.append(_last_frame(event("response.completed", response=response("completed", [item], usage))))
    return reply, frames


def _templates(kind: str, model: str) -> tuple[bytes, list[bytes]]:
    found = _TEMPLATE_CACHE.get((kind, model))
    if found is None:
        if len(_TEMPLATE_CACHE) >= _MAX_CACHED_MODELS:
            _TEMPLATE_CACHE.clear()
        found = _messages_templates(model) if kind == "messages" else _responses_templates(model)
        _TEMPLATE_CACHE[(kind, model)] = found
    return found

_JSON_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
    b"x-request-id: %s\r\ncontent-length: %d\r\n\r\n"
)
_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\nx-request-id: %s\r\n\r\n"
)
_MODELS = orjson.dumps({"object": "list", "data": [
    {"id": "mock-model", "object": "model", "created": 0, "owned_by": "mock"}]})


def _simple(status: bytes, body: bytes) -> bytes:
    return (b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (status, len(body), body))


class MockProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.streaming = False  # a delayed stream is being written: later requests wait
        self.close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        STATS["connections"] += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.streaming:
            self._process()

    def _process(self) -> None:
        while self.transport is not None and not self.streaming:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].decode("latin-1")
            lines = head.split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) != 3:
                STATS["bad_requests"] += 1
                self.transport.write(_simple(b"400 Bad Request", b'{"error":"bad request line"}'))
                self.transport.close()
                return
            method, path = parts[0], parts[1]
            length = 0
            close = parts[2] == "HTTP/1.0"
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value.strip())
                elif name == "connection":
                    close = value.strip().lower() == "close"
                elif name == "transfer-encoding":
                    STATS["bad_requests"] += 1
                    self.transport.write(_simple(b"411 Length Required", b'{"error":"chunked bodies unsupported"}'))
                    self.transport.close()
                    return
            total = end + 4 + length
            if len(self.buf) < total:
                return
            body = self.buf[end + 4 : total]
            self.buf = self.buf[total:]
            self.close_after = close
            self._handle(method, path, body)
            if close and not self.streaming and self.transport is not None:
                self.transport.close()

    def _handle(self, method: str, path: str, body: bytes) -> None:
        assert self.transport is not None
        path = path.split("?", 1)[0]
        kind = None
        if method == "POST":
            if path.endswith("/chat/completions"):
                kind = "chat"
            elif path.endswith("/messages"):
                kind = "messages"
            elif path.endswith("/responses"):
                kind = "responses"
        if kind is not None:
            try:
                req = orjson.loads(body)
                model = str(req.get("model") or "mock-model")
            except (orjson.JSONDecodeError, AttributeError):
                STATS["bad_requests"] += 1
                self.transport.write(_simple(b"400 Bad Request", b'{"error":"invalid json"}'))
                return
            STATS[kind] += 1
            STATS["calls"] += 1
            if kind == "chat":
                self._chat(req, model)
            else:
                self._agent(kind, req, model)
            return
        STATS["other"] += 1
        if method == "GET" and path == "/stats":
            self.transport.write(_simple(b"200 OK", orjson.dumps(STATS)))
        elif method == "GET" and path.endswith("/models"):
            self.transport.write(_simple(b"200 OK", _MODELS))
        elif method == "GET" and path in ("/health", "/healthz"):
            self.transport.write(_simple(b"200 OK", b'{"ok":true}'))
        else:
            self.transport.write(_simple(b"404 Not Found", b'{"error":"not found"}'))

    def _chat(self, req: dict[str, Any], model: str) -> None:
        assert self.transport is not None
        rid = b"chatcmpl-mock%d" % STATS["chat"]
        if req.get("stream") is True:
            STATS["stream"] += 1
            options = req.get("stream_options") or {}
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
            frames = _stream_frames(model, rid.decode(), include_usage)
            self.transport.write(_SSE_HEAD % rid)
            self._write_frames(frames, self._delay(req), range(1, CHUNKS + 1))
            return
        payload = _completion(model, rid.decode())
        self.transport.write(_JSON_HEAD % (rid, len(payload)) + payload)

    def _agent(self, kind: str, req: dict[str, Any], model: str) -> None:
        """Anthropic Messages or OpenAI Responses, from the per-model templates."""
        assert self.transport is not None
        reply, frames = _templates(kind, model)
        n = STATS["calls"] % 10**ID_WIDTH
        if kind == "messages":
            rid = b"msg_mock%0*d" % (ID_WIDTH, n)
            swaps = [(_MSG_PH, rid)]
            # The content deltas are frames 2..21: delay between them and before the block stop.
            delayed = range(3, CHUNKS + 3)
        else:
            rid = b"resp_mock%0*d" % (ID_WIDTH, n)
            swaps = [(_RESP_PH, rid), (_ITEM_PH, b"item_mock%0*d" % (ID_WIDTH, n))]
            delayed = range(5, CHUNKS + 5)  # the text deltas are frames 4..23
        if req.get("stream") is True:
            STATS["stream"] += 1
            out = []
            for frame in frames:
                for old, new in swaps:
                    frame = frame.replace(old, new)
                out.append(frame)
            self.transport.write(_SSE_HEAD % rid)
            self._write_frames(out, self._delay(req), delayed)
            return
        for old, new in swaps:
            reply = reply.replace(old, new)
        self.transport.write(_JSON_HEAD % (rid, len(reply)) + reply)

    @staticmethod
    def _delay(req: dict[str, Any]) -> float:
        delay = req.get("mock_chunk_delay_ms")
        return DEFAULT_DELAY_S if delay is None else float(delay) / 1000.0

    def _write_frames(self, frames: list[bytes], delay_s: float, delayed: range) -> None:
        assert self.transport is not None
        if delay_s <= 0:
            for frame in frames:  # one write per event, as a token-by-token server does
                self.transport.write(frame)
            return
        STATS["delayed_streams"] += 1
        self.streaming = True
        asyncio.get_running_loop().create_task(self._slow_stream(frames, delay_s, delayed))

    async def _slow_stream(self, frames: list[bytes], delay_s: float, delayed: range) -> None:
        STATS["open_streams"] += 1
        try:
            # The first content chunk goes out at once; the delay is *between* chunks.
            for i, frame in enumerate(frames):
                if self.transport is None:
                    return
                if i in delayed:
                    await asyncio.sleep(delay_s)
                    if self.transport is None:
                        return
                self.transport.write(frame)
        finally:
            STATS["open_streams"] -= 1
            self.streaming = False
        if self.transport is not None:
            if self.close_after:
                self.transport.close()
            elif self.buf:
                self._process()


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(MockProtocol, host, port, backlog=4096, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    bound = server.sockets[0].getsockname()[1]
    print(f"mock upstream listening on http://{host}:{bound}/v1", flush=True)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    global DEFAULT_DELAY_S
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0,
                        help="default delay between stream chunks (a request's mock_chunk_delay_ms wins)")
    args = parser.parse_args(argv)
    DEFAULT_DELAY_S = args.chunk_delay_ms / 1000.0
    try:
        import uvloop
    except ImportError:  # still correct, only slower
        print("uvloop not installed: using the default asyncio loop", file=sys.stderr)
        asyncio.run(serve(args.host, args.port))
    else:
        uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
