"""The access log's direct path: under the logging `serve` sets up, a request's record is
formatted straight from its dict; it must read exactly as the same record through logging,
and any change to that set-up (a filter, another handler) must send records through logging."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest

from quota_proxy import logs

NAMES = ("quota_proxy", "uvicorn", "uvicorn.error")
RECORD = {
    "request_id": "req_0123456789abcdef01234567", "method": "POST", "path": "/v1/chat/completions",
    "status": 200, "latency_ms": 0.612, "route": "quota/fast", "upstream": "mock", "input_tokens": 31,
    "output_tokens": 12, "charged": 43, "account": "acme", "key_prefix": "qta_live_ab12",
}  # fmt: skip


Configure = Callable[[str, str], io.StringIO]


@pytest.fixture
def configure(monkeypatch: pytest.MonkeyPatch) -> Iterator[Configure]:
    """configure_logging, writing to a buffer it returns; the loggers as they were afterwards."""
    saved = [(logging.getLogger(n), logging.getLogger(n).handlers[:], logging.getLogger(n).level,
              logging.getLogger(n).propagate) for n in NAMES]  # fmt: skip
    monkeypatch.setattr(logs, "_direct", None)

    def configure_into_buffer(level: str, log_format: str) -> io.StringIO:
        # Patched here, in the test's body: pytest swaps sys.stderr itself between phases.
        buffer = io.StringIO()
        with monkeypatch.context() as patch:
            patch.setattr("sys.stderr", buffer)
            logs.configure_logging(level, log_format)
        return buffer

    yield configure_into_buffer
    for logger, handlers, level, propagate in saved:
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


def emitted(buffer: io.StringIO, records: list[dict[str, Any]]) -> list[str]:
    async def run() -> None:
        for record in records:
            logs.log_access(record)
        await asyncio.sleep(logs.FLUSH_AFTER_S * 2)  # the handler writes what it holds by then

    asyncio.run(run())
    return buffer.getvalue().splitlines()


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_a_direct_line_reads_as_the_same_record_through_logging(configure: Configure, log_format: str) -> None:
    stderr = configure("info", log_format)
    direct = emitted(stderr, [RECORD])
    handler = logging.getLogger("quota_proxy").handlers[0]
    assert logs._direct is handler
    record = logging.LogRecord("quota_proxy.access", logging.INFO, "", 0, "request", (), None)
    record.access = RECORD
    via_logging = handler.format(record)
    assert len(direct) == 1
    if log_format == "json":  # the timestamps differ by the microseconds between the two
        a, b = orjson.loads(direct[0]), orjson.loads(via_logging)
        assert a.pop("ts")[:16] == b.pop("ts")[:16] and a == b
        assert a["event"] == "request" and a["key_prefix"] == "qta_live_ab12"
    else:
        assert direct[0].split(" ", 1)[1] == via_logging.split(" ", 1)[1]


def test_a_filter_on_the_access_logger_sees_every_record(configure: Configure) -> None:
    stderr = configure("info", "json")
    seen: list[logging.LogRecord] = []
    access = logging.getLogger("quota_proxy.access")

    def keep_200(record: logging.LogRecord) -> bool:
        seen.append(record)
        return record.access["status"] == 200  # type: ignore[attr-defined,no-any-return]

    access.addFilter(keep_200)
    try:
        lines = emitted(stderr, [RECORD, {**RECORD, "status": 404}])
    finally:
        access.removeFilter(keep_200)
    assert len(seen) == 2
    assert [orjson.loads(line)["status"] for line in lines] == [200]


def test_a_level_above_info_writes_no_access_line(configure: Configure) -> None:
    stderr = configure("warning", "json")
    assert emitted(stderr, [RECORD]) == []
