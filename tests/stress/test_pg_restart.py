"""A PostgreSQL restart under load (issue 10): requests fail closed with 503
store_unavailable while the database is down, the gateway recovers by itself, and every
request that reached the upstream is settled exactly once — nothing forwarded unmetered.

The test runs its own PostgreSQL cluster (initdb + pg_ctl in a temporary folder), so that
restarting it disturbs nobody else's database.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import anyio
import asyncpg
import httpx
import pytest

from tests.stress.harness import (
    Checks,
    FakeUpstreamProcess,
    GatewayProcess,
    ProcessSet,
    Reply,
    RouteConf,
    UpstreamConf,
    chat_body,
    error_shape_ok,
    free_port,
    ledger_verify,
    new_key,
    send,
    write_config,
)

pytestmark = pytest.mark.anyio

PG_BIN = Path(os.environ.get("QUOTA_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
LOAD_S = 10.0
DOWN_AT_S = 3.0
DOWN_FOR_S = 2.0


class Cluster:
    """A private PostgreSQL cluster: initdb, start, stop, start again."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.data = folder / "data"
        self.port = free_port()
        # initdb refuses to run as root: run the server as the `postgres` user then.
        self.user = "postgres" if os.geteuid() == 0 else None

    def _run(self, *args: str) -> None:
        command = [str(PG_BIN / args[0]), *args[1:]]
        if self.user:
            command = ["runuser", "-u", self.user, "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    def init(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(self.folder, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.folder / "server.log"), "-w", "-o",
                  f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"


@pytest.fixture
def cluster(workdir: Path) -> Iterator[Cluster]:
    if not (PG_BIN / "initdb").exists():
        message = f"no PostgreSQL server binaries in {PG_BIN} (set QUOTA_TEST_PG_BIN)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root without runuser: initdb cannot run")
    folder = Path(f"/tmp/qp-pg-{os.getpid()}-{free_port()}")
    running = Cluster(folder)
    running.init()
    running.start()
    try:
        yield running
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            running.stop()
        shutil.rmtree(folder, ignore_errors=True)


async def test_a_database_restart_fails_closed_and_recovers(
    procs: ProcessSet, workdir: Path, cluster: Cluster
) -> None:
    checks = Checks("pg_restart_under_load")
    fake = procs.add(FakeUpstreamProcess(workdir)).start()
    port = free_port()
    config = write_config(
        workdir / "quota-proxy.toml", store=workdir / "unused.db", port=port, store_url=cluster.url,
        upstreams=[UpstreamConf("fake", fake.base_url)], routes=[RouteConf("pg/x1", "fake", 1)],
        billing={"hold_ttl_s": 10},
    )
    gateway = GatewayProcess(workdir, config, port, workers=2)
    gateway.cli("accounts", "create", "acme", "--quota-tokens", str(10**9))
    key = new_key(gateway, "acme", "live", "load")
    procs.add(gateway).start()

    replies: list[tuple[float, Reply]] = []
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as client:

        async def load(i: int) -> None:
            while time.monotonic() - started < LOAD_S:
                stream = i % 2 == 0
                body = chat_body("alpha beta", model="pg/x1", stream=stream, max_tokens=8,
                                 fake={"chunk_delay_s": 0.05} if stream else None)
                reply = await send(client, "POST", "/v1/chat/completions", key=key, body=body, stream=stream)
                replies.append((time.monotonic() - started, reply))
                if reply.status != 200:
                    await anyio.sleep(0.05)

        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(load, i)
            await anyio.sleep(DOWN_AT_S)
            await anyio.to_thread.run_sync(cluster.stop)
            down = await send(client, "GET", "/readyz")
            await anyio.sleep(DOWN_FOR_S)
            await anyio.to_thread.run_sync(cluster.start)

    statuses = Counter(r.status for _, r in replies)
    checks.expect("every reply is 200 or 503", set(statuses) <= {200, 503}, dict(statuses))
    checks.expect("the outage was seen", statuses[503] > 0, dict(statuses))
    for _, r in replies:
        if r.status == 503:
            checks.expect("503s are store_unavailable JSON",
                          error_shape_ok(r) and r.json()["error"]["code"] == "store_unavailable", r.body[:200])
    checks.expect("/readyz said so while it was down", down.status == 503, down.status)
    late = [r.status for t, r in replies if t > DOWN_AT_S + DOWN_FOR_S + 3]
    checks.expect("recovered by itself", late and all(s == 200 for s in late), Counter(late))

    # Let the keeper write any settlement that waited for the database, then count.
    conn = None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        conn = await asyncpg.connect(cluster.url)
        holds = await conn.fetchval("SELECT count(*) FROM holds")
        settled = await conn.fetchval("SELECT count(*) FROM requests")
        await conn.close()
        forwarded = httpx.get(f"{fake.url}/_fake/stats").json().get("requests", 0)
        if holds == 0 and settled == forwarded:
            break
        await anyio.sleep(1)
    checks.expect("no hold left", holds == 0, holds)
    checks.expect("every forwarded request settled once", settled == forwarded, (settled, forwarded))
    checks.expect("every answered request was forwarded", forwarded >= statuses[200], (forwarded, statuses[200]))
    code, data = ledger_verify(gateway)
    checks.expect("ledger verify passes", code == 0, data)
    checks.finish({"statuses": dict(statuses), "forwarded": forwarded, "settled": settled})
