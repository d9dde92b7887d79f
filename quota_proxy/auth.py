"""AuthMiddleware: who is calling, as pure ASGI.

Keys are looked up by SHA-256 digest and cached for `cache_ttl_s` (2 s by default), so a
key revoked from the CLI stops working on a running gateway within that time, while the
hot path touches the store only once per key per TTL.
"""

from __future__ import annotations

import time

from quota_proxy.asgi import ASGIApp, Receive, Scope, Send, send_error
from quota_proxy.errors import InvalidApiKey
from quota_proxy.keys import digest, key_kind
from quota_proxy.state import request_state
from quota_proxy.store import KeyRecord, Store


class KeyCache:
    def __init__(self, store: Store, ttl_s: float = 2.0, max_entries: int = 100_000) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, KeyRecord | None]] = {}

    async def lookup(self, key: str) -> KeyRecord | None:
        """The key's record if it exists and is usable now; None otherwise."""
        if key_kind(key) is None:
            return None
        now = time.monotonic()
        key_digest = digest(key)
        hit = self._entries.get(key_digest)
        if hit is not None and now - hit[0] < self.ttl_s:
            record = hit[1]
        else:
            record = await self.store.key_by_digest(key_digest)
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            self._entries[key_digest] = (now, record)
        if record is None or not record.usable_at(int(time.time() * 1000)):
            return None
        return record


def presented_key(scope: Scope) -> str | None:
    """The key from `Authorization: Bearer …` or `x-api-key: …`."""
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif name == b"x-api-key" and value.strip():
            return value.decode("latin-1").strip()
    return None


class AuthMiddleware:
    """Refuses unauthenticated requests with 401; hands the KeyRecord on in the RequestState."""

    def __init__(self, app: ASGIApp, keys: KeyCache, public_paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.keys = keys
        self.public_paths = public_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.public_paths:
            await self.app(scope, receive, send)
            return
        key = presented_key(scope)
        record = await self.keys.lookup(key) if key else None
        if record is None:
            message = "Missing API key." if key is None else "Invalid, revoked or expired API key."
            await send_error(send, InvalidApiKey(message))
            return
        state = request_state(scope)
        state.key = record
        log = state.log
        log["key_prefix"] = record.prefix
        log["account"] = record.account_name
        await self.app(scope, receive, send)
