"""Prometheus text metrics, fed from each request's access-log record.

Kept in-process and dependency-free; per worker when `--workers` > 1.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

LATENCY_BUCKETS_MS = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)


class Metrics:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, str], int] = defaultdict(int)
        self.errors: dict[tuple[str, str], int] = defaultdict(int)
        self.tokens: dict[tuple[str, str], int] = defaultdict(int)
        self.charged: dict[str, int] = defaultdict(int)
        self.latency: dict[str, list[int]] = {}
        self.latency_sum: dict[str, float] = defaultdict(float)

    def observe(self, log: dict[str, Any]) -> None:
        route = log.get("route", "")
        status = str(log.get("status", 0))
        self.requests[(route, status)] += 1
        if log.get("status", 0) >= 400:
            self.errors[(route, status)] += 1
        if "input_tokens" in log:
            self.tokens[(route, "input")] += log["input_tokens"]
            self.tokens[(route, "output")] += log["output_tokens"]
            self.charged[route] += log["charged"]
        latency = log.get("latency_ms", 0.0)
        buckets = self.latency.get(route)
        if buckets is None:
            buckets = self.latency[route] = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        for i, bound in enumerate(LATENCY_BUCKETS_MS):
            if latency <= bound:
                buckets[i] += 1
                break
        else:
            buckets[-1] += 1
        self.latency_sum[route] += latency / 1000

    def render(self, open_holds: int | None = None) -> bytes:
        out: list[str] = []
        out += ["# HELP quota_requests_total Requests by route and status.",
                "# TYPE quota_requests_total counter"]
        for (route, status), n in sorted(self.requests.items()):
            out.append(f'quota_requests_total{{route="{_esc(route)}",status="{status}"}} {n}')
        out += ["# HELP quota_errors_total Responses with status >= 400.",
                "# TYPE quota_errors_total counter"]
        for (route, status), n in sorted(self.errors.items()):
            out.append(f'quota_errors_total{{route="{_esc(route)}",status="{status}"}} {n}')
        out += ["# HELP quota_tokens_total Tokens metered, by route and direction.",
                "# TYPE quota_tokens_total counter"]
        for (route, direction), n in sorted(self.tokens.items()):
            out.append(f'quota_tokens_total{{route="{_esc(route)}",direction="{direction}"}} {n}')
        out += ["# HELP quota_charged_quota_tokens_total Quota tokens charged, by route.",
                "# TYPE quota_charged_quota_tokens_total counter"]
        for route, n in sorted(self.charged.items()):
            out.append(f'quota_charged_quota_tokens_total{{route="{_esc(route)}"}} {n}')
        out += ["# HELP quota_request_duration_seconds Request latency through the gateway.",
                "# TYPE quota_request_duration_seconds histogram"]
        for route, buckets in sorted(self.latency.items()):
            cumulative = 0
            for bound, n in zip((*LATENCY_BUCKETS_MS, None), buckets):
                cumulative += n
                le = "+Inf" if bound is None else repr(bound / 1000)
                out.append(
                    f'quota_request_duration_seconds_bucket{{route="{_esc(route)}",le="{le}"}} {cumulative}'
                )
            out.append(f'quota_request_duration_seconds_sum{{route="{_esc(route)}"}} {self.latency_sum[route]}')
            out.append(f'quota_request_duration_seconds_count{{route="{_esc(route)}"}} {cumulative}')
        if open_holds is not None:
            out += ["# HELP quota_holds_open Holds currently open in the store.",
                    "# TYPE quota_holds_open gauge", f"quota_holds_open {open_holds}"]
        return ("\n".join(out) + "\n").encode()


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
