"""Sequential latency of the agent endpoints through the gateway, next to the fake upstream
answered directly: what the gateway adds (auth, routing, hold, translation, settle).

    python bench/agents_latency.py        (from the repository root)
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

from quota_proxy import admin  # noqa: E402
from quota_proxy.app import create_app  # noqa: E402
from quota_proxy.config import Limits, load_settings  # noqa: E402
from quota_proxy.runner import run_server  # noqa: E402
from quota_proxy.testing import run_fake_upstream  # noqa: E402
from tests.agents_support import extra_config  # noqa: E402
from tests.conftest import config_toml  # noqa: E402

N = 300


async def timed(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str]
) -> tuple[float, float]:
    latencies = []
    for _ in range(N):
        started = time.perf_counter()
        reply = await client.post(url, json=body, headers=headers)
        assert reply.status_code == 200, reply.text
        latencies.append((time.perf_counter() - started) * 1000)
    latencies.sort()
    return statistics.median(latencies), latencies[int(N * 0.95)]


async def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="agents-latency-"))
    async with run_fake_upstream() as up:
        config = work / "quota-proxy.toml"
        config.write_text(config_toml(up.base_url, work / "quota.db", routes=extra_config(up.base_url)))
        settings = load_settings(config)
        app = create_app(settings)
        async with run_server(app, lifespan="on") as server:
            await admin.create_account(app.store, settings, "bench", 10**12)
            created = await admin.create_key(
                app.store, settings, "bench", "live", "", None, True, None, Limits()
            )
            gw = f"http://{server.host}:{server.port}"
            headers = {"x-api-key": str(created["key"]), "anthropic-version": "2023-06-01"}
            messages = [{"role": "user", "content": "hi there"}]
            msg = {"model": "quota/claude", "max_tokens": 32, "messages": messages}
            rsp = {"model": "quota/codex", "input": "hi there", "max_output_tokens": 32}
            chat = {"model": "quota/sonnet", "messages": messages, "max_tokens": 32}
            runs = [
                ("fake directly: /v1/messages", f"{up.url}/v1/messages", {**msg, "model": "m"}, {}),
                ("gateway: /v1/messages, native", f"{gw}/v1/messages", msg, headers),
                (
                    "gateway: /v1/messages, translated",
                    f"{gw}/v1/messages",
                    {**msg, "model": "quota/sonnet"},
                    headers,
                ),
                ("fake directly: /v1/responses", f"{up.url}/v1/responses", {**rsp, "model": "m"}, {}),
                ("gateway: /v1/responses, native", f"{gw}/v1/responses", rsp, headers),
                (
                    "gateway: /v1/responses, translated",
                    f"{gw}/v1/responses",
                    {**rsp, "model": "quota/sonnet"},
                    headers,
                ),
                ("gateway: /v1/chat/completions", f"{gw}/v1/chat/completions", chat, headers),
            ]
            async with httpx.AsyncClient(timeout=10) as client:
                for name, url, body, hdrs in runs:
                    p50, p95 = await timed(client, url, body, hdrs)
                    print(f"{name:38s} p50 {p50:6.2f} ms   p95 {p95:6.2f} ms")
            assert await app.store.verify_ledger() == []


if __name__ == "__main__":
    asyncio.run(main())
