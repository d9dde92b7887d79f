"""Settings as frozen dataclasses read from one TOML file.

Validation collects every problem, each named by its key path
(`routes."quota/opus".multiplier: must be > 0`), so an operator fixes the file in one go.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from quota_proxy.money import Money, Multiplier, parse_decimal

DEFAULT_CONFIG_NAME = "quota-proxy.toml"
TIERS = ("trusted", "community")
OVERDRAFT_MODES = ("cap", "refuse")


class ConfigError(Exception):
    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 20_971_520
    graceful_timeout_s: float = 30.0
    metrics_token_env: str | None = None
    metrics_token: str | None = field(default=None, repr=False)
    log_format: str = "auto"


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """`path` picks SQLite (the default); `url` picks PostgreSQL and the rest tune it."""

    path: Path = Path("quota.db")
    url: str | None = None
    password_env: str | None = None
    password: str | None = field(default=None, repr=False)
    pool_size: int = 10
    connect_timeout_s: float = 5.0
    command_timeout_s: float = 10.0


@dataclass(frozen=True, slots=True)
class BillingSettings:
    quota_tokens_per_usd: int = 1_000_000
    overdraft: str = "cap"
    hold_ttl_s: int = 120


@dataclass(frozen=True, slots=True)
class FundingSettings:
    max_grant_usd: Decimal = Decimal(10_000)


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    base_url: str
    api_key_env: str | None = None
    api_key: str | None = field(default=None, repr=False)
    timeout_s: float = 600.0
    connect_timeout_s: float = 10.0
    cooldown_s: float = 30.0


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-key limits; a key's own values win over its route's defaults. None: no limit."""

    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None


@dataclass(frozen=True, slots=True)
class Route:
    alias: str
    upstreams: tuple[Upstream, ...]
    model: str
    multiplier: Multiplier
    stream: bool = True
    tier: str = "trusted"
    max_output_tokens: int = 4096
    description: str = ""
    limits: Limits = Limits()

    @property
    def upstream(self) -> Upstream:
        """The first (preferred) upstream."""
        return self.upstreams[0]


@dataclass(frozen=True, slots=True)
class Package:
    id: str
    name: str
    price_usd: Decimal
    quota_tokens: int


@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSettings = ServerSettings()
    store: StoreSettings = StoreSettings()
    billing: BillingSettings = BillingSettings()
    funding: FundingSettings = FundingSettings()
    upstreams: Mapping[str, Upstream] = field(default_factory=dict)
    routes: Mapping[str, Route] = field(default_factory=dict)
    packages: tuple[Package, ...] = ()
    source: Path | None = None
    warnings: tuple[str, ...] = ()

    @property
    def money(self) -> Money:
        return Money(self.billing.quota_tokens_per_usd)


def default_config_path() -> Path:
    return Path(os.environ.get("QUOTA_PROXY_CONFIG") or DEFAULT_CONFIG_NAME)


def load_settings(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate a TOML file; ConfigError lists every problem."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"{path}: config file not found"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read ({exc.strerror})"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: invalid TOML: {exc}"]) from None
    return parse_settings(raw, base_dir=path.resolve().parent, env=env, source=path)


def parse_settings(
    raw: Mapping[str, Any],
    *,
    base_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
    source: Path | None = None,
) -> Settings:
    v = _Validator()
    env = os.environ if env is None else env
    base_dir = base_dir or Path.cwd()
    v.only_keys("", raw, {"server", "store", "billing", "funding", "upstreams", "routes", "packages"})

    srv = v.table("server", raw.get("server"))
    v.only_keys(
        "server",
        srv,
        {"host", "port", "max_body_bytes", "graceful_timeout_s", "metrics_token_env", "log_format"},
    )
    metrics_env = srv.get("metrics_token_env")
    metrics_token = None
    if metrics_env is not None:
        metrics_env = v.string("server.metrics_token_env", metrics_env)
        metrics_token = env.get(metrics_env) or None
        if metrics_token is None:
            v.warn("server.metrics_token_env", f"environment variable {metrics_env} is not set; "
                   "GET /metrics refuses every request until it is")
    log_format = v.string("server.log_format", srv.get("log_format", "auto"))
    if log_format not in ("auto", "json", "text"):
        v.problem("server.log_format", 'must be "auto", "json" or "text"')
    server = ServerSettings(
        host=v.string("server.host", srv.get("host", "127.0.0.1")),
        port=v.integer("server.port", srv.get("port", 8080), 0, 65535),
        max_body_bytes=v.integer("server.max_body_bytes", srv.get("max_body_bytes", 20_971_520), 1),
        graceful_timeout_s=v.number(
            "server.graceful_timeout_s", srv.get("graceful_timeout_s", 30), positive=True
        ),
        metrics_token_env=metrics_env,
        metrics_token=metrics_token,
        log_format=log_format,
    )

    st = v.table("store", raw.get("store"))
    v.only_keys(
        "store", st,
        {"path", "url", "password_env", "pool_size", "connect_timeout_s", "command_timeout_s"},
    )
    store_path = Path(v.string("store.path", st.get("path", "quota.db")))
    if not store_path.is_absolute():
        store_path = base_dir / store_path
    store_url = st.get("url")
    if store_url is not None:
        store_url = v.string("store.url", store_url)
        if "path" in st:
            v.problem("store.url", "give either store.path (SQLite) or store.url (PostgreSQL), not both")
        if not store_url.startswith(("postgresql://", "postgres://")):
            v.problem("store.url", 'must start with "postgresql://"')
    password_env = st.get("password_env")
    password = None
    if password_env is not None:
        password_env = v.string("store.password_env", password_env)
        password = env.get(password_env) or None
        if password is None:
            v.warn("store.password_env", f"environment variable {password_env} is not set")
    store = StoreSettings(
        path=store_path,
        url=store_url,
        password_env=password_env,
        password=password,
        pool_size=v.integer("store.pool_size", st.get("pool_size", 10), 1, 1000),
        connect_timeout_s=v.number("store.connect_timeout_s", st.get("connect_timeout_s", 5), positive=True),
        command_timeout_s=v.number("store.command_timeout_s", st.get("command_timeout_s", 10), positive=True),
    )

    bl = v.table("billing", raw.get("billing"))
    v.only_keys("billing", bl, {"quota_tokens_per_usd", "overdraft", "hold_ttl_s"})
    overdraft = v.string("billing.overdraft", bl.get("overdraft", "cap"))
    if overdraft not in OVERDRAFT_MODES:
        v.problem("billing.overdraft", 'must be "cap" or "refuse"')
    billing = BillingSettings(
        quota_tokens_per_usd=v.integer(
            "billing.quota_tokens_per_usd", bl.get("quota_tokens_per_usd", 1_000_000), 1
        ),
        overdraft=overdraft,
        hold_ttl_s=v.integer("billing.hold_ttl_s", bl.get("hold_ttl_s", 120), 10),
    )

    fd = v.table("funding", raw.get("funding"))
    v.only_keys("funding", fd, {"max_grant_usd"})
    max_grant = v.decimal("funding.max_grant_usd", fd.get("max_grant_usd", 10_000))
    funding = FundingSettings(max_grant_usd=max_grant)

    upstreams: dict[str, Upstream] = {}
    for name, up in v.table("upstreams", raw.get("upstreams")).items():
        p = f"upstreams.{_quote(name)}"
        up = v.table(p, up)
        v.only_keys(p, up, {"base_url", "api_key_env", "timeout_s", "connect_timeout_s", "cooldown_s"})
        base_url = v.string(f"{p}.base_url", up.get("base_url"), required=True).rstrip("/")
        if base_url and not base_url.startswith(("http://", "https://")):
            v.problem(f"{p}.base_url", "must start with http:// or https://")
        key_env = up.get("api_key_env")
        api_key = None
        if key_env is not None:
            key_env = v.string(f"{p}.api_key_env", key_env)
            api_key = env.get(key_env) or None
            if api_key is None:
                v.warn(f"{p}.api_key_env", f"environment variable {key_env} is not set; "
                       "requests go to this upstream without a key")
        upstreams[name] = Upstream(
            name=name,
            base_url=base_url,
            api_key_env=key_env,
            api_key=api_key,
            timeout_s=v.number(f"{p}.timeout_s", up.get("timeout_s", 600), positive=True),
            connect_timeout_s=v.number(
                f"{p}.connect_timeout_s", up.get("connect_timeout_s", 10), positive=True
            ),
            cooldown_s=v.number(f"{p}.cooldown_s", up.get("cooldown_s", 30), positive=True),
        )

    routes: dict[str, Route] = {}
    for alias, rt in v.table("routes", raw.get("routes")).items():
        p = f"routes.{_quote(alias)}"
        rt = v.table(p, rt)
        v.only_keys(
            p,
            rt,
            {"upstream", "upstreams", "model", "multiplier", "stream", "tier", "max_output_tokens",
             "description", "rpm", "tpm", "max_concurrent"},
        )
        chosen = _route_upstreams(v, p, rt, upstreams)
        try:
            multiplier = Multiplier.parse(rt.get("multiplier", 1))
        except ValueError as exc:
            v.problem(f"{p}.multiplier", str(exc))
            multiplier = Multiplier.parse(1)
        tier = v.string(f"{p}.tier", rt.get("tier", "trusted"))
        if tier not in TIERS:
            v.problem(f"{p}.tier", 'must be "trusted" or "community"')
        limits = Limits(
            **{
                name: v.integer(f"{p}.{name}", rt[name], 1) if name in rt else None
                for name in ("rpm", "tpm", "max_concurrent")
            }
        )
        if chosen:
            routes[alias] = Route(
                alias=alias,
                upstreams=chosen,
                model=v.string(f"{p}.model", rt.get("model"), required=True),
                multiplier=multiplier,
                stream=v.boolean(f"{p}.stream", rt.get("stream", True)),
                tier=tier,
                max_output_tokens=v.integer(
                    f"{p}.max_output_tokens", rt.get("max_output_tokens", 4096), 1
                ),
                description=v.string(f"{p}.description", rt.get("description", "")),
                limits=limits,
            )

    packages: list[Package] = []
    raw_packages = raw.get("packages", [])
    if not isinstance(raw_packages, list):
        v.problem("packages", "must be an array of tables ([[packages]])")
        raw_packages = []
    seen_ids: set[str] = set()
    for i, pk in enumerate(raw_packages):
        p = f"packages[{i}]"
        pk = v.table(p, pk)
        v.only_keys(p, pk, {"id", "name", "price_usd", "quota_tokens"})
        pid = v.string(f"{p}.id", pk.get("id"), required=True)
        if pid in seen_ids:
            v.problem(f"{p}.id", f"duplicate package id {pid!r}")
        seen_ids.add(pid)
        packages.append(
            Package(
                id=pid,
                name=v.string(f"{p}.name", pk.get("name", pid)),
                price_usd=v.decimal(f"{p}.price_usd", pk.get("price_usd"), required=True),
                quota_tokens=v.integer(f"{p}.quota_tokens", pk.get("quota_tokens"), 1, required=True),
            )
        )

    if v.problems:
        raise ConfigError(v.problems)
    return Settings(
        server=server,
        store=store,
        billing=billing,
        funding=funding,
        upstreams=upstreams,
        routes=routes,
        packages=tuple(sorted(packages, key=lambda pk: (pk.price_usd, pk.id))),
        source=source,
        warnings=tuple(v.warnings),
    )


def _route_upstreams(
    v: _Validator, path: str, route: Mapping[str, Any], upstreams: Mapping[str, Upstream]
) -> tuple[Upstream, ...]:
    """`upstream = "a"`, or `upstreams = ["a", "b"]` tried in order; exactly one of them."""
    if ("upstream" in route) == ("upstreams" in route):
        v.problem(f"{path}.upstream", 'set either upstream = "name" or upstreams = ["a", "b"]')
        return ()
    if "upstream" in route:
        names = [v.string(f"{path}.upstream", route["upstream"], required=True)]
        where = f"{path}.upstream"
    else:
        raw = route["upstreams"]
        where = f"{path}.upstreams"
        if not isinstance(raw, list) or not raw or not all(isinstance(n, str) for n in raw):
            v.problem(where, "must be a non-empty array of upstream names")
            return ()
        if len(set(raw)) != len(raw):
            v.problem(where, "names an upstream twice")
        names = raw
    chosen = []
    for name in names:
        upstream = upstreams.get(name)
        if upstream is None:
            if name:
                v.problem(where, f"no upstream named {name!r} in [upstreams]")
            return ()
        chosen.append(upstream)
    return tuple(chosen)


def _quote(name: str) -> str:
    bare = name.replace("_", "").replace("-", "").isalnum()
    return name if bare else f'"{name}"'


class _Validator:
    def __init__(self) -> None:
        self.problems: list[str] = []
        self.warnings: list[str] = []

    def warn(self, path: str, message: str) -> None:
        self.warnings.append(f"{path}: {message}")

    def problem(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def only_keys(self, path: str, table: Mapping[str, Any], allowed: set[str]) -> None:
        for key in table:
            if key not in allowed:
                where = f"{path}.{_quote(key)}" if path else _quote(key)
                self.problem(where, f"unknown key (expected one of: {', '.join(sorted(allowed))})")

    def table(self, path: str, value: Any) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem(path, "must be a table")
            return {}
        return value

    def string(self, path: str, value: Any, required: bool = False) -> str:
        if value is None:
            if required:
                self.problem(path, "is required")
            return ""
        if not isinstance(value, str):
            self.problem(path, "must be a string")
            return ""
        if required and not value.strip():
            self.problem(path, "must not be empty")
        return value

    def integer(
        self, path: str, value: Any, low: int | None = None, high: int | None = None,
        required: bool = False,
    ) -> int:
        if value is None:
            if required:
                self.problem(path, "is required")
            return low or 0
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(path, "must be an integer")
            return low or 0
        if low is not None and value < low:
            self.problem(path, f"must be >= {low}")
        if high is not None and value > high:
            self.problem(path, f"must be <= {high}")
        return value

    def number(self, path: str, value: Any, positive: bool = False) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.problem(path, "must be a number")
            return 1.0
        if positive and not value > 0:
            self.problem(path, "must be > 0")
        return float(value)

    def boolean(self, path: str, value: Any) -> bool:
        if not isinstance(value, bool):
            self.problem(path, "must be true or false")
            return False
        return value

    def decimal(self, path: str, value: Any, required: bool = False) -> Decimal:
        if value is None:
            if required:
                self.problem(path, "is required")
            return Decimal(0)
        try:
            dec = parse_decimal(value)
        except ValueError as exc:
            self.problem(path, str(exc))
            return Decimal(0)
        if dec < 0:
            self.problem(path, "must be >= 0")
        return dec
