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
    ├── StoreUnavailableError       503 store_unavailable (the database is away: fail closed)
    └── UpstreamTimeout             504 upstream_timeout

Foreign errors (the upstream client's, sqlite's) are translated to these at one boundary each.
This module is a leaf (it imports nothing from the package): `asgi.send_error` sends one.
"""

from __future__ import annotations

from typing import Any, ClassVar

import orjson


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


class NotSupported(QuotaError):
    """The gateway cannot do this with its configuration (e.g. a custom store without orders)."""

    status, code, type = 501, "not_supported", "api_error"


class UpstreamError(QuotaError):
    status, code, type = 502, "upstream_error", "api_error"
    default_message = "The upstream model server failed."


class UpstreamTimeout(QuotaError):
    status, code, type = 504, "upstream_timeout", "api_error"
    default_message = "The upstream model server timed out."


class StoreUnavailableError(QuotaError):
    status, code, type = 503, "store_unavailable", "api_error"
    default_message = (
        "The balance store is unreachable; nothing was forwarded or charged. Retry shortly."
    )
