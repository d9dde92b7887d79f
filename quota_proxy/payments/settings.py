"""`[payments.stripe]` and `[alerts]`: parsed here and handed to config.py, which owns the file.

Stripe is on when `[payments.stripe]` is present. Then the webhook signing secret must be
set and non-empty: an empty secret would let anyone sign events (SDKs accepted one as valid
until late 2026), so the gateway refuses to start rather than run without it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

DEFAULT_API_BASE = "https://api.stripe.com"
DEFAULT_TOLERANCE_S = 300  # Stripe's own default for webhook timestamps


@dataclass(frozen=True, slots=True)
class StripeSettings:
    secret_key_env: str
    webhook_secret_env: str
    api_base: str = DEFAULT_API_BASE
    webhook_tolerance_s: int = DEFAULT_TOLERANCE_S
    currency: str = "usd"  # packages are priced in dollars (price_usd)
    secret_key: str = field(default="", repr=False)
    webhook_secret: str = field(default="", repr=False)


@dataclass(frozen=True, slots=True)
class PaymentSettings:
    stripe: StripeSettings | None = None


@dataclass(frozen=True, slots=True)
class AlertConfig:
    """How the low-balance alert loop runs (thresholds and URLs are per account, in the store)."""

    poll_interval_s: float = 5.0
    retry_base_s: float = 30.0  # attempt n waits retry_base_s × 2^(n-1), capped at 6 hours
    max_attempts: int = 10
    timeout_s: float = 10.0


def parse_payments(
    raw: Any, env: Mapping[str, str], package_prices: Mapping[str, Decimal]
) -> tuple[PaymentSettings, list[str]]:
    """The payments table and the problems found in it, each named by its key path."""
    problems: list[str] = []
    if raw is None:
        return PaymentSettings(), problems
    if not isinstance(raw, dict):
        return PaymentSettings(), ["payments: must be a table"]
    for key in raw:
        if key != "stripe":
            problems.append(f"payments.{key}: unknown key (expected one of: stripe)")
    st = raw.get("stripe")
    if st is None:
        return PaymentSettings(), problems
    if not isinstance(st, dict):
        return PaymentSettings(), [*problems, "payments.stripe: must be a table"]
    allowed = {"secret_key_env", "webhook_secret_env", "api_base", "webhook_tolerance_s"}
    for key in st:
        if key not in allowed:
            problems.append(
                f"payments.stripe.{key}: unknown key (expected one of: {', '.join(sorted(allowed))})"
            )

    def env_name(key: str) -> str:
        name = st.get(key)
        if not isinstance(name, str) or not name.strip():
            problems.append(f"payments.stripe.{key}: is required (the name of an environment variable)")
            return ""
        return name

    key_env = env_name("secret_key_env")
    hook_env = env_name("webhook_secret_env")
    secret_key = env.get(key_env, "").strip() if key_env else ""
    webhook_secret = env.get(hook_env, "").strip() if hook_env else ""
    if key_env and not secret_key:
        problems.append(
            f"payments.stripe.secret_key_env: environment variable {key_env} is not set or empty; "
            "Stripe needs its API key"
        )
    if hook_env and not webhook_secret:
        problems.append(
            f"payments.stripe.webhook_secret_env: environment variable {hook_env} is not set or empty; "
            "refusing to accept Stripe webhooks without a signing secret"
        )
    api_base = st.get("api_base", DEFAULT_API_BASE)
    if not isinstance(api_base, str) or not api_base.startswith(("http://", "https://")):
        problems.append("payments.stripe.api_base: must be a URL starting with http:// or https://")
        api_base = DEFAULT_API_BASE
    tolerance = st.get("webhook_tolerance_s", DEFAULT_TOLERANCE_S)
    if isinstance(tolerance, bool) or not isinstance(tolerance, int) or not 1 <= tolerance <= 3600:
        problems.append("payments.stripe.webhook_tolerance_s: must be an integer from 1 to 3600")
        tolerance = DEFAULT_TOLERANCE_S
    for package_id, price in package_prices.items():
        if (price * 100) % 1 != 0:
            problems.append(
                f"packages ({package_id}).price_usd: must be whole cents to be sold through Stripe"
            )
    stripe = StripeSettings(
        secret_key_env=key_env,
        webhook_secret_env=hook_env,
        api_base=api_base.rstrip("/"),
        webhook_tolerance_s=tolerance,
        secret_key=secret_key,
        webhook_secret=webhook_secret,
    )
    return PaymentSettings(stripe=stripe), problems


def parse_alerts(raw: Any) -> tuple[AlertConfig, list[str]]:
    problems: list[str] = []
    if raw is None:
        return AlertConfig(), problems
    if not isinstance(raw, dict):
        return AlertConfig(), ["alerts: must be a table"]
    defaults = AlertConfig()
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in ("poll_interval_s", "retry_base_s", "max_attempts", "timeout_s"):
            problems.append(
                f"alerts.{key}: unknown key (expected one of: max_attempts, poll_interval_s, "
                "retry_base_s, timeout_s)"
            )
            continue
        if key == "max_attempts":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append("alerts.max_attempts: must be an integer >= 1")
                continue
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            problems.append(f"alerts.{key}: must be a number > 0")
            continue
        values[key] = value
    return AlertConfig(
        poll_interval_s=float(values.get("poll_interval_s", defaults.poll_interval_s)),
        retry_base_s=float(values.get("retry_base_s", defaults.retry_base_s)),
        max_attempts=int(values.get("max_attempts", defaults.max_attempts)),
        timeout_s=float(values.get("timeout_s", defaults.timeout_s)),
    ), problems
