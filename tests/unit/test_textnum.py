"""edpilot.textnum: numbers as the Prometheus text format and Kubernetes write them, ASCII only."""

from __future__ import annotations

import math

import pytest

from edpilot.textnum import ascii_float, ascii_int, positive_int


@pytest.mark.parametrize(
    ("text", "value"),
    [("0", 0), ("42", 42), (" 7 ", 7), ("007", 7), ("999999999999999999", 999999999999999999)],
)
def test_ascii_integers(text: str, value: int) -> None:
    assert ascii_int(text) == value


@pytest.mark.parametrize("text", ["", "-1", "+1", "1.0", "1_000", "²", "٣", "９", "1e3", "0x10", "9" * 19])
def test_anything_else_is_no_integer(text: str) -> None:
    assert ascii_int(text) is None


def test_positive_int_bounds() -> None:
    assert positive_int("0") is None
    assert positive_int("1") == 1
    assert positive_int("64", maximum=64) == 64
    assert positive_int("65", maximum=64) is None
    assert positive_int(None) is None


@pytest.mark.parametrize(
    ("text", "value"),
    [("1", 1.0), ("-0.5", -0.5), (".5", 0.5), ("5.", 5.0), ("1e3", 1000.0), ("1.5E-3", 0.0015),
     ("+Inf", math.inf), ("-Inf", -math.inf), ("inf", math.inf)],
)  # fmt: skip
def test_prometheus_floats(text: str, value: float) -> None:
    assert ascii_float(text) == value


def test_nan_is_a_float_the_caller_must_refuse() -> None:
    parsed = ascii_float("NaN")
    assert parsed is not None and math.isnan(parsed)


@pytest.mark.parametrize(
    "text", ["", "1_000", "١٢", "１", "0x1p3", "1e", "e3", "--1", "1e1000", "1" * 65, "nanx"]
)
def test_anything_else_is_no_float(text: str) -> None:
    assert ascii_float(text) is None
