"""Parse, check and print ``.narinfo`` files, and compute their fingerprint.

The text format is ``Key: value`` lines. :func:`parse` is strict about what a
proxy depends on (store path, hashes, sizes, references, signature shape) and
tolerant of variants seen in the wild (CRLF line ends, a missing final
newline, hex/base64 hashes, absent Compression, unknown keys).
:meth:`NarInfo.to_text` prints exactly what Nix's writer prints.

Pure functions: no I/O, safe to call from any thread.
"""

from __future__ import annotations

import re

import attrs

from ncps.nixhash import NixHash, parse_hash

STORE_DIR = "/nix/store"
"""The only store directory ncps serves."""

COMPRESSIONS: frozenset[str] = frozenset(
    {
        "none",
        "br",
        "bzip2",
        "compress",
        "grzip",
        "gzip",
        "lrzip",
        "lz4",
        "lzip",
        "lzma",
        "lzop",
        "xz",
        "zstd",
    }
)
"""The ``Compression`` values Nix knows."""

DEFAULT_COMPRESSION = "bzip2"
"""What Nix assumes when ``Compression`` is missing or empty."""

MAX_NARINFO_BYTES = 1024 * 1024
"""Larger narinfo texts are rejected outright."""

MAX_SIZE_VALUE = 2**63 - 1
"""Sizes must fit a signed 64-bit database column."""

UNKNOWN_DERIVER = "unknown-deriver"
"""The Deriver value Nix writes (and reads) for "no deriver"."""

_BASENAME_RE = re.compile(r"[0-9a-df-np-sv-z]{32}-[0-9A-Za-z+\-._?=]{1,211}")
_DECIMAL_RE = re.compile(r"[0-9]+")
_SIGNATURE_RE = re.compile(r"[^\s:]+:[A-Za-z0-9+/]+={0,2}")
# Control characters (including CR, LF, TAB and DEL) never belong in a value;
# letting them through would let one field smuggle in another line.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_WHITESPACE_RE = re.compile(r"\s")

_SINGLE_VALUED_KEYS = frozenset(
    {
        "StorePath",
        "URL",
        "Compression",
        "FileHash",
        "FileSize",
        "NarHash",
        "NarSize",
        "References",
        "Deriver",
        "System",
        "CA",
    }
)


class NarInfoError(ValueError):
    """A narinfo text or object is invalid; the message names the field."""


def is_store_path_basename(s: str) -> bool:
    """Tell whether ``s`` is ``<32 nix32 chars>-<name>`` with a valid name.

    The name is 1 to 211 characters of ``[0-9A-Za-z+-._?=]`` and does not
    start with ``.``.
    """
    return _BASENAME_RE.fullmatch(s) is not None and s[33] != "."


def is_store_path(s: str) -> bool:
    """Tell whether ``s`` is ``/nix/store/`` followed by a valid basename."""
    prefix = STORE_DIR + "/"
    return s.startswith(prefix) and is_store_path_basename(s[len(prefix) :])


def signature_key_name(signature: str) -> str:
    """Return the key name of a ``name:base64`` signature (text before ``:``)."""
    return signature.partition(":")[0]


@attrs.frozen
class NarInfo:
    """One narinfo, as plain data.

    ``references`` and ``deriver`` hold basenames (``<hash>-<name>``), as in
    the text format. The constructor does not validate; :func:`parse` and
    :meth:`validate` do.
    """

    store_path: str
    url: str
    compression: str
    nar_hash: NixHash
    nar_size: int
    file_hash: NixHash | None = None
    file_size: int | None = None
    references: tuple[str, ...] = ()
    deriver: str | None = None
    system: str | None = None
    signatures: tuple[str, ...] = ()
    ca: str | None = None

    @property
    def hash_part(self) -> str:
        """The 32-character hash part of :attr:`store_path`."""
        return self.store_path[len(STORE_DIR) + 1 :][:32]

    def fingerprint(self) -> bytes:
        """Return the bytes that ``Sig`` lines sign.

        ``1;<StorePath>;<NarHash as algo:nix32>;<NarSize>;<refs>`` where
        ``<refs>`` is the comma-joined sorted full paths of the references
        (empty when there are none, so the text then ends with ``;``).
        """
        refs = ",".join(sorted(f"{STORE_DIR}/{ref}" for ref in self.references))
        text = f"1;{self.store_path};{self.nar_hash.to_nix32()};{self.nar_size};{refs}"
        return text.encode("utf-8")

    def to_text(self) -> str:
        """Print in Nix's field order, every line ending in a newline.

        :raises NarInfoError: if a value contains a control character
            (it would break the line structure).
        """
        lines = [
            f"StorePath: {self.store_path}",
            f"URL: {self.url}",
            f"Compression: {self.compression}",
        ]
        if self.file_hash is not None:
            lines.append(f"FileHash: {self.file_hash.to_nix32()}")
        if self.file_size is not None:
            lines.append(f"FileSize: {self.file_size}")
        lines.append(f"NarHash: {self.nar_hash.to_nix32()}")
        lines.append(f"NarSize: {self.nar_size}")
        lines.append(f"References: {' '.join(self.references)}")
        if self.deriver is not None:
            lines.append(f"Deriver: {self.deriver}")
        if self.system is not None:
            lines.append(f"System: {self.system}")
        lines.extend(f"Sig: {signature}" for signature in self.signatures)
        if self.ca is not None:
            lines.append(f"CA: {self.ca}")
        for line in lines:
            if _CONTROL_RE.search(line):
                key = line.partition(":")[0]
                raise NarInfoError(f"{key}: value contains a control character")
        return "".join(line + "\n" for line in lines)

    def validate(self) -> None:
        """Check every field as :func:`parse` would.

        :raises NarInfoError: naming the first invalid field.
        """
        _check_store_path(self.store_path)
        _check_url(self.url)
        if self.compression not in COMPRESSIONS:
            raise NarInfoError(f"Compression: unknown value {self.compression!r}")
        if self.nar_hash.algorithm != "sha256":
            raise NarInfoError(
                f"NarHash: must be sha256, got {self.nar_hash.algorithm}"
            )
        _check_size("NarSize", self.nar_size, minimum=1)
        if self.file_size is not None:
            _check_size("FileSize", self.file_size, minimum=1)
        for ref in self.references:
            _check_reference(ref)
        if self.deriver is not None:
            _check_deriver(self.deriver)
        if self.system is not None:
            _check_word("System", self.system)
        for signature in self.signatures:
            _check_signature(signature)
        if self.ca is not None:
            _check_ca(self.ca)


def check_consistency(ni: NarInfo) -> None:
    """ncps's upstream sanity rule for uncompressed NARs.

    With ``Compression: none`` the file *is* the NAR, so a non-zero
    FileSize must equal NarSize and a FileHash must equal NarHash.

    :raises NarInfoError: naming the inconsistent field.
    """
    if ni.compression != "none":
        return
    if ni.file_size is not None and ni.file_size != ni.nar_size:
        raise NarInfoError(
            f"FileSize: {ni.file_size} differs from NarSize {ni.nar_size} "
            "with Compression: none"
        )
    if ni.file_hash is not None and ni.file_hash != ni.nar_hash:
        raise NarInfoError("FileHash: differs from NarHash with Compression: none")


def _check_store_path(value: str) -> None:
    if not is_store_path(value):
        raise NarInfoError(f"StorePath: {value!r} is not a valid store path")


def _check_url(value: str) -> None:
    if not value:
        raise NarInfoError("URL: must not be empty")
    if _WHITESPACE_RE.search(value) or _CONTROL_RE.search(value):
        raise NarInfoError(f"URL: {value!r} contains whitespace or control characters")


def _check_size(field: str, value: int, minimum: int) -> None:
    if not minimum <= value <= MAX_SIZE_VALUE:
        raise NarInfoError(f"{field}: {value} is out of range")


def _check_reference(value: str) -> None:
    if not is_store_path_basename(value):
        raise NarInfoError(f"References: {value!r} is not a valid store path basename")


def _check_deriver(value: str) -> None:
    if not (is_store_path_basename(value) and value.endswith(".drv")):
        raise NarInfoError(
            f"Deriver: {value!r} is not a valid store path basename ending in .drv"
        )


def _check_word(field: str, value: str) -> None:
    if not value or _WHITESPACE_RE.search(value) or _CONTROL_RE.search(value):
        raise NarInfoError(f"{field}: {value!r} must be one word")


def _check_signature(value: str) -> None:
    if _SIGNATURE_RE.fullmatch(value) is None:
        raise NarInfoError(f"Sig: {value!r} does not look like name:base64")


def _check_ca(value: str) -> None:
    if not value or _CONTROL_RE.search(value):
        raise NarInfoError(f"CA: {value!r} is not a valid content address")


def _parse_decimal(field: str, value: str, minimum: int) -> int:
    if _DECIMAL_RE.fullmatch(value) is None:
        raise NarInfoError(f"{field}: expected a decimal integer, got {value!r}")
    number = int(value)
    if not minimum <= number <= MAX_SIZE_VALUE:
        raise NarInfoError(f"{field}: {number} is out of range (minimum {minimum})")
    return number


def _parse_field_hash(field: str, value: str) -> NixHash:
    try:
        return parse_hash(value)
    except ValueError as exc:
        raise NarInfoError(f"{field}: {exc}") from None


def _decode(text: str | bytes) -> str:
    if isinstance(text, bytes):
        if len(text) > MAX_NARINFO_BYTES:
            raise NarInfoError(f"narinfo is larger than {MAX_NARINFO_BYTES} bytes")
        try:
            return text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise NarInfoError(f"narinfo is not valid UTF-8: {exc}") from None
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise NarInfoError(f"narinfo is not valid Unicode text: {exc}") from None
    if size > MAX_NARINFO_BYTES:
        raise NarInfoError(f"narinfo is larger than {MAX_NARINFO_BYTES} bytes")
    return text


def _split_lines(text: str) -> tuple[dict[str, str], list[str]]:
    """Split into single-valued fields and the list of ``Sig`` values."""
    fields: dict[str, str] = {}
    signatures: list[str] = []
    for number, raw_line in enumerate(text.split("\n"), start=1):
        line = raw_line.removesuffix("\r")
        if not line:
            continue
        key, sep, value = line.partition(": ")
        if not sep or not key:
            raise NarInfoError(f"line {number}: expected 'Key: value', got {line!r}")
        if _CONTROL_RE.search(line):
            raise NarInfoError(f"{key}: value contains a control character")
        if key == "Sig":
            signatures.append(value)
        elif key in _SINGLE_VALUED_KEYS:
            if key in fields:
                raise NarInfoError(f"{key}: appears more than once")
            fields[key] = value
        # Unknown keys are ignored, as Nix does.
    return fields, signatures


def _required(fields: dict[str, str], key: str) -> str:
    value = fields.get(key)
    if value is None:
        raise NarInfoError(f"{key}: missing")
    return value


def parse(text: str | bytes) -> NarInfo:
    """Parse narinfo text (``bytes`` must be UTF-8).

    :raises NarInfoError: with a message naming the offending field.
    """
    fields, signatures = _split_lines(_decode(text))

    store_path = _required(fields, "StorePath")
    _check_store_path(store_path)
    url = _required(fields, "URL")
    _check_url(url)

    compression = fields.get("Compression") or DEFAULT_COMPRESSION
    if compression not in COMPRESSIONS:
        raise NarInfoError(f"Compression: unknown value {compression!r}")

    nar_hash = _parse_field_hash("NarHash", _required(fields, "NarHash"))
    if nar_hash.algorithm != "sha256":
        raise NarInfoError(f"NarHash: must be sha256, got {nar_hash.algorithm}")
    nar_size = _parse_decimal("NarSize", _required(fields, "NarSize"), minimum=1)

    file_hash: NixHash | None = None
    if "FileHash" in fields:
        file_hash = _parse_field_hash("FileHash", fields["FileHash"])
    file_size: int | None = None
    if "FileSize" in fields:
        # Some writers emit "FileSize: 0" for "unknown"; treat it as unset.
        file_size = _parse_decimal("FileSize", fields["FileSize"], minimum=0) or None

    references = tuple(ref for ref in fields.get("References", "").split(" ") if ref)
    for ref in references:
        _check_reference(ref)

    deriver = fields.get("Deriver")
    if deriver == UNKNOWN_DERIVER:
        deriver = None
    if deriver is not None:
        _check_deriver(deriver)

    system = fields.get("System") or None
    if system is not None:
        _check_word("System", system)

    for signature in signatures:
        _check_signature(signature)

    # Nix reads an empty CA as "not content-addressed".
    ca = fields.get("CA") or None

    return NarInfo(
        store_path=store_path,
        url=url,
        compression=compression,
        nar_hash=nar_hash,
        nar_size=nar_size,
        file_hash=file_hash,
        file_size=file_size,
        references=references,
        deriver=deriver,
        system=system,
        signatures=tuple(signatures),
        ca=ca,
    )
