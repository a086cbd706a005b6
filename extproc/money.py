"""Money is integer micro-dollars everywhere; these are the only two conversions to and from
decimal US dollars (config and command line in, headers and reports out)."""

from __future__ import annotations

from decimal import ROUND_CEILING, Decimal, InvalidOperation


def usd_to_micro(value: object, *, round_up: bool = False) -> int:
    """US dollars (a number or decimal string) as integer micro-dollars: exact, or rounded up
    (prices). Raises ValueError with a readable reason."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"not an amount of US dollars: {value!r}")
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise ValueError(f"not an amount of US dollars: {value!r}") from None
    if not amount.is_finite():
        raise ValueError(f"not an amount of US dollars: {value!r}")
    micro = amount * 1_000_000
    if round_up:
        return int(micro.to_integral_value(rounding=ROUND_CEILING))
    if micro != micro.to_integral_value():
        raise ValueError(f"amounts are exact to the micro-dollar: {value!r}")
    return int(micro)


def format_usd(micro: int) -> str:
    """Integer micro-dollars as an exact decimal string, e.g. 1234 -> '0.001234'."""
    sign = "-" if micro < 0 else ""
    micro = abs(micro)
    return f"{sign}{micro // 1_000_000}.{micro % 1_000_000:06d}"
