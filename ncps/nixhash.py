"""Typed hashes as Nix writes them: ``sha256:<nix32>``, hex, base64 and SRI.

:func:`parse_hash` follows Nix's ``Hash::parseAnyPrefixed``: the algorithm
comes from a mandatory prefix and, after ``algo:``, the encoding is inferred
from the length of the rest (hex, nix32 or base64 lengths never collide for a
given algorithm). ``algo-<base64>`` is the SRI form.

Pure functions: no I/O, safe to call from any thread.
"""

from __future__ import annotations

import base64
import binascii
import re

import attrs

from ncps import nix32

HASH_SIZES: dict[str, int] = {"md5": 16, "sha1": 20, "sha256": 32, "sha512": 64}
"""Digest size in bytes of each algorithm Nix knows."""

_HEX_RE = re.compile(r"[0-9a-fA-F]*")
_BASE64_RE = re.compile(r"[A-Za-z0-9+/]*={0,2}")


def _base64_length(nbytes: int) -> int:
    return (nbytes + 2) // 3 * 4


def _check_algorithm(algorithm: str) -> int:
    size = HASH_SIZES.get(algorithm)
    if size is None:
        known = ", ".join(sorted(HASH_SIZES))
        raise ValueError(f"unknown hash algorithm {algorithm!r} (known: {known})")
    return size


def _validate_digest(
    instance: NixHash, attribute: attrs.Attribute[bytes], digest: bytes
) -> None:
    size = _check_algorithm(instance.algorithm)
    if len(digest) != size:
        raise ValueError(
            f"a {instance.algorithm} digest is {size} bytes, got {len(digest)}"
        )


@attrs.frozen
class NixHash:
    """A digest together with the algorithm that produced it.

    The constructor checks that the algorithm is known and that the digest
    has the right size for it (raising ``ValueError``).
    """

    algorithm: str
    digest: bytes = attrs.field(validator=_validate_digest)

    def to_nix32(self) -> str:
        """Render as ``<algo>:<nix32>``, the form narinfos and fingerprints use."""
        return f"{self.algorithm}:{nix32.encode(self.digest)}"

    def to_hex(self) -> str:
        """Render as ``<algo>:<lower-case hex>``."""
        return f"{self.algorithm}:{self.digest.hex()}"

    def to_base64(self) -> str:
        """Render as ``<algo>:<base64>``."""
        return f"{self.algorithm}:{base64.b64encode(self.digest).decode('ascii')}"

    def to_sri(self) -> str:
        """Render as an SRI string, ``<algo>-<base64>``."""
        return f"{self.algorithm}-{base64.b64encode(self.digest).decode('ascii')}"

    def nix32_digest(self) -> str:
        """Return the digest alone in nix32, without the algorithm prefix."""
        return nix32.encode(self.digest)

    def __str__(self) -> str:
        return self.to_nix32()


def _decode_base64(text: str, what: str) -> bytes:
    if _BASE64_RE.fullmatch(text) is None:
        raise ValueError(f"invalid base64 in {what}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"invalid base64 in {what}: {exc}") from None


def parse_hash(text: str) -> NixHash:
    """Parse a hash in any encoding Nix accepts with an algorithm prefix.

    Accepted: ``algo:<hex>`` (either case), ``algo:<nix32>``,
    ``algo:<base64>`` (padded) and SRI ``algo-<base64>``, for ``algo`` one of
    :data:`HASH_SIZES`.

    :raises ValueError: naming the problem: no prefix, unknown algorithm,
        wrong length for the algorithm, or bad characters.
    """
    algorithm, sep, rest = text.partition(":")
    sri = False
    if not sep:
        algorithm, sep, rest = text.partition("-")
        if not sep:
            raise ValueError(
                f"hash {text!r} has no algorithm prefix (expected 'algo:' or 'algo-')"
            )
        sri = True
    size = _check_algorithm(algorithm)
    if sri:
        if len(rest) != _base64_length(size):
            raise ValueError(
                f"SRI hash {text!r} has wrong length for {algorithm}: "
                f"expected {_base64_length(size)} base64 characters, got {len(rest)}"
            )
        digest = _decode_base64(rest, f"SRI hash {text!r}")
    elif len(rest) == size * 2:
        if _HEX_RE.fullmatch(rest) is None:
            raise ValueError(f"invalid hex in hash {text!r}")
        digest = bytes.fromhex(rest)
    elif len(rest) == nix32.encoded_length(size):
        try:
            digest = nix32.decode(rest)
        except ValueError as exc:
            raise ValueError(f"invalid nix32 in hash {text!r}: {exc}") from None
    elif len(rest) == _base64_length(size):
        digest = _decode_base64(rest, f"hash {text!r}")
    else:
        raise ValueError(
            f"hash {text!r} has wrong length for {algorithm}: expected "
            f"{size * 2} (hex), {nix32.encoded_length(size)} (nix32) or "
            f"{_base64_length(size)} (base64) characters, got {len(rest)}"
        )
    if len(digest) != size:
        raise ValueError(f"hash {text!r} decodes to {len(digest)} bytes, not {size}")
    return NixHash(algorithm, digest)
