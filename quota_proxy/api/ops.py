"""Operations endpoints: liveness, readiness, metrics, the OpenAPI document. Public: no key needed."""

from __future__ import annotations

import hmac

import orjson

from quota_proxy.api.common import Services
from quota_proxy.api.openapi import OPENAPI
from quota_proxy.asgi import Receive, Scope, Send, send_bytes, send_json
from quota_proxy.auth import presented_key
from quota_proxy.errors import InvalidApiKey, QuotaError, StoreUnavailableError
from quota_proxy.metrics import CONTENT_TYPE
from quota_proxy.store import StoreUnavailable

_OPENAPI_BYTES = orjson.dumps(OPENAPI)


class NotReady(QuotaError):
    status, code, type = 503, "not_ready", "api_error"
    default_message = "The store is not usable."


class OpsApi:
    def __init__(self, services: Services) -> None:
        self.s = services

    async def openapi(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_bytes(send, 200, _OPENAPI_BYTES)

    async def healthz(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_json(send, 200, {"status": "ok"})

    async def readyz(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.s.store.ping()
        except StoreUnavailable as exc:
            raise StoreUnavailableError("The store is unreachable.") from exc
        except Exception as exc:  # any store failure means "not ready", never a 500
            raise NotReady(f"The store is not usable: {type(exc).__name__}.") from None
        await send_json(send, 200, {"status": "ready", "routes": len(self.s.routes.routes)})

    async def metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = self.s.settings.server
        if server.metrics_token_env is not None:
            # Fail closed: a token named in the config but missing from the environment
            # matches nothing.
            token = (server.metrics_token or "").encode()
            presented = (presented_key(scope) or "").encode()
            if not token or not hmac.compare_digest(presented, token):
                raise InvalidApiKey("This endpoint needs the metrics bearer token.")
        holds = await self.s.store.open_holds()
        await send_bytes(
            send, 200, self.s.metrics.render(open_holds=holds),
            content_type=CONTENT_TYPE,
        )
