"""The stress suite's machinery: real processes in their own process groups, free ports on
127.0.0.1, a real SQLite file read back read-only, and one JSON results file per scenario.

Form: ``QUOTA_STRESS=full`` runs the release-check counts; anything else (the default,
``reduced``) runs the CI counts. ``scale(reduced, full)`` picks between them.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

MODE = (os.environ.get("QUOTA_STRESS") or "reduced").strip().lower()
FULL = MODE == "full"
RESULTS = Path(__file__).resolve().parent / "results"
PYTHON = sys.executable
KEEPER_INTERVAL_S = 5.0  # quota_proxy.app.MAINTENANCE_INTERVAL_S: how often holds are refreshed/released


def scale(reduced: int, full: int) -> int:
    return full if FULL else reduced


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- results -------------------------------------------------------------------------


class Checks:
    """Invariants of one scenario: every one is evaluated and reported, then all asserted."""

    def __init__(self, scenario: str) -> None:
        self.scenario = scenario
        self.results: dict[str, bool] = {}
        self.violations: dict[str, list[Any]] = {}  # name -> [count, first detail]
        self.started = time.monotonic()

    def expect(self, name: str, ok: bool, detail: Any = "") -> bool:
        ok = bool(ok)
        self.results[name] = self.results.get(name, True) and ok
        if not ok:
            self.violations.setdefault(name, [0, detail])[0] += 1
        return ok

    @property
    def failures(self) -> list[str]:
        return [f"{name} ({n}x), first: {detail}" for name, (n, detail) in self.violations.items()]

    def finish(self, figures: dict[str, Any]) -> None:
        """Print the figures, write them to tests/stress/results/<form>/<scenario>.json, assert."""
        doc = {
            "scenario": self.scenario,
            "mode": MODE,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "duration_s": round(time.monotonic() - self.started, 1),
            "figures": figures,
            "invariants": {k: ("ok" if v else f"VIOLATED {self.violations[k][0]}x") for k, v in self.results.items()},
            "failures": self.failures[:50],
        }
        folder = RESULTS / MODE
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{self.scenario}.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
        print(f"\n[stress:{self.scenario}] {MODE} form, {doc['duration_s']} s")
        print(json.dumps({"figures": figures, "invariants": doc["invariants"]}, indent=1, default=str))
        assert not self.failures, f"{self.scenario}: invariants violated:\n" + "\n".join(self.failures[:30])


def latency_figures(samples_s: Sequence[float]) -> dict[str, float]:
    if not samples_s:
        return {"n": 0}
    ms = sorted(s * 1000 for s in samples_s)
    return {
        "n": len(ms),
        "p50_ms": round(statistics.median(ms), 2),
        "p95_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.95))], 2),
        "max_ms": round(ms[-1], 2),
    }


# -- config --------------------------------------------------------------------------


@dataclass
class UpstreamConf:
    name: str
    base_url: str
    timeout_s: float = 30
    connect_timeout_s: float = 2
    api_key_env: str | None = None


@dataclass
class RouteConf:
    alias: str
    upstream: str
    multiplier: float | int = 1
    max_output_tokens: int = 64
    stream: bool = True
    model: str = "fake-chat"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return str(value)


def write_config(
    path: Path,
    *,
    store: Path,
    port: int,
    upstreams: Iterable[UpstreamConf],
    routes: Iterable[RouteConf],
    billing: dict[str, Any] | None = None,
    server: dict[str, Any] | None = None,
    store_url: str | None = None,
) -> Path:
    lines = ["[server]", 'host = "127.0.0.1"', f"port = {port}"]
    lines += [f"{k} = {_toml(v)}" for k, v in (server or {}).items()]
    store_line = f"url = {_toml(store_url)}\npool_size = 4" if store_url else f"path = {_toml(str(store))}"
    # The checks read the store the moment an answer arrives: groups commit at once.
    lines += ["[store]", store_line, "settle_delay_ms = 0", "[billing]"]
    lines += [f"{k} = {_toml(v)}" for k, v in (billing or {}).items()]
    for up in upstreams:
        lines += [f"[upstreams.{up.name}]", f"base_url = {_toml(up.base_url)}",
                  f"timeout_s = {up.timeout_s}", f"connect_timeout_s = {up.connect_timeout_s}"]
        if up.api_key_env:
            lines.append(f"api_key_env = {_toml(up.api_key_env)}")
    for r in routes:
        lines += [f"[routes.{_toml(r.alias)}]", f"upstream = {_toml(r.upstream)}", f"model = {_toml(r.model)}",
                  f"multiplier = {r.multiplier}", f"max_output_tokens = {r.max_output_tokens}",
                  f"stream = {_toml(r.stream)}"]
    path.write_text("\n".join(lines) + "\n")
    return path


# -- processes -----------------------------------------------------------------------


def group_pids(pgid: int) -> list[int]:
    """Every live process in a process group (from /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        # fields[0] is the state, [2] the process group; zombies hold no memory or fds
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry))
    return sorted(pids)


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


class Process:
    """A child in its own session (so its whole group can be signalled), output to files."""

    def __init__(self, name: str, args: list[str], workdir: Path, env: dict[str, str] | None = None,
                 nofile: int | None = None) -> None:
        self.nofile = nofile  # a soft RLIMIT_NOFILE for the child, as a service manager would set
        self.name = name
        self.args = args
        self.workdir = workdir
        self.env = {**os.environ, **(env or {})}
        self.out_path = workdir / f"{name}.out.log"
        self.err_path = workdir / f"{name}.err.log"
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        assert self.popen is None or self.popen.poll() is not None, "already running"
        with open(self.out_path, "ab") as out, open(self.err_path, "ab") as err:
            self.popen = subprocess.Popen(
                self.args, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                cwd=self.workdir, env=self.env, start_new_session=True,
                preexec_fn=self._limit_fds if self.nofile else None,
            )
        return self

    def _limit_fds(self) -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(self.nofile or hard, hard), hard))

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def pids(self) -> list[int]:
        return group_pids(self.pid) if self.popen is not None else []

    def rss(self) -> int:
        return sum(rss_bytes(p) for p in self.pids())

    def fds(self) -> int:
        return sum(fd_count(p) for p in self.pids())

    def signal_group(self, sig: int) -> None:
        if self.popen is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    def wait(self, timeout: float) -> int | None:
        assert self.popen is not None
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM the group, SIGKILL whatever is left after timeout; always reaps."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.signal_group(signal.SIGTERM)
            if self.wait(timeout) is None:
                self.signal_group(signal.SIGKILL)
                self.popen.wait(10)
        self.signal_group(signal.SIGKILL)  # orphans of the group, if any

    def kill(self) -> None:
        self.signal_group(signal.SIGKILL)
        if self.popen is not None:
            self.popen.wait(10)

    def stderr_text(self) -> str:
        try:
            return self.err_path.read_text(errors="replace")
        except OSError:
            return ""


def wait_http(url: str, timeout: float, proc: Process | None = None) -> float:
    """Poll url until it answers 200; returns the seconds waited."""
    started = time.monotonic()
    deadline = started + timeout
    with httpx.Client(timeout=2) as client:
        while time.monotonic() < deadline:
            if proc is not None and not proc.running():
                raise RuntimeError(f"{proc.name} exited ({proc.popen and proc.popen.returncode}): "
                                   f"{proc.stderr_text()[-2000:]}")
            try:
                if client.get(url).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


class FakeUpstreamProcess(Process):
    """`python -m quota_proxy.testing` on a free port."""

    def __init__(self, workdir: Path, name: str = "fake", *, api_key_env: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        args = [PYTHON, "-m", "quota_proxy.testing", "--host", "127.0.0.1", "--port", str(self.port)]
        if api_key_env:
            args += ["--api-key-env", api_key_env]
        super().__init__(name, args, workdir, env)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def start(self) -> FakeUpstreamProcess:
        super().start()
        wait_http(f"{self.url}/_fake/stats", 30, self)
        return self


class GatewayProcess(Process):
    """`quota-proxy serve --workers N` on one config (and so one SQLite file)."""

    def __init__(self, workdir: Path, config: Path, port: int, *, workers: int = 2,
                 env: dict[str, str] | None = None, name: str = "gateway", nofile: int | None = None) -> None:
        self.config = config
        self.port = port
        self.workers = workers
        args = [PYTHON, "-m", "quota_proxy", "--config", str(config), "serve",
                "--workers", str(workers), "--port", str(port)]
        super().__init__(name, args, workdir, env, nofile)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> GatewayProcess:
        super().start()
        self.ready_after_s = wait_http(f"{self.url}/readyz", timeout, self)
        return self

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [PYTHON, "-m", "quota_proxy", "--config", str(self.config), *args],
            capture_output=True, text=True, timeout=120, env=self.env, cwd=self.workdir,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"quota-proxy {' '.join(args)} exited {result.returncode}: {result.stderr}")
        return result

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def worker_pids(self) -> list[int]:
        """The processes that serve requests: the workers when there are several, else the one."""
        pids = [p for p in self.pids() if p != self.pid and _is_worker(p)]
        return pids or [self.pid]


def _is_worker(pid: int) -> bool:
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


class ProcessSet:
    """Every process a test started; stopped (then killed) at teardown, whatever happened."""

    def __init__(self) -> None:
        self.procs: list[Process] = []

    def add(self, proc: Process) -> Any:
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            try:
                proc.stop(timeout=5)
            except Exception:  # teardown must reach every process
                proc.signal_group(signal.SIGKILL)


# -- the store, read back ------------------------------------------------------------


def query(db: Path, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Read the SQLite file read-only with the stdlib driver (the gateway may be running)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute(sql, tuple(params)).fetchall()
    finally:
        con.close()


def balances(db: Path) -> dict[int, tuple[int, int]]:
    """account id -> (balance, held)."""
    return {r[0]: (r[1], r[2]) for r in query(db, "SELECT id, balance, held FROM accounts")}


def books(db: Path) -> tuple[Any, ...]:
    """What a refused request must leave alone: ledger, balances, holds, users, keys, idempotency."""
    return (
        query(db, "SELECT count(*), coalesce(sum(amount), 0), coalesce(max(id), 0) FROM ledger"),
        query(db, "SELECT id, kind, name, parent_id, billing_mode, balance, held FROM accounts ORDER BY id"),
        query(db, "SELECT count(*) FROM requests"),
        query(db, "SELECT count(*) FROM holds"),
        query(db, "SELECT count(*) FROM idempotency"),
        query(db, "SELECT id, revoked_at FROM api_keys ORDER BY id"),
    )


# -- HTTP helpers --------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    request_id: str | None
    body: bytes
    elapsed_s: float
    headers: dict[str, str] = field(default_factory=dict)
    error: str | None = None  # a transport error instead of a reply

    def json(self) -> Any:
        return json.loads(self.body)

    def events(self) -> list[str]:
        """The data payloads of an SSE body."""
        out = []
        for block in self.body.decode("utf-8", "replace").replace("\r\n", "\n").split("\n\n"):
            data = [line[5:].lstrip(" ") for line in block.split("\n") if line.startswith("data:")]
            if data:
                out.append("\n".join(data))
        return out


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def send(client: httpx.AsyncClient, method: str, path: str, *, key: str | None = None,
               body: Any = None, stream: bool = False, headers: dict[str, str] | None = None) -> Reply:
    """One request; a streamed body is read to its end. Transport errors become Reply.error."""
    hdrs = {**(auth(key) if key else {}), **(headers or {})}
    started = time.perf_counter()
    try:
        if stream:
            async with client.stream(method, path, json=body, headers=hdrs) as r:
                chunks = [c async for c in r.aiter_raw()]
                return Reply(r.status_code, r.headers.get("x-quota-request-id"), b"".join(chunks),
                             time.perf_counter() - started, dict(r.headers))
        r = await client.request(method, path, json=body, headers=hdrs)
        return Reply(r.status_code, r.headers.get("x-quota-request-id"), r.content,
                     time.perf_counter() - started, dict(r.headers))
    except httpx.HTTPError as exc:
        return Reply(0, None, b"", time.perf_counter() - started, error=f"{type(exc).__name__}: {exc}")


def error_shape_ok(reply: Reply) -> bool:
    """SPEC §3: {"error": {"code", "message", "type"}} as JSON, never HTML or a traceback."""
    if not reply.headers.get("content-type", "").startswith("application/json"):
        return False
    try:
        body = reply.json()
    except ValueError:
        return False
    error = body.get("error") if isinstance(body, dict) else None
    return (
        isinstance(error, dict)
        and isinstance(error.get("code"), str)
        and isinstance(error.get("message"), str)
        and isinstance(error.get("type"), str)
        and b"Traceback" not in reply.body
    )


def chat_body(content: str, *, model: str, stream: bool = False, max_tokens: int | None = None,
              fake: dict[str, Any] | None = None, include_usage: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": content}]}
    if stream:
        body["stream"] = True
        if include_usage:
            body["stream_options"] = {"include_usage": True}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if fake:
        body["fake"] = fake
    return body


# -- a standard set-up ---------------------------------------------------------------


def usd(quota_tokens: int) -> str:
    """Quota tokens as the exact dollar string the CLI and the Funding API take (1e6 per $)."""
    whole, frac = divmod(quota_tokens, 1_000_000)
    return f"{whole}.{frac:06d}"


def start_gateway(
    procs: ProcessSet,
    workdir: Path,
    *,
    upstreams: Iterable[UpstreamConf],
    routes: Iterable[RouteConf],
    workers: int = 2,
    billing: dict[str, Any] | None = None,
    server: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    accounts: Sequence[tuple[str, int]] = (),
    nofile: int | None = None,
) -> GatewayProcess:
    """Write the config, create the accounts through the CLI (before serving), start serve."""
    port = free_port()
    config = write_config(workdir / "quota-proxy.toml", store=workdir / "quota.db", port=port,
                          upstreams=upstreams, routes=routes, billing=billing, server=server)
    gateway = GatewayProcess(workdir, config, port, workers=workers, env=env, nofile=nofile)
    for name, quota_tokens in accounts:
        gateway.cli("accounts", "create", name, "--quota-tokens", str(quota_tokens))
    procs.add(gateway).start()
    return gateway


def new_key(gateway: GatewayProcess, account: str, kind: str, name: str = "") -> str:
    data = gateway.cli_json("keys", "create", "--account", account, "--kind", kind, "--name", name)
    return str(data["key"])


def ledger_verify(gateway: GatewayProcess) -> tuple[int, Any]:
    result = gateway.cli("ledger", "verify", "--json", check=False)
    try:
        data = json.loads(result.stdout)
    except ValueError:
        data = result.stdout + result.stderr
    return result.returncode, data
