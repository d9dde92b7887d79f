"""The test kit for quota-proxy users: a fake upstream that speaks Chat Completions, the
Anthropic Messages API (``/v1/messages``, ``/v1/messages/count_tokens``) and the OpenAI
Responses API (``/v1/responses``), streamed or not.

Replies and usage are deterministic, so tests can assert exact charges. A request can
steer the fake through a ``"fake"`` object in its JSON body (the SDKs'
``extra_body={"fake": {...}}``): be slow, omit usage, or fail the way real upstreams fail;
report cache reads and writes (``cache_read_tokens``, ``cache_write_tokens``,
``cache_write_1h_tokens``) and reasoning (``reasoning_tokens``) in each API's own usage
style; or call the request's first tool (``tool_calls``). The same knobs can be set for
every request on ``FakeUpstreamOptions``.

In a test: ``async with run_fake_upstream() as upstream: ... upstream.base_url``. As a
process: ``python -m quota_proxy.testing --port 9000``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal

from quota_proxy.fake_upstream import (
    HUGE_WORDS,
    FakeUpstream,
    FakeUpstreamOptions,
    RecordedRequest,
    RunningUpstream,
    create_fake_upstream,
    run_fake_upstream,
)

__all__ = [
    "HUGE_WORDS",
    "FakeUpstream",
    "FakeUpstreamOptions",
    "RecordedRequest",
    "RunningUpstream",
    "create_fake_upstream",
    "main",
    "run_fake_upstream",
]


async def _serve_until_signalled(options: FakeUpstreamOptions, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with run_fake_upstream(options, host=host, port=port) as running:
        print(f"FAKE_UPSTREAM_READY {running.base_url}", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m quota_proxy.testing", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between streamed words")
    parser.add_argument("--first-byte-delay", type=float, default=0.0, help="seconds before response headers")
    parser.add_argument("--reply-words", type=int, default=8)
    parser.add_argument("--no-usage", action="store_true", help="never report usage, like an old server")
    parser.add_argument(
        "--api-key-env", metavar="NAME", help="require the key held in this environment variable"
    )
    args = parser.parse_args(argv)
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            parser.error(f"--api-key-env: environment variable {args.api_key_env} is not set")
    options = FakeUpstreamOptions(
        chunk_delay_s=args.chunk_delay,
        first_byte_delay_s=args.first_byte_delay,
        reply_words=args.reply_words,
        include_usage=not args.no_usage,
        api_key=api_key,
    )
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_serve_until_signalled(options, args.host, args.port))


if __name__ == "__main__":
    main()

