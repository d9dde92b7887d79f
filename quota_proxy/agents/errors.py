"""Our errors in Anthropic's shape on the Messages endpoints.

Every gateway error is rendered once, in the OpenAI shape (``asgi.send_error``). On
``/v1/messages`` this middleware rewrites such a body to what Anthropic's SDKs and Claude
Code read — ``{"type": "error", "error": {"type", "message"}}`` — keeping our ``code`` and
extra fields (a 402's required/available quota tokens). Bodies already in Anthropic's
shape (an upstream's own error, passed through) are left as they are.
"""

from __future__ import annotations

from typing import Any

import orjson

from quota_proxy.asgi import ASGIApp, Message, Receive, Scope, Send

# Anthropic's error types by status; its SDKs pick exception classes by status.
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
}


def is_anthropic_path(path: str) -> bool:
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def anthropic_error(status: int, body: bytes) -> bytes | None:
    """Our OpenAI-shaped error body in Anthropic's shape, or None if it is not ours."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    error = obj.get("error") if isinstance(obj, dict) else None
    if not isinstance(error, dict) or "type" in obj or "code" not in error:
        return None
    kind = ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    shaped: dict[str, Any] = {**error, "type": kind}
    return orjson.dumps({"type": "error", "error": shaped})


class AnthropicErrorShape:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_anthropic_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def reshape(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                if message["status"] >= 400 and _is_json(message):
                    start = message  # held until the whole (small) error body is here
                    return
                await send(message)
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = b"".join(chunks)
            shaped = anthropic_error(start["status"], body)
            if shaped is not None:
                body = shaped
                start["headers"] = [
                    (k, str(len(body)).encode() if k.lower() == b"content-length" else v)
                    for k, v in start.get("headers", ())
                ]
            await send(start)
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, reshape)


def _is_json(message: Message) -> bool:
    for key, value in message.get("headers", ()):
        if key.lower() == b"content-type":
            return bytes(value).startswith(b"application/json")
    return False
