"""`quota-proxy demo`: the gateway on a temporary store, in front of the built-in fake
upstream, with one funded account and key, and a ready curl line."""

from __future__ import annotations

import asyncio
import signal
import tempfile
from pathlib import Path

from quota_proxy import admin
from quota_proxy.app import create_app
from quota_proxy.config import Settings, parse_settings
from quota_proxy.fake_upstream import run_fake_upstream
from quota_proxy.logs import configure_logging
from quota_proxy.runner import run_server
from quota_proxy.store import open_store

DEMO_FUNDS_USD = "5"


def demo_settings(upstream_base_url: str, store_path: Path, host: str, port: int) -> Settings:
    aliases = [
        ("quota/fast", 1, "Quick tasks, low-cost coding"),
        ("quota/balanced", 2, "Daily coding and chat"),
        ("quota/sonnet", 3, "Stronger coding route"),
        ("quota/sonnet-pro", 5, "Advanced reasoning and code edits"),
        ("quota/opus", 8, "Deep tasks and complex refactors"),
        ("quota/opus-max", 15, "Highest-cost route for heavy reasoning"),
    ]
    return parse_settings(
        {
            "server": {"host": host, "port": port},
            "store": {"path": str(store_path)},
            "upstreams": {"demo": {"base_url": upstream_base_url}},
            "routes": {
                alias: {"upstream": "demo", "model": "fake-model", "multiplier": mult,
                        "description": description}
                for alias, mult, description in aliases
            },
            "packages": [
                {"id": "starter", "name": "Starter", "price_usd": 5, "quota_tokens": 5_000_000},
                {"id": "pro", "name": "Pro", "price_usd": 20, "quota_tokens": 22_000_000},
            ],
        }
    )


async def _demo(host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    with tempfile.TemporaryDirectory(prefix="quota-proxy-demo-") as tmp:
        async with run_fake_upstream() as upstream:
            settings = demo_settings(upstream.base_url, Path(tmp) / "demo.db", host, port)
            async with open_store(settings.store) as store:
                amount = settings.money.quota_tokens_from_usd(DEMO_FUNDS_USD)
                await admin.create_account(store, settings, "demo", amount)
                key = await admin.create_key(store, settings, "demo", "live", "demo", None, True, None)
                secret = await admin.create_key(store, settings, "demo", "secret", "demo", None, True, None)
            async with run_server(create_app(settings), host=host, port=port, lifespan="on") as server:
                base = f"{server.url}/v1"
                print(
                    f"quota-proxy demo: gateway on {base} (demo upstream on {upstream.base_url})\n"
                    f"account 'demo' funded with ${DEMO_FUNDS_USD}; temporary store {settings.store.path}\n"
                    f"inference key: {key['key']}\n"
                    f"secret key:    {secret['key']}\n\n"
                    f"curl {base}/chat/completions \\\n"
                    f"  -H \"Authorization: Bearer {key['key']}\" \\\n"
                    f"  -H \"Content-Type: application/json\" \\\n"
                    f"  -d '{{\"model\": \"quota/sonnet\", \"messages\": "
                    f"[{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'\n\n"
                    f"Press Ctrl-C to stop.",
                    flush=True,
                )
                await stop.wait()


def run_demo(host: str = "127.0.0.1", port: int = 8080) -> None:
    configure_logging("warning")
    asyncio.run(_demo(host, port))
