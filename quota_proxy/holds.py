"""HoldKeeper: keeps this process's holds alive and releases the holds of the dead.

A hold expires `hold_ttl_s` after it was last refreshed. While a process lives, its keeper
refreshes its own holds (so a long stream keeps its reservation); when a process dies, its
holds stop being refreshed and any keeper releases them once they expire. Whoever mounts
MeteringMiddleware owns a keeper and runs it for as long as the middleware serves.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator

import anyio

from quota_proxy.config import LiveSettings, Settings
from quota_proxy.store import Store

logger = logging.getLogger("quota_proxy.holds")

MAINTENANCE_INTERVAL_S = 5.0
IDEMPOTENCY_TTL_MS = 7 * 24 * 3600 * 1000


def new_owner() -> str:
    """A name for this process's holds: unique per process start."""
    return f"{os.getpid()}-{os.urandom(4).hex()}"


class HoldKeeper:
    def __init__(self, store: Store, settings: Settings | LiveSettings, owner: str | None = None) -> None:
        self.store = store
        self.live = settings if isinstance(settings, LiveSettings) else LiveSettings(settings)
        self.owner = owner or new_owner()

    @contextlib.asynccontextmanager
    async def running(self, interval_s: float = MAINTENANCE_INTERVAL_S) -> AsyncIterator[None]:
        """Release what expired while no one watched, then keep holds for as long as this is open."""
        await self.store.release_expired_holds()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._keep, interval_s)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()

    async def tick(self) -> None:
        """One round: refresh ours, release expired ones (a crashed process's), purge old records,
        and put the charges committed since the last round on disk."""
        await self.store.refresh_holds(self.owner, self.live.current.billing.hold_ttl_s * 1000)
        await self.store.release_expired_holds()
        await self.store.purge_idempotency(IDEMPOTENCY_TTL_MS)
        await self.store.purge_rate_windows()
        await self.store.sync()  # charges commit cheaply; this bounds what a power cut takes back

    async def _keep(self, interval_s: float) -> None:
        while True:
            await anyio.sleep(interval_s)
            try:
                await self.tick()
            except Exception as exc:  # a busy store must not kill the keeper; it retries
                logger.warning("hold maintenance failed: %s", exc)
