"""Nix's base-32 encoding ("nix32"), as used in store paths and hashes.

Nix's base-32 is not RFC 4648: it uses its own alphabet (no ``e``, ``o``, ``u``
or ``t``) and walks the bits from the most significant end of the
*little-endian* byte string. Character ``i`` of an ``L``-character encoding
holds the five bits starting at bit ``(L - 1 - i) * 5``.

Pure functions: no I/O, safe to call from any thread.
"""

from __future__ import annotations

import functools
import re

ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
"""The 32 digits, in value order."""

_DIGIT_VALUES: dict[str, int] = {char: value for value, char in enumerate(ALPHABET)}

HASH_PART_RE = re.compile(r"^[0-9a-df-np-sv-z]{32}$")
"""A store path hash part: 32 nix32 characters (160 bits).

Note that ``$`` also matches before a trailing newline, so use
:func:`is_hash_part` (or ``HASH_PART_RE.fullmatch``) rather than ``.match``.
"""


def encoded_length(nbytes: int) -> int:
    """Return the length of the nix32 encoding of ``nbytes`` bytes.

    This is ``ceil(nbytes * 8 / 5)``: 52 for sha256, 32 for sha1 and store
    path hash parts, 103 for sha512, 26 for md5.

    :raises ValueError: if ``nbytes`` is negative.
    """
    if nbytes < 0:
        raise ValueError(f"byte length must not be negative, got {nbytes}")
    return (nbytes * 8 + 4) // 5


# Hashes are encoded and decoded again and again (every narinfo served renders
# its NarHash and FileHash): remember the recent ones.
_MEMO = 16384


@functools.lru_cache(maxsize=_MEMO)
def encode(data: bytes) -> str:
    """Encode ``data`` in Nix's base-32."""
    length = encoded_length(len(data))
    value = int.from_bytes(data, "little")
    return "".join(
        ALPHABET[(value >> (position * 5)) & 0x1F]
        for position in range(length - 1, -1, -1)
    )


@functools.lru_cache(maxsize=_MEMO)
def decode(text: str) -> bytes:
    """Decode Nix's base-32 ``text`` back into bytes.

    :raises ValueError: on a character outside :data:`ALPHABET`, on a length
        that is not the encoding of any byte length, or when the unused high
        bits of the first character are not zero (such text is never produced
        by :func:`encode`, and Nix rejects it too).
    """
    nbytes = len(text) * 5 // 8
    if encoded_length(nbytes) != len(text):
        raise ValueError(
            f"invalid nix32 length {len(text)}: not the encoding of any byte length"
        )
    value = 0
    for index, char in enumerate(text):
        digit = _DIGIT_VALUES.get(char)
        if digit is None:
            raise ValueError(
                f"invalid nix32 character {char!r} at position {index} of {text!r}"
            )
        value = (value << 5) | digit
    if value >> (nbytes * 8):
        raise ValueError(f"invalid nix32 string {text!r}: non-zero leftover bits")
    return value.to_bytes(nbytes, "little")


def is_hash_part(s: str) -> bool:
    """Tell whether ``s`` is exactly a 32-character store path hash part."""
    return HASH_PART_RE.fullmatch(s) is not None
