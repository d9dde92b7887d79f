"""Operations: metrics, access log, overhead header, per-key limits, fallback upstreams,
backup under load, SIGHUP reload and SIGTERM drain with a live stream."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from quota_proxy.config import StoreSettings
from quota_proxy.logs import JsonFormatter, TextFormatter
from quota_proxy.runner import run_server
from quota_proxy.store import open_store
from quota_proxy.testing import run_fake_upstream
from tests.conftest import GatewayHarness, closed_port, config_toml

pytestmark = pytest.mark.anyio

MESSAGES = [{"role": "user", "content": "the secret prompt text zebra"}]


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "quota/fast", "messages": MESSAGES, **extra}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


async def funded(gateway: GatewayHarness, **key_options: Any) -> tuple[str, dict[str, str]]:
    await gateway.account("acme", 1_000_000)
    key = await gateway.key("acme", **key_options)
    return key, {"authorization": f"Bearer {key}"}


async def test_metrics_move_with_requests(gateway: GatewayHarness) -> None:
    _, auth = await funded(gateway)
    http = gateway.http()
    before = samples((await http.get("/metrics")).text)
    ok = await http.post("/v1/chat/completions", json=chat(), headers=auth)
    usage = ok.json()["usage"]
    refused = await http.post(
        "/v1/chat/completions", json=chat(model="quota/down"), headers=auth
    )
    assert refused.status_code == 502
    await http.get("/v1/me", headers=auth)  # a read: this process's settlement groups commit first
    response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    after = samples(response.text)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("quota_requests_total", route="quota/fast", status="200") == 1
    assert delta("quota_requests_total", route="quota/down", status="502") == 1
    assert delta("quota_tokens_total", route="quota/fast", direction="input") == usage["input_tokens"]
    assert delta("quota_tokens_total", route="quota/fast", direction="output") == usage["output_tokens"]
    assert delta("quota_charged_quota_tokens_total", route="quota/fast") == usage["charged_quota_tokens"]
    assert delta("quota_upstream_errors_total", route="quota/down", upstream="down", kind="ConnectFailed") == 1
    assert delta("quota_request_duration_seconds_count", route="quota/fast") == 1
    assert delta("quota_upstream_duration_seconds_count", route="quota/fast", upstream="fake") == 1
    assert delta("quota_store_duration_seconds_count", op="hold") >= 1
    # both requests were settled (the 502 charged nothing), in one group or two
    assert delta("quota_settlement_group_size_sum") == 2
    assert 1 <= delta("quota_settlement_commit_seconds_count") == delta("quota_settlement_group_size_count") <= 2
    assert after[("quota_holds_open", ())] == 0


async def test_metrics_count_402_and_stream_first_byte(gateway: GatewayHarness) -> None:
    await gateway.account("poor", 1)
    key = await gateway.key("poor")
    http = gateway.http()
    auth = {"authorization": f"Bearer {key}"}
    assert (await http.post("/v1/chat/completions", json=chat(), headers=auth)).status_code == 402
    await gateway.account("acme", 100_000)
    rich = {"authorization": f"Bearer {await gateway.key('acme')}"}
    streamed = await http.post("/v1/chat/completions", json=chat(stream=True), headers=rich)
    assert streamed.status_code == 200
    found = samples((await http.get("/metrics")).text)
    assert found[("quota_insufficient_balance_total", (("route", "quota/fast"),))] == 1
    assert found[("quota_stream_first_byte_seconds_count", (("route", "quota/fast"),))] == 1


async def test_metrics_token_guards_the_endpoint(
    make_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QP_TEST_METRICS_TOKEN", "s3cret-metrics")
    gateway = await make_gateway(server={"metrics_token_env": "QP_TEST_METRICS_TOKEN"})
    http = gateway.http()
    refused = await http.get("/metrics")
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_api_key"
    wrong = await http.get("/metrics", headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401
    allowed = await http.get("/metrics", headers={"authorization": "Bearer s3cret-metrics"})
    assert allowed.status_code == 200
    assert "quota_requests_total" in allowed.text or "quota_requests" in allowed.text


async def test_access_log_lines_are_json_with_the_fields_and_no_secret(
    gateway: GatewayHarness, caplog: pytest.LogCaptureFixture
) -> None:
    key, auth = await funded(gateway)
    http = gateway.http()
    with caplog.at_level(logging.INFO, logger="quota_proxy"):
        response = await http.post("/v1/chat/completions", json=chat(), headers=auth)
        await http.post("/v1/chat/completions", json=chat(stream=True), headers=auth)
        await http.get("/v1/models", headers={"authorization": "Bearer qta_live_" + "x" * 32})
    records = [r for r in caplog.records if r.name == "quota_proxy.access"]
    assert len(records) == 3
    json_lines = [JsonFormatter().format(r) for r in records]
    text_lines = [TextFormatter().format(r) for r in records]
    first = orjson.loads(json_lines[0])
    usage = response.json()["usage"]
    assert first["request_id"] == response.headers["x-quota-request-id"]
    assert first["key_prefix"] == key[:13]
    assert first["account"] == "acme"
    assert first["route"] == "quota/fast"
    assert first["upstream"] == "fake"
    assert first["status"] == 200
    assert first["input_tokens"] == usage["input_tokens"]
    assert first["output_tokens"] == usage["output_tokens"]
    assert first["charged"] == usage["charged_quota_tokens"]
    for field in ("latency_ms", "upstream_ms", "overhead_ms", "hold_ms", "settle_ms"):
        assert isinstance(first[field], float) and first[field] >= 0, field
    assert orjson.loads(json_lines[2])["status"] == 401
    for line in json_lines + text_lines:
        assert key not in line
        assert key[13:] not in line
        assert "zebra" not in line
        assert "hello world" not in line  # the fake's completion text
    assert "quota/fast" in text_lines[0] and " 200 " in text_lines[0]


async def test_overhead_header_is_the_gateways_share(gateway: GatewayHarness) -> None:
    _, auth = await funded(gateway)
    http = gateway.http()
    slow = await http.post(
        "/v1/chat/completions", json=chat(fake={"first_byte_delay_s": 0.3}), headers=auth
    )
    overhead = float(slow.headers["x-quota-overhead-ms"])
    assert 0 <= overhead < 250, "the upstream's 300 ms must not count as overhead"
    error = await http.get("/v1/nothing")
    assert float(error.headers["x-quota-overhead-ms"]) >= 0


async def test_requests_per_minute_limit_gives_429_with_retry_after(gateway: GatewayHarness) -> None:
    _, auth = await funded(gateway, rpm=2)
    http = gateway.http()
    statuses = [
        (await http.post("/v1/chat/completions", json=chat(), headers=auth)).status_code
        for _ in range(2)
    ]
    assert statuses == [200, 200]
    limited = await http.post("/v1/chat/completions", json=chat(), headers=auth)
    assert limited.status_code == 429
    assert limited.json()["error"]["code"] == "rate_limited"
    assert limited.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    assert len(gateway.upstream.app.requests) == 2
    await gateway.verify()


async def test_tokens_per_minute_limit(gateway: GatewayHarness) -> None:
    _, auth = await funded(gateway, tpm=10)
    http = gateway.http()
    first = await http.post("/v1/chat/completions", json=chat(), headers=auth)
    assert first.status_code == 200
    assert first.json()["usage"]["total_tokens"] > 10
    second = await http.post("/v1/chat/completions", json=chat(), headers=auth)
    assert second.status_code == 429
    assert "retry-after" in second.headers


async def test_route_default_limits_apply_unless_the_key_sets_its_own(make_gateway: Any) -> None:
    extra = '[routes."quota/limited"]\nupstream = "fake"\nmodel = "m"\nmax_output_tokens = 16\nrpm = 1\n'
    gateway = await make_gateway(routes=extra)
    await gateway.account("acme", 1_000_000)
    default_key = await gateway.key("acme")
    own_key = await gateway.key("acme", rpm=5)
    http = gateway.http()
    body = {"model": "quota/limited", "messages": MESSAGES}
    default_auth = {"authorization": f"Bearer {default_key}"}
    own_auth = {"authorization": f"Bearer {own_key}"}
    assert (await http.post("/v1/chat/completions", json=body, headers=default_auth)).status_code == 200
    assert (await http.post("/v1/chat/completions", json=body, headers=default_auth)).status_code == 429
    for _ in range(3):
        assert (await http.post("/v1/chat/completions", json=body, headers=own_auth)).status_code == 200


async def test_concurrency_limit_counts_requests_in_flight(gateway: GatewayHarness) -> None:
    _, auth = await funded(gateway, max_concurrent=1)
    http = gateway.http()
    slow = chat(stream=True, fake={"chunk_delay_s": 0.1, "reply_words": 6})
    async with http.stream("POST", "/v1/chat/completions", json=slow, headers=auth) as stream:
        assert stream.status_code == 200
        second = await http.post("/v1/chat/completions", json=chat(), headers=auth)
        assert second.status_code == 429
        assert second.headers["retry-after"] == "1"
        await stream.aread()
    third = await http.post("/v1/chat/completions", json=chat(), headers=auth)
    assert third.status_code == 200
    await gateway.verify()


async def test_limits_count_a_finished_request_as_finished_while_its_settlement_waits(make_gateway: Any) -> None:
    """Settlements wait for a quiet moment (here up to a minute) before they commit; a key
    with a concurrency or tokens-per-minute limit commits them first, so the answer it
    already has is neither in flight nor missing from its minute."""
    gateway = await make_gateway(store={"settle_delay_ms": 60_000})
    http = gateway.http()
    _, one_at_a_time = await funded(gateway, max_concurrent=1)
    for _ in range(3):
        assert (await http.post("/v1/chat/completions", json=chat(), headers=one_at_a_time)).status_code == 200
    key = await gateway.key("acme", tpm=10)
    by_tokens = {"authorization": f"Bearer {key}"}
    assert (await http.post("/v1/chat/completions", json=chat(), headers=by_tokens)).status_code == 200
    assert (await http.post("/v1/chat/completions", json=chat(), headers=by_tokens)).status_code == 429
    await gateway.verify()


async def test_a_refusal_commits_the_pending_settlements_before_it_counts(make_gateway: Any) -> None:
    """An answered request's hold stays until its settlement group commits (here up to a
    minute): a hold that does not fit commits the pending group and asks again, so a balance
    that covers the next request once the earlier ones are charged is not refused for their
    holds, in refuse mode (no cap to lower) too."""
    gateway = await make_gateway(
        store={"settle_delay_ms": 60_000, "settle_gather_ms": 60_000}, billing={"overdraft": "refuse"}
    )
    http = gateway.http()
    _, auth = await funded(gateway)
    assert (await http.post("/v1/chat/completions", json=chat(), headers=auth)).status_code == 200
    with sqlite3.connect(gateway.settings.store.path) as raw:
        ((hold,),) = raw.execute("SELECT amount FROM holds").fetchall()  # still pending
    await gateway.account("tight", 2 * hold + hold // 2)  # three holds do not fit, three charges do
    tight = {"authorization": f"Bearer {await gateway.key('tight')}"}
    answers = [await http.post("/v1/chat/completions", json=chat(), headers=tight) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    charged = sum(int(a.json()["usage"]["charged_quota_tokens"]) for a in answers)
    tight_account = await gateway.store.account_by_name("tight")
    assert tight_account is not None
    assert await gateway.store.available(tight_account.id) == 2 * hold + hold // 2 - charged
    await gateway.verify()


async def test_fallback_to_the_second_upstream_when_the_first_refuses(
    make_gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    extra = (
        '[routes."quota/ha"]\nupstreams = ["down", "fake"]\nmodel = "m"\nmultiplier = 1\n'
        "max_output_tokens = 16\n"
    )
    gateway = await make_gateway(routes=extra)
    await gateway.account("acme", 1_000_000)
    auth = {"authorization": f"Bearer {await gateway.key('acme')}"}
    http = gateway.http()
    with caplog.at_level(logging.WARNING, logger="quota_proxy.upstream"):
        response = await http.post(
            "/v1/chat/completions", json={"model": "quota/ha", "messages": MESSAGES}, headers=auth
        )
    assert response.status_code == 200
    assert len(gateway.upstream.app.requests) == 1
    assert any("upstream down" in r.getMessage() for r in caplog.records)
    # Cooled down: the next request goes straight to the healthy upstream.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="quota_proxy.upstream"):
        again = await http.post(
            "/v1/chat/completions", json={"model": "quota/ha", "messages": MESSAGES}, headers=auth
        )
    assert again.status_code == 200
    assert not caplog.records
    # Charged once, from the attempt that answered.
    await gateway.settled()
    rows = sqlite3.connect(gateway.settings.store.path).execute(
        "SELECT count(*), sum(charged) FROM requests WHERE route = 'quota/ha'"
    ).fetchone()
    assert rows[0] == 2 and rows[1] == 2 * response.json()["usage"]["charged_quota_tokens"]
    await gateway.verify()


async def _always_500(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 500, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"error": {"message": "boom"}}'})


async def test_fallback_on_5xx_and_none_after_the_first_byte(make_gateway: Any) -> None:
    async with run_server(_always_500) as broken, run_fake_upstream() as second:
        extra = (
            f'[upstreams.broken]\nbase_url = "{broken.url}/v1"\n'
            f'[upstreams.second]\nbase_url = "{second.base_url}"\n'
            '[routes."quota/ha"]\nupstreams = ["broken", "fake"]\nmodel = "m"\nmax_output_tokens = 16\n'
            '[routes."quota/pair"]\nupstreams = ["fake", "second"]\nmodel = "m"\nmax_output_tokens = 16\n'
        )
        gateway = await make_gateway(routes=extra)
        await gateway.account("acme", 1_000_000)
        auth = {"authorization": f"Bearer {await gateway.key('acme')}"}
        http = gateway.http()
        ok = await http.post(
            "/v1/chat/completions", json={"model": "quota/ha", "messages": MESSAGES}, headers=auth
        )
        assert ok.status_code == 200
        # The first upstream breaks after its first bytes: no retry on the second.
        broken_stream = await http.post(
            "/v1/chat/completions",
            json={"model": "quota/pair", "messages": MESSAGES, "stream": True,
                  "fake": {"fail": "reset_mid_stream"}},
            headers=auth,
        )
        assert broken_stream.status_code == 200
        assert b'"error"' in broken_stream.content
        assert len(second.app.requests) == 0
        await gateway.verify()


async def test_backup_taken_under_load_restores_to_a_store_that_verifies(
    gateway: GatewayHarness, tmp_path: Path
) -> None:
    _, auth = await funded(gateway)
    http = gateway.http()
    backup_path = tmp_path / "backup.db"
    statuses: list[int] = []

    async def one() -> None:
        body = chat(stream=True, fake={"chunk_delay_s": 0.01})
        statuses.append((await http.post("/v1/chat/completions", json=body, headers=auth)).status_code)

    async with anyio.create_task_group() as tg:
        for _ in range(30):
            tg.start_soon(one)
        await anyio.sleep(0.05)
        result = await anyio.to_thread.run_sync(
            lambda: gateway.cli("backup", str(backup_path), "--json")
        )
    assert statuses == [200] * 30
    assert orjson.loads(result.stdout)["bytes"] > 0
    conn = sqlite3.connect(backup_path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    async with open_store(StoreSettings(path=backup_path)) as restored:
        problems = await restored.verify_ledger()
        # Holds in flight when the copy was taken are still in it; their accounting must agree.
        assert problems == []


# -- signals: a real `quota-proxy serve` process -------------------------------------------


def _serve(config: Path, port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "quota_proxy", "serve", "--config", str(config), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


async def _wait_ready(url: str, proc: subprocess.Popen[str]) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(200):
            if proc.poll() is not None:
                raise AssertionError(f"serve exited: {proc.stderr.read() if proc.stderr else ''}")
            try:
                if (await client.get(f"{url}/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await anyio.sleep(0.05)
    raise AssertionError("serve did not become ready")


def _stop(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=10)
    return err


def _setup_store(config: Path) -> str:
    from tests.conftest import run_cli

    run_cli("--config", str(config), "accounts", "create", "acme", "--quota-tokens", "1000000")
    created = run_cli("--config", str(config), "keys", "create", "--account", "acme", "--kind", "live", "--json")
    return str(orjson.loads(created.stdout)["key"])


async def test_sighup_reloads_routes_and_refuses_a_bad_file_with_a_stream_open(tmp_path: Path) -> None:
    async with run_fake_upstream() as upstream:
        config = tmp_path / "q.toml"
        original = config_toml(upstream.base_url, tmp_path / "q.db")
        config.write_text(original)
        key = _setup_store(config)
        port = closed_port()
        url = f"http://127.0.0.1:{port}"
        proc = _serve(config, port)
        try:
            await _wait_ready(url, proc)
            auth = {"authorization": f"Bearer {key}"}
            async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                body = chat(stream=True, fake={"chunk_delay_s": 0.1, "reply_words": 15})
                async with http.stream("POST", "/v1/chat/completions", json=body, headers=auth) as live:
                    chunks = live.aiter_bytes()
                    await chunks.__anext__()
                    config.write_text(
                        original + '[routes."quota/new"]\nupstream = "fake"\nmodel = "m"\n'
                    )
                    os.kill(proc.pid, signal.SIGHUP)
                    for _ in range(100):
                        models = (await http.get("/v1/models", headers=auth)).json()["data"]
                        if "quota/new" in {m["id"] for m in models}:
                            break
                        await anyio.sleep(0.05)
                    else:
                        raise AssertionError("the new route never appeared")
                    rest = b"".join([chunk async for chunk in chunks])
                assert rest.endswith(b"data: [DONE]\n\n")
                config.write_text(original.replace("multiplier = 3", "multiplier = 0"))
                os.kill(proc.pid, signal.SIGHUP)
                await anyio.sleep(0.5)
                assert proc.poll() is None
                kept = await http.post(
                    "/v1/chat/completions", json={"model": "quota/new", "messages": MESSAGES}, headers=auth
                )
                assert kept.status_code == 200
        finally:
            err = _stop(proc)
        assert "reload refused" in err and "multiplier: must be > 0" in err
        assert key not in err


async def test_sigterm_drains_streams_in_flight_and_settles_them(tmp_path: Path) -> None:
    async with run_fake_upstream() as upstream:
        config = tmp_path / "q.toml"
        config.write_text(config_toml(upstream.base_url, tmp_path / "q.db"))
        key = _setup_store(config)
        port = closed_port()
        url = f"http://127.0.0.1:{port}"
        proc = _serve(config, port)
        try:
            await _wait_ready(url, proc)
            auth = {"authorization": f"Bearer {key}"}
            async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                body = chat(stream=True, fake={"chunk_delay_s": 0.1, "reply_words": 15})
                async with http.stream("POST", "/v1/chat/completions", json=body, headers=auth) as live:
                    chunks = live.aiter_bytes()
                    await chunks.__anext__()
                    os.kill(proc.pid, signal.SIGTERM)
                    await anyio.sleep(0.3)
                    with pytest.raises(httpx.TransportError):
                        async with httpx.AsyncClient(timeout=2) as fresh:
                            await fresh.get(f"{url}/healthz")
                    rest = b"".join([chunk async for chunk in chunks])
                assert rest.endswith(b"data: [DONE]\n\n")
            # uvicorn re-raises the signal once it has drained, so the exit is "by SIGTERM".
            assert proc.wait(timeout=20) in (0, -signal.SIGTERM)
        finally:
            _stop(proc)
        conn = sqlite3.connect(tmp_path / "q.db")
        assert conn.execute("SELECT count(*) FROM requests WHERE outcome = 'ok'").fetchone()[0] == 1
        assert conn.execute("SELECT count(*) FROM holds").fetchone()[0] == 0
        conn.close()
