"""Low-balance alerts: found after the fact, delivered signed, retried, never twice per crossing.

A background loop (one per gateway process, started by the app's lifespan) does two things
every `[alerts] poll_interval_s`:

1. scan: queues one delivery per threshold crossed downward (UNIQUE per crossing, so a
   re-scan queues nothing new). On SQLite it reads the ledger rows written since its
   persisted cursor, and the request path does no work for alerts; on PostgreSQL (ids commit
   out of order) a ledger trigger records crossings as they commit and the scan takes them
   (store/alerts_postgres.py). An alert follows its crossing by at most one poll interval.
2. deliver: claims due deliveries with a conditional UPDATE (so processes never race for
   one), POSTs the JSON with `Quota-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of
   "t.body" under the account's signing secret>`, and on failure retries after
   retry_base_s × 2^(attempt-1), capped at 6 hours, up to max_attempts.

Deliveries and the cursor are in the store: a restart neither loses a queued alert nor
resends a delivered one. A crash between the receiver's 2xx and our record of it resends
that one alert; receivers de-duplicate by its `id`.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import anyio
import orjson

from quota_proxy.money import Money
from quota_proxy.payments.settings import AlertConfig
from quota_proxy.store.alerts import AlertStore, Crossing, DueDelivery
from quota_proxy.store.records import now_ms

if TYPE_CHECKING:
    import httpx

logger = logging.getLogger("quota_proxy.alerts")

SIGNATURE_HEADER = "Quota-Signature"
EVENT_TYPE = "balance.low"
MAX_BACKOFF_S = 6 * 3600
LEASE_MARGIN_S = 5.0


def sign(secret: str, timestamp: int, payload: bytes) -> str:
    """The signature header's value for this body at this time (Stripe's scheme)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + payload, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(secret: str, header: str, payload: bytes, tolerance_s: int = 300) -> bool:
    """What a receiver does: recompute and compare in constant time, refuse old timestamps."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - timestamp) > tolerance_s:
        return False
    expected = sign(secret, timestamp, payload).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


def backoff_s(attempt: int, base_s: float) -> float:
    return float(min(base_s * 2 ** (attempt - 1), MAX_BACKOFF_S))


def payload_builder(money: Money) -> Callable[[str, Crossing], bytes]:
    def build(alert_id: str, c: Crossing) -> bytes:
        is_user = c.account_kind == "user"
        return orjson.dumps(
            {
                "id": alert_id,
                "object": "event",
                "type": EVENT_TYPE,
                "created": c.created_at // 1000,
                "data": {
                    "account": c.developer_name,
                    "external_user_id": c.account_name if is_user else None,
                    "threshold": money.usd(c.threshold),
                    "threshold_quota_tokens": c.threshold,
                    "balance_before": money.usd(c.balance_before),
                    "balance_before_quota_tokens": c.balance_before,
                    "balance": money.usd(c.balance_after),
                    "balance_quota_tokens": c.balance_after,
                    "ledger_id": c.ledger_id,
                },
            }
        )

    return build


class AlertDispatcher:
    def __init__(self, store: AlertStore, config: AlertConfig, money: Money) -> None:
        self.store = store
        self.config = config
        self.build = payload_builder(money)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Run the loop for as long as this is open (the app's lifespan)."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.run)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()

    async def run(self) -> None:
        """The loop. A failing store is logged and retried at the next tick. The HTTP client
        (httpx, ~18 MB) is made at the first delivery: most gateways never send one."""
        client: httpx.AsyncClient | None = None
        try:
            while True:
                try:
                    client = await self.tick(client)
                except Exception as exc:  # the store busy or closing: try again next tick
                    logger.warning("alert loop: %s: %s", type(exc).__name__, exc)
                await anyio.sleep(self.config.poll_interval_s)
        finally:
            if client is not None:
                with anyio.CancelScope(shield=True):
                    await client.aclose()

    async def tick(self, client: httpx.AsyncClient | None) -> httpx.AsyncClient | None:
        await self.store.scan(self.build)
        # A claimed delivery is leased for longer than one attempt may take (fail_after below),
        # so no other process sends it meanwhile; a process killed mid-attempt delays its
        # retry by at most this lease.
        lease_ms = int((self.config.timeout_s + LEASE_MARGIN_S) * 1000)
        for delivery in await self.store.claim_due(lease_ms):
            if client is None:
                import httpx

                client = httpx.AsyncClient(timeout=self.config.timeout_s, follow_redirects=False)
            await self._deliver(client, delivery)
        return client

    async def _deliver(self, client: httpx.AsyncClient, d: DueDelivery) -> None:
        import httpx  # already loaded with the client

        if d.webhook_url is None or d.signing_secret is None:
            await self.store.failed(d.id, "the account has no alert webhook any more", None)
            return
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            SIGNATURE_HEADER: sign(d.signing_secret, timestamp, d.payload),
            "user-agent": "quota-proxy-alerts",
        }
        error: str | None = None
        try:
            with anyio.fail_after(self.config.timeout_s):
                response = await client.post(d.webhook_url, content=d.payload, headers=headers)
            if not 200 <= response.status_code < 300:
                error = f"HTTP {response.status_code}"
        except TimeoutError:
            error = f"no answer within {self.config.timeout_s:g} s"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        finally:
            client.cookies.clear()  # one receiver's cookies are not another's
        if error is None:
            await self.store.delivered(d.id)
            return
        retry_at = None
        if d.attempts < self.config.max_attempts:
            retry_at = now_ms() + int(backoff_s(d.attempts, self.config.retry_base_s) * 1000)
        logger.warning(
            "alert %s attempt %d failed (%s)%s", d.public_id, d.attempts, error,
            "" if retry_at else "; giving up",
        )
        await self.store.failed(d.id, error, retry_at)
