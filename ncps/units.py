"""Parse and print the duration, size and boolean syntaxes of ncps's flags.

* durations: Go's ``time.ParseDuration`` syntax (``300ms``, ``1h30m``), but
  negative values are refused;
* sizes: an integer and one unit letter, binary multiples (``5K`` = 5120);
* booleans: ``true/false``, ``1/0``, ``yes/no``, ``on/off``.

Every parser raises ``ValueError`` with a message quoting the input.
Pure functions: no I/O, safe to call from any thread.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

NANOSECOND = 1
MICROSECOND = 1000 * NANOSECOND
MILLISECOND = 1000 * MICROSECOND
SECOND = 1000 * MILLISECOND
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE

_DURATION_UNITS: dict[str, int] = {
    "ns": NANOSECOND,
    "us": MICROSECOND,
    "\u00b5s": MICROSECOND,  # MICRO SIGN, what Go prints
    "\u03bcs": MICROSECOND,  # GREEK SMALL LETTER MU, also accepted by Go
    "ms": MILLISECOND,
    "s": SECOND,
    "m": MINUTE,
    "h": HOUR,
}
_MAX_DURATION_NS = 2**63 - 1  # Go's time.Duration is an int64 of nanoseconds
_DURATION_PART_RE = re.compile(r"([0-9]*(?:\.[0-9]*)?)([^0-9.]*)")

_SIZE_RE = re.compile(r"([0-9]+)([BKMGTbkmgt])")
_SIZE_UNITS: dict[str, int] = {
    "B": 1,
    "K": 2**10,
    "M": 2**20,
    "G": 2**30,
    "T": 2**40,
}

_TRUE_WORDS = frozenset({"true", "1", "yes", "on"})
_FALSE_WORDS = frozenset({"false", "0", "no", "off"})


def _decimal_fraction(number: str) -> Fraction:
    """Exact value of ``digits[.digits]`` where either side may be empty."""
    whole, _, fraction = number.partition(".")
    value = Fraction(int(whole or "0"))
    if fraction:
        value += Fraction(int(fraction), 10 ** len(fraction))
    return value


def parse_duration(text: str) -> float:
    """Parse a Go duration such as ``1h30m`` or ``2m3.5s`` into seconds.

    Units: ``ns``, ``us`` (or ``µs``), ``ms``, ``s``, ``m``, ``h``; each
    number may have a fraction. A bare ``0`` is allowed; surrounding
    whitespace is ignored. Fractions of a nanosecond are truncated, as in Go.

    :raises ValueError: on empty, negative, unitless or malformed input, an
        unknown unit, or a value beyond Go's ~292 years.
    """
    stripped = text.strip()
    if not stripped:
        raise ValueError("invalid duration '': empty")
    if stripped.startswith("-"):
        raise ValueError(f"invalid duration {text!r}: must not be negative")
    body = stripped.removeprefix("+")
    if body == "0":
        return 0.0
    if not body:
        raise ValueError(f"invalid duration {text!r}: no value")
    total = Fraction(0)
    position = 0
    while position < len(body):
        match = _DURATION_PART_RE.match(body, position)
        assert match is not None  # the pattern can match the empty string
        number, unit = match.groups()
        if number in ("", "."):
            raise ValueError(f"invalid duration {text!r}: expected a number")
        if not unit:
            raise ValueError(
                f"invalid duration {text!r}: missing unit after {number!r} "
                "(use ns, us, ms, s, m or h)"
            )
        scale = _DURATION_UNITS.get(unit)
        if scale is None:
            raise ValueError(
                f"invalid duration {text!r}: unknown unit {unit!r} "
                "(use ns, us, ms, s, m or h)"
            )
        total += _decimal_fraction(number) * scale
        position = match.end()
    nanoseconds = int(total)
    if nanoseconds > _MAX_DURATION_NS:
        raise ValueError(f"invalid duration {text!r}: too large")
    return nanoseconds / SECOND


def _format_fraction(value: int, scale: int) -> str:
    """Render ``value / scale`` in decimal without trailing zeros."""
    whole, remainder = divmod(value, scale)
    if not remainder:
        return str(whole)
    digits = len(str(scale)) - 1
    return f"{whole}.{remainder:0{digits}d}".rstrip("0")


def format_duration(seconds: float) -> str:
    """Print ``seconds`` the way Go's ``Duration.String`` does.

    The value is rounded to whole nanoseconds. Examples: ``0s``, ``300ms``,
    ``1.5µs``, ``2m3.5s``, ``1h30m0s``. Negative values get a leading ``-``.

    :raises ValueError: if ``seconds`` is infinite or NaN.
    """
    if not math.isfinite(seconds):
        raise ValueError(f"cannot format non-finite duration {seconds!r}")
    # Exact conversion: float multiplication would be off by a few
    # nanoseconds for durations of months.
    nanoseconds = round(Fraction(seconds) * SECOND)
    if nanoseconds == 0:
        return "0s"
    sign = "-" if nanoseconds < 0 else ""
    magnitude = abs(nanoseconds)
    if magnitude < SECOND:
        if magnitude < MICROSECOND:
            return f"{sign}{magnitude}ns"
        if magnitude < MILLISECOND:
            return f"{sign}{_format_fraction(magnitude, MICROSECOND)}\u00b5s"
        return f"{sign}{_format_fraction(magnitude, MILLISECOND)}ms"
    hours, rest = divmod(magnitude, HOUR)
    minutes, rest = divmod(rest, MINUTE)
    text = f"{_format_fraction(rest, SECOND)}s"
    if hours:
        text = f"{hours}h{minutes}m{text}"
    elif minutes:
        text = f"{minutes}m{text}"
    return sign + text


def parse_size(text: str) -> int:
    """Parse a size like ``512M`` or ``10g`` into bytes.

    An integer followed by exactly one unit letter ``B``, ``K``, ``M``,
    ``G`` or ``T`` (any case), in binary multiples. Surrounding whitespace
    is ignored.

    :raises ValueError: on a bare number, a decimal, a multi-letter unit such
        as ``KB``/``GiB``, or anything else.
    """
    match = _SIZE_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"invalid size {text!r}: expected an integer and one unit letter "
            "B, K, M, G or T (for example 512M or 10G)"
        )
    number, unit = match.groups()
    return int(number) * _SIZE_UNITS[unit.upper()]


def format_size(nbytes: int) -> str:
    """Print ``nbytes`` in the largest unit that divides it exactly (``10G``)."""
    if nbytes < 0:
        raise ValueError(f"size must not be negative, got {nbytes}")
    for unit in ("T", "G", "M", "K"):
        scale = _SIZE_UNITS[unit]
        if nbytes and nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    return f"{nbytes}B"


def parse_bool(text: str) -> bool:
    """Parse ``true/false``, ``1/0``, ``yes/no`` or ``on/off`` (any case).

    :raises ValueError: on anything else.
    """
    word = text.strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise ValueError(
        f"invalid boolean {text!r}: expected true/false, 1/0, yes/no or on/off"
    )
