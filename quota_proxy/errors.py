"""The error tree and its one OpenAI-shaped JSON rendering.

    QuotaError                      every error a client may see; carries status, code, type
    ├── BadRequest                  400 bad_request
    ├── StreamNotSupported          400 stream_not_supported
    ├── InvalidApiKey               401 invalid_api_key
    ├── InsufficientBalance         402 insufficient_balance (+ required/available quota tokens)
    ├── PermissionDenied            403 permission_denied
    ├── ModelNotFound               404 model_not_found
    ├── UserNotFound                404 user_not_found
    ├── NotFound                    404 not_found (unknown path)
    ├── MethodNotAllowed            405 method_not_allowed
    ├── IdempotencyConflict         409 idempotency_conflict
    ├── PayloadTooLarge             413 payload_too_large
    ├── RateLimited                 429 rate_limited
    ├── UpstreamError               502 upstream_error
    └── UpstreamTimeout             504 upstream_timeout

Foreign errors (the upstream client's, sqlite's) are translated to these at one boundary each.
On the Anthropic Messages endpoints the same errors render in Anthropic's shape
(``{"type": "error", "error": {"type", "message", "code", …}}``), so its SDKs and Claude
Code read them.
"""

from __future__ import annotations

from typing import Any, ClassVar

import orjson

from quota_proxy.asgi import Receive, Scope, Send, send_json


class QuotaError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    type: ClassVar[str] = "api_error"
    default_message: ClassVar[str] = "Internal error."

    def __init__(self, message: str | None = None, **extra: Any) -> None:
        self.message = message or self.default_message
        self.extra = extra
        self.headers: list[tuple[bytes, bytes]] = []
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message, "type": self.type}
        error.update(self.extra)
        return {"error": error}

    def json_bytes(self) -> bytes:
        return orjson.dumps(self.body())

    def anthropic_body(self) -> dict[str, Any]:
        kind = ANTHROPIC_TYPES.get(self.status, "api_error" if self.status >= 500 else "invalid_request_error")
        error: dict[str, Any] = {"type": kind, "message": self.message, "code": self.code}
        error.update(self.extra)
        return {"type": "error", "error": error}

    async def send(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = self.anthropic_body() if is_anthropic_path(scope.get("path", "")) else self.body()
        await send_json(send, self.status, body, self.headers)


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


class BadRequest(QuotaError):
    status, code, type = 400, "bad_request", "invalid_request_error"
    default_message = "Bad request."


class StreamNotSupported(QuotaError):
    status, code, type = 400, "stream_not_supported", "invalid_request_error"
    default_message = "This route does not support streaming; send the request without stream: true."


class InvalidApiKey(QuotaError):
    status, code, type = 401, "invalid_api_key", "authentication_error"
    default_message = "Missing or invalid API key."


class InsufficientBalance(QuotaError):
    status, code, type = 402, "insufficient_balance", "billing_error"
    default_message = "Your Quota balance is too low for this route."

    def __init__(self, required: int, available: int, message: str | None = None) -> None:
        super().__init__(
            message, required_quota_tokens=required, available_quota_tokens=max(available, 0)
        )


class PermissionDenied(QuotaError):
    status, code, type = 403, "permission_denied", "permission_error"
    default_message = "This key may not use this endpoint."


class ModelNotFound(QuotaError):
    status, code, type = 404, "model_not_found", "invalid_request_error"


class UserNotFound(QuotaError):
    status, code, type = 404, "user_not_found", "invalid_request_error"
    default_message = "No such user for this account."


class NotFound(QuotaError):
    status, code, type = 404, "not_found", "invalid_request_error"
    default_message = "No such endpoint."


class MethodNotAllowed(QuotaError):
    status, code, type = 405, "method_not_allowed", "invalid_request_error"
    default_message = "Method not allowed on this endpoint."


class IdempotencyConflict(QuotaError):
    status, code, type = 409, "idempotency_conflict", "invalid_request_error"
    default_message = "This Idempotency-Key was already used with a different request body."


class PayloadTooLarge(QuotaError):
    status, code, type = 413, "payload_too_large", "invalid_request_error"
    default_message = "Request body too large."


class RateLimited(QuotaError):
    status, code, type = 429, "rate_limited", "rate_limit_error"
    default_message = "Rate limit reached for this key."


class UpstreamError(QuotaError):
    status, code, type = 502, "upstream_error", "api_error"
    default_message = "The upstream model server failed."


class UpstreamTimeout(QuotaError):
    status, code, type = 504, "upstream_timeout", "api_error"
    default_message = "The upstream model server timed out."
