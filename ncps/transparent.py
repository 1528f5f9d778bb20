"""Transparent zstd: ``Compression: none`` NARs kept zstd-compressed.

An upstream NAR whose narinfo says ``Compression: none`` is verified as it
arrives, like any other.  When it is whole, :func:`pack_thd` compresses it
into a second temp file, and that is what is committed, in the stored form
:data:`~ncps.storage.base.ZSTD_NONE` (unless zstd saves less than a tenth:
then the NAR is kept as it came).  The narinfo we serve is unchanged: the
URL is still ``nar/<key>.nar``, ``Compression: none``.

Such an object is sent as it is stored, with ``Content-Encoding: zstd``, to
a client that takes it (:func:`client_takes_zstd`); every other client gets
the NAR decoded on the fly (:class:`ZstdDecodedNar`), with the NAR's own
length.  A ``.nar.xz`` or ``.nar.zst`` body never gets a Content-Encoding.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import zstandard

from ncps.errors import StorageError
from ncps.storage.base import StoredNar

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

# Fast, and on NARs about as good as level 9 (bench/README.md, issue 8).
LEVEL = 3
# Kept zstd-compressed only when that saves at least this share.
MIN_SAVING = 0.10
# Our own frames use far less; anything that asks for more is not ours.
MAX_WINDOW = 1 << 27
PACK_CHUNK = 1 << 20
# After this much of a NAR, give up if the output is still this big a share.
PROBE = 16 * PACK_CHUNK
PROBE_RATIO = 0.97

# Nix up to 2.33 sends no Accept-Encoding but decodes a Content-Encoding
# (zstd, xz, gzip, br) itself; later versions and Lix send Accept-Encoding.
_NIX_AGENT = re.compile(rb"(?:^|\s)Nix/\d")


def client_takes_zstd(accept_encoding: bytes | None, user_agent: bytes | None) -> bool:
    """Whether a response may carry ``Content-Encoding: zstd``.

    With an ``Accept-Encoding``, as it says (q-values honoured: ``zstd;q=0``
    refuses, ``*`` covers zstd).  Without one, only for a Nix client: HTTP
    would allow any coding, but curl, browsers and scripts that send none
    expect the bytes as they are.
    """
    if accept_encoding is None:
        return user_agent is not None and _NIX_AGENT.search(user_agent) is not None
    zstd_q: float | None = None
    any_q: float | None = None
    for item in accept_encoding.split(b","):
        token, _, params = item.partition(b";")
        q = _quality(params)
        token = token.strip().lower()
        if token == b"zstd":
            zstd_q = q
        elif token == b"*":
            any_q = q
    if zstd_q is not None:
        return zstd_q > 0
    return any_q is not None and any_q > 0


def _quality(params: bytes) -> float:
    for param in params.split(b";"):
        name, _, value = param.partition(b"=")
        if name.strip().lower() == b"q":
            try:
                q = float(value.strip())
            except ValueError:
                return 0.0
            return q if 0.0 <= q <= 1.0 else 0.0
    return 1.0


def pack_thd(source: Path, fd: int) -> int | None:
    """Compress the file ``source`` into the empty file ``fd`` and fsync it.

    Returns the compressed size, or None when zstd would save less than
    :data:`MIN_SAVING` (``fd`` then holds an unfinished frame: discard it).
    Does not close ``fd``.
    """
    raw_size = source.stat().st_size
    budget = int(raw_size * (1 - MIN_SAVING))
    compressor = zstandard.ZstdCompressor(level=LEVEL, write_checksum=True)
    written = read = 0
    with source.open("rb") as src:
        chunker = compressor.chunker(size=raw_size, chunk_size=PACK_CHUNK)
        while data := src.read(PACK_CHUNK):
            read += len(data)
            for piece in chunker.compress(data):
                written += _write_all(fd, piece)
                if written > budget:
                    return None
            if read == PROBE and written > read * PROBE_RATIO:
                # Already compressed data (a tarball, images): give up early
                # rather than compress a gigabyte for nothing.
                return None
        for piece in chunker.finish():
            written += _write_all(fd, piece)
    if written > budget:
        return None
    os.fsync(fd)
    return written


def _write_all(fd: int, data: bytes) -> int:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    return len(data)


class _Source(io.RawIOBase):
    """A StoredNar as a raw file (for the file object zstandard reads)."""

    def __init__(self, stored: StoredNar) -> None:
        super().__init__()
        self._stored = stored

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        data = self._stored.read_thd(len(view))
        view[: len(data)] = data
        return len(data)


class ZstdDecodedNar:
    """A stored ZSTD_NONE object read back as the NAR itself (a StoredNar).

    ``size`` is the NAR's length.  A seek decodes and drops the bytes before
    the offset.  Reads block: run them on the pool of the object's store.  A
    frame that does not decode raises :class:`StorageError`.
    """

    fd: int | None = None

    def __init__(self, stored: StoredNar, nar_size: int) -> None:
        self._stored = stored
        self.size = nar_size
        self._skip = 0
        decompressor = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
        source = io.BufferedReader(_Source(stored), buffer_size=PACK_CHUNK)
        self._reader = decompressor.stream_reader(
            source, read_size=PACK_CHUNK, closefd=False
        )

    def seek_thd(self, offset: int) -> None:
        self._skip = offset

    def read_thd(self, n: int) -> bytes:
        try:
            while self._skip > 0:
                dropped = self._reader.read(min(self._skip, PACK_CHUNK))
                if not dropped:
                    return b""
                self._skip -= len(dropped)
            data: bytes = self._reader.read(n)
        except zstandard.ZstdError as e:
            raise StorageError(f"stored NAR does not decode: {e}") from None
        return data

    def close_thd(self) -> None:
        self._reader.close()
        self._stored.close_thd()
