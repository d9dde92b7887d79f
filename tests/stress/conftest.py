"""Fixtures of the stress suite: a ProcessSet that stops every child at teardown, and a work
folder per test (config, SQLite file, logs of every process)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.stress.harness import MODE, ProcessSet


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "stress: the reliability suite (tests/stress); deselect with -m 'not stress'")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.stress)


def pytest_report_header() -> str:
    return f"quota-proxy stress suite: {MODE} form (QUOTA_STRESS=full for the release form)"


@pytest.fixture
def procs() -> Iterator[ProcessSet]:
    running = ProcessSet()
    try:
        yield running
    finally:
        running.stop_all()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path
