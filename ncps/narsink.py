"""Thread-side sink for a NAR being downloaded: write, hash, decompress, verify.

A :class:`NarSink` belongs to exactly one download and is only ever used by one
pool thread at a time (the download hands it one batch of chunks after the
other), so it needs no locks.  Every method here blocks.

Hostile bodies cost bounded work: the compressed bytes are capped (by
FileSize, else by :func:`compressed_cap` of NarSize, which every compressor
stays under even on incompressible data), and decoding is linear in them:
input reaches a decompressor in slices that start small with each stream, so
the copy a decompressor makes of what follows the end of a stream stays in
proportion to the stream, however many tiny streams are concatenated.
"""

from __future__ import annotations

import bz2
import hashlib
import lzma
import os
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import attrs
import zstandard

from ncps.errors import IntegrityError
from ncps.nixhash import NixHash

# Compressions whose NarHash we can check while the bytes stream in.
VERIFIABLE_COMPRESSIONS = frozenset({"none", "xz", "zstd", "bzip2"})
# Most decompressed bytes per call: the buffer a decoder fills (one per io
# thread at a time) and the bytes object it becomes.
_OUT_CHUNK = 256 << 10
# Pieces of input handed to an xz/bzip2 decompressor in one call: the first
# of each stream is small, the next ones double up to the largest.
_FIRST_SLICE = 16
_IN_SLICE = 64 << 10
# The most history a decoder may keep: a zstd frame's window, an xz
# stream's dictionary.  2^27 (128 MiB) is libzstd's default limit, the one
# Nix decodes zstd NARs with (through libarchive), and twice what xz -9 uses.
# Larger streams are refused before the decoder allocates anything.  Pages
# are only touched as output is written, so a download's resident share is
# at most min(window, NarSize).
DECODER_WINDOW = 1 << 27
# xz's limit counts the decoder's whole memory: the dictionary plus its
# own state (tens of KiB).
_XZ_MEMLIMIT = DECODER_WINDOW + (1 << 20)


@attrs.frozen
class Expected:
    """What a NAR must turn out to be, from its verified narinfo."""

    compression: str
    nar_hash: NixHash
    nar_size: int
    file_hash: NixHash | None = None
    file_size: int | None = None


def compressed_cap(nar_size: int) -> int:
    """Most compressed bytes we accept for a NAR of ``nar_size`` without FileSize.

    Incompressible data grows by under 0.01% plus about 60 bytes of headers
    in xz, by about 0.5% plus 50 bytes in bzip2 and by under 0.4% plus a
    few bytes per 128 KiB block in zstd; NarSize + 1/32 + 64 KiB leaves a wide
    margin (for many concatenated streams or frames too) while it keeps
    junk (skippable frames, empty blocks) from streaming without end.
    """
    return nar_size + nar_size // 32 + (64 << 10)


class _Decoder(Protocol):
    def feed(self, data: bytes) -> None: ...
    def finish(self) -> None: ...


class _Spent:
    """Stands in for a decoder once its memory was given back."""

    def feed(self, data: bytes) -> None:
        raise IntegrityError("the NAR was already finished or discarded")

    def finish(self) -> None:
        raise IntegrityError("the NAR was already finished or discarded")


class _NarCounter:
    """Hashes the uncompressed NAR and refuses to grow beyond NarSize."""

    def __init__(self, expected: Expected) -> None:
        self.hash = hashlib.new(expected.nar_hash.algorithm)
        self.size = 0
        self.limit = expected.nar_size

    def write(self, data: bytes) -> int:
        self.size += len(data)
        if self.size > self.limit:
            raise IntegrityError(f"NAR is larger than its NarSize {self.limit}")
        self.hash.update(data)
        return len(data)


class _Identity:
    def __init__(self, out: _NarCounter) -> None:
        self.out = out

    def feed(self, data: bytes) -> None:
        self.out.write(data)

    def finish(self) -> None:
        pass


class _Stdlib:
    """xz and bzip2, via decompressors that honour ``max_length``.

    ``fed`` counts the bytes handed to decompressors: decoding is linear
    because it stays within a small multiple of the input size, however many
    streams the input holds.
    """

    def __init__(
        self,
        out: _NarCounter,
        make: Callable[[], lzma.LZMADecompressor | bz2.BZ2Decompressor],
    ) -> None:
        self.out = out
        self.make = make
        self.dec: lzma.LZMADecompressor | bz2.BZ2Decompressor = make()
        self.slice = _FIRST_SLICE
        self.fed = 0

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        offset = 0
        while offset < len(view):
            if self.dec.eof:
                # Concatenated streams (as ``xz``/``bzip2`` produce) decode on.
                self.dec = self.make()
                self.slice = _FIRST_SLICE
            piece = view[offset : offset + self.slice]
            self.fed += len(piece)
            self.out.write(self.dec.decompress(piece, _OUT_CHUNK))
            while not self.dec.eof and not self.dec.needs_input:
                self.out.write(self.dec.decompress(b"", _OUT_CHUNK))
            if self.dec.eof:
                # The decompressor gives back (copies) what it did not read;
                # slices grow from small with each stream, so what is handed
                # over twice stays a fraction of what the stream used.
                offset += len(piece) - len(self.dec.unused_data)
            else:
                offset += len(piece)
                self.slice = min(self.slice * 2, _IN_SLICE)

    def finish(self) -> None:
        if not self.dec.eof:
            raise IntegrityError("compressed NAR is truncated")


class _Zstd:
    def __init__(self, out: _NarCounter) -> None:
        dctx = zstandard.ZstdDecompressor(max_window_size=DECODER_WINDOW)
        sink: Any = out  # a file-like object with write(); all zstd needs
        self.writer = dctx.stream_writer(
            sink, write_size=_OUT_CHUNK, write_return_read=True
        )
        self.fed = 0

    def feed(self, data: bytes) -> None:
        try:
            self.writer.write(data)
        except zstandard.ZstdError as e:
            raise IntegrityError(f"zstd NAR does not decode: {e}") from None
        self.fed += len(data)

    def finish(self) -> None:
        try:
            self.writer.flush()
        except zstandard.ZstdError as e:
            raise IntegrityError(f"zstd NAR does not decode: {e}") from None


def _xz_decompressor() -> lzma.LZMADecompressor:
    # The .xz container only: never lzma-alone or raw streams.  A stream
    # whose dictionary would need more than the limit fails (LZMAError)
    # before the dictionary is allocated.
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=_XZ_MEMLIMIT)


class NarSink:
    """Receives the compressed bytes of one NAR into a temp file and checks them.

    ``write_thd`` appends a batch and returns how many bytes the file now holds;
    ``finish_thd`` checks every size and hash, fsyncs and closes the file, and
    raises :class:`IntegrityError` on any mismatch.
    """

    def __init__(self, fd: int, expected: Expected) -> None:
        if expected.compression not in VERIFIABLE_COMPRESSIONS:
            raise IntegrityError(
                f"cannot verify NARs compressed with {expected.compression}"
            )
        self.fd = fd
        self.expected = expected
        self.file_size = 0
        self.file_cap = (
            expected.file_size
            if expected.file_size is not None
            else compressed_cap(expected.nar_size)
        )
        # For an uncompressed NAR the file *is* the NAR: its FileHash (checked
        # equal to NarHash at ingest) needs no second pass over the bytes.
        same = expected.file_hash is None or expected.file_hash == expected.nar_hash
        self.file_hash = (
            None if expected.compression == "none" and same else hashlib.sha256()
        )
        self.nar = _NarCounter(expected)
        self.decoder: _Decoder
        if expected.compression == "none":
            self.decoder = _Identity(self.nar)
        elif expected.compression == "zstd":
            self.decoder = _Zstd(self.nar)
        else:
            self.decoder = _Stdlib(
                self.nar,
                _xz_decompressor
                if expected.compression == "xz"
                else bz2.BZ2Decompressor,
            )

    def write_thd(self, chunks: Iterable[bytes]) -> int:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
            self.file_size += len(chunk)
            if self.file_size > self.file_cap:
                if self.expected.file_size is not None:
                    raise IntegrityError(
                        f"download is larger than its FileSize {self.file_cap}"
                    )
                raise IntegrityError(
                    f"download is larger than {self.file_cap} bytes, the most a "
                    f"NAR of NarSize {self.expected.nar_size} may compress to"
                )
            if self.file_hash is not None:
                self.file_hash.update(chunk)
            try:
                self.decoder.feed(chunk)
            except (lzma.LZMAError, OSError, EOFError) as e:
                raise IntegrityError(f"compressed NAR does not decode: {e}") from None
        return self.file_size

    def finish_thd(self) -> int:
        """Verify every size and hash; return the file size (see :meth:`sync_thd`)."""
        exp = self.expected
        try:
            self.decoder.finish()
        except (lzma.LZMAError, OSError, EOFError) as e:
            raise IntegrityError(f"compressed NAR does not decode: {e}") from None
        finally:
            self._drop_decoder()
        if exp.file_size is not None and self.file_size != exp.file_size:
            raise IntegrityError(
                f"download is {self.file_size} bytes, FileSize says {exp.file_size}"
            )
        if (
            self.file_hash is not None
            and exp.file_hash is not None
            and exp.file_hash.algorithm == "sha256"
        ):
            got = NixHash("sha256", self.file_hash.digest())
            if got != exp.file_hash:
                raise IntegrityError(
                    f"FileHash mismatch: expected {exp.file_hash}, got {got}"
                )
        if self.nar.size != exp.nar_size:
            raise IntegrityError(
                f"NAR is {self.nar.size} bytes, NarSize says {exp.nar_size}"
            )
        got_nar = NixHash(exp.nar_hash.algorithm, self.nar.hash.digest())
        if got_nar != exp.nar_hash:
            raise IntegrityError(
                f"NarHash mismatch: expected {exp.nar_hash}, got {got_nar}"
            )
        return self.file_size

    def sync_thd(self) -> None:
        """Make the verified bytes durable and close the file."""
        os.fsync(self.fd)
        self.close_thd()

    def close_thd(self) -> None:
        self._drop_decoder()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _drop_decoder(self) -> None:
        """Free the decoder's window and buffers now.

        They are native memory (a zstd window or an xz dictionary, up to
        :data:`DECODER_WINDOW`) that the garbage collector does not see:
        left to it, the decoders of finished downloads that sit in reference
        cycles pile up (162 of them, 385 MiB allocated, at the peak of a
        301-path closure).
        """
        self.decoder = _Spent()
