"""Ed25519 keys and narinfo signatures in Nix's text formats.

* public key: ``name:base64(32-byte key)``
* secret key: ``name:base64(32-byte seed || 32-byte public key)`` (libsodium
  layout, what ``nix-store --generate-binary-cache-key`` writes)
* signature (a ``Sig:`` value): ``name:base64(64-byte signature)`` over
  :meth:`ncps.narinfo.NarInfo.fingerprint`.

Ed25519 is deterministic, so signing the same fingerprint with the same key
gives the same ``Sig`` line Nix would.

Pure functions: no I/O, safe to call from any thread (signing is ~50 us).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Iterator

import attrs
import nacl.exceptions
import nacl.signing

from ncps.narinfo import NarInfo, signature_key_name

PUBLIC_KEY_BYTES = 32
SEED_BYTES = 32
SIGNATURE_BYTES = 64

_KEY_NAME_RE = re.compile(r"[^\s:]+")
_BASE64_RE = re.compile(r"[A-Za-z0-9+/]+={0,2}")


class KeyFormatError(ValueError):
    """A key's text or bytes are malformed; the message says how."""


def _check_name(name: str) -> None:
    if _KEY_NAME_RE.fullmatch(name) is None:
        raise KeyFormatError(
            f"invalid key name {name!r}: must be non-empty, without ':' or whitespace"
        )


def _split_key_text(text: str, what: str) -> tuple[str, bytes]:
    """Split ``name:base64`` into the name and decoded bytes."""
    # Key files often end in a newline; Go's decoder (which ncps key files
    # have been written for) also skips line breaks inside the base64.
    stripped = text.strip()
    name, sep, encoded = stripped.partition(":")
    if not sep:
        raise KeyFormatError(f"{what} is not of the form name:base64")
    _check_name(name)
    encoded = encoded.replace("\r", "").replace("\n", "")
    if _BASE64_RE.fullmatch(encoded) is None:
        raise KeyFormatError(f"{what} {name!r} has invalid base64")
    try:
        return name, base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise KeyFormatError(f"{what} {name!r} has invalid base64") from None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _validate_name(instance: object, attribute: object, name: str) -> None:
    _check_name(name)


def _validate_public_bytes(instance: object, attribute: object, key: bytes) -> None:
    if len(key) != PUBLIC_KEY_BYTES:
        raise KeyFormatError(
            f"public key must be {PUBLIC_KEY_BYTES} bytes, got {len(key)}"
        )


def _validate_seed(instance: object, attribute: object, seed: bytes) -> None:
    if len(seed) != SEED_BYTES:
        raise KeyFormatError(f"secret key seed must be {SEED_BYTES} bytes")


@attrs.frozen
class PublicKey:
    """A named Ed25519 verification key.

    :raises KeyFormatError: from the constructor on a bad name or key size.
    """

    name: str = attrs.field(validator=_validate_name)
    key: bytes = attrs.field(validator=_validate_public_bytes)
    _verify_key: nacl.signing.VerifyKey = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_verify_key", nacl.signing.VerifyKey(self.key))

    @classmethod
    def parse(cls, text: str) -> PublicKey:
        """Parse ``name:base64(32 bytes)``; surrounding whitespace is ignored.

        :raises KeyFormatError: describing what is wrong.
        """
        name, key = _split_key_text(text, "public key")
        if len(key) != PUBLIC_KEY_BYTES:
            raise KeyFormatError(
                f"public key {name!r} must decode to {PUBLIC_KEY_BYTES} bytes, "
                f"got {len(key)}"
            )
        return cls(name, key)

    def to_text(self) -> str:
        """Render as ``name:base64``, the ``trusted-public-keys`` form."""
        return f"{self.name}:{_b64(self.key)}"

    def verify(self, fingerprint: bytes, signature: str) -> bool:
        """Tell whether ``signature`` (``name:base64``) signs ``fingerprint``.

        False when the name differs from this key's, the base64 is bad, the
        signature has the wrong size or does not verify. Never raises.
        """
        name, sep, encoded = signature.partition(":")
        if not sep or name != self.name or _BASE64_RE.fullmatch(encoded) is None:
            return False
        try:
            raw = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            return False
        if len(raw) != SIGNATURE_BYTES:
            return False
        try:
            self._verify_key.verify(fingerprint, raw)
        except (nacl.exceptions.CryptoError, ValueError, TypeError):
            return False
        return True


@attrs.frozen
class SecretKey:
    """A named Ed25519 signing key (the seed is kept out of ``repr``).

    :raises KeyFormatError: from the constructor on a bad name or seed size.
    """

    name: str = attrs.field(validator=_validate_name)
    seed: bytes = attrs.field(validator=_validate_seed, repr=False)
    _signing_key: nacl.signing.SigningKey = attrs.field(
        init=False, repr=False, eq=False
    )

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_signing_key", nacl.signing.SigningKey(self.seed))

    @classmethod
    def parse(cls, text: str) -> SecretKey:
        """Parse Nix's secret key format ``name:base64(seed || public key)``.

        :raises KeyFormatError: on bad syntax, a wrong size, or a public half
            that does not belong to the seed.
        """
        name, raw = _split_key_text(text, "secret key")
        expected = SEED_BYTES + PUBLIC_KEY_BYTES
        if len(raw) != expected:
            raise KeyFormatError(
                f"secret key {name!r} must decode to {expected} bytes, got {len(raw)}"
            )
        key = cls(name, raw[:SEED_BYTES])
        if key.public_key().key != raw[SEED_BYTES:]:
            raise KeyFormatError(
                f"secret key {name!r} is corrupt: its public half does not match "
                "its seed"
            )
        return key

    @classmethod
    def generate(cls, name: str) -> SecretKey:
        """Make a new random key called ``name``.

        :raises KeyFormatError: if ``name`` is empty or contains ``:`` or
            whitespace.
        """
        _check_name(name)
        return cls(name, bytes(nacl.signing.SigningKey.generate()))

    def to_text(self) -> str:
        """Render in Nix's secret key file format (no trailing newline)."""
        return f"{self.name}:{_b64(self.seed + self.public_key().key)}"

    def public_key(self) -> PublicKey:
        """Return the matching public key, with the same name."""
        return PublicKey(self.name, bytes(self._signing_key.verify_key))

    def sign(self, fingerprint: bytes) -> str:
        """Sign ``fingerprint``; return the ``name:base64`` ``Sig`` value."""
        signature = self._signing_key.sign(fingerprint).signature
        return f"{self.name}:{_b64(signature)}"


class TrustedKeys:
    """A set of trusted public keys, looked up by name as Nix does.

    When two keys share a name the later one wins; the earlier can never
    verify anything and is reported by :meth:`shadowed`.
    """

    def __init__(self, keys: Iterable[PublicKey]) -> None:
        self._all: tuple[PublicKey, ...] = tuple(keys)
        self._by_name: dict[str, PublicKey] = {key.name: key for key in self._all}

    def __iter__(self) -> Iterator[PublicKey]:
        """Iterate over the effective keys (one per name)."""
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def __repr__(self) -> str:
        names = ", ".join(self._by_name)
        return f"TrustedKeys([{names}])"

    def get(self, name: str) -> PublicKey | None:
        """Return the effective key called ``name``, if any."""
        return self._by_name.get(name)

    def verify(self, fingerprint: bytes, signature: str) -> bool:
        """Tell whether ``signature`` verifies with the key of its name."""
        key = self._by_name.get(signature_key_name(signature))
        return key is not None and key.verify(fingerprint, signature)

    def verify_narinfo(self, ni: NarInfo) -> bool:
        """Tell whether at least one of ``ni``'s signatures is trusted."""
        if not ni.signatures:
            return False
        fingerprint = ni.fingerprint()
        return any(self.verify(fingerprint, sig) for sig in ni.signatures)

    def shadowed(self) -> list[PublicKey]:
        """Return the keys replaced by a later key of the same name.

        An exact duplicate of the effective key is not reported: it is
        harmless.
        """
        return [key for key in self._all if self._by_name[key.name] != key]


def strip_signatures(ni: NarInfo, name: str) -> NarInfo:
    """Return ``ni`` without the signatures made by a key called ``name``."""
    kept = tuple(sig for sig in ni.signatures if signature_key_name(sig) != name)
    return attrs.evolve(ni, signatures=kept)


def sign_narinfo(ni: NarInfo, key: SecretKey) -> NarInfo:
    """Return ``ni`` re-signed by ``key``.

    Any signature by a key of the same name is dropped first, then a fresh
    one is appended; other signatures are kept in order.
    """
    stripped = strip_signatures(ni, key.name)
    return attrs.evolve(
        stripped, signatures=(*stripped.signatures, key.sign(ni.fingerprint()))
    )
