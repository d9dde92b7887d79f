"""Prometheus metrics through prometheus-client, fed from each request's access-log record.

With `serve --workers N` the workers share PROMETHEUS_MULTIPROC_DIR (set by `serve`), and a
scrape of any worker reports the sum over all of them.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
STORE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1)
GROUP_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 500)


class Metrics:
    def __init__(self) -> None:
        # Labelled children looked up once per (route, status), not on every request.
        self._children: dict[tuple[str, int], tuple[Any, Any]] = {}
        self._metered: dict[str, tuple[Any, Any, Any]] = {}
        self._labelled: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "quota_requests", "Requests by route and status.", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "quota_request_duration_seconds", "Request latency through the gateway.", ["route"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.upstream_latency = Histogram(
            "quota_upstream_duration_seconds",
            "Upstream time: to the whole reply, or to the first byte of a stream.",
            ["route", "upstream"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.ttfb = Histogram(
            "quota_stream_first_byte_seconds", "Time to the first byte of a stream, at the gateway.",
            ["route"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.tokens = Counter(
            "quota_tokens", "Tokens metered, by route and direction.", ["route", "direction"], registry=r
        )
        self.charged = Counter(
            "quota_charged_quota_tokens", "Quota tokens charged, by route.", ["route"], registry=r
        )
        self.insufficient = Counter(
            "quota_insufficient_balance", "Requests refused with 402.", ["route"], registry=r
        )
        self.upstream_errors = Counter(
            "quota_upstream_errors", "Upstream failures by kind.", ["route", "upstream", "kind"], registry=r
        )
        self.rate_limited = Counter(
            "quota_rate_limited", "Requests refused with 429 by a key's limits.", ["route"], registry=r
        )
        self.store_latency = Histogram(
            "quota_store_duration_seconds",
            "Store work on the request path: hold (one statement), settle (the journal append; "
            "its group commits after the answer).",
            ["op"],
            buckets=STORE_BUCKETS, registry=r,
        )
        self.settlement_commit = Histogram(
            "quota_settlement_commit_seconds",
            "One settlement group's commit, off the request path (an outage's retries included).",
            buckets=STORE_BUCKETS, registry=r,
        )
        self.settlement_group = Histogram(
            "quota_settlement_group_size", "Settlements committed together in one group.",
            buckets=GROUP_BUCKETS, registry=r,
        )

    def observe(self, log: dict[str, Any]) -> None:
        route = log.get("route", "")
        status = log.get("status", 0)
        children = self._children.get((route, status))
        if children is None:
            children = self._children[(route, status)] = (
                self.requests.labels(route, str(status)),
                self.latency.labels(route),
            )
        children[0].inc()
        children[1].observe(log.get("latency_ms", 0.0) / 1000)
        if not route:
            return
        if status == 402:
            self.insufficient.labels(route).inc()
        elif status == 429:
            self.rate_limited.labels(route).inc()
        upstream = log.get("upstream")
        if upstream is not None and "upstream_ms" in log:
            self._child(self.upstream_latency, route, upstream).observe(log["upstream_ms"] / 1000)
        if "ttfb_ms" in log:
            self._child(self.ttfb, route).observe(log["ttfb_ms"] / 1000)
        for kind in log.get("upstream_errors", ()):
            self.upstream_errors.labels(route, kind[0], kind[1]).inc()
        if "hold_ms" in log:
            self._child(self.store_latency, "hold").observe(log["hold_ms"] / 1000)
        if "settle_ms" in log:
            self._child(self.store_latency, "settle").observe(log["settle_ms"] / 1000)
        if "input_tokens" in log:
            tokens_in, tokens_out, charged = self._metered_children(route)
            tokens_in.inc(log["input_tokens"])
            tokens_out.inc(log["output_tokens"])
            charged.inc(log["charged"])

    def observe_settlement_group(self, settlements: int, seconds: float) -> None:
        self.settlement_group.observe(settlements)
        self.settlement_commit.observe(seconds)

    def _child(self, metric: Any, *labels: str) -> Any:
        """A labelled child, looked up in prometheus-client once per label set."""
        key = (id(metric), labels)
        child = self._labelled.get(key)
        if child is None:
            child = self._labelled[key] = metric.labels(*labels)
        return child

    def _metered_children(self, route: str) -> tuple[Any, Any, Any]:
        children = self._metered.get(route)
        if children is None:
            children = self._metered[route] = (
                self.tokens.labels(route, "input"),
                self.tokens.labels(route, "output"),
                self.charged.labels(route),
            )
        return children

    def render(self, open_holds: int | None = None) -> bytes:
        registry = self.registry
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        text = generate_latest(registry)
        if open_holds is not None:
            gauge = GaugeMetricFamily("quota_holds_open", "Holds open in the store (all processes).")
            gauge.add_metric([], open_holds)
            extra = CollectorRegistry()
            extra.register(_Static([gauge]))
            text += generate_latest(extra)
        return text


class _Static:
    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> Any:
        return iter(self.families)
