"""Wrong redemption codes, throttled per account: N misses in a window, then 429 until the
oldest miss leaves it. In memory, per process: codes carry 100 random bits, so guessing is
hopeless anyway; the throttle keeps a script from hammering the store trying."""

from __future__ import annotations

import time
from collections import deque


class FailureThrottle:
    def __init__(self, limit: int = 10, window_s: float = 600.0, max_keys: int = 100_000) -> None:
        self.limit = limit
        self.window_s = window_s
        self.max_keys = max_keys
        self._misses: dict[object, deque[float]] = {}

    def retry_after(self, key: object) -> float | None:
        """Seconds until `key` may try again, or None if it may now."""
        misses = self._misses.get(key)
        if not misses:
            return None
        now = time.monotonic()
        while misses and misses[0] <= now - self.window_s:
            misses.popleft()
        if len(misses) < self.limit:
            return None
        return misses[0] + self.window_s - now

    def miss(self, key: object) -> None:
        if len(self._misses) >= self.max_keys and key not in self._misses:
            self._misses.clear()
        self._misses.setdefault(key, deque()).append(time.monotonic())
