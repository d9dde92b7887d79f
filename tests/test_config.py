"""Config validation (SPEC §5): every problem named by its key path, `config check`, and
`serve` refusing to start on a bad file."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Annotated, get_args, get_type_hints

import orjson
import pytest

from quota_proxy import ConfigError, create_app, load_settings
from quota_proxy.cli import SERVE_FLAGS, build_parser, with_serve_flags
from quota_proxy.config import (
    BillingSettings,
    FundingSettings,
    Rule,
    ServerSettings,
    StoreSettings,
    _Validator,
)
from tests.conftest import closed_port, run_cli

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parent.parent

VALID = """
[server]
port = 8080

[store]
path = "quota.db"

[billing]
overdraft = "cap"

[upstreams.local]
base_url = "http://127.0.0.1:11434/v1"
timeout_s = 600

[routes."quota/fast"]
upstream = "local"
model = "llama3.2:3b"
multiplier = 1

[routes."quota/opus"]
upstream = "local"
model = "big"
multiplier = 8
stream = false

[[packages]]
id = "starter"
name = "Starter"
price_usd = 5
quota_tokens = 5_000_000
"""


def write(tmp_path: Path, text: str, name: str = "quota-proxy.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems_of(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text))
    return caught.value.problems


# (replace this, with this, the problem expected, exactly or as a prefix ending in "…")
CASES = [
    ("multiplier = 8", "multiplier = 0", 'routes."quota/opus".multiplier: must be > 0'),
    ("multiplier = 8", "multiplier = -2", 'routes."quota/opus".multiplier: must be > 0'),
    ("multiplier = 8", 'multiplier = "x8"', 'routes."quota/opus".multiplier: must be a number'),
    ("multiplier = 8", "multipler = 8", 'routes."quota/opus".multipler: unknown key…'),
    (
        'model = "big"',
        'model = "big"\nupstream_model = "x"',
        'routes."quota/opus".upstream_model: unknown key…',
    ),
    ("[server]", "[server]\nhots = 1", "server.hots: unknown key…"),
    ("[billing]", "[biling]", "biling: unknown key…"),
    (
        'upstream = "local"\nmodel = "big"',
        'upstream = "nope"\nmodel = "big"',
        "routes.\"quota/opus\".upstream: no upstream named 'nope' in [upstreams]",
    ),
    ('overdraft = "cap"', 'overdraft = "maybe"', 'billing.overdraft: must be "cap" or "refuse"'),
    ("port = 8080", 'port = "8080"', "server.port: must be an integer"),
    ("port = 8080", "port = 70000", "server.port: must be <= 65535"),
    ("stream = false", 'stream = "no"', 'routes."quota/opus".stream: must be true or false'),
    (
        "stream = false",
        "max_output_tokens = 1.5",
        'routes."quota/opus".max_output_tokens: must be an integer',
    ),
    ("stream = false", "max_output_tokens = 0", 'routes."quota/opus".max_output_tokens: must be >= 1'),
    ("stream = false", 'tier = "gold"', 'routes."quota/opus".tier: must be "trusted" or "community"'),
    ("timeout_s = 600", 'timeout_s = "long"', "upstreams.local.timeout_s: must be a number"),
    ("timeout_s = 600", "timeout_s = 0", "upstreams.local.timeout_s: must be > 0"),
    (
        'base_url = "http://127.0.0.1:11434/v1"',
        'base_url = "ftp://example.com"',
        "upstreams.local.base_url: must start with http:// or https://",
    ),
    ('model = "big"\n', "", 'routes."quota/opus".model: is required'),
    ("quota_tokens = 5_000_000", 'quota_tokens = "lots"', "packages[0].quota_tokens: must be an integer"),
    ('path = "quota.db"', "path = 7", "store.path: must be a string"),
]


def matches(expected: str, problems: list[str]) -> bool:
    if expected.endswith("…"):
        return any(p.startswith(expected[:-1]) for p in problems)
    return expected in problems


async def test_the_valid_base_config_loads(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, VALID))
    assert set(settings.routes) == {"quota/fast", "quota/opus"}
    assert str(settings.routes["quota/opus"].multiplier) == "x8"
    assert settings.store.path == tmp_path / "quota.db"  # relative to the config's folder


async def test_each_problem_names_its_key_path(tmp_path: Path) -> None:
    for old, new, expected in CASES:
        assert old in VALID, old
        problems = problems_of(tmp_path, VALID.replace(old, new, 1))
        assert matches(expected, problems), (expected, problems)


async def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    text = (
        VALID.replace("multiplier = 8", "multiplier = 0")
        .replace('overdraft = "cap"', 'overdraft = "never"')
        .replace("port = 8080", 'port = "x"')
    )
    problems = problems_of(tmp_path, text)
    assert 'routes."quota/opus".multiplier: must be > 0' in problems
    assert 'billing.overdraft: must be "cap" or "refuse"' in problems
    assert "server.port: must be an integer" in problems
    assert len(problems) == 3


async def test_config_check_rejects_a_bad_file_with_exit_2(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        VALID.replace("multiplier = 8", "multiplier = 0").replace('overdraft = "cap"', 'overdraft = "x"'),
    )
    for args in (
        ("--config", str(config), "config", "check"),
        ("config", "check", "--config", str(config), "--json"),
    ):
        result = run_cli(*args, check=False)
        assert result.returncode == 2, result
        assert 'routes."quota/opus".multiplier: must be > 0' in result.stderr
        assert 'billing.overdraft: must be "cap" or "refuse"' in result.stderr
        assert result.stdout == ""
        assert "Traceback" not in result.stderr


async def test_config_check_names_an_unreadable_file(tmp_path: Path) -> None:
    broken = write(tmp_path, "[server\nport = 1\n", "broken.toml")
    result = run_cli("--config", str(broken), "config", "check", check=False)
    assert result.returncode == 2
    assert "broken.toml" in result.stderr
    assert "Traceback" not in result.stderr
    missing = tmp_path / "missing.toml"
    result = run_cli("--config", str(missing), "config", "check", check=False)
    assert result.returncode == 2
    assert "missing.toml" in result.stderr


async def test_config_check_accepts_a_good_file_and_prints_the_routes(tmp_path: Path) -> None:
    config = write(tmp_path, VALID)
    table = run_cli("--config", str(config), "config", "check")
    assert "quota/fast" in table.stdout and "quota/opus" in table.stdout
    data = orjson.loads(run_cli("config", "check", "--json", "--config", str(config)).stdout)
    assert data["ok"] is True
    assert [r["alias"] for r in data["routes"]] == ["quota/fast", "quota/opus"]
    assert not (tmp_path / "quota.db").exists()  # checking never creates the store


async def test_serve_with_a_bad_config_exits_without_serving(tmp_path: Path) -> None:
    config = write(tmp_path, VALID.replace("multiplier = 8", "multiplier = 0"))
    port = closed_port()
    result = subprocess.run(
        [sys.executable, "-m", "quota_proxy", "serve", "--config", str(config), "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 2
    assert 'routes."quota/opus".multiplier: must be > 0' in result.stderr
    assert not (tmp_path / "quota.db").exists()


async def test_create_app_refuses_a_bad_config(tmp_path: Path) -> None:
    config = write(
        tmp_path, VALID.replace('upstream = "local"\nmodel = "big"', 'upstream = "gone"\nmodel = "big"')
    )
    with pytest.raises(ConfigError) as caught:
        create_app(config)
    assert "routes.\"quota/opus\".upstream: no upstream named 'gone' in [upstreams]" in caught.value.problems


async def test_the_example_config_passes_config_check(tmp_path: Path) -> None:
    example = REPO / "config.example.toml"
    result = subprocess.run(
        [sys.executable, "-m", "quota_proxy", "--config", str(example), "config", "check", "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
        # PYTHONPATH: the checkout, when the package is not installed (a no-op when it is)
        env={"PATH": "/usr/bin:/bin", "HOSTED_LLM_KEY": "test-key", "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    data = orjson.loads(result.stdout)
    aliases = [r["alias"] for r in data["routes"]]
    assert aliases == [
        "quota/fast",
        "quota/balanced",
        "quota/sonnet",
        "quota/sonnet-pro",
        "quota/opus",
        "quota/opus-max",
    ]
    multipliers = [float(r["multiplier"].removeprefix("x")) for r in data["routes"]]
    assert multipliers == sorted(multipliers) and len(set(multipliers)) == 6  # rising
    assert data["warnings"] == []  # every api_key_env is set here


# -- each setting written once (issue 9, item 14) ---------------------------------------

SECTIONS = {"server": ServerSettings, "store": StoreSettings, "billing": BillingSettings, "funding": FundingSettings}
WRONG = {int: ('"x"', "must be an integer"), float: ('"x"', "must be a number"), bool: ('"x"', "must be true or false"),
         str: ("1", "must be a string"), Path: ("1", "must be a string"), Decimal: ("true", "…")}


def test_an_empty_file_gives_the_dataclass_defaults(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, ""))
    assert settings.server == ServerSettings()
    assert settings.billing == BillingSettings()
    assert settings.funding == FundingSettings()
    assert settings.store == StoreSettings(path=tmp_path / StoreSettings().path)


def test_every_field_of_every_section_is_a_checked_key(tmp_path: Path) -> None:
    """Keys, types and limits come from the dataclasses: a field added there is a key of the
    file, checked by its type, with no second list to update."""
    checked = 0
    from_environment = {"metrics_token", "password"}
    for section, cls in SECTIONS.items():
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in from_environment:  # read from the environment, never from the file
                problems = problems_of(tmp_path, f'[{section}]\n{f.name} = "x"\n')
                assert any(p.startswith(f"{section}.{f.name}: unknown key") for p in problems)
                continue
            kind = next(k for k in WRONG if k in (hints[f.name], *get_args(hints[f.name])))
            value, message = WRONG[kind]
            problems = problems_of(tmp_path, f"[{section}]\n{f.name} = {value}\n")
            expected = f"{section}.{f.name}: {message}"
            assert matches(expected, problems), (expected, problems)
            checked += 1
    assert checked == sum(len(dataclasses.fields(c)) for c in SECTIONS.values()) - len(from_environment)


def test_new_server_settings_are_validated(tmp_path: Path) -> None:
    text = (
        "[server]\nworkers = 0\nlog_level = \"loud\"\nheader_timeout_s = 0\nmax_connections = 0\n"
        "max_header_bytes = 10\n"
    )
    assert problems_of(tmp_path, text) == [
        "server.workers: must be >= 1",
        "server.header_timeout_s: must be > 0",
        "server.max_header_bytes: must be >= 1024",
        "server.max_connections: must be >= 1",
        'server.log_level: must be "debug", "info", "warning" or "error"',
    ]
    settings = load_settings(write(tmp_path, "[server]\nworkers = 3\nlog_level = \"warning\"\nheader_timeout_s = 2.5\n"))
    assert (settings.server.workers, settings.server.log_level, settings.server.header_timeout_s) == (3, "warning", 2.5)


def test_serve_flags_override_the_server_settings_of_the_same_name(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, '[server]\nworkers = 3\nlog_level = "warning"\nport = 9000\n'))
    flags = build_parser().parse_args(["serve", "--workers", "2", "--host", "0.0.0.0"])
    server = with_serve_flags(settings, flags).server
    assert (server.workers, server.host, server.log_level, server.port) == (2, "0.0.0.0", "warning", 9000)
    assert with_serve_flags(settings, build_parser().parse_args(["serve"])) == settings
    for name in SERVE_FLAGS:
        assert name in {f.name for f in dataclasses.fields(ServerSettings)}


async def test_reload_swaps_one_holder_that_every_reader_sees(tmp_path: Path) -> None:
    config = write(tmp_path, VALID)
    app = create_app(config)
    before = app.live.current
    config.write_text(
        VALID.replace("price_usd = 5", "price_usd = 7").replace('overdraft = "cap"', "quota_tokens_per_usd = 2_000_000")
        + '[routes."quota/new"]\nupstream = "local"\nmodel = "m"\n'
    )
    assert app.reload()
    after = app.live.current
    assert after is not before
    assert app.settings is after and app.services.settings is after
    assert "quota/new" in app.routes.routes and app.services.routes.routes is after.routes
    assert app.services.money.quota_tokens_from_usd(Decimal(1)) == 2_000_000
    assert [str(p.price_usd) for p in app.services.settings.packages] == ["7"]
    config.write_text(VALID.replace("multiplier = 8", "multiplier = 0"))
    assert not app.reload()
    assert app.live.current is after  # a bad file changes nothing


@dataclass(frozen=True, slots=True)
class _Weights:
    cache_read: Fraction = Fraction(1)


@dataclass(frozen=True, slots=True)
class _Section:
    """A section with the other kinds of field the reader knows, for the settings to come."""

    names: tuple[str, ...] = ()
    link: Annotated[str | None, Rule(url=True)] = None
    weights: _Weights = _Weights()
    mode: Annotated[str, Rule(choices=("a", "b"))] = "a"


def test_the_reader_knows_arrays_urls_fractions_and_nested_tables() -> None:
    v = _Validator()
    fields = v.read("x", {"names": ["m-*", "n"], "link": "https://h/p/", "weights": {"cache_read": 0.1}}, _Section)
    assert v.problems == []
    assert _Section(**fields) == _Section(("m-*", "n"), "https://h/p", _Weights(Fraction(1, 10)), "a")
    v.read("x", {"names": ["", 3], "link": "ftp://h", "weights": {"cache_read": -1, "other": 1}, "mode": "c"}, _Section)
    assert v.problems == [
        "x.names: must be an array of non-empty strings",
        "x.link: must start with http:// or https://",
        "x.weights.other: unknown key (expected one of: cache_read)",
        "x.weights.cache_read: must be >= 0",
        'x.mode: must be "a" or "b"',
    ]


def test_store_url_takes_its_password_from_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, '[store]\nurl = "postgresql://quota@db:5432/quota"\npassword_env = "QP_DB_PW"\npool_size = 4\n')
    settings = load_settings(path, env={"QP_DB_PW": "s3cret"})
    assert (settings.store.url, settings.store.password, settings.store.pool_size) == (
        "postgresql://quota@db:5432/quota", "s3cret", 4
    )
    assert "s3cret" not in repr(settings.store)
    assert matches("store.url: give either store.path (SQLite) or store.url (PostgreSQL), not both",
                   problems_of(tmp_path, '[store]\npath = "q.db"\nurl = "postgresql://x@y/z"\n'))
    assert matches('store.url: must start with "postgresql://"',
                   problems_of(tmp_path, '[store]\nurl = "mysql://x@y/z"\n'))
