"""`quota-proxy demo`, the README's first command, as a newcomer runs it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx

from tests.conftest import closed_port


def test_demo_serves_a_funded_key_and_prints_a_working_curl_line() -> None:
    port = closed_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "quota_proxy", "demo", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any("Ctrl-C" in line for line in lines):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        text = "".join(lines)
        key = re.search(r"inference key: (qta_live_[0-9A-Za-z]{32})", text)
        curl = re.search(r"curl (http://\S+/v1/chat/completions)", text)
        assert key and curl, text
        assert f"Bearer {key.group(1)}" in text
        body = re.search(r"-d '(.+)'", text)
        assert body, text
        response = httpx.post(
            curl.group(1),
            content=body.group(1),
            headers={"authorization": f"Bearer {key.group(1)}", "content-type": "application/json"},
            timeout=10,
        )
        assert response.status_code == 200, response.text
        usage = response.json()["usage"]
        assert usage["route_multiplier"] == "x3"
        assert usage["charged_quota_tokens"] == 3 * (usage["input_tokens"] + usage["output_tokens"])
        me = httpx.get(
            curl.group(1).replace("/chat/completions", "/me"),
            headers={"authorization": f"Bearer {key.group(1)}"},
            timeout=10,
        ).json()
        assert me["account"]["balance_quota_tokens"] == 5_000_000 - usage["charged_quota_tokens"]
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        if proc.stdout:
            proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()
