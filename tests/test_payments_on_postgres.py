"""The payment and alert suites again, on PostgreSQL: purchases, replayed and concurrent
webhook deliveries, two worker processes, redemption codes under concurrency, alerts across
restarts. Same tests, same assertions; every gateway they start uses a fresh PostgreSQL
database (tests/conftest.py, QUOTA_TEST_STORE). Without a server they skip; on CI they fail."""

from __future__ import annotations

import pytest

from tests.test_payments import *  # noqa: F403
from tests.test_payments_alerts import *  # noqa: F403
from tests.test_payments_codes import *  # noqa: F403


@pytest.fixture(autouse=True)
def _on_postgres(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUOTA_TEST_STORE", "postgres")
