"""Log output: one JSON object per line (for machines), or a readable line in a terminal.

Access records carry only what SPEC allows: ids, the key's display prefix, account, user,
route, upstream, status, token counts, charge and timings — never keys, prompts or completions.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Any

import orjson

ACCESS_FIELDS_IN_TEXT = (
    ("route", "{}"),
    ("upstream", "via {}"),
    ("input_tokens", "in={}"),
    ("output_tokens", "out={}"),
    ("charged", "charged={}"),
    ("account", "account={}"),
    ("user", "user={}"),
    ("key_prefix", "key={}…"),
)


_second: tuple[int, str] = (-1, "")


def _timestamp(created: float) -> str:
    """ISO 8601 UTC with milliseconds; the formatted second is reused while it lasts."""
    global _second
    whole = int(created)
    if _second[0] != whole:
        _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{_second[1]}.{int((created - whole) * 1000):03d}Z"


class AccessFormatter(logging.Formatter):
    """A formatter that can also format an access record without a LogRecord."""

    def format(self, record: logging.LogRecord) -> str:
        access = getattr(record, "access", None)
        if access is not None:
            return self.format_access(record.created, access)
        return self.format_other(record)

    def format_access(self, created: float, access: dict[str, Any]) -> str:
        raise NotImplementedError

    def format_other(self, record: logging.LogRecord) -> str:
        raise NotImplementedError


class JsonFormatter(AccessFormatter):
    def format_access(self, created: float, access: dict[str, Any]) -> str:
        entry: dict[str, Any] = {"ts": _timestamp(created), "level": "info", "event": "request"}
        entry.update(access)
        return orjson.dumps(entry, default=str).decode()

    def format_other(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and record.exc_info[0] is not None:
            entry["error"] = record.exc_info[0].__name__
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(AccessFormatter):
    def format_other(self, record: logging.LogRecord) -> str:
        return f"{_timestamp(record.created)} {record.levelname.lower():7} {record.getMessage()}"

    def format_access(self, created: float, access: dict[str, Any]) -> str:
        parts = [
            _timestamp(created),
            str(access.get("status", "-")),
            access.get("method", "-"),
            access.get("path", "-"),
            f"{access.get('latency_ms', 0):.1f}ms",
        ]
        parts += [fmt.format(access[name]) for name, fmt in ACCESS_FIELDS_IN_TEXT if access.get(name) is not None]
        parts.append(access.get("request_id", ""))
        return " ".join(parts)


# Info lines (access lines) are held this long at most, or until this many are held: one
# write(2) for all of them, and no extra event-loop turn per request to make it.
FLUSH_AFTER_S = 0.05
MAX_HELD_LINES = 1000


class BatchingStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """One line per record, but written and flushed together at most FLUSH_AFTER_S after
    the first: a busy gateway makes one write(2) for the access lines of many requests
    instead of one per request. Warnings and errors, and records logged with no loop
    running, go out at once (with everything held before them), and so does everything
    held when the process exits (logging.shutdown flushes every handler)."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._lines: list[str] = []
        self._scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._lines.append(self.format(record))
        except Exception:
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING:
            self.flush()
            return
        self._flush_soon()

    def emit_access(self, access: dict[str, Any]) -> None:
        """An access record, formatted straight from its dict (no LogRecord, no trip through
        the logger hierarchy: most of a line's cost)."""
        formatter = self.formatter
        assert isinstance(formatter, AccessFormatter)
        self._lines.append(formatter.format_access(time.time(), access))
        self._flush_soon()

    def _flush_soon(self) -> None:
        if len(self._lines) >= MAX_HELD_LINES:
            self.flush()
        elif not self._scheduled:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._scheduled = True
            loop.call_later(FLUSH_AFTER_S, self.flush)

    def flush(self) -> None:
        self.acquire()
        try:
            self._scheduled = False
            if self._lines:
                text = "\n".join(self._lines) + "\n"
                self._lines.clear()
                self.stream.write(text)
                self.stream.flush()
        except (OSError, ValueError):
            pass  # stderr closed under us (shutting down): nothing else to do with the lines
        finally:
            self.release()


def configure_logging(level: str = "info", log_format: str = "auto") -> None:
    """Everything quota-proxy logs goes to stderr, one line per record.

    Records skip what the formatters never print (the caller's file and line, found by
    walking the stack; thread and process names): a third of an access line's cost.
    """
    if log_format == "auto":
        log_format = "text" if sys.stderr.isatty() else "json"
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    global _direct
    handler = BatchingStreamHandler(sys.stderr)
    handler.setFormatter(TextFormatter() if log_format == "text" else JsonFormatter())
    for name in ("quota_proxy", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
    _direct = handler


ACCESS_LOG = logging.getLogger("quota_proxy.access")
_PARENT = logging.getLogger("quota_proxy")
# The handler configure_logging installed: access records go to it directly while the
# loggers still look as configure_logging left them.
_direct: BatchingStreamHandler | None = None


def log_access(access: dict[str, Any]) -> None:
    """One request's access record, at INFO on the quota_proxy.access logger. A process
    whose logging configure_logging set up (every `serve`) writes it straight to that
    handler; any other set-up (an app embedding the gateway, a test's capture) gets an
    ordinary log record."""
    if not ACCESS_LOG.isEnabledFor(logging.INFO):
        return
    handler = _direct
    handlers = _PARENT.handlers
    if (
        handler is not None
        and len(handlers) == 1
        and handlers[0] is handler
        and ACCESS_LOG.propagate
        and not ACCESS_LOG.handlers
        and not ACCESS_LOG.filters
        and handler.level <= logging.INFO
        and not _PARENT.filters
        and not handler.filters
    ):
        handler.emit_access(access)
    else:
        ACCESS_LOG.info("request", extra={"access": access})
