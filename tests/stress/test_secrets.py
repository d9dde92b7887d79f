"""Scenario 7 — secrets and injection (SPEC §2 keys, §3 access log).

A mixed run through `serve --workers 2` whose every log line (stderr) is captured: no
issued key, no upstream key (the gateway must send one: the fake upstream requires it) and
no prompt text may appear, while every request does get its access line. Then SQL-injection
strings go into every free-text field (grant descriptions, Idempotency-Keys, account and key
names and credit descriptions through the CLI): each is stored and returned verbatim, and
the schema is untouched. Keys are never compared as strings: they are looked up by their
SHA-256 digest in a UNIQUE index (quota_proxy/keys.py, store.key_by_digest), so there is no
secret-dependent comparison to time.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.stress.harness import (
    Checks,
    FakeUpstreamProcess,
    ProcessSet,
    Reply,
    RouteConf,
    UpstreamConf,
    chat_body,
    ledger_verify,
    new_key,
    query,
    send,
    start_gateway,
)

pytestmark = pytest.mark.anyio

UPSTREAM_KEY_ENV = "STRESS_UPSTREAM_KEY"
INJECTIONS = [
    "Robert'); DROP TABLE accounts;--",
    "' OR '1'='1",
    '"; DELETE FROM ledger; --',
    "1; UPDATE accounts SET balance = 1000000000 WHERE 1=1 --",
    "%' UNION SELECT digest, prefix FROM api_keys --",
    "x') ON CONFLICT DO NOTHING; --",
    "\\'; ATTACH DATABASE '/tmp/pwn.db' AS pwn; --",
    "ünïcødé ✓ 🚀 \u202e RTL",
]


async def test_no_secret_in_logs_and_injection_is_inert(procs: ProcessSet, workdir: Path) -> None:
    checks = Checks("7_secrets")
    upstream_key = "upk-" + secrets.token_urlsafe(24)
    env = {UPSTREAM_KEY_ENV: upstream_key}
    fake = procs.add(FakeUpstreamProcess(workdir, api_key_env=UPSTREAM_KEY_ENV, env=env)).start()
    gateway = start_gateway(
        procs, workdir, workers=2, env=env,
        upstreams=[UpstreamConf("fake", fake.base_url, api_key_env=UPSTREAM_KEY_ENV)],
        routes=[RouteConf("stress/x1", "fake", 1), RouteConf("stress/x3", "fake", 3)],
        accounts=[("secrets", 100_000_000), ("poor", 10)],
    )
    db = gateway.workdir / "quota.db"
    tables_before = query(db, "SELECT type, name, sql FROM sqlite_master ORDER BY name")
    live = new_key(gateway, "secrets", "live", INJECTIONS[0])
    secret = new_key(gateway, "secrets", "secret", INJECTIONS[1])
    poor = new_key(gateway, "poor", "live")
    unknown = "qta_live_" + "Z" * 32  # well-formed, never issued
    issued = [live, secret, poor]
    prompts = [f"marker-{secrets.token_hex(8)} please keep this prompt private" for _ in range(12)]

    replies: list[Reply] = []
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:

        async def call(method: str, path: str, key: str | None, body: Any = None, stream: bool = False,
                       headers: dict[str, str] | None = None) -> Reply:
            r = await send(client, method, path, key=key, body=body, stream=stream, headers=headers)
            replies.append(r)
            return r

        for i, prompt in enumerate(prompts):
            model = "stress/x1" if i % 2 else "stress/x3"
            assert (await call("POST", "/v1/chat/completions", live, chat_body(prompt, model=model))).status == 200
            assert (await call("POST", "/v1/chat/completions", secret,
                               chat_body(prompt, model=model, stream=True, include_usage=True), stream=True)).status == 200
            await call("POST", "/v1/completions", live, {"model": model, "prompt": prompt, "max_tokens": 4})
            await call("POST", "/v1/embeddings", live, {"model": model, "input": prompt})
            await call("POST", "/v1/chat/completions", unknown, chat_body(prompt, model=model))  # 401
            await call("POST", "/v1/chat/completions", poor, chat_body(prompt, model=model))  # 402
            await call("POST", "/v1/chat/completions", live, chat_body(prompt, model="quota/" + prompt))  # 404
            await call("POST", "/v1/chat/completions", live, {"model": model, "messages": prompt})  # 400
            await call("POST", "/v1/chat/completions", live, chat_body(prompt, model=model, fake={"fail": "status:500"}))
            await call("POST", "/v1/chat/completions", live, chat_body(prompt, model=model, fake={"fail": "status:400"}))
            await call("GET", "/v1/balance", live)
            await call("GET", "/v1/me", secret)
            await call("GET", "/v1/models", None, headers={"x-api-key": live})

        # -- injection strings through the Funding API ---------------------------------
        for i, text in enumerate(INJECTIONS):
            idem = f"idem-{i}-" + text.encode("ascii", "ignore").decode()[:200]
            body = {"external_user_id": f"inj-user-{i}", "amount": 0.01, "description": text}
            first = await call("POST", "/v1/funding/grant", secret, body, headers={"idempotency-key": idem})
            again = await call("POST", "/v1/funding/grant", secret, body, headers={"idempotency-key": idem})
            ok = first.status == 200 and again.status == 200
            checks.expect("grant with an injection description is accepted", ok, (first.status, first.body[:200]))
            if ok:
                checks.expect("the description comes back verbatim", first.json()["description"] == text,
                              first.json().get("description"))
                checks.expect("an injection Idempotency-Key replays", again.json()["duplicate"] is True
                              and again.json()["ledger_id"] == first.json()["ledger_id"], again.json())
                stored = query(db, "SELECT description FROM ledger WHERE public_id = ?", (first.json()["ledger_id"],))
                checks.expect("the description is stored verbatim", stored == [(text,)], stored)
                listed = gateway.cli_json("ledger", "list", "--account", "secrets", "--user", f"inj-user-{i}")["entries"]
                checks.expect("`ledger list` shows it verbatim", any(e.get("description") == text for e in listed),
                              listed[:1])
            bad = await call("POST", "/v1/funding/grant", secret,
                             {"external_user_id": text, "amount": 0.01, "description": "x"})
            checks.expect("an injection external_user_id is refused with 400", bad.status == 400, bad.status)
            path_bad = await call("GET", "/v1/balance?external_user_id=" + httpx.QueryParams({"x": text})["x"], secret)
            checks.expect("an injection user id in a query is refused (400/404)", path_bad.status in (400, 404),
                          path_bad.status)

    # -- injection strings through the CLI ----------------------------------------------
    for i, text in enumerate(INJECTIONS):
        name = f"{text} #{i}"
        gateway.cli("accounts", "create", name, "--quota-tokens", "1000")
        gateway.cli("keys", "create", "--account", name, "--kind", "live", "--name", text, "--json")
        gateway.cli("credit", "--account", name, "--quota-tokens", "5", "--description", text)
    accounts = {a["name"] for a in gateway.cli_json("accounts", "list")}
    keys = gateway.cli_json("keys", "list")
    for i, text in enumerate(INJECTIONS):
        name = f"{text} #{i}"
        checks.expect("an injection account name is stored and listed verbatim", name in accounts, name)
        checks.expect("an injection key name is stored and listed verbatim",
                      any(k.get("name") == text and k.get("account") == name for k in keys), name)
        entries = gateway.cli_json("ledger", "list", "--account", name)["entries"]
        checks.expect("an injection credit description is listed verbatim",
                      any(e.get("description") == text for e in entries), entries[:1])
        balance = gateway.cli_json("balance", "--account", name)
        checks.expect("the injected account's balance is exactly its own", balance.get("balance_quota_tokens") == 1005,
                      balance)
    tables_after = query(db, "SELECT type, name, sql FROM sqlite_master ORDER BY name")
    checks.expect("the schema is untouched", tables_after == tables_before)
    checks.expect("no balance was inflated by an injection string",
                  query(db, "SELECT count(*) FROM accounts WHERE balance > 100000000")[0][0] == 0)
    code, verify = ledger_verify(gateway)
    checks.expect("quota-proxy ledger verify exits 0", code == 0, verify)

    # -- the logs -------------------------------------------------------------------------
    gateway.stop()  # flush and close: every line is on disk
    log = gateway.stderr_text() + gateway.out_path.read_text(errors="replace")
    lines = [line for line in log.splitlines() if line.strip()]
    access: dict[str, int] = {}
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("request_id"):
            access[entry["request_id"]] = access.get(entry["request_id"], 0) + 1
    ids = [r.request_id for r in replies if r.request_id]
    missing = [i for i in ids if access.get(i, 0) != 1]
    checks.expect("every request has exactly one access-log line (workers included)", not missing,
                  f"{len(missing)} of {len(ids)} missing")
    for label, values in (("issued key", issued + [unknown]), ("upstream key", [upstream_key]),
                          ("prompt text", prompts), ("key body", [k[-24:] for k in issued])):
        leaked = [v for v in values if v in log]
        checks.expect(f"no {label} in the logs", not leaked, [v[:12] + "…" for v in leaked])
    answers = b"".join(r.body for r in replies)
    checks.expect("no upstream key in any answer", upstream_key.encode() not in answers)
    fake_log = fake.stderr_text()
    checks.expect("the upstream did receive the gateway's key (no 401 from the fake)",
                  all(r.status != 502 or b"credentials" not in r.body for r in replies), fake_log[-300:])

    checks.finish({
        "requests": len(replies),
        "log_lines": len(lines),
        "access_lines_matched": len(ids) - len(missing),
        "secrets_searched": {"issued_keys": len(issued) + 1, "upstream_keys": 1, "prompts": len(prompts)},
        "injection_strings": len(INJECTIONS),
        "injection_fields": ["grant description", "Idempotency-Key", "external_user_id (refused)",
                             "query external_user_id (refused)", "account name (CLI)", "key name (CLI)",
                             "credit description (CLI)"],
        "statuses": {str(s): sum(1 for r in replies if r.status == s) for s in sorted({r.status for r in replies})},
        "ledger_verify": verify,
    })
