"""Metrics add a request's observations up in plain Python and hand them to prometheus-client
in bulk: what a scrape shows must be exactly what prometheus-client's own observe() and inc()
would have shown, bucket by bucket, and nothing may wait longer than the flush interval."""

from __future__ import annotations

import asyncio
import random

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from pytest import MonkeyPatch

import quota_proxy.metrics as metrics_module
from quota_proxy.metrics import LATENCY_BUCKETS, STORE_BUCKETS, Metrics
from tests.test_ops import samples


def record(rng: random.Random, status: int) -> dict[str, object]:
    log: dict[str, object] = {
        "route": "quota/fast",
        "status": status,
        "latency_ms": rng.choice([rng.uniform(0, 400), 1.0, 2.5, 5.0, 0.0]),  # bounds exactly, too
        "upstream": "mock",
        "upstream_ms": rng.uniform(0, 50),
        "hold_ms": rng.choice([rng.uniform(0, 3), 0.25, 0.1]),
        "settle_ms": rng.uniform(0, 0.5),
    }
    if status == 200:
        log.update(input_tokens=rng.randrange(1000), output_tokens=rng.randrange(1000), charged=rng.randrange(2000))
    return log


def test_bulk_observations_render_as_prometheus_client_would() -> None:
    rng = random.Random(7)
    logs = [record(rng, rng.choice([200, 200, 200, 402, 429])) for _ in range(3000)]
    groups = [(rng.randrange(1, 600), rng.uniform(0, 0.02)) for _ in range(500)]
    metrics = Metrics()
    for log in logs:
        metrics.observe(log)
    for size, seconds in groups:
        metrics.observe_settlement_group(size, seconds)
    got = samples(metrics.render().decode())

    # The same observations, one by one, through prometheus-client itself.
    registry = CollectorRegistry()
    latency = Histogram("quota_request_duration_seconds", "", ["route"], buckets=LATENCY_BUCKETS, registry=registry)
    store = Histogram("quota_store_duration_seconds", "", ["op"], buckets=STORE_BUCKETS, registry=registry)
    group = Histogram("quota_settlement_group_size", "", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 500),
                      registry=registry)
    for log in logs:
        latency.labels("quota/fast").observe(float(log["latency_ms"]) / 1000)  # type: ignore[arg-type]
        store.labels("hold").observe(float(log["hold_ms"]) / 1000)  # type: ignore[arg-type]
    for size, _ in groups:
        group.observe(size)
    want = samples(generate_latest(registry).decode())

    compared = 0
    for name, labels in want:
        if name.endswith("_created") or ("op", "settle") in labels:
            continue  # settle times were not replayed above
        if name.endswith("_sum"):
            assert abs(got[(name, labels)] - want[(name, labels)]) < 1e-6, (name, labels)
        else:
            assert got[(name, labels)] == want[(name, labels)], (name, labels)
        compared += 1
    assert compared > 40
    ok = sum(1 for log in logs if log["status"] == 200)
    assert got[("quota_requests_total", (("route", "quota/fast"), ("status", "200")))] == ok
    assert got[("quota_insufficient_balance_total", (("route", "quota/fast"),))] == sum(
        1 for log in logs if log["status"] == 402
    )
    assert got[("quota_tokens_total", (("direction", "input"), ("route", "quota/fast")))] == sum(
        int(log.get("input_tokens", 0)) for log in logs  # type: ignore[call-overload]
    )


def test_pending_observations_reach_prometheus_client_within_the_flush_interval(monkeypatch: MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_module, "FLUSH_INTERVAL_S", 0.05)
    key = ("quota_requests_total", (("route", ""), ("status", "404")))

    async def scenario() -> tuple[float | None, float | None]:
        metrics = Metrics()
        metrics.observe({"route": "", "status": 404, "latency_ms": 1.0})
        # The registry read directly (render() would hand the observation over itself).
        before = samples(generate_latest(metrics.registry).decode()).get(key)
        await asyncio.sleep(0.2)  # no scrape in between: the timer alone hands it over
        return before, samples(generate_latest(metrics.registry).decode()).get(key)

    assert asyncio.run(scenario()) == (0.0, 1.0)
