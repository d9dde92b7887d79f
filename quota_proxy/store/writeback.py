"""Ask the kernel to start writing a file's dirty pages now, without waiting for them.

Why: a checkpoint begins with an fsync of the WAL, which writes out every frame since the
last one (a second of traffic). While that runs, a request's write to the WAL waits for
it in the kernel: 10-100 ms on a virtual disk, most of the c=1 p99 tail
(bench/RESULTS.md). Starting the write-out every few milliseconds leaves that fsync little
to do. Linux's `sync_file_range(SYNC_FILE_RANGE_WRITE)` does exactly this and returns at
once; elsewhere (no such call) nothing is done and the fsync does it all, as before.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable
from pathlib import Path

_SYNC_FILE_RANGE_WRITE = 2


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range  # the C library the process runs on
    except (OSError, AttributeError, TypeError):  # no such call here (macOS, Windows)
        return None
    call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    call.restype = ctypes.c_int
    return call


class Writeback:
    """Starts the write-out of one file's dirty pages; `start()` is safe to call from a
    worker thread and never waits for the disk (unless the device's queue is full)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._call = _sync_file_range()
        self._fd: int | None = None

    @property
    def supported(self) -> bool:
        return self._call is not None

    def start(self) -> bool:
        """True if the kernel took the request (False: no such call here, or no file yet)."""
        if self._call is None:
            return False
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return False  # not created yet
        return self._call(self._fd, 0, 0, _SYNC_FILE_RANGE_WRITE) == 0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
