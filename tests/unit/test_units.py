"""Tests for ncps.units: Go-style durations, sizes and booleans."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ncps.units import (
    format_duration,
    format_size,
    parse_bool,
    parse_duration,
    parse_size,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0.0),
        ("+0", 0.0),
        ("0s", 0.0),
        ("300ms", 0.3),
        ("3s", 3.0),
        ("5m", 300.0),
        ("24h", 86400.0),
        ("1.5h", 5400.0),
        ("1h30m", 5400.0),
        ("2m3.5s", 123.5),
        ("1h15m30.918273645s", 4530.918273645),
        (".5s", 0.5),
        ("5.s", 5.0),
        ("+3s", 3.0),
        ("10ns", 10e-9),
        ("10us", 10e-6),
        ("10\u00b5s", 10e-6),
        ("10\u03bcs", 10e-6),
        ("1h1h", 7200.0),
        ("1.0000000001s", 1.0),  # below a nanosecond: truncated like Go
        ("  30s\n", 30.0),
        ("2562047h", 2562047 * 3600.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("+", "no value"),
        ("-1s", "negative"),
        ("-0", "negative"),
        ("5", "missing unit"),
        ("1.5", "missing unit"),
        ("0.0", "missing unit"),
        ("00", "missing unit"),
        ("1h5", "missing unit"),
        ("s", "expected a number"),
        (".s", "expected a number"),
        ("1h.", "expected a number"),
        ("3x", "unknown unit 'x'"),
        ("3 s", "unknown unit ' s'"),
        ("3S", "unknown unit 'S'"),
        ("3sec", "unknown unit 'sec'"),
        ("1d", "unknown unit 'd'"),
        ("1e3s", "unknown unit 'e'"),
        ("1.5.3s", "missing unit"),
        ("2562048h", "too large"),
    ],
)
def test_parse_duration_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        # Outputs of Go's time.Duration.String for the same values.
        (0.0, "0s"),
        (1e-9, "1ns"),
        (1.5e-6, "1.5\u00b5s"),
        (0.3, "300ms"),
        (0.0015, "1.5ms"),
        (1.0, "1s"),
        (123.5, "2m3.5s"),
        (3600.0, "1h0m0s"),
        (5400.0, "1h30m0s"),
        (4530.918273645, "1h15m30.918273645s"),
        (86400.0, "24h0m0s"),
        (60.0, "1m0s"),
        (-1.5, "-1.5s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@given(st.integers(min_value=0, max_value=2**22 * 10**9))
def test_duration_round_trip_to_the_nanosecond(nanoseconds: int) -> None:
    # Up to ~48 days a float still tells nanoseconds apart.
    seconds = nanoseconds / 1e9
    assert parse_duration(format_duration(seconds)) == seconds


@given(st.integers(min_value=0, max_value=2562047 * 3600))
def test_duration_round_trip_whole_seconds(seconds: int) -> None:
    text = format_duration(float(seconds))
    assert "." not in text
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_format_duration_rejects_non_finite(value: float) -> None:
    with pytest.raises(ValueError, match="non-finite"):
        format_duration(value)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("0B", 0),
        ("1B", 1),
        ("5K", 5120),
        ("5k", 5120),
        ("512M", 512 * 2**20),
        ("10G", 10 * 2**30),
        ("10g", 10 * 2**30),
        ("2T", 2 * 2**40),
        (" 1G\n", 2**30),
        ("0010K", 10240),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "text",
    [
        "",
        "10",
        "1.5G",
        "10KB",
        "10GiB",
        "10MiB",
        "G",
        "-1G",
        "+1G",
        "1 G",
        "1P",
        "1E",
        "10\u212a",  # KELVIN SIGN folds to 'k' under Unicode case-insensitivity
        "\u0661K",  # ARABIC-INDIC DIGIT ONE
    ],
)
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0B"),
        (1, "1B"),
        (1023, "1023B"),
        (5120, "5K"),
        (1536, "1536B"),
        (10 * 2**30, "10G"),
        (2**40, "1T"),
        (3 * 2**20, "3M"),
    ],
)
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text


def test_format_size_rejects_negative() -> None:
    with pytest.raises(ValueError, match="negative"):
        format_size(-1)


@given(st.integers(min_value=0, max_value=2**60))
def test_size_round_trip(size: int) -> None:
    assert parse_size(format_size(size)) == size


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("true", True),
        ("TRUE", True),
        ("True", True),
        ("1", True),
        ("yes", True),
        ("Yes", True),
        ("on", True),
        ("ON", True),
        (" true\n", True),
        ("false", False),
        ("FALSE", False),
        ("0", False),
        ("no", False),
        ("NO", False),
        ("off", False),
        ("Off", False),
    ],
)
def test_parse_bool(text: str, value: bool) -> None:
    assert parse_bool(text) is value


@pytest.mark.parametrize(
    "text", ["", "t", "f", "y", "n", "2", "-1", "truee", "enabled"]
)
def test_parse_bool_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid boolean"):
        parse_bool(text)
