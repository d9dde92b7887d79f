"""The `quota-proxy` command line (SPEC §6), run as a real subprocess against the same
config and SQLite file as a running gateway."""

from __future__ import annotations

import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import openai
import orjson
import pytest

from quota_proxy.testing import RunningUpstream
from tests.conftest import GatewayHarness, closed_port, config_toml, run_cli

pytestmark = pytest.mark.anyio


def one_json(result: subprocess.CompletedProcess[str]) -> Any:
    """stdout holds exactly one JSON document and nothing else."""
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "nothing on stdout"
    return orjson.loads(result.stdout)  # raises on any extra text


def cli_after(gateway: GatewayHarness, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The same command with --config after the subcommand."""
    return run_cli(*args, "--config", str(gateway.config_path), check=check)


async def test_every_command_prints_one_json_document(gateway: GatewayHarness) -> None:
    created = one_json(gateway.cli("accounts", "create", "shop", "--usd", "5.50", "--json"))
    assert created["name"] == "shop"
    assert created["balance"] == "$5.50"
    assert created["balance_quota_tokens"] == 5_500_000
    other = one_json(cli_after(gateway, "accounts", "create", "other", "--quota-tokens", "1000", "--json"))
    assert other["balance_quota_tokens"] == 1000

    listed = one_json(gateway.cli("accounts", "list", "--json"))
    assert {a["name"]: a["balance_quota_tokens"] for a in listed} == {"shop": 5_500_000, "other": 1000}

    live = one_json(
        gateway.cli("keys", "create", "--account", "shop", "--kind", "live", "--name", "ci", "--json")
    )
    assert set(live) >= {"id", "key", "prefix", "account", "kind"}
    assert re.fullmatch(r"qta_live_[0-9A-Za-z]{32}", live["key"])
    assert live["key"].startswith(live["prefix"]) and len(live["prefix"]) < len(live["key"]) - 20
    assert (live["account"], live["kind"]) == ("shop", "live")
    secret = one_json(
        cli_after(
            gateway,
            "keys",
            "create",
            "--account",
            "shop",
            "--kind",
            "secret",
            "--routes",
            "quota/fast,quota/half",
            "--no-community",
            "--expires",
            "2030-06-30",
            "--json",
        )
    )
    assert re.fullmatch(r"sk-quota-[0-9A-Za-z]{40}", secret["key"])

    keys = gateway.cli("keys", "list", "--account", "shop", "--json")
    key_list = one_json(keys)
    assert {k["id"] for k in key_list} == {live["id"], secret["id"]}
    for plaintext in (live["key"], secret["key"]):
        assert plaintext not in keys.stdout  # never the key itself
        assert plaintext[-20:] not in keys.stdout
    restricted = next(k for k in key_list if k["id"] == secret["id"])
    assert restricted["routes"] == ["quota/fast", "quota/half"]
    assert restricted["allow_community"] is False
    assert restricted["expires_at"] == "2030-06-30T23:59:59Z"  # end of that day, UTC
    assert len(one_json(gateway.cli("keys", "list", "--json"))) == 2  # all accounts

    # The key the CLI printed works against the running gateway.
    reply = await gateway.openai(live["key"]).chat.completions.create(
        model="quota/sonnet", messages=[{"role": "user", "content": "hello there"}]
    )
    assert reply.usage is not None
    charged = reply.usage.model_dump()["charged_quota_tokens"]
    assert charged == 3 * (5 + 8)

    usd = one_json(gateway.cli("credit", "--account", "shop", "--usd", "1.25", "--json"))
    assert usd["entry"]["amount_quota_tokens"] == 1_250_000
    assert usd["entry"]["kind"] in ("credit", "purchase")
    tokens = one_json(
        cli_after(
            gateway,
            "credit",
            "--account",
            "shop",
            "--quota-tokens",
            "500",
            "--description",
            "goodwill",
            "--json",
        )
    )
    assert tokens["entry"]["amount_quota_tokens"] == 500
    assert tokens["entry"]["description"] == "goodwill"
    package = one_json(gateway.cli("credit", "--account", "shop", "--package", "starter", "--json"))
    assert package["entry"]["kind"] == "purchase"
    assert package["entry"]["amount_quota_tokens"] == 5_000_000
    expected = 5_500_000 - charged + 1_250_000 + 500 + 5_000_000
    assert package["entry"]["balance_after_quota_tokens"] == expected

    balance = one_json(gateway.cli("balance", "--account", "shop", "--json"))
    assert balance["balance_quota_tokens"] == expected == await gateway.balance("shop")
    assert balance["balance"] == "$11.750461"

    usage = one_json(gateway.cli("usage", "--account", "shop", "--json"))
    rows = usage["rows"]
    assert len(rows) == 1
    assert rows[0]["route"] == "quota/sonnet"
    assert (rows[0]["requests"], rows[0]["input_tokens"], rows[0]["output_tokens"]) == (1, 5, 8)
    assert rows[0]["charged_quota_tokens"] == charged
    assert one_json(cli_after(gateway, "usage", "--account", "shop", "--days", "1", "--json"))["rows"] == rows

    page = one_json(gateway.cli("ledger", "list", "--account", "shop", "--json"))
    assert (page["account"], page["more"], page["next_before"]) == ("shop", 0, None)
    ledger = page["entries"]
    assert [e["amount_quota_tokens"] for e in ledger] == [5_000_000, 500, 1_250_000, -charged, 5_500_000]
    assert ledger[0]["balance_after_quota_tokens"] == expected
    assert all(e["id"].startswith("ledg_") for e in ledger)
    assert ledger[3]["kind"] == "charge" and ledger[3]["request_id"].startswith("req_")
    charge = ledger[3]["charge"]
    assert charge["request_id"] == ledger[3]["request_id"]
    assert (charge["route"], charge["upstream_model"], charge["multiplier"]) == ("quota/sonnet", "fake-sonnet", "x3")
    assert (charge["input_tokens"], charge["output_tokens"], charge["charged_quota_tokens"]) == (5, 8, charged)
    assert (charge["key_id"], charge["key_prefix"]) == (live["id"], live["prefix"])
    assert (charge["estimated"], charge["outcome"], charge["external_user_id"]) == (False, "ok", None)
    assert all(e["charge"] is None for i, e in enumerate(ledger) if i != 3)

    verified = one_json(gateway.cli("ledger", "verify", "--json"))
    assert verified["ok"] is True and verified["problems"] == []

    granted = one_json(gateway.cli("grant", "--account", "shop", "--user", "u-1", "--usd", "0.50", "--json"))
    assert granted["amount_granted"] == "$0.50"
    user_balance = one_json(gateway.cli("balance", "--account", "shop", "--user", "u-1", "--json"))
    assert user_balance["balance_quota_tokens"] == 500_000
    assert (
        one_json(gateway.cli("users", "list", "--account", "shop", "--json"))[0]["external_user_id"] == "u-1"
    )
    assert (
        one_json(gateway.cli("users", "show", "--account", "shop", "--user", "u-1", "--json"))["billing_mode"]
        == "user"
    )
    mode = one_json(
        gateway.cli("users", "set-mode", "--account", "shop", "--user", "u-1", "developer", "--json")
    )
    assert mode["billing_mode"] == "developer"

    config = one_json(gateway.cli("config", "check", "--json"))
    assert "quota/sonnet" in {r["alias"] for r in config["routes"]}

    revoked = one_json(gateway.cli("keys", "revoke", live["prefix"], "--json"))
    assert revoked["revoked"] == live["id"]
    after = one_json(gateway.cli("keys", "list", "--account", "shop", "--json"))
    assert next(k for k in after if k["id"] == live["id"])["revoked_at"] is not None
    assert next(k for k in after if k["id"] == secret["id"])["revoked_at"] is None
    await gateway.verify()


async def test_config_before_and_after_the_subcommand_agree(gateway: GatewayHarness) -> None:
    gateway.cli("accounts", "create", "acme", "--quota-tokens", "42")
    before = one_json(gateway.cli("accounts", "list", "--json"))
    after = one_json(cli_after(gateway, "accounts", "list", "--json"))
    assert before == after
    assert [(a["name"], a["balance_quota_tokens"]) for a in before] == [("acme", 42)]
    # And through the environment variable, with no --config at all.
    env_result = run_cli("accounts", "list", "--json", env={"QUOTA_PROXY_CONFIG": str(gateway.config_path)})
    assert one_json(env_result) == before


async def test_errors_go_to_stderr_and_leave_stdout_empty(gateway: GatewayHarness) -> None:
    for args in (
        ("balance", "--account", "nobody", "--json"),
        ("credit", "--account", "nobody", "--usd", "1", "--json"),
        ("keys", "revoke", "qta_live_zzzz", "--json"),
        ("credit", "--account", "nobody", "--package", "nope", "--json"),
    ):
        result = gateway.cli(*args, check=False)
        assert result.returncode != 0, args
        assert result.stdout == "", args
        assert result.stderr.strip(), args
        assert "Traceback" not in result.stderr, args
    gateway.cli("accounts", "create", "acme")
    duplicate = gateway.cli("accounts", "create", "acme", "--json", check=False)
    assert duplicate.returncode != 0 and duplicate.stdout == ""
    inexact = gateway.cli("credit", "--account", "acme", "--usd", "0.0000001", "--json", check=False)
    assert inexact.returncode != 0 and inexact.stdout == ""
    assert await gateway.balance("acme") == 0


async def test_keys_create_shows_the_key_once_in_text_mode(gateway: GatewayHarness) -> None:
    await gateway.account("acme", 1000)
    result = gateway.cli("keys", "create", "--account", "acme", "--kind", "secret")
    keys = re.findall(r"sk-quota-[0-9A-Za-z]{40}", result.stdout)
    assert len(keys) == 1
    listing = gateway.cli("keys", "list")
    assert keys[0] not in listing.stdout
    models = await gateway.openai(keys[0]).models.list()
    assert models.data


async def test_ledger_list_pages_and_says_how_many_entries_it_leaves_out(gateway: GatewayHarness) -> None:
    account = await gateway.account("pager", 1000)  # entry 1: the initial credit
    secret = await gateway.key("pager", kind="secret")
    for i in range(58):
        await gateway.store.credit(account.id, i + 1, "credit", f"top-up {i}")
    http = gateway.http()
    auth = {"authorization": f"Bearer {secret}"}
    granted = await http.post("/v1/funding/grant", json={"external_user_id": "bob", "amount": 0.0005}, headers=auth)
    assert granted.status_code == 200, granted.text
    user_client = openai.AsyncOpenAI(base_url=f"{gateway.base_url}/users/bob", api_key=secret, max_retries=0)
    try:
        reply = await user_client.chat.completions.create(
            model="quota/fast", messages=[{"role": "user", "content": "hello there"}]
        )
    finally:
        await user_client.close()
    assert reply.usage is not None

    # 60 entries: the default page shows 50 and says 10 more exist, and where to continue.
    first = one_json(gateway.cli("ledger", "list", "--account", "pager", "--json"))
    assert len(first["entries"]) == 50 and first["more"] == 10
    assert first["next_before"] == first["entries"][-1]["id"]
    assert first["entries"][0]["kind"] == "grant"
    rest = one_json(gateway.cli("ledger", "list", "--account", "pager", "--before", first["next_before"], "--json"))
    assert (len(rest["entries"]), rest["more"], rest["next_before"]) == (10, 0, None)
    everything = one_json(gateway.cli("ledger", "list", "--account", "pager", "--all", "--json"))
    assert everything["more"] == 0
    assert [e["id"] for e in everything["entries"]] == [e["id"] for e in first["entries"] + rest["entries"]]
    assert len(everything["entries"]) == 60 and everything["entries"][-1]["description"] == "initial funding"
    small = one_json(gateway.cli("ledger", "list", "--account", "pager", "--limit", "7", "--json"))
    assert (len(small["entries"]), small["more"]) == (7, 53)

    text = gateway.cli("ledger", "list", "--account", "pager").stdout
    assert f"10 older entries not shown: --before {first['next_before']}" in text
    assert "--all" in text
    assert "(no older entries)" in gateway.cli("ledger", "list", "--account", "pager", "--all").stdout

    # The app user's charge names the user, the key and the buckets.
    bob = one_json(gateway.cli("ledger", "list", "--account", "pager", "--user", "bob", "--json"))
    assert bob["external_user_id"] == "bob"
    assert [e["kind"] for e in bob["entries"]] == ["charge", "grant"]
    charge = bob["entries"][0]["charge"]
    assert charge["external_user_id"] == "bob" and secret.startswith(charge["key_prefix"])
    assert (charge["route"], charge["multiplier"], charge["outcome"], charge["estimated"]) == (
        "quota/fast", "x1", "ok", False)
    assert charge["input_tokens"] + charge["output_tokens"] == charge["charged_quota_tokens"] > 0
    assert charge["cache_read_tokens"] == charge["cache_write_tokens"] == charge["cache_write_1h_tokens"] == 0
    bob_text = gateway.cli("ledger", "list", "--account", "pager", "--user", "bob").stdout
    assert "quota/fast" in bob_text and "fake-fast" in bob_text and "x1" in bob_text

    # A cursor from another ledger, or --all with --limit, is refused on stderr.
    wrong = gateway.cli("ledger", "list", "--account", "pager", "--before", bob["entries"][0]["id"], check=False)
    assert wrong.returncode == 1 and wrong.stdout == "" and "--before" in wrong.stderr
    both = gateway.cli("ledger", "list", "--account", "pager", "--all", "--limit", "5", check=False)
    assert both.returncode == 2 and both.stdout == ""


async def test_ledger_verify_fails_on_broken_books(gateway: GatewayHarness, tmp_path: Path) -> None:
    await gateway.account("acme", 10_000)
    await gateway.account("beta", 500)
    key = await gateway.key("acme")
    await gateway.openai(key).chat.completions.create(
        model="quota/fast", messages=[{"role": "user", "content": "hi"}]
    )
    await gateway.settled()
    assert one_json(gateway.cli("ledger", "verify", "--json"))["ok"] is True

    # A consistent copy of the live database, then books broken behind the ledger's back.
    copy = tmp_path / "broken.db"
    source = sqlite3.connect(gateway.settings.store.path)
    target = sqlite3.connect(copy)
    try:
        source.backup(target)
        target.execute("DROP TRIGGER accounts_balance_follows_ledger")
        target.execute("UPDATE accounts SET balance = balance + 777 WHERE name = 'acme'")
        target.commit()
    finally:
        source.close()
        target.close()
    broken_config = tmp_path / "broken.toml"
    broken_config.write_text(config_toml(gateway.upstream.base_url, copy))

    result = run_cli("--config", str(broken_config), "ledger", "verify", "--json", check=False)
    assert result.returncode != 0
    data = orjson.loads(result.stdout)
    assert data["ok"] is False
    assert [p["name"] for p in data["problems"]] == ["acme"]
    problem = data["problems"][0]
    assert problem["balance"] - problem["ledger_sum"] == 777
    table = run_cli("--config", str(broken_config), "ledger", "verify", check=False)
    assert table.returncode != 0
    assert "acme" in table.stdout
    # The live books are untouched.
    assert gateway.cli("ledger", "verify", check=False).returncode == 0


async def test_serve_runs_the_gateway_in_a_subprocess(upstream: RunningUpstream, tmp_path: Path) -> None:
    config = tmp_path / "serve.toml"
    config.write_text(config_toml(upstream.base_url, tmp_path / "serve.db"))
    run_cli("--config", str(config), "accounts", "create", "acme", "--quota-tokens", "100000")
    key = one_json(
        run_cli("--config", str(config), "keys", "create", "--account", "acme", "--kind", "live", "--json")
    )["key"]
    port = closed_port()
    base = f"http://127.0.0.1:{port}"
    with subprocess.Popen(
        [sys.executable, "-m", "quota_proxy", "serve", "--config", str(config), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            async with httpx.AsyncClient(timeout=2) as http:
                deadline = time.monotonic() + 20
                while True:
                    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                    assert time.monotonic() < deadline, "serve never became healthy"
                    try:
                        if (await http.get(f"{base}/healthz")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await anyio.sleep(0.1)
                assert (await http.get(f"{base}/readyz")).status_code == 200
            async with openai.AsyncOpenAI(
                base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=10
            ) as client:
                reply = await client.chat.completions.create(
                    model="quota/fast", messages=[{"role": "user", "content": "hello there"}]
                )
            assert reply.choices[0].message.content == "hello world this is a fake reply from"
            assert reply.usage is not None
            assert reply.usage.model_dump()["charged_quota_tokens"] == 13
            assert upstream.app.requests[-1].body["model"] == "fake-fast"
        finally:
            proc.terminate()
            try:
                _, stderr = proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                raise
    # uvicorn shuts down gracefully, then re-raises the SIGTERM it captured.
    assert proc.returncode in (0, -signal.SIGTERM), stderr
    assert "Traceback" not in stderr
    assert key not in stderr  # keys are never logged
    assert "hello there" not in stderr  # nor prompts
    assert "hello world" not in stderr  # nor completions
    balance = one_json(run_cli("--config", str(config), "balance", "--account", "acme", "--json"))
    assert balance["balance_quota_tokens"] == 100_000 - 13
