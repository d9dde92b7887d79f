"""Quota tokens, dollars, multipliers and the charge formula — integers and Decimal only."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction


@dataclass(frozen=True, slots=True)
class Multiplier:
    """A route multiplier kept as an exact fraction so that charges never see a float."""

    value: Fraction

    @classmethod
    def parse(cls, raw: object) -> Multiplier:
        dec = parse_decimal(raw)
        if dec <= 0:
            raise ValueError("must be > 0")
        return cls(Fraction(dec))

    def charge(self, tokens: int) -> int:
        """ceil(tokens × multiplier), exactly."""
        return -(-tokens * self.value.numerator // self.value.denominator)

    def affordable_tokens(self, quota_tokens: int) -> int:
        """The most tokens whose charge fits in quota_tokens."""
        if quota_tokens <= 0:
            return 0
        return quota_tokens * self.value.denominator // self.value.numerator

    def __str__(self) -> str:
        """'x3', 'x0.5', 'x1.25'."""
        return _multiplier_text(self.value.numerator, self.value.denominator)


@functools.lru_cache(maxsize=256)
def _multiplier_text(numerator: int, denominator: int) -> str:
    """Every request names its route's multiplier: formatted once per multiplier."""
    dec = Decimal(numerator) / Decimal(denominator)
    return "x" + format(dec.normalize(), "f")


class Money:
    """Conversions between quota tokens and dollars at a fixed integer rate."""

    __slots__ = ("per_usd",)

    def __init__(self, quota_tokens_per_usd: int) -> None:
        self.per_usd = quota_tokens_per_usd

    def usd(self, quota_tokens: int) -> str:
        """'$5.50', '$14.9844', '-$0.02': two decimals at least, more only where needed to be exact."""
        return format_usd(_exact_decimal(Fraction(quota_tokens, self.per_usd)))

    def quota_tokens_from_usd(self, amount: object) -> int:
        """An exact dollar amount to whole quota tokens; ValueError if it is not exact."""
        dec = parse_decimal(amount)
        tokens = dec * self.per_usd
        if tokens != tokens.to_integral_value():
            raise ValueError(f"must be a whole number of quota tokens (a multiple of {self.usd(1)})")
        return int(tokens)

    def rate_per_usd(self, quota_tokens: int, price_usd: Decimal) -> str:
        """Quota tokens per dollar of a package, as an exact-enough decimal string."""
        if price_usd == 0:
            return "free"
        rate = Decimal(quota_tokens) / price_usd
        return format(rate.quantize(Decimal("0.01")).normalize(), "f")


def parse_decimal(amount: object) -> Decimal:
    """A number from JSON, TOML or the CLI (dollars, a multiplier): numbers and numeric
    strings only, finite. ValueError says what is wrong, for the caller to prefix."""
    if isinstance(amount, bool) or not isinstance(amount, (int, float, str, Decimal)):
        raise ValueError("must be a number")
    try:
        # repr() of a float is its shortest exact decimal form ("0.5", "1.1").
        dec = Decimal(repr(amount)) if isinstance(amount, float) else Decimal(str(amount).strip())
    except InvalidOperation:
        raise ValueError("must be a number") from None
    if not dec.is_finite():
        raise ValueError("must be a finite number")
    return dec


def _exact_decimal(value: Fraction) -> Decimal:
    """A Fraction whose denominator divides a power of ten, as an exact Decimal."""
    num, den = value.numerator, value.denominator
    digits = 0
    while (10**digits) % den != 0 and digits < 40:
        digits += 1
    scale = 10**digits
    if scale % den != 0:
        # A rate like 3 quota tokens per dollar: round half-up at 6 places, shown as such.
        return (Decimal(num) / Decimal(den)).quantize(Decimal("0.000001"))
    return Decimal(num * (scale // den)).scaleb(-digits)


def format_usd(amount: Decimal) -> str:
    """A Decimal dollar amount as '$20.00' (two decimals at least, exact beyond)."""
    sign = "-" if amount < 0 else ""
    text = format(abs(amount).normalize(), "f")
    whole, _, frac = text.partition(".")
    return f"{sign}${whole}.{frac.rstrip('0').ljust(2, '0')}"
