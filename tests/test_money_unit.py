"""money.py: the only conversions between decimal US dollars and integer micro-dollars.
Every expected value is worked out by hand (1 USD = 1,000,000 micro-USD)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from extproc.money import format_usd, usd_to_micro


def test_a_decimal_string_becomes_exact_micro_dollars() -> None:
    assert usd_to_micro("1.5") == 1_500_000


def test_an_integer_of_dollars_becomes_micro_dollars() -> None:
    assert usd_to_micro(2) == 2_000_000


def test_a_float_price_becomes_micro_dollars() -> None:
    assert usd_to_micro(0.25) == 250_000


def test_a_fraction_of_a_micro_dollar_is_refused_unless_rounding_up() -> None:
    with pytest.raises(ValueError, match="exact to the micro-dollar"):
        usd_to_micro("0.0000015")


def test_round_up_takes_the_next_whole_micro_dollar() -> None:
    assert usd_to_micro("0.0000015", round_up=True) == 2  # 1.5 micro-USD -> 2


def test_round_up_keeps_an_exact_amount() -> None:
    assert usd_to_micro("0.000003", round_up=True) == 3


@pytest.mark.parametrize("value", [True, None, Decimal("1.5"), [1], "abc", "inf", "NaN"])
def test_anything_but_a_finite_number_or_decimal_string_is_refused(value: object) -> None:
    with pytest.raises(ValueError, match="not an amount of US dollars"):
        usd_to_micro(value)


def test_format_usd_writes_six_decimals() -> None:
    assert format_usd(1234) == "0.001234"


def test_format_usd_of_whole_dollars() -> None:
    assert format_usd(3_000_000) == "3.000000"


def test_format_usd_of_zero_has_no_sign() -> None:
    assert format_usd(0) == "0.000000"


def test_format_usd_of_a_debt_is_negative() -> None:
    assert format_usd(-1_500_001) == "-1.500001"
