"""`quota-proxy serve`: uvicorn with uvloop and httptools, one or more workers."""

from __future__ import annotations

import os
import resource
import shutil
import tempfile
from pathlib import Path

import uvicorn

from quota_proxy.config import Settings
from quota_proxy.logs import configure_logging


def raise_open_file_limit() -> None:
    """Every connection is a file descriptor: lift the soft limit (often 1,024) to the hard
    one, so a crowd of idle or slow clients cannot starve the gateway of sockets. Workers
    inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1_048_576
    if soft != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


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
    os.environ["QUOTA_PROXY_LOG_LEVEL"] = log_level
    configure_logging(log_level, settings.server.log_format)
    raise_open_file_limit()
    metrics_dir = None
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Workers write their metrics here; a scrape of any worker sums them all.
        metrics_dir = tempfile.mkdtemp(prefix="quota-proxy-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        _run(settings, host, port, workers, log_level)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _run(settings: Settings, host: str | None, port: int | None, workers: int, log_level: str) -> None:
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
        timeout_graceful_shutdown=int(settings.server.graceful_timeout_s),
        server_header=False,
    )
