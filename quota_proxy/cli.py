"""The `quota-proxy` command: parses arguments, calls admin/serve/demo, prints tables or JSON.

Every command takes --config PATH before or after the subcommand, and --json where it
prints data (one JSON document on stdout, nothing else).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson

from quota_proxy import admin
from quota_proxy.config import (
    LOG_LEVELS,
    ConfigError,
    Limits,
    Settings,
    StoreSettings,
    default_config_path,
    load_settings,
)
from quota_proxy.store import (
    DashboardStore,
    Store,
    StoreError,
    open_store,
    supports_dashboard,
    supports_payments,
)
from quota_proxy.store.copy import copy_store
from quota_proxy.views import account_view, iso_time, key_view, user_view

EXIT_ERROR = 1
EXIT_CONFIG = 2
LEDGER_PAGE = 50


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, metavar="PATH",
                        help="config file (default: $QUOTA_PROXY_CONFIG, else ./quota-proxy.toml)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print one JSON document")
    parser = argparse.ArgumentParser(prog="quota-proxy", parents=[common],
                                     description="A self-hosted OpenAI-compatible gateway with prepaid balances.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(name: str, help: str, parent: Any = sub) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = parent.add_parser(
            name, parents=[common], help=help, description=help
        )
        return parser

    p = cmd("serve", "run the gateway; each flag overrides the [server] setting of the same name")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--workers", type=_positive)
    p.add_argument("--log-level", choices=LOG_LEVELS)

    p = cmd("demo", "run the gateway on a temporary store with a built-in demo upstream")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)

    config = cmd("config", "configuration").add_subparsers(dest="action", required=True, metavar="ACTION")
    cmd("check", "validate the config and print the routes", config)

    accounts = cmd("accounts", "developer accounts").add_subparsers(dest="action", required=True, metavar="ACTION")
    p = cmd("create", "create a developer account, optionally funded", accounts)
    p.add_argument("name")
    _amount_args(p)
    cmd("list", "accounts with balances", accounts)

    keys = cmd("keys", "API keys").add_subparsers(dest="action", required=True, metavar="ACTION")
    p = cmd("create", "create a key; it is printed once", keys)
    p.add_argument("--account", required=True)
    p.add_argument("--kind", required=True, choices=["live", "secret"])
    p.add_argument("--name", default="", metavar="LABEL")
    p.add_argument("--routes", help="comma-separated aliases this key may use")
    p.add_argument("--no-community", action="store_true", help="refuse community-tier routes")
    p.add_argument("--expires", metavar="DATE", help="YYYY-MM-DD (end of day, UTC) or ISO datetime")
    p.add_argument("--rpm", type=_positive, help="requests per minute (default: the route's)")
    p.add_argument("--tpm", type=_positive, help="tokens per minute (default: the route's)")
    p.add_argument("--max-concurrent", type=_positive, help="requests in flight at once")
    p = cmd("list", "list keys (never the keys themselves)", keys)
    p.add_argument("--account")
    p = cmd("revoke", "revoke a key by id or display prefix", keys)
    p.add_argument("key", metavar="ID_OR_PREFIX")

    p = cmd("credit", "record a purchase or credit")
    p.add_argument("--account", required=True)
    group = _amount_args(p, required=True)
    group.add_argument("--package", metavar="ID")
    p.add_argument("--description")

    p = cmd("balance", "an account's or an app user's balance")
    p.add_argument("--account", required=True)
    p.add_argument("--user", metavar="EXTERNAL_ID")

    p = cmd("usage", "usage per route and per day, or per agent session")
    p.add_argument("--account", required=True)
    p.add_argument("--days", type=int, default=30)
    p.add_argument("--user", metavar="EXTERNAL_ID")
    p.add_argument("--by", choices=("day", "session"), default="day")

    ledger = cmd("ledger", "the audit ledger").add_subparsers(dest="action", required=True, metavar="ACTION")
    p = cmd("list", "an account's ledger, newest first", ledger)
    p.add_argument("--account", required=True)
    p.add_argument("--user", metavar="EXTERNAL_ID")
    page = p.add_mutually_exclusive_group()
    page.add_argument("--limit", type=_positive, default=LEDGER_PAGE, help=f"entries per page (default {LEDGER_PAGE})")
    page.add_argument("--all", action="store_true", help="every entry, no paging")
    p.add_argument("--before", metavar="ID", help="start below this entry (the next_before of the last page)")
    cmd("verify", "check balance = sum(ledger) and held = open holds for every account", ledger)

    p = cmd("backup", "copy the store to a new file while the gateway serves (SQLite online backup)")
    p.add_argument("path", type=Path)

    store = cmd("store", "the store itself").add_subparsers(dest="action", required=True, metavar="ACTION")
    p = cmd("copy", "copy the whole store into a new, empty one (SQLite <-> PostgreSQL) and verify it", store)
    p.add_argument("--to", required=True, metavar="URL_OR_PATH",
                   help="postgresql://user@host:5432/db, or a SQLite file path")
    p.add_argument("--password-env", metavar="NAME", help="environment variable with the target's password")

    p = cmd("grant", "grant an app user balance from an account's grant pool")
    p.add_argument("--account", required=True)
    p.add_argument("--user", required=True, metavar="EXTERNAL_ID")
    p.add_argument("--usd", required=True)
    p.add_argument("--idempotency-key")
    p.add_argument("--description", default="")

    users = cmd("users", "an account's app users").add_subparsers(dest="action", required=True, metavar="ACTION")
    p = cmd("list", "users with balances", users)
    p.add_argument("--account", required=True)
    p = cmd("show", "one user", users)
    p.add_argument("--account", required=True)
    p.add_argument("--user", required=True, metavar="EXTERNAL_ID")
    p = cmd("set-mode", "whose balance the user's completions charge", users)
    p.add_argument("--account", required=True)
    p.add_argument("--user", required=True, metavar="EXTERNAL_ID")
    p.add_argument("mode", choices=["user", "developer"])
    _payment_commands(cmd)
    _dashboard_parser(cmd)
    return parser


def _payment_commands(cmd: Any) -> None:
    orders = cmd("orders", "package orders paid through a provider").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = cmd("list", "an account's orders, newest first", orders)
    p.add_argument("--account", required=True)
    p.add_argument("--limit", type=_positive, default=100)

    codes = cmd("codes", "redemption codes").add_subparsers(dest="action", required=True, metavar="ACTION")
    p = cmd("create", "create codes for a package; they are printed once", codes)
    p.add_argument("--package", required=True, metavar="ID")
    p.add_argument("--count", type=_positive, default=1)
    p.add_argument("--expires", metavar="DATE", help="YYYY-MM-DD (end of day, UTC) or ISO datetime")
    cmd("list", "codes and who claimed them (never the codes themselves)", codes)

    alerts = cmd("alerts", "low-balance alerts").add_subparsers(dest="action", required=True, metavar="ACTION")
    p = cmd("set", "where an account's alerts go and at which balances", alerts)
    p.add_argument("--account", required=True)
    p.add_argument("--url", required=True, help="the webhook the signed alerts are POSTed to")
    p.add_argument("--thresholds", default="", help="dollars, comma-separated, for the account's balance")
    p.add_argument("--user-thresholds", default="", help="dollars, comma-separated, for each app user's")
    p = cmd("show", "an account's alert settings and latest deliveries", alerts)
    p.add_argument("--account", required=True)


def _dashboard_parser(cmd: Callable[..., argparse.ArgumentParser]) -> None:
    dashboard = cmd("dashboard", "web dashboard sign-ins").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    p = cmd("invite", "print a one-time, expiring link with which a person sets a dashboard password",
            dashboard)
    p.add_argument("--account", required=True)
    p.add_argument("--email", required=True)
    p.add_argument("--role", choices=["developer", "operator"], default="developer")
    logins = cmd("logins", "people who can sign in to the dashboard", dashboard).add_subparsers(
        dest="login_action", required=True, metavar="ACTION"
    )
    cmd("list", "logins with their account and role", logins)
    p = cmd("disable", "stop a login from signing in and end its sessions (a new invitation enables it)",
            logins)
    p.add_argument("email", metavar="EMAIL")
    sessions = cmd("sessions", "signed-in dashboard sessions", dashboard).add_subparsers(
        dest="session_action", required=True, metavar="ACTION"
    )
    p = cmd("list", "live sessions, newest first", sessions)
    p.add_argument("--email")
    p = cmd("revoke", "end sessions: one by id, every session of an email, or all", sessions)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("session", nargs="?", metavar="SESSION_ID")
    target.add_argument("--email")
    target.add_argument("--all", action="store_true")


SERVE_FLAGS = ("host", "port", "workers", "log_level")


def with_serve_flags(settings: Settings, args: argparse.Namespace) -> Settings:
    """`serve --NAME` overrides the [server] setting of the same name (uvicorn's pattern)."""
    given = {name: getattr(args, name) for name in SERVE_FLAGS if getattr(args, name, None) is not None}
    return replace(settings, server=replace(settings.server, **given))


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _amount_args(p: argparse.ArgumentParser, required: bool = False) -> Any:
    group = p.add_mutually_exclusive_group(required=required)
    group.add_argument("--usd", metavar="X")
    group.add_argument("--quota-tokens", type=int, metavar="N")
    return group


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    config_path = Path(getattr(args, "config", None) or default_config_path())
    as_json = getattr(args, "json", False)
    if args.command == "demo":
        from quota_proxy.demo import run_demo

        run_demo(args.host, args.port)
        return
    try:
        settings = load_settings(config_path)
    except ConfigError as exc:
        print(f"quota-proxy: invalid config {config_path}:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    if args.command in ("serve", "config"):
        for warning in settings.warnings:
            print(f"quota-proxy: warning: {warning}", file=sys.stderr)
    if args.command == "serve":
        from quota_proxy.serve import serve

        serve(with_serve_flags(settings, args), config_path)
        return
    if args.command == "config":
        _print(as_json, _config_view(settings), _config_table)
        return
    try:
        data, table = asyncio.run(_run_store_command(args, settings))
    except admin.AdminError as exc:
        print(f"quota-proxy: {exc}", file=sys.stderr)
        sys.exit(EXIT_ERROR)
    except StoreError as exc:
        print(f"quota-proxy: store error: {exc}", file=sys.stderr)
        sys.exit(EXIT_ERROR)
    _print(as_json, data, table)
    if args.command == "ledger" and args.action == "verify" and data["problems"]:
        sys.exit(EXIT_ERROR)


Table = Callable[[Any], str]


def _print(as_json: bool, data: Any, table: Table) -> None:
    if as_json:
        sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write(table(data))


async def _run_store_command(args: argparse.Namespace, settings: Settings) -> tuple[Any, Table]:
    async with open_store(settings.store) as store:
        handler = _HANDLERS[(args.command, getattr(args, "action", None))]
        return await handler(args, settings, store)


Handler = Callable[[argparse.Namespace, Settings, Store], Awaitable[tuple[Any, Table]]]
_HANDLERS: dict[tuple[str, str | None], Handler] = {}


def _handles(command: str, action: str | None = None) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        _HANDLERS[(command, action)] = fn
        return fn

    return register


@_handles("accounts", "create")
async def _accounts_create(args: argparse.Namespace, s: Settings, store: Store) -> tuple[Any, Table]:
    amount = admin.quota_tokens(s, args.usd, args.quota_tokens)
    data = await admin.create_account(store, s, args.name, amount)
    return data, lambda d: f"created account {d['name']} ({d['id']}), balance {d['balance']}\n"


@_handles("accounts", "list")
async def _accounts_list(args: argparse.Namespace, s: Settings, store: Store) -> tuple[Any, Table]:
    data = [account_view(a, s.money) for a in await store.list_accounts()]
    return data, lambda d: _table(d, ["name", "id", "balance", "balance_quota_tokens", "held_quota_tokens"])


@_handles("keys", "create")
async def _keys_create(args: argparse.Namespace, s: Settings, store: Store) -> tuple[Any, Table]:
    routes = tuple(r.strip() for r in args.routes.split(",") if r.strip()) if args.routes else None
    data = await admin.create_key(store, s, args.account, args.kind, args.name, routes,
                                  not args.no_community, args.expires,
                                  Limits(args.rpm, args.tpm, args.max_concurrent))
    return data, lambda d: (
        f"{d['key']}\n"
        f"# {d['kind']} key {d['id']} for account {d['account']}: shown once, store it now\n"
    )


@_handles("keys", "list")
async def _keys_list(args: argparse.Namespace, s: Settings, store: Store) -> tuple[Any, Table]:
    account_id = (await admin.developer(store, args.account)).id if args.account else None
    data = [key_view(k) for k in await store.list_keys(account_id)]
    return data, lambda d: _table(d, ["id", "prefix", "account", "kind", "name", "expires_at", "revoked_at"])


@_handles("keys", "revoke")
async def _keys_revoke(args: argparse.Namespace, s: Settings, store: Store) -> tuple[Any, Table]:
    try:
        found = await store.revoke_key(args.key)
    except ValueError as exc:
        raise admin.AdminError(str(exc)) from None
    if not found:
        raise admin.AdminError(f"no key with id or prefix {args.key!r}")
    data = {"revoked": found[0].public_id, "prefix": found[0].prefix}
    return data, lambda d: f"revoked {d['revoked']} ({d['prefix']}…)\n"


@_handles("credit")
async def _credit(args: argparse.Namespace, s: Settings, store: Store) -> tuple[Any, Table]:
    amount = admin.quota_tokens(s, args.usd, args.quota_tokens)
    data = await admin.credit(store, s, args.account, amount, args.package, args.description)
    return data, lambda d: (
        f"{d['entry']['kind']} {d['entry']['amount']} to {d['account']}: "
        f"balance {d['entry']['balance_after']} ({d['entry']['id']})\n"
    )


@_handles("balance")
async def _balance(args: argparse.Namespace, s: Settings, store: Store) -> tuple[Any, Table]:
    account = await admin.developer(store, args.account)
    if args.user:
        user = await admin.app_user(store, account, args.user)
        data = {"account": account.name, **user_view(user, s.money)}
        return data, lambda d: f"{d['account']}/{d['external_user_id']}: {d['balance']} ({d['balance_quota_tokens']} quota tokens, billing mode {d['billing_mode']})\n"
    data = account_view(account, s.money)
    return data, lambda d: f"{d['name']}: {d['balance']} ({d['balance_quota_tokens']} quota tokens, {d['held_quota_tokens']} held)\n"


@_handles("usage")
async def _usage(args: argparse.Namespace, s: Settings, store: Store) -> tuple[Any, Table]:
    account = await admin.developer(store, args.account)
    buckets = ("cache_read_tokens", "cache_write_tokens", "cache_write_1h_tokens", "reasoning_tokens")
    if args.by == "session":
        sessions = await store.usage_by_session(account.id, args.days)
        data = {
            "account": account.name,
            "days": args.days,
            "by": "session",
            "rows": [
                {"session": t.name, "requests": t.requests, "input_tokens": t.input_tokens,
                 "output_tokens": t.output_tokens, **{b: getattr(t, b) for b in buckets},
                 "charged_quota_tokens": t.charged, "charged": s.money.usd(t.charged)}
                for t in sessions
            ],
        }
        return data, lambda d: _table(d["rows"], ["session", "requests", "input_tokens", "cache_read_tokens",
                                                  "cache_write_tokens", "output_tokens", "charged_quota_tokens"])
    user_id = (await admin.app_user(store, account, args.user)).id if args.user else None
    rows = await store.usage(account.id, args.days, user_id)
    data = {
        "account": account.name,
        "days": args.days,
        "rows": [
            {"day": r.day, "route": r.route, "user": r.user, "requests": r.requests,
             "input_tokens": r.input_tokens, "output_tokens": r.output_tokens,
             **{b: getattr(r, b) for b in buckets},
             "charged_quota_tokens": r.charged, "charged": s.money.usd(r.charged)}
            for r in rows
        ],
    }
    return data, lambda d: _table(d["rows"], ["day", "route", "user", "requests", "input_tokens",
                                              "output_tokens", "charged_quota_tokens"])


@_handles("ledger", "list")
async def _ledger_list(args: argparse.Namespace, s: Settings, store: Store) -> tuple[Any, Table]:
    limit = None if args.all else args.limit
    data = await admin.ledger_page(store, s, args.account, args.user, limit, args.before)
    return data, _ledger_table


def _ledger_table(d: dict[str, Any]) -> str:
    rows = []
    for e in d["entries"]:
        row = dict(e)
        charge = e["charge"]
        if charge is not None:
            buckets = [("in", "input_tokens"), ("out", "output_tokens"), ("cache_read", "cache_read_tokens"),
                       ("cache_write", "cache_write_tokens"), ("cache_write_1h", "cache_write_1h_tokens")]
            row |= {
                "route": charge["route"],
                "upstream_model": charge["upstream_model"],
                "key": charge["key_prefix"],
                "user": charge["external_user_id"],
                "tokens": " ".join(f"{label}={charge[f]}" for label, f in buckets if charge[f] or label in ("in", "out")),
                "multiplier": charge["multiplier"],
                "estimated": "estimated" if charge["estimated"] else "",
                "outcome": charge["outcome"],
            }
        rows.append(row)
    text = _table(rows, ["id", "created_at", "kind", "amount_quota_tokens", "balance_after_quota_tokens",
                         "request_id", "route", "upstream_model", "key", "user", "tokens", "multiplier",
                         "estimated", "outcome", "description"])
    if d["more"]:
        return text + (f"… {d['more']} older entries not shown: --before {d['next_before']} "
                       "for the next page, --all for every entry\n")
    return text + "(no older entries)\n"


@_handles("ledger", "verify")
async def _ledger_verify(args: argparse.Namespace, s: Settings, store: Store) -> tuple[Any, Table]:
    problems = await store.verify_ledger()
    accounts = await store.account_count()
    data = {"ok": not problems, "accounts": accounts, "problems": problems}

    def table(d: Any) -> str:
        if d["ok"]:
            return f"ledger ok: {d['accounts']} accounts, every balance = sum of its ledger\n"
        return "LEDGER MISMATCH\n" + _table(d["problems"], list(d["problems"][0]))

    return data, table


@_handles("backup")
async def _backup(args: argparse.Namespace, s: Settings, store: Store) -> tuple[Any, Table]:
    size = await store.backup(args.path)
    data = {"backup": str(args.path), "bytes": size, "store": str(s.store.path)}
    return data, lambda d: f"backed up {d['store']} to {d['backup']} ({d['bytes']} bytes)\n"


@_handles("store", "copy")
async def _store_copy(args: argparse.Namespace, s: Settings, store: Store) -> tuple[Any, Table]:
    if args.to.startswith(("postgresql://", "postgres://")):
        password = os.environ.get(args.password_env) if args.password_env else None
        target_settings = StoreSettings(url=args.to, password=password)
    else:
        target_settings = StoreSettings(path=Path(args.to))
    async with open_store(target_settings) as target:
        report = await copy_store(store, target)
        data = {"from": store.description, "to": target.description, "verified": True,
                **dataclasses.asdict(report)}
    return data, lambda d: (
        f"copied {d['accounts']} accounts, {d['keys']} keys, {d['ledger_entries']} ledger entries, "
        f"{d['requests']} requests, {d['holds']} holds, {d['idempotency_keys']} idempotency keys "
        f"from {d['from']} to {d['to']}; verified: same balances, ledger ok\n"
    )


@_handles("grant")
async def _grant(args: argparse.Namespace, s: Settings, store: Store) -> tuple[Any, Table]:
    data = await admin.grant(store, s, args.account, args.user, args.usd, args.idempotency_key,
                             args.description)
    return data, lambda d: (
        f"granted {d['amount_granted']} to {d['external_user_id']}: {d['balance_before']} -> "
        f"{d['balance_after']}{' (duplicate: nothing granted)' if d['duplicate'] else ''}\n"
    )


@_handles("users", "list")
async def _users_list(args: argparse.Namespace, s: Settings, store: Store) -> tuple[Any, Table]:
    account = await admin.developer(store, args.account)
    data = [user_view(u, s.money) for u in await store.list_users(account.id)]
    return data, lambda d: _table(d, ["external_user_id", "balance", "balance_quota_tokens", "billing_mode"])


@_handles("users", "show")
async def _users_show(args: argparse.Namespace, s: Settings, store: Store) -> tuple[Any, Table]:
    account = await admin.developer(store, args.account)
    data = user_view(await admin.app_user(store, account, args.user), s.money)
    return data, lambda d: _table([d], list(d))


@_handles("users", "set-mode")
async def _users_set_mode(args: argparse.Namespace, s: Settings, store: Store) -> tuple[Any, Table]:
    account = await admin.developer(store, args.account)
    user = await admin.app_user(store, account, args.user)
    await store.set_billing_mode(user.id, args.mode)
    data = user_view(await admin.app_user(store, account, args.user), s.money)
    return data, lambda d: f"{d['external_user_id']}: billing mode {d['billing_mode']}\n"


def _dashboard_store(store: Store) -> DashboardStore:
    if not supports_dashboard(store):
        raise admin.AdminError("this store has no dashboard sign-in and sessions")
    return store  # type: ignore[return-value]


def _payments_store(store: Store) -> Store:
    """Orders, codes and alerts: both engines have them; a library user's store might not."""
    if not supports_payments(store):
        raise admin.AdminError("this store has no orders, codes and alerts")
    return store


@_handles("orders", "list")
async def _orders_list(args: argparse.Namespace, s: Settings, any_store: Store) -> tuple[Any, Table]:
    store = _payments_store(any_store)
    from quota_proxy.payments import admin as pay

    data = await pay.list_orders(store, s, args.account, args.limit)
    return data, lambda d: _table(d, ["order_id", "created_at", "status", "package", "price",
                                      "quota_tokens", "ledger_id", "refunded_quota_tokens"])


@_handles("codes", "create")
async def _codes_create(args: argparse.Namespace, s: Settings, any_store: Store) -> tuple[Any, Table]:
    store = _payments_store(any_store)
    from quota_proxy.payments import admin as pay

    data = await pay.create_codes(store, s, args.package, args.count, args.expires)
    return data, lambda d: "".join(f"{c}\n" for c in d["codes"]) + (
        f"# {len(d['codes'])} code(s) for package {d['package']} ({d['quota_tokens']} quota tokens"
        f"{', expiring ' + d['expires_at'] if d['expires_at'] else ''}): shown once, store them now\n"
    )


@_handles("codes", "list")
async def _codes_list(args: argparse.Namespace, s: Settings, any_store: Store) -> tuple[Any, Table]:
    store = _payments_store(any_store)
    from quota_proxy.payments import admin as pay

    data = await pay.list_codes(store)
    return data, lambda d: _table(d, ["id", "package", "quota_tokens", "expires_at", "claimed_by", "claimed_at"])


@_handles("alerts", "set")
async def _alerts_set(args: argparse.Namespace, s: Settings, any_store: Store) -> tuple[Any, Table]:
    store = _payments_store(any_store)
    from quota_proxy.payments import admin as pay

    def split(text: str) -> list[str]:
        return [t.strip() for t in text.split(",") if t.strip()]

    data = await pay.set_alerts(store, s, args.account, args.url, split(args.thresholds),
                                split(args.user_thresholds))
    return data, _alerts_table


@_handles("alerts", "show")
async def _alerts_show(args: argparse.Namespace, s: Settings, any_store: Store) -> tuple[Any, Table]:
    store = _payments_store(any_store)
    from quota_proxy.payments import admin as pay

    return await pay.show_alerts(store, s, args.account), _alerts_table


def _alerts_table(d: dict[str, Any]) -> str:
    levels = ", ".join(t["amount"] for t in d["thresholds"]) or "-"
    users = ", ".join(t["amount"] for t in d["user_thresholds"]) or "-"
    text = (f"alerts for {d['account']}: {d['webhook_url'] or '(none)'}\n"
            f"thresholds: {levels}; app users: {users}\nsigning secret: {d['signing_secret'] or '-'}\n")
    if d.get("deliveries"):
        text += _table(d["deliveries"], ["id", "account", "threshold_quota_tokens", "status", "attempts"])
    return text


@_handles("dashboard", "invite")
async def _dashboard_invite(args: argparse.Namespace, s: Settings, any_store: Store) -> tuple[Any, Table]:
    store = _dashboard_store(any_store)
    from quota_proxy.dashboard.invites import InviteError, invite, server_url

    try:
        created = await invite(store, s, args.account, args.email, args.role, server_url(s))
    except InviteError as exc:
        raise admin.AdminError(str(exc)) from None
    inv = created.invitation
    data = {"link": created.link, "email": inv.email, "account": inv.account_name, "role": inv.role.value,
            "expires_at": iso_time(inv.expires_at)}
    return data, lambda d: (
        f"{d['link']}\n# one-time link for {d['email']} ({d['role']} of {d['account']}), "
        f"valid until {d['expires_at']}: send it to them, it is not shown again\n"
    )


@_handles("dashboard", "logins")
async def _dashboard_logins(args: argparse.Namespace, s: Settings, any_store: Store) -> tuple[Any, Table]:
    store = _dashboard_store(any_store)
    if args.login_action == "disable":
        if not await store.disable_login(args.email):
            raise admin.AdminError(f"no dashboard login for {args.email!r}")
        return {"disabled": args.email.lower()}, lambda d: f"disabled {d['disabled']}; its sessions ended\n"
    data = [
        {"email": x.email, "account": x.account_name, "role": x.role.value,
         "created_at": iso_time(x.created_at), "disabled_at": iso_time(x.disabled_at)}
        for x in await store.list_logins()
    ]
    return data, lambda d: _table(d, ["email", "account", "role", "created_at", "disabled_at"])


@_handles("dashboard", "sessions")
async def _dashboard_sessions(args: argparse.Namespace, s: Settings, any_store: Store) -> tuple[Any, Table]:
    store = _dashboard_store(any_store)
    if args.session_action == "list":
        data = [
            {"id": x.public_id, "email": x.email, "account": x.account_name, "role": x.role.value,
             "created_at": iso_time(x.created_at), "last_seen_at": iso_time(x.last_seen_at),
             "expires_at": iso_time(x.expires_at), "address": x.address}
            for x in await store.list_sessions(args.email)
        ]
        return data, lambda d: _table(d, ["id", "email", "account", "role", "created_at", "last_seen_at"])
    count = await store.revoke_sessions(public_id=args.session, email=args.email, everyone=args.all)
    if args.session and not count:
        raise admin.AdminError(f"no live session {args.session!r} (see `quota-proxy dashboard sessions list`)")
    return {"revoked": count}, lambda d: f"revoked {d['revoked']} session(s)\n"


def _config_view(settings: Settings) -> dict[str, Any]:
    return {
        "ok": True,
        "config": str(settings.source) if settings.source else None,
        "store": open_store(settings.store).description,  # a URL is shown without its password
        "warnings": list(settings.warnings),
        "routes": [
            {"alias": r.alias, "upstream": ",".join(u.name for u in r.upstreams),
             "base_url": r.upstream.base_url,
             "model": r.model, "multiplier": str(r.multiplier), "stream": r.stream, "tier": r.tier,
             "max_output_tokens": r.max_output_tokens}
            for r in settings.routes.values()
        ],
        "packages": [
            {"id": p.id, "name": p.name, "price_usd": str(p.price_usd), "quota_tokens": p.quota_tokens}
            for p in settings.packages
        ],
    }


def _config_table(d: dict[str, Any]) -> str:
    return f"config ok: {d['config']}\nstore: {d['store']}\n" + _table(
        d["routes"], ["alias", "upstream", "model", "multiplier", "stream", "tier", "max_output_tokens"]
    )


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    if not rows:
        return "(none)\n"
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


if __name__ == "__main__":
    main()
