"""The single executable (`scripts/build-binary` -> dist/quota-proxy), run as a user would:
with a clean environment (no PYTHONPATH, no VIRTUAL_ENV, PATH=/usr/bin:/bin), from a folder
that holds only its config.

Building takes half a minute or more, so these tests run only when QUOTA_BINARY_TEST=1 is set
or dist/quota-proxy already exists; dist/quota-proxy is rebuilt when any file under
quota_proxy/ or packaging/ (or pyproject.toml) is newer than it.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import orjson
import pytest

ROOT = Path(__file__).resolve().parent.parent
BINARY = ROOT / "dist" / "quota-proxy"
BUILD_TIMEOUT_S = 1200
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 45
CLEAN_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("QUOTA_BINARY_TEST") != "1"
        and os.environ.get("CI") != "true"
        and not BINARY.exists(),
        reason="single-executable tests: set QUOTA_BINARY_TEST=1 (builds dist/quota-proxy) "
        "or run scripts/build-binary first",
    ),
]


def _sources() -> Iterator[Path]:
    for folder in (ROOT / "quota_proxy", ROOT / "packaging"):
        for path in folder.rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                yield path
    yield ROOT / "pyproject.toml"


def _is_fresh() -> bool:
    if not BINARY.exists():
        return False
    built = BINARY.stat().st_mtime
    return all(path.stat().st_mtime < built for path in _sources())


@pytest.fixture(scope="module")
def binary() -> Path:
    if not _is_fresh():
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        result = subprocess.run(
            [str(ROOT / "scripts" / "build-binary")],
            check=False,
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
        )
        assert result.returncode == 0, f"scripts/build-binary failed:\n{result.stdout}\n{result.stderr}"
    assert BINARY.exists()
    return BINARY


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Process:
    """A child process whose stdout lines are read by a thread, so waits have deadlines."""

    def __init__(self, args: list[str], *, cwd: Path, env: dict[str, str]) -> None:
        self.popen = subprocess.Popen(
            args,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        with self.popen.stdout:
            for line in self.popen.stdout:
                self.lines.put(line)

    def wait_for(self, pattern: str, timeout: float = START_TIMEOUT_S) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                if self.popen.poll() is not None and self.lines.empty():
                    break
                continue
            self.output.append(line)
            if match := re.search(pattern, line):
                return match
        raise AssertionError(f"no line matching {pattern!r} within {timeout} s:\n{''.join(self.output)}")

    def stop(self) -> int:
        """SIGTERM, then wait; a process that does not stop in time is killed and fails."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=10)
            raise AssertionError(f"{self.popen.args!r} did not stop within {STOP_TIMEOUT_S} s after SIGTERM") from None
        finally:
            self.reader.join(timeout=10)  # it closes stdout at end of file


def run(binary: Path, *args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(binary), *args],
        check=False,
        cwd=cwd,
        env={**CLEAN_ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"quota-proxy {' '.join(args)} exited {result.returncode}:\n{result.stderr}"
    return result


def wait_healthy(url: str, proc: Process, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.popen.poll() is None, f"the gateway exited with {proc.popen.returncode}"
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"no 200 from {url}/healthz within {timeout} s")


def test_demo_answers_a_proxied_request(binary: Path, tmp_path: Path) -> None:
    port = free_port()
    demo = Process([str(binary), "demo", "--port", str(port)], cwd=tmp_path, env=CLEAN_ENV)
    try:
        base_url = demo.wait_for(r"gateway on (http://\S+/v1)").group(1)
        key = demo.wait_for(r"inference key: (qta_live_\S+)").group(1)
        assert base_url == f"http://127.0.0.1:{port}/v1"
        reply = httpx.post(
            f"{base_url}/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": "quota/sonnet", "messages": [{"role": "user", "content": "Hello!"}]},
            timeout=30,
        )
        assert reply.status_code == 200, reply.text
        usage = reply.json()["usage"]
        assert usage["charged_quota_tokens"] == 3 * (usage["input_tokens"] + usage["output_tokens"]) > 0
    finally:
        assert demo.stop() == 0


@pytest.fixture
def fake_upstream(tmp_path: Path) -> Iterator[str]:
    """The fake upstream from the project's own Python, requiring the key in FAKE_UPSTREAM_KEY."""
    env = {**os.environ, "FAKE_UPSTREAM_KEY": "upstream-secret"}
    upstream = Process(
        [sys.executable, "-m", "quota_proxy.testing", "--port", "0", "--api-key-env", "FAKE_UPSTREAM_KEY"],
        cwd=tmp_path,
        env=env,
    )
    try:
        yield upstream.wait_for(r"FAKE_UPSTREAM_READY (\S+)").group(1)
    finally:
        upstream.stop()


@pytest.mark.parametrize("workers", [1, 2])
def test_cli_and_serve_with_a_config(binary: Path, tmp_path: Path, fake_upstream: str, workers: int) -> None:
    port = free_port()
    (tmp_path / "quota-proxy.toml").write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\n'
        '[store]\npath = "quota.db"\n'
        f'[upstreams.fake]\nbase_url = "{fake_upstream}"\napi_key_env = "FAKE_UPSTREAM_KEY"\ntimeout_s = 10\n'
        '[routes."quota/fast"]\nupstream = "fake"\nmodel = "fake-fast"\nmultiplier = 2\nmax_output_tokens = 64\n'
    )
    upstream_key = {"FAKE_UPSTREAM_KEY": "upstream-secret"}

    checked = run(binary, "config", "check", "--json", cwd=tmp_path, env=upstream_key)
    assert "quota/fast" in checked.stdout
    run(binary, "accounts", "create", "acme", "--usd", "5", cwd=tmp_path)
    key = orjson.loads(
        run(binary, "keys", "create", "--account", "acme", "--kind", "live", "--json", cwd=tmp_path).stdout
    )["key"]

    serve = Process([str(binary), "serve", "--workers", str(workers)], cwd=tmp_path, env={**CLEAN_ENV, **upstream_key})
    try:
        wait_healthy(f"http://127.0.0.1:{port}", serve)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=30)
        charged = 0
        for _ in range(2 * workers):
            reply = client.chat.completions.create(
                model="quota/fast", messages=[{"role": "user", "content": "Hello from the binary"}]
            )
            assert reply.choices[0].message.content
            usage = reply.model_dump()["usage"]
            assert usage["charged_quota_tokens"] == 2 * (usage["prompt_tokens"] + usage["completion_tokens"])
            charged += usage["charged_quota_tokens"]
        stream = client.chat.completions.create(
            model="quota/fast", messages=[{"role": "user", "content": "Stream it"}], stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        client.close()
    finally:
        # uvicorn re-raises SIGTERM after a graceful shutdown, so a clean stop may end by it.
        assert serve.stop() in (0, -signal.SIGTERM)

    verify = run(binary, "ledger", "verify", "--json", cwd=tmp_path)
    assert orjson.loads(verify.stdout)["ok"] is True
    balance = orjson.loads(run(binary, "balance", "--account", "acme", "--json", cwd=tmp_path).stdout)
    spent = 5_000_000 - balance["balance_quota_tokens"]
    assert spent > charged > 0  # the non-streamed replies, plus the streamed one
    backup = orjson.loads(run(binary, "backup", str(tmp_path / "backup.db"), "--json", cwd=tmp_path).stdout)
    assert backup["bytes"] > 0 and (tmp_path / "backup.db").exists()
