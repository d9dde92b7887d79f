"""Scenario 6c — schemathesis against the gateway's own OpenAPI document (GET /openapi.json).

schemathesis generates requests from the document — valid and invalid bodies, headers,
query strings and path parameters for every operation — and checks each answer: never a
5xx, and every response conforms to the document (status listed, JSON shape of errors and
of the gateway's own objects). Afterwards the books must still reconcile.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.stress.harness import (
    Checks,
    FakeUpstreamProcess,
    ProcessSet,
    RouteConf,
    UpstreamConf,
    ledger_verify,
    new_key,
    scale,
    start_gateway,
)

SCHEMATHESIS = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which(
    "schemathesis"
)


@pytest.mark.skipif(SCHEMATHESIS is None, reason="schemathesis is not installed (pip install schemathesis)")
def test_schemathesis_finds_no_server_error(procs: ProcessSet, workdir: Path) -> None:
    checks = Checks("6c_schemathesis")
    fake = procs.add(FakeUpstreamProcess(workdir)).start()
    gateway = start_gateway(
        procs, workdir, workers=1, upstreams=[UpstreamConf("fake", fake.base_url)],
        routes=[RouteConf("quota/fast", "fake", 1, max_output_tokens=32)],
        accounts=[("fuzz", 10_000_000)],
    )
    key = new_key(gateway, "fuzz", "secret")
    gateway.cli("grant", "--account", "fuzz", "--user", "user_1", "--usd", "1")
    examples = scale(25, 150)
    assert SCHEMATHESIS is not None
    result = subprocess.run(
        [
            SCHEMATHESIS, "run", f"{gateway.url}/openapi.json",
            "--header", f"Authorization: Bearer {key}",
            "--checks", "not_a_server_error,status_code_conformance,response_schema_conformance",
            "--max-examples", str(examples),
            "--request-timeout", "10",
            "--workers", "1",
            "--suppress-health-check", "all",
            "--generation-deterministic",
        ],
        capture_output=True, text=True, timeout=900, cwd=workdir,
        env={**os.environ, "SCHEMATHESIS_HOOKS": "", "NO_COLOR": "1"},
    )
    summary = [line for line in result.stdout.splitlines() if line.strip()][-12:]
    checks.expect("schemathesis: every check passed (exit 0)", result.returncode == 0,
                  "\n".join(result.stdout.splitlines()[-60:]) + result.stderr[-2000:])
    code, verify = ledger_verify(gateway)
    checks.expect("quota-proxy ledger verify exits 0 after the fuzzing", code == 0, verify)
    checks.finish({"max_examples_per_operation": examples, "summary": summary})
