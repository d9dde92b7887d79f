"""Start and stop the processes a benchmark needs: the mock upstream, quota-proxy, LiteLLM.

Each runs in its own process group on 127.0.0.1, its output in a log file, and is stopped
(SIGTERM to the group, then SIGKILL) when its context manager exits.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import procstat

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
HOST = "127.0.0.1"
LITELLM_VENV = Path(os.environ.get("QUOTA_BENCH_LITELLM_VENV", BENCH / ".venv-litellm"))
# 1.107.0 was a compromised release (pulled from PyPI): stay below it.
LITELLM_REQUIREMENT = "litellm[proxy]>=1.106,<1.107"
MOCK_KEY = "sk-mock-upstream"
LITELLM_MASTER_KEY = "sk-litellm-bench-master"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def http_json(url: str, *, method: str = "GET", headers: dict[str, str] | None = None,
              timeout: float = 5.0) -> object:
    req = urllib.request.Request(url, method=method, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float, log: Path,
              headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}; log:\n{_tail(log)}")
        try:
            http_json(url, headers=headers, timeout=1.0)
            return
        except (OSError, ValueError):
            time.sleep(0.05)
    raise RuntimeError(f"{url}: not ready after {timeout_s:.0f} s; log:\n{_tail(log)}")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def raise_fd_limit() -> None:
    """Children inherit this: 1,000 open streams need ~3,000 descriptors in the gateway."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@contextlib.contextmanager
def process(argv: list[str], log: Path, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True,
        )
    try:
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


@dataclass
class Target:
    """Something to send chat completions to."""

    name: str
    port: int
    model: str
    auth: str | None
    pid: int | None  # the process whose tree's CPU and memory are measured
    path: str = "/v1/chat/completions"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}{self.path}"


@contextlib.contextmanager
def mock_upstream(workdir: Path, chunk_delay_ms: float = 0.0) -> Iterator[Target]:
    port = free_port()
    log = workdir / "mock.log"
    argv = [sys.executable, str(BENCH / "mock_upstream.py"), "--port", str(port),
            "--chunk-delay-ms", str(chunk_delay_ms)]
    with process(argv, log) as proc:
        wait_http(f"http://{HOST}:{port}/stats", proc, 15, log)
        yield Target("direct", port, "mock-model", None, proc.pid)


def mock_stats(mock: Target) -> dict[str, int]:
    return http_json(f"http://{HOST}:{mock.port}/stats")  # type: ignore[return-value]


def quota_config(mock_port: int, store: Path, port: int) -> str:
    return f"""
[server]
host = "127.0.0.1"
port = {port}

[store]
path = "{store}"

[billing]
overdraft = "cap"

[upstreams.mock]
base_url = "http://127.0.0.1:{mock_port}/v1"
timeout_s = 60
connect_timeout_s = 5

[routes."quota/fast"]
upstream = "mock"
model = "mock-model"
multiplier = 1
max_output_tokens = 256
description = "the benchmark's mock"

[routes."quota/double"]
upstream = "mock"
model = "mock-model"
multiplier = 2
max_output_tokens = 256
"""


def source_env(source: Path | None) -> dict[str, str] | None:
    """The environment that runs quota_proxy from another source tree (an A/B baseline)."""
    return None if source is None else {**os.environ, "PYTHONPATH": str(source)}


def cli(config: Path, *args: str, source: Path | None = None) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "quota_proxy", "--config", str(config), *args],
        capture_output=True, text=True, timeout=120, cwd=config.parent, env=source_env(source),
    )
    if result.returncode != 0:
        raise RuntimeError(f"quota-proxy {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def prepare_quota_proxy(workdir: Path, mock_port: int, store: Path | None = None,
                        source: Path | None = None) -> tuple[Path, str, int]:
    """Write the config, create the account and a live key. Returns (config, key, port).
    With source, the CLI of that source tree does it (its own schema)."""
    port = free_port()
    config = workdir / "quota-proxy.toml"
    store = store or workdir / "quota.db"
    config.write_text(quota_config(mock_port, store, port))
    if not _has_account(store):
        cli(config, "accounts", "create", "bench", "--quota-tokens", str(10**12), source=source)
    key = json.loads(cli(config, "keys", "create", "--account", "bench", "--kind", "live", "--json",
                         source=source))["key"]
    return config, key, port


def _has_account(store: Path) -> bool:
    if not store.exists():
        return False
    import sqlite3

    with contextlib.closing(sqlite3.connect(store)) as db:
        try:
            return db.execute("SELECT 1 FROM accounts WHERE name = 'bench'").fetchone() is not None
        except sqlite3.OperationalError:
            return False


@contextlib.contextmanager
def quota_proxy(config: Path, key: str, port: int, log: Path, log_level: str = "info",
                source: Path | None = None, name: str = "quota-proxy") -> Iterator[Target]:
    argv = [sys.executable, "-m", "quota_proxy", "--config", str(config), "serve",
            "--port", str(port), "--log-level", log_level]
    with process(argv, log, env=source_env(source), cwd=config.parent) as proc:
        wait_http(f"http://{HOST}:{port}/healthz", proc, 30, log)
        yield Target(name, port, "quota/fast", key, proc.pid)


def ensure_litellm(log: Path) -> Path:
    """LiteLLM proxy in its own venv (installed on first use from PyPI). Returns its `litellm`."""
    exe = LITELLM_VENV / "bin" / "litellm"
    if exe.exists():
        return exe
    print(f"installing {LITELLM_REQUIREMENT} into {LITELLM_VENV} (first use only) ...", flush=True)
    python = shutil.which("python3") or sys.executable
    with open(log, "ab") as out:
        subprocess.run([python, "-m", "venv", str(LITELLM_VENV)], check=True, stdout=out, stderr=out)
        subprocess.run([str(LITELLM_VENV / "bin" / "pip"), "install", "-q", LITELLM_REQUIREMENT],
                       check=True, stdout=out, stderr=out, timeout=1200)
    return exe


def litellm_version() -> str:
    try:
        out = subprocess.run([str(LITELLM_VENV / "bin" / "python"), "-c",
                              "import importlib.metadata as m; print(m.version('litellm'))"],
                             capture_output=True, text=True, timeout=60)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "not installed"


@contextlib.contextmanager
def litellm(workdir: Path, mock_port: int) -> Iterator[Target]:
    log = workdir / "litellm.log"
    exe = ensure_litellm(log)
    port = free_port()
    config = workdir / "litellm.yaml"
    config.write_text(f"""
model_list:
  - model_name: mock-model
    litellm_params:
      model: openai/mock-model
      api_base: http://127.0.0.1:{mock_port}/v1
      api_key: {MOCK_KEY}
litellm_settings:
  telemetry: false
  drop_params: false
general_settings:
  master_key: {LITELLM_MASTER_KEY}
""")
    env = {
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no network: use the bundled cost map
        "LITELLM_LOG": "ERROR",
        "LITELLM_TELEMETRY": "False",
        "DISABLE_SCHEMA_UPDATE": "True",
        "NO_DOCS": "True",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    env.pop("DATABASE_URL", None)
    argv = [str(exe), "--config", str(config), "--host", HOST, "--port", str(port), "--num_workers", "1"]
    with process(argv, log, env=env, cwd=workdir) as proc:
        wait_http(f"http://{HOST}:{port}/health/liveliness", proc, 180, log)
        yield Target("litellm", port, "mock-model", LITELLM_MASTER_KEY, proc.pid)


def held_connections(port: int) -> int:
    """Server-side TCP connections on `port` its process still holds: ESTABLISHED, or
    CLOSE_WAIT (the client has gone, the server has not yet answered and closed)."""
    local = f":{port:04X}"
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f, None)
            for line in f:
                fields = line.split()
                if fields[1].endswith(local) and fields[3] in ("01", "08"):
                    count += 1
    return count


def drain(mock: Target, target: Target, quiet_s: float = 0.15, max_s: float = 30.0) -> tuple[dict[str, int], float]:
    """The mock's counters once the target has gone quiet (no new upstream call of any API,
    no open delayed stream, (nearly) no CPU for quiet_s, and for the gateway no client
    connection still held): wrk stops with requests in flight, and a gateway waiting on its
    store (a PostgreSQL lock or stall) uses no CPU yet may forward them afterwards."""
    assert target.pid is not None
    gateway = target.pid != mock.pid
    t0 = time.monotonic()
    last = mock_stats(mock)
    cpu = procstat.cpu_seconds(target.pid)
    since = time.monotonic()
    while time.monotonic() - t0 < max_s:
        time.sleep(0.05)
        now = mock_stats(mock)
        cpu_now = procstat.cpu_seconds(target.pid)
        if now["calls"] != last["calls"] or now["open_streams"] or (gateway and held_connections(target.port)):
            last, cpu, since = now, cpu_now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            if (cpu_now - cpu) / (time.monotonic() - since) < 0.1:
                break
            cpu, since = cpu_now, time.monotonic()
    return last, time.monotonic() - t0
