"""What every NAR store offers: the contract between the cache and a backend.

A store keeps committed, verified NAR objects under the key layout shared with
the Go ncps (``store/nar/<k0>/<k0k1>/<key>.nar[.ext]``).  Downloads in progress
are always local temp files (clients tail them); a whole, verified, fsynced
temp file is then *committed*: renamed into place (local) or uploaded
(S3).  An object is visible only once it is whole.

Every ``*_thd`` method blocks and runs on the pool the store names in
:attr:`NarStore.pool_name`; nothing here touches the reactor.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

COMPRESSION_EXTENSIONS: dict[str, str] = {
    "none": "",
    "xz": ".xz",
    "zstd": ".zst",
    "bzip2": ".bz2",
    "br": ".br",
    "lz4": ".lz4",
    "lzip": ".lzip",
}
EXTENSION_COMPRESSIONS = {ext: c for c, ext in COMPRESSION_EXTENSIONS.items()}

# A ``Compression: none`` NAR kept zstd-compressed (transparent zstd, see
# :mod:`ncps.transparent`).  It is a stored *form* of its own, with its own
# name: a ``.nar.zst`` object is a NAR whose narinfo says zstd, and the two
# must never share a name.  Never part of a URL.
ZSTD_NONE = "none+zstd"
# Every stored form: a compression, or ZSTD_NONE.
FORM_EXTENSIONS: dict[str, str] = {
    **COMPRESSION_EXTENSIONS,
    ZSTD_NONE: ".transparent.zst",
}
EXTENSION_FORMS = {ext: form for form, ext in FORM_EXTENSIONS.items()}


def served_compression(form: str) -> str:
    """The compression clients ask for to get an object stored in ``form``."""
    return "none" if form == ZSTD_NONE else form


def nar_file_name(nar_key: str, compression: str) -> str:
    """``<key>.nar[.ext]``, the name used in URLs."""
    return f"{nar_key}.nar{COMPRESSION_EXTENSIONS[compression]}"


def stored_name(nar_key: str, form: str) -> str:
    """The object's file name in storage: its URL name but for ZSTD_NONE."""
    return f"{nar_key}.nar{FORM_EXTENSIONS[form]}"


def nar_object_key(nar_key: str, form: str) -> str:
    """The object's path relative to the store root, the same on every backend."""
    return f"store/nar/{nar_key[0]}/{nar_key[:2]}/{stored_name(nar_key, form)}"


def parse_nar_object_key(key: str) -> tuple[str, str] | None:
    """(nar_key, form) for a ``store/nar/...`` key, None if it is not one."""
    parts = key.split("/")
    if len(parts) != 5 or parts[:2] != ["store", "nar"]:
        return None
    name = parts[4]
    stem, sep, ext = name.partition(".nar")
    if not sep or not stem or parts[2] != stem[0] or parts[3] != stem[:2]:
        return None
    form = EXTENSION_FORMS.get(ext)
    if form is None:
        return None
    return stem, form


class StoredNar(Protocol):
    """A committed object opened for reading; owned by whoever opened it."""

    size: int
    # A readable OS descriptor when the object is a local file (served with
    # pread on the reactor); None for remote objects, read with read_thd.
    fd: int | None

    def read_thd(self, n: int) -> bytes:
        """Up to ``n`` next bytes; ``b""`` at the end.  Raises StorageError."""

    def seek_thd(self, offset: int) -> None:
        """Read on from byte ``offset`` (below ``size``), before the first read.

        For a byte range; raises StorageError.
        """

    def close_thd(self) -> None:
        """Release the object (idempotent)."""


class NarStore(Protocol):
    """A place for committed NAR objects.

    An object is named by its key and its stored form: the ``compression``
    arguments below take a compression or :data:`ZSTD_NONE`.
    """

    # "local" or "s3": for logs, metrics and the copy tool.
    kind: str
    # Which pool the *_thd methods must run on: "io" (local disk) or "s3".
    pool_name: str

    @property
    def temp_dir(self) -> Path:
        """Where downloads in progress are written (always a local directory).

        After :meth:`prepare_thd`, this instance's own directory under
        ``--cache-temp-path`` (see :mod:`ncps.tempdir`).
        """

    def prepare_thd(self) -> None:
        """Startup check: create what is missing and prove the store usable.

        Claims this instance's temp directory, after removing what dead
        instances left in ``--cache-temp-path``.  Raises
        :class:`~ncps.errors.StartupError` naming the flag at fault (and
        then holds nothing).
        """

    def release_thd(self) -> None:
        """Give back what :meth:`prepare_thd` claimed, at shutdown (idempotent).

        Removes this instance's temp directory with any temp file still in
        it: call it once nothing writes temp files any more.
        """

    def new_temp_file_thd(self, nar_key: str) -> tuple[int, Path]:
        """A fresh, exclusively created temp file in :attr:`temp_dir`: (fd, path).

        Claims the temp directory first if :meth:`prepare_thd` has not.
        """

    def discard_thd(self, temp_path: Path) -> None:
        """Remove a temp file that will never be committed (missing is fine)."""

    def commit_thd(self, temp_path: Path, nar_key: str, compression: str) -> None:
        """Make a whole, verified, fsynced temp file the committed object.

        The object appears atomically (rename, or a completed upload) and the
        temp file is gone afterwards.  Committing an object that exists
        already replaces it with identical bytes or keeps it; both are fine.
        Raises StorageError (remote) or OSError (local) and leaves no object.
        """

    def size_thd(self, nar_key: str, compression: str) -> int | None:
        """Size of the committed object, None if it is not there."""

    def open_thd(self, nar_key: str, compression: str) -> StoredNar | None:
        """Open the committed object for reading, None if it is not there."""

    def delete_thd(self, nar_key: str, compression: str) -> None:
        """Remove the committed object (missing is fine)."""

    def iter_objects_thd(self) -> Iterator[tuple[str, str, int]]:
        """Every committed object as (nar_key, form, size)."""
