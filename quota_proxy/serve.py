"""`quota-proxy serve`: uvicorn with uvloop and httptools, one or more workers."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import uvicorn

from quota_proxy.config import Settings


def configure_logging(level: str = "info") -> None:
    """Access lines (already JSON) and errors to stderr, one line each."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("quota_proxy")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def serve(
    settings: Settings,
    config_path: Path,
    *,
    host: str | None = None,
    port: int | None = None,
    workers: int = 1,
    log_level: str = "info",
) -> None:
    # Workers are separate processes: each loads the same validated file itself.
    os.environ["QUOTA_PROXY_CONFIG"] = str(config_path.resolve())
    configure_logging(log_level)
    uvicorn.run(
        "quota_proxy.app:app_from_environment",
        factory=True,
        host=host or settings.server.host,
        port=settings.server.port if port is None else port,
        workers=workers if workers > 1 else None,
        loop="uvloop",
        http="httptools",
        ws="none",
        lifespan="on",
        access_log=False,
        log_level=log_level,
        log_config=None,
        timeout_graceful_shutdown=30,
        server_header=False,
    )
