"""Settings as frozen dataclasses read from one TOML file.

Each setting is written once, as a dataclass field: its name is the TOML key, its annotation
the type checked, its default the default, and an `Annotated[..., Rule(...)]` any further
limit; a field without a default is required. The loader adds only what ties keys together
(route -> upstream names, secrets from the environment, paths relative to the file).

Validation collects every problem, each named by its key path
(`routes."quota/opus".multiplier: must be > 0`), so an operator fixes the file in one go.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tomllib
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, replace
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin, get_type_hints

from quota_proxy.money import Money, Multiplier, parse_decimal
from quota_proxy.payments.settings import AlertConfig, PaymentSettings, parse_alerts, parse_payments
from quota_proxy.usage import DEFAULT_WEIGHTS, BucketWeights

DEFAULT_CONFIG_NAME = "quota-proxy.toml"
TIERS = ("trusted", "community")
OVERDRAFT_MODES = ("cap", "refuse")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "json", "text")
SECURE_COOKIES = ("auto", "always", "never")
UPSTREAM_APIS = ("openai", "anthropic")
UPSTREAM_AUTH = ("auto", "bearer", "x-api-key")


class ConfigError(Exception):
    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True, slots=True)
class Rule:
    """What a TOML value must be, beyond its field's type (which comes from the annotation).
    A field without a default is required."""

    low: int | None = None  # integers: at least this
    high: int | None = None  # integers: at most this
    positive: bool = False  # numbers: > 0
    choices: tuple[str, ...] = ()  # strings: one of these
    url: bool = False  # strings: an http(s) URL, kept without its trailing "/"
    in_file: bool = True  # False: not a key of the file; the loader fills it in


NOT_IN_FILE = Rule(in_file=False)


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: Annotated[int, Rule(low=0, high=65535)] = 8080
    workers: Annotated[int, Rule(low=1)] = 1
    max_body_bytes: Annotated[int, Rule(low=1)] = 20_971_520
    graceful_timeout_s: Annotated[float, Rule(positive=True)] = 30.0
    # Slow and greedy clients (quota_proxy.http_protocol): a connection must finish its
    # request headers this long after it opened (or its request began); headers past
    # max_header_bytes are refused; requests on connections past max_connections get a 503.
    header_timeout_s: Annotated[float, Rule(positive=True)] = 10.0
    max_header_bytes: Annotated[int, Rule(low=1024)] = 131_072
    max_connections: Annotated[int, Rule(low=1)] = 2048
    metrics_token_env: str | None = None
    metrics_token: Annotated[str | None, NOT_IN_FILE] = field(default=None, repr=False)
    log_level: Annotated[str, Rule(choices=LOG_LEVELS)] = "info"
    log_format: Annotated[str, Rule(choices=LOG_FORMATS)] = "auto"
    # Where people reach the gateway ("https://llm.example.com"): dashboard invitation links,
    # Stripe Checkout's return URLs (required with [payments.stripe]).
    public_url: Annotated[str | None, Rule(url=True)] = None


@dataclass(frozen=True, slots=True)
class DashboardSettings:
    """The web dashboard: where it is mounted and how its sessions behave."""

    enabled: bool = True
    path: str = "/dashboard"  # not under /v1; kept without a trailing "/"
    # "auto": Secure cookies over TLS or with an https public_url; "always"; "never".
    secure_cookies: Annotated[str, Rule(choices=SECURE_COOKIES)] = "auto"
    session_idle_minutes: Annotated[int, Rule(low=1)] = 60
    session_max_hours: Annotated[int, Rule(low=1)] = 12
    invitation_hours: Annotated[int, Rule(low=1)] = 72


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """`path` picks SQLite (the default); `url` picks PostgreSQL and the rest tune it."""

    path: Path = Path("quota.db")  # relative: to the config file's folder
    url: str | None = None  # postgresql://user@host:5432/db (not together with path)
    password_env: str | None = None
    password: Annotated[str | None, NOT_IN_FILE] = field(default=None, repr=False)
    pool_size: Annotated[int, Rule(low=1, high=1000)] = 10  # connections per gateway process
    connect_timeout_s: Annotated[float, Rule(positive=True)] = 5.0
    command_timeout_s: Annotated[float, Rule(positive=True)] = 10.0
    # Settlements wait here for their group commit (store/group_commit.py); default: beside
    # the SQLite file, or `quota-settlements` beside the config file for PostgreSQL.
    journal: Path | None = None
    # A settlement group gathers settlements for settle_gather_ms, then commits at the next
    # quiet moment (the gateway waiting on an upstream), and after settle_delay_ms at the
    # latest (gathering never outlasts it); settle_delay_ms 0: at the next event-loop turn.
    settle_gather_ms: Annotated[int, Rule(low=0, high=60_000)] = 5
    settle_delay_ms: Annotated[int, Rule(low=0, high=60_000)] = 20


@dataclass(frozen=True, slots=True)
class BillingSettings:
    quota_tokens_per_usd: Annotated[int, Rule(low=1)] = 1_000_000
    overdraft: Annotated[str, Rule(choices=OVERDRAFT_MODES)] = "cap"
    hold_ttl_s: Annotated[int, Rule(low=10)] = 120


@dataclass(frozen=True, slots=True)
class FundingSettings:
    max_grant_usd: Decimal = Decimal(10_000)


@dataclass(frozen=True, slots=True)
class Upstream:
    name: Annotated[str, NOT_IN_FILE]
    base_url: Annotated[str, Rule(url=True)]
    api_key_env: str | None = None
    api_key: Annotated[str | None, NOT_IN_FILE] = field(default=None, repr=False)
    timeout_s: Annotated[float, Rule(positive=True)] = 600.0
    connect_timeout_s: Annotated[float, Rule(positive=True)] = 10.0
    cooldown_s: Annotated[float, Rule(positive=True)] = 30.0
    # What the upstream speaks: "openai" (Chat Completions; the Responses API too when
    # responses = true) or "anthropic" (the Messages API, authenticated by x-api-key).
    api: Annotated[str, Rule(choices=UPSTREAM_APIS)] = "openai"
    responses: bool = False
    messages: bool = False  # an "openai" upstream that serves the Messages API too (vLLM, SGLang)
    # How the key is sent: "auto" is Bearer for "openai", x-api-key for "anthropic" (an
    # open-weight server's Messages endpoint may want Bearer instead).
    auth: Annotated[str, Rule(choices=UPSTREAM_AUTH)] = "auto"


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-key limits; a key's own values win over its route's defaults. None: no limit.
    In the file they are keys of the route's table."""

    rpm: Annotated[int | None, Rule(low=1)] = None
    tpm: Annotated[int | None, Rule(low=1)] = None
    max_concurrent: Annotated[int | None, Rule(low=1)] = None


@dataclass(frozen=True, slots=True)
class Route:
    alias: Annotated[str, NOT_IN_FILE]
    upstreams: Annotated[tuple[Upstream, ...], NOT_IN_FILE]  # from `upstream` or `upstreams`
    model: str
    multiplier: Multiplier = Multiplier(Fraction(1))
    stream: bool = True
    tier: Annotated[str, Rule(choices=TIERS)] = "trusted"
    max_output_tokens: Annotated[int, Rule(low=1)] = 4096
    description: str = ""
    limits: Annotated[Limits, NOT_IN_FILE] = Limits()
    match: tuple[str, ...] = ()  # more model names or fnmatch patterns ("claude-sonnet-*")
    weights: BucketWeights = DEFAULT_WEIGHTS  # [routes."x".weights]: per-bucket price weights

    @property
    def upstream(self) -> Upstream:
        """The first (preferred) upstream."""
        return self.upstreams[0]


@dataclass(frozen=True, slots=True)
class Package:
    id: str
    price_usd: Decimal
    quota_tokens: Annotated[int, Rule(low=1)]
    name: str = ""  # default: the id


@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSettings = ServerSettings()
    store: StoreSettings = StoreSettings()
    billing: BillingSettings = BillingSettings()
    funding: FundingSettings = FundingSettings()
    dashboard: DashboardSettings = DashboardSettings()
    upstreams: Mapping[str, Upstream] = field(default_factory=dict)
    routes: Mapping[str, Route] = field(default_factory=dict)
    packages: tuple[Package, ...] = ()
    payments: PaymentSettings = PaymentSettings()  # read by quota_proxy.payments.settings
    alerts: AlertConfig = AlertConfig()
    source: Annotated[Path | None, NOT_IN_FILE] = None
    warnings: Annotated[tuple[str, ...], NOT_IN_FILE] = ()

    @property
    def money(self) -> Money:
        return Money(self.billing.quota_tokens_per_usd)


class LiveSettings:
    """The running Settings behind one reference. A request reads `current` once and uses
    that snapshot to the end, so a reload is one assignment and never mixes two files."""

    __slots__ = ("current",)

    def __init__(self, settings: Settings) -> None:
        self.current = settings


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
    """Validate a parsed TOML document; ConfigError lists every problem. Keys, types and
    defaults come from the dataclasses above; this adds only what ties keys together."""
    v = _Validator()
    env = os.environ if env is None else env
    base_dir = base_dir or Path.cwd()
    v.only_keys("", raw, _keys(Settings))

    server = ServerSettings(**v.read("server", raw.get("server"), ServerSettings))
    if server.metrics_token_env is not None:
        metrics_token = env.get(server.metrics_token_env) or None
        if metrics_token is None:
            v.warn("server.metrics_token_env", f"environment variable {server.metrics_token_env} is not set; "
                   "GET /metrics refuses every request until it is")
        server = replace(server, metrics_token=metrics_token)

    raw_store = raw.get("store")
    store = StoreSettings(**v.read("store", raw_store, StoreSettings))
    if not store.path.is_absolute():
        store = replace(store, path=base_dir / store.path)
    if store.journal is None and store.url is not None:
        store = replace(store, journal=base_dir / "quota-settlements")
    elif store.journal is not None and not store.journal.is_absolute():
        store = replace(store, journal=base_dir / store.journal)
    if store.url is not None:
        if isinstance(raw_store, dict) and "path" in raw_store:
            v.problem("store.url", "give either store.path (SQLite) or store.url (PostgreSQL), not both")
        if not store.url.startswith(("postgresql://", "postgres://")):
            v.problem("store.url", 'must start with "postgresql://"')
    if store.password_env is not None:
        password = env.get(store.password_env) or None
        if password is None:
            v.warn("store.password_env", f"environment variable {store.password_env} is not set")
        store = replace(store, password=password)
    billing = BillingSettings(**v.read("billing", raw.get("billing"), BillingSettings))
    funding = FundingSettings(**v.read("funding", raw.get("funding"), FundingSettings))
    dashboard = DashboardSettings(**v.read("dashboard", raw.get("dashboard"), DashboardSettings))
    path = dashboard.path.rstrip("/")
    if not path.startswith("/") or path == "/v1" or path.startswith("/v1/") or any(c in path for c in "?#% "):
        v.problem("dashboard.path", 'must be a path such as "/dashboard" (not / and not under /v1)')
    dashboard = replace(dashboard, path=path)

    upstreams: dict[str, Upstream] = {}
    for name, table in v.table("upstreams", raw.get("upstreams")).items():
        p = f"upstreams.{_quote(name)}"
        fields = v.read(p, table, Upstream)
        key_env = fields["api_key_env"]
        if key_env is not None:
            fields["api_key"] = env.get(key_env) or None
            if fields["api_key"] is None:
                v.warn(f"{p}.api_key_env", f"environment variable {key_env} is not set; "
                       "requests go to this upstream without a key")
        upstreams[name] = Upstream(name=name, **fields)

    routes: dict[str, Route] = {}
    for alias, table in v.table("routes", raw.get("routes")).items():
        p = f"routes.{_quote(alias)}"
        table = v.table(p, table)
        fields = v.read(p, table, Route, also=(Limits,), extra_keys=("upstream", "upstreams"))
        limits = Limits(**v.read(p, table, Limits, check_keys=False))
        chosen = _route_upstreams(v, p, table, upstreams)
        if chosen:
            routes[alias] = Route(alias=alias, upstreams=chosen, limits=limits, **fields)

    packages: list[Package] = []
    raw_packages = raw.get("packages", [])
    if not isinstance(raw_packages, list):
        v.problem("packages", "must be an array of tables ([[packages]])")
        raw_packages = []
    seen_ids: set[str] = set()
    for i, table in enumerate(raw_packages):
        p = f"packages[{i}]"
        package = Package(**v.read(p, table, Package))
        if package.id in seen_ids:
            v.problem(f"{p}.id", f"duplicate package id {package.id!r}")
        seen_ids.add(package.id)
        packages.append(package if package.name else replace(package, name=package.id))

    payments, problems = parse_payments(
        raw.get("payments"), env, {p.id: p.price_usd for p in packages}
    )
    v.problems.extend(problems)
    if payments.stripe is not None and not server.public_url:
        v.problem("server.public_url", "is required with [payments.stripe] (Checkout's return URLs)")
    alerts, problems = parse_alerts(raw.get("alerts"))
    v.problems.extend(problems)

    if v.problems:
        raise ConfigError(v.problems)
    return Settings(
        server=server,
        store=store,
        billing=billing,
        funding=funding,
        dashboard=dashboard,
        upstreams=upstreams,
        routes=routes,
        packages=tuple(sorted(packages, key=lambda pk: (pk.price_usd, pk.id))),
        payments=payments,
        alerts=alerts,
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


# -- reading a table into a dataclass's fields -----------------------------------------


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    kind: Any  # int, float, str, bool, Path, Decimal, Multiplier, or a nested dataclass
    optional: bool  # `X | None`: the file may leave it out, and then it is None
    rule: Rule
    default: Any  # MISSING: required


@functools.cache
def _fields(cls: type) -> tuple[_Field, ...]:
    """The fields of a settings dataclass that are keys of its TOML table."""
    hints = get_type_hints(cls, include_extras=True)
    found = []
    for f in dataclasses.fields(cls):
        hint, rule = hints[f.name], Rule()
        if get_origin(hint) is Annotated:
            hint, *extras = get_args(hint)
            rule = next((x for x in extras if isinstance(x, Rule)), rule)
        if not rule.in_file:
            continue
        args = get_args(hint)
        optional = type(None) in args and get_origin(hint) in (UnionType, Union)
        kind = next(a for a in args if a is not type(None)) if optional else hint
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            default = MISSING
        found.append(_Field(f.name, kind, optional, rule, default))
    return tuple(found)


def _keys(cls: type) -> set[str]:
    return {f.name for f in _fields(cls)}


def _choices(choices: tuple[str, ...]) -> str:
    quoted = [f'"{c}"' for c in choices]
    return ", ".join(quoted[:-1]) + " or " + quoted[-1] if len(quoted) > 1 else quoted[0]


class _Validator:
    def __init__(self) -> None:
        self.problems: list[str] = []
        self.warnings: list[str] = []

    def warn(self, path: str, message: str) -> None:
        self.warnings.append(f"{path}: {message}")

    def problem(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def read(
        self,
        path: str,
        value: Any,
        cls: type,
        *,
        also: tuple[type, ...] = (),
        extra_keys: tuple[str, ...] = (),
        check_keys: bool = True,
    ) -> dict[str, Any]:
        """The keyword arguments for `cls` from one TOML table (default where a key is
        absent). `also`: classes whose keys share the table."""
        table = self.table(path, value)
        if check_keys:
            allowed = _keys(cls).union(*(_keys(c) for c in also), extra_keys)
            self.only_keys(path, table, allowed)
        return {f.name: self.field(f"{path}.{f.name}", table, f) for f in _fields(cls)}

    def field(self, path: str, table: Mapping[str, Any], f: _Field) -> Any:
        if f.name not in table:
            if f.default is MISSING:
                self.problem(path, "is required")
                return _PLACEHOLDERS.get(f.kind)
            return f.default
        value, rule, kind = table[f.name], f.rule, f.kind
        if kind is bool:
            return self.boolean(path, value)
        if kind is int:
            return self.integer(path, value, rule.low, rule.high)
        if kind is float:
            return self.number(path, value, positive=rule.positive)
        if kind is Decimal:
            return self.decimal(path, value)
        if kind is Fraction:
            return Fraction(self.decimal(path, value))
        if kind is Multiplier:
            try:
                return Multiplier.parse(value)
            except ValueError as exc:
                self.problem(path, str(exc))
                return _PLACEHOLDERS[Multiplier]
        if get_origin(kind) is tuple:  # tuple[str, ...]: an array of strings
            if not isinstance(value, list) or not all(isinstance(s, str) and s.strip() for s in value):
                self.problem(path, "must be an array of non-empty strings")
                return ()
            return tuple(value)
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):  # a table of its own: [section.name]
            return kind(**self.read(path, value, kind))
        text = self.string(path, value, required=f.default is MISSING)
        if rule.choices and text not in rule.choices:
            self.problem(path, f"must be {_choices(rule.choices)}")
        if rule.url:
            text = text.rstrip("/")
            if text and not text.startswith(("http://", "https://")):
                self.problem(path, "must start with http:// or https://")
        return Path(text) if kind is Path else text

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
        if not isinstance(value, str):
            self.problem(path, "must be a string")
            return ""
        if required and not value.strip():
            self.problem(path, "must not be empty")
        return value

    def integer(self, path: str, value: Any, low: int | None = None, high: int | None = None) -> int:
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

    def decimal(self, path: str, value: Any) -> Decimal:
        try:
            dec = parse_decimal(value)
        except ValueError as exc:
            self.problem(path, str(exc))
            return Decimal(0)
        if dec < 0:
            self.problem(path, "must be >= 0")
        return dec


# A stand-in for a missing or invalid required value, so that reading goes on and every
# problem is reported; the Settings are never built when there is one.
_PLACEHOLDERS: dict[Any, Any] = {str: "", int: 0, float: 1.0, Decimal: Decimal(0), Multiplier: Multiplier(Fraction(1))}
