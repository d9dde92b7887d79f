"""docs/reference.md stays true: its config keys and defaults, commands and error codes
are checked against the code, so a new key, command or error cannot go undocumented."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from quota_proxy import errors
from quota_proxy.api.ops import NotReady
from quota_proxy.cli import build_parser
from quota_proxy.config import ConfigError, parse_settings
from quota_proxy.http_protocol import HeadersTooLarge, Overloaded, RequestTimeout

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "reference.md"
TEXT = REFERENCE.read_text(encoding="utf-8")

UPSTREAM = {"base_url": "http://127.0.0.1:1/v1"}
ROUTE = {"upstream": "u", "model": "m"}
PACKAGE = {"id": "p", "price_usd": 1, "quota_tokens": 1}


def config_with(section: str, key: str | None = None, value: Any = None) -> dict[str, Any]:
    """A minimal valid config, with one key of one section set (or none)."""
    tables: dict[str, dict[str, Any]] = {
        "upstreams": dict(UPSTREAM),
        "routes": dict(ROUTE),
        "packages": dict(PACKAGE),
    }
    raw: dict[str, Any] = {}
    if section not in tables:
        # "payments.stripe" is the table [payments.stripe], nested as TOML reads it.
        outer, _, inner = section.partition(".")
        raw[outer] = {inner: {}} if inner else {}
    target = tables.get(section) or (raw[outer][inner] if inner else raw[outer])
    if key is not None:
        target[key] = value
    raw.update(upstreams={"u": tables["upstreams"]}, routes={"r": tables["routes"]})
    raw["packages"] = [tables["packages"]]
    return raw


def documented_keys() -> dict[str, dict[str, str]]:
    """{section: {key: default cell}} from the reference's configuration tables."""
    sections: dict[str, dict[str, str]] = {}
    current = None
    for line in TEXT.splitlines():
        heading = re.match(r"### `\[+([a-z_]+(?:\.[a-z_]+)?)", line)
        if heading:
            current = heading.group(1)
            sections[current] = {}
            continue
        if line.startswith("## "):
            current = None
        row = re.match(r"\| (`[^|]+`) \| ([^|]+) \|", line)
        if current and row:
            for key in re.findall(r"`([a-z_]+)`", row.group(1)):
                sections[current][key] = row.group(2).strip()
    return sections


def accepted_keys(section: str) -> set[str]:
    """The keys the validator accepts, from its own "unknown key (expected one of: …)" problem."""
    with pytest.raises(ConfigError) as caught:
        parse(config_with(section, "not_a_key", 1))
    (problem,) = [p for p in caught.value.problems if "not_a_key" in p]
    listed = re.search(r"expected one of: ([^)]*)\)", problem)
    assert listed is not None, problem
    return set(listed.group(1).split(", "))


SECTIONS = (
    "server", "store", "billing", "funding", "dashboard", "upstreams", "routes", "packages", "payments.stripe",
    "alerts",
)
# [payments.stripe] needs its secrets in the environment and a public URL to parse at all.
STRIPE_ENV = {"K": "sk_test_x", "H": "whsec_x"}
STRIPE_REQUIRED = {"secret_key_env": "K", "webhook_secret_env": "H"}


def parse(raw: dict[str, Any]) -> Any:
    if "payments" in raw:
        raw["payments"]["stripe"] = {**STRIPE_REQUIRED, **raw["payments"]["stripe"]}
        raw["server"] = {"public_url": "https://gw.example"}
    return parse_settings(raw, env=STRIPE_ENV)


def test_every_section_is_documented() -> None:
    assert set(documented_keys()) == set(SECTIONS)


@pytest.mark.parametrize("section", SECTIONS)
def test_every_accepted_key_is_documented_and_no_other(section: str) -> None:
    assert set(documented_keys()[section]) == accepted_keys(section)


@pytest.mark.parametrize("section", SECTIONS)
def test_documented_defaults_are_the_real_defaults(section: str) -> None:
    """Setting a key to its documented default changes nothing."""
    baseline = parse(config_with(section))
    checked = 0
    for key, cell in documented_keys()[section].items():
        literal = re.fullmatch(r"`(.+)`", cell)
        if literal is None:
            continue  # "required", "none", "no limit", "the id": not a value
        value = tomllib.loads(f"v = {literal.group(1)}")["v"]
        assert parse(config_with(section, key, value)) == baseline, (section, key, cell)
        checked += 1
    assert checked or section == "packages"


def test_every_command_is_documented() -> None:
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    table = TEXT.split("## Command line", 1)[1]
    for name, sub in commands.items():
        actions = [a for a in sub._actions if a.dest == "action"]
        names = [f"{name} {action}" for action in actions[0].choices] if actions else [name]
        for full in names:
            documented = re.search(rf"\| `{re.escape(full)}[ `]", table)
            assert documented, f"`quota-proxy {full}` is missing from docs/reference.md"
        for option in (o for a in sub._actions for o in a.option_strings if o.startswith("--")):
            if option not in ("--help", "--config", "--json"):
                assert option in table, f"`quota-proxy {name}` option {option} is undocumented"


def test_every_error_code_is_in_the_error_table() -> None:
    table = TEXT.split("## Errors", 1)[1].split("\n## ", 1)[0]
    server = [HeadersTooLarge, RequestTimeout, Overloaded]  # answered by the HTTP layer itself
    classes = [errors.QuotaError, NotReady, *server, *errors.QuotaError.__subclasses__()]
    for cls in classes:
        row = f"| {cls.status} | `{cls.code}` | `{cls.type}` |"
        assert row in table, f"{cls.__name__}: no row {row!r} in docs/reference.md"
