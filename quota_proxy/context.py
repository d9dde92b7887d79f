"""The outermost middleware: a request id on every response, one access-log line per
request, and a last-resort JSON 500 so that no stack trace ever reaches a client."""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from typing import Any

from quota_proxy.asgi import ASGIApp, ClientGone, Message, Receive, Scope, Send, send_error
from quota_proxy.errors import QuotaError, StoreUnavailableError
from quota_proxy.logs import log_access
from quota_proxy.state import STATE_KEY, RequestState, new_request_id
from quota_proxy.store import StoreUnavailable

error_log = logging.getLogger("quota_proxy.error")

REQUEST_ID_HEADER = b"x-quota-request-id"
OVERHEAD_HEADER = b"x-quota-overhead-ms"
CLIENT_CLOSED = 499

# Called once per request with the finished access-log record.
Observer = Callable[[dict[str, Any]], None]


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, observers: tuple[Observer, ...] = ()) -> None:
        self.app = app
        self.observers = observers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_request_id()
        started = time.perf_counter()
        state = RequestState(request_id, started)
        scope[STATE_KEY] = state
        log = state.log
        path = scope["path"]
        status = 0
        id_header = (REQUEST_ID_HEADER, request_id.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                # The gateway's own share so far: all of it, less the upstream's time.
                overhead_ms = (time.perf_counter() - started - state.upstream_s) * 1000
                log["overhead_ms"] = round(overhead_ms, 3)
                message["headers"] = [
                    *message.get("headers", ()),
                    id_header,
                    (OVERHEAD_HEADER, f"{overhead_ms:.3f}".encode()),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
            # Nothing sent and nothing raised: the client left before its answer (nginx's 499).
            status = status or CLIENT_CLOSED
        except ClientGone:
            status = status or CLIENT_CLOSED
        except StoreUnavailable as exc:
            # Fail closed: without the store nothing is authorised, held or forwarded.
            error_log.warning("store unavailable in request %s: %s", request_id, exc)
            if status == 0:
                await send_error(send_with_id, StoreUnavailableError())
            status = status or 503
        except Exception as exc:
            error_log.error(
                "unhandled %s in request %s\n%s", type(exc).__name__, request_id, where_it_failed(exc)
            )
            if status == 0:
                await send_error(send_with_id, QuotaError())
            status = status or 500
        finally:
            log["request_id"] = request_id
            log["method"] = scope["method"]
            log["path"] = path
            log["status"] = status
            log["latency_ms"] = round((time.perf_counter() - started) * 1000, 3)
            for observe in self.observers:
                observe(log)
            log_access(log)


def where_it_failed(exc: BaseException) -> str:
    """The traceback's frames (file, line, function, source line) without the exception's
    message or any local value: a message or a value could quote a prompt or a key."""
    frames = traceback.extract_tb(exc.__traceback__)
    lines = [f'  File "{f.filename}", line {f.lineno}, in {f.name}\n    {f.line or ""}' for f in frames]
    return "Traceback (most recent call last):\n" + "\n".join(lines) + f"\n{type(exc).__qualname__}"
