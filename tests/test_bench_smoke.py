"""The benchmark harness stays runnable: a smoke run of a few seconds, checked for shape only.

Speed is never asserted here; the figures belong in bench/RESULTS.md.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.slow
def test_quick_benchmark_run_is_well_formed(tmp_path: Path) -> None:
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (apt-get install -y wrk); the benchmark needs it")
    out = tmp_path / "quick.json"
    result = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())

    assert data["kind"] == "quick"
    assert out.with_suffix(".md").exists()
    scenarios = [s["name"] for s in data["settings"]["scenarios"]]
    assert scenarios
    runs = data["runs"]
    assert {(r["scenario"], r["target"]) for r in runs} == {
        (s, t) for s in scenarios for t in ("direct", "quota-proxy")
    }
    for run in runs:
        where = f"{run['target']} {run['scenario']}: {run['sample'] or run['exact']['sample']}"
        assert run["requests"] > 0, where
        assert run["non200"] == 0 and run["bad_body"] == 0 and run["socket_errors"] == 0, where
        exact = run["exact"]
        assert exact["requests"] > 0, where
        assert exact["non200"] == 0 and exact["bad_body"] == 0 and exact["errors"] == 0, where
        # Every client request made exactly one upstream call: no retries, no duplicates.
        assert exact["upstream_calls"] == exact["requests"], where
        assert f"{exact['calls_per_request']:.2f}" == "1.00", where
        for key in ("rps", "p50_ms", "p99_ms", "cpu_ms_per_request"):
            assert isinstance(run[key], (int, float)) and math.isfinite(run[key]) and run[key] >= 0, key
    for name in scenarios:
        proxy = data["summary"][name]["quota-proxy"]
        assert "added_p50_ms" in proxy and math.isfinite(proxy["added_p50_ms"]["median"])
        assert proxy["non200"] == 0 and proxy["bad_body"] == 0
    assert data["memory"]["quota-proxy"]["peak_load_mb"] > 0
    assert data["checks"]["ledger_verify"].startswith("ledger ok"), data["checks"]["ledger_verify"]
    assert data["checks"]["open_holds"] == 0
