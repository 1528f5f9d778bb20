"""ncps.narsink: streaming verification of NAR files in every verifiable compression."""

from __future__ import annotations

import bz2
import functools
import lzma
import os
import struct
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
import zstandard

from ncps.errors import IntegrityError
from ncps.narsink import DECODER_WINDOW, Expected, NarSink, compressed_cap
from ncps.testing import compress, random_nar, sha256

COMPRESSIONS = ["none", "xz", "zstd", "bzip2"]


def expected_for(
    nar: bytes, file: bytes, compression: str, **changes: object
) -> Expected:
    exp = Expected(
        compression=compression,
        nar_hash=sha256(nar),
        nar_size=len(nar),
        file_hash=sha256(file),
        file_size=len(file),
    )
    return attrs.evolve(exp, **changes)


def pieces(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


@pytest.fixture
def sink_file(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    path = tmp_path / "nar.part"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    yield path, fd
    try:
        os.close(fd)
    except OSError:
        pass  # the sink closed it


def feed(sink: NarSink, data: bytes, piece: int = 7919, batch: int = 3) -> None:
    """Feed in odd-sized pieces, several per batch, as the download does."""
    chunks = list(pieces(data, piece))
    for i in range(0, len(chunks), batch):
        sink.write_thd(chunks[i : i + batch])


def verify(fd: int, file: bytes, expected: Expected) -> int:
    sink = NarSink(fd, expected)
    feed(sink, file)
    return sink.finish_thd()


NAR = random_nar(60_000, seed=1)


@functools.cache
def compressed(compression: str) -> bytes:
    return compress(NAR, compression)


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_good_file_verifies_and_is_written_whole(
    sink_file: tuple[Path, int], compression: str
) -> None:
    path, fd = sink_file
    file = compressed(compression)
    assert verify(fd, file, expected_for(NAR, file, compression)) == len(file)
    assert path.read_bytes() == file


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_verifies_without_file_fields(
    sink_file: tuple[Path, int], compression: str
) -> None:
    _, fd = sink_file
    file = compressed(compression)
    exp = expected_for(NAR, file, compression, file_hash=None, file_size=None)
    assert verify(fd, file, exp) == len(file)


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_wrong_nar_hash(sink_file: tuple[Path, int], compression: str) -> None:
    _, fd = sink_file
    file = compressed(compression)
    other = sha256(NAR + b"x")
    with pytest.raises(IntegrityError, match="NarHash"):
        verify(fd, file, expected_for(NAR, file, compression, nar_hash=other))


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_nar_differs_in_one_byte(sink_file: tuple[Path, int], compression: str) -> None:
    _, fd = sink_file
    tampered = bytearray(NAR)
    tampered[len(NAR) // 2] ^= 0x01
    file = compress(bytes(tampered), compression)
    exp = expected_for(NAR, file, compression)  # file fields describe what is sent
    with pytest.raises(IntegrityError, match="NarHash"):
        verify(fd, file, exp)


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_short_nar(sink_file: tuple[Path, int], compression: str) -> None:
    _, fd = sink_file
    file = compress(NAR[:-8], compression)
    exp = expected_for(NAR, file, compression)
    with pytest.raises(IntegrityError, match="NarSize"):
        verify(fd, file, exp)


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_nar_longer_than_nar_size(
    sink_file: tuple[Path, int], compression: str
) -> None:
    _, fd = sink_file
    file = compress(NAR + b"\0" * 8, compression)
    exp = expected_for(NAR, file, compression)
    with pytest.raises(IntegrityError, match="NarSize"):
        verify(fd, file, exp)


def test_extra_bytes_after_uncompressed_nar(sink_file: tuple[Path, int]) -> None:
    _, fd = sink_file
    exp = expected_for(NAR, NAR, "none", file_size=None, file_hash=None)
    with pytest.raises(IntegrityError):
        verify(fd, NAR + b"trailing", exp)


@pytest.mark.parametrize("compression", ["xz", "bzip2", "zstd"])
def test_garbage_after_compressed_stream(
    sink_file: tuple[Path, int], compression: str
) -> None:
    _, fd = sink_file
    file = compressed(compression) + b"trailing garbage"
    exp = expected_for(NAR, file, compression, file_size=None, file_hash=None)
    with pytest.raises(IntegrityError):
        verify(fd, file, exp)


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_file_size_mismatch(sink_file: tuple[Path, int], compression: str) -> None:
    _, fd = sink_file
    file = compressed(compression)
    with pytest.raises(IntegrityError, match="FileSize"):
        verify(fd, file, expected_for(NAR, file, compression, file_size=len(file) + 1))


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_file_larger_than_file_size_fails_while_streaming(
    sink_file: tuple[Path, int], compression: str
) -> None:
    _, fd = sink_file
    file = compressed(compression)
    sink = NarSink(fd, expected_for(NAR, file, compression, file_size=len(file) - 1))
    with pytest.raises(IntegrityError, match="FileSize"):
        sink.write_thd([file])


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_file_hash_mismatch(sink_file: tuple[Path, int], compression: str) -> None:
    _, fd = sink_file
    file = compressed(compression)
    wrong = sha256(file + b"x")
    with pytest.raises(IntegrityError, match="FileHash"):
        verify(fd, file, expected_for(NAR, file, compression, file_hash=wrong))


@pytest.mark.parametrize("compression", ["xz", "zstd", "bzip2"])
def test_truncated_compressed_stream(
    sink_file: tuple[Path, int], compression: str
) -> None:
    _, fd = sink_file
    file = compressed(compression)[:-20]
    exp = expected_for(NAR, file, compression)  # FileSize/FileHash of what is sent
    with pytest.raises(IntegrityError):
        verify(fd, file, exp)


@pytest.mark.parametrize("compression", ["xz", "zstd", "bzip2"])
def test_garbage_compressed_stream(
    sink_file: tuple[Path, int], compression: str
) -> None:
    _, fd = sink_file
    garbage = os.urandom(20_000)
    exp = expected_for(NAR, garbage, compression)
    with pytest.raises(IntegrityError):
        verify(fd, garbage, exp)


def test_concatenated_xz_streams(sink_file: tuple[Path, int]) -> None:
    _, fd = sink_file
    half = len(NAR) // 2
    file = lzma.compress(NAR[:half]) + lzma.compress(NAR[half:])
    assert verify(fd, file, expected_for(NAR, file, "xz")) == len(file)


def test_concatenated_bzip2_streams(sink_file: tuple[Path, int]) -> None:
    _, fd = sink_file
    half = len(NAR) // 3
    file = bz2.compress(NAR[:half]) + bz2.compress(NAR[half:])
    assert verify(fd, file, expected_for(NAR, file, "bzip2")) == len(file)


def test_multi_frame_zstd(sink_file: tuple[Path, int]) -> None:
    _, fd = sink_file
    cctx = zstandard.ZstdCompressor(level=1)
    thirds = [NAR[i : i + 20_000] for i in range(0, len(NAR), 20_000)]
    file = b"".join(cctx.compress(part) for part in thirds)
    assert len(thirds) > 2
    assert verify(fd, file, expected_for(NAR, file, "zstd")) == len(file)


def test_streamed_zstd_frame_without_content_size(sink_file: tuple[Path, int]) -> None:
    _, fd = sink_file
    cobj = zstandard.ZstdCompressor(level=1).compressobj()
    file = cobj.compress(NAR) + cobj.flush()
    assert verify(fd, file, expected_for(NAR, file, "zstd")) == len(file)


def test_one_byte_at_a_time(sink_file: tuple[Path, int]) -> None:
    _, fd = sink_file
    nar = random_nar(2000, seed=5)
    file = compress(nar, "xz")
    sink = NarSink(fd, expected_for(nar, file, "xz"))
    for i in range(len(file)):
        assert sink.write_thd([file[i : i + 1]]) == i + 1
    assert sink.finish_thd() == len(file)


def test_unverifiable_compression_is_refused(sink_file: tuple[Path, int]) -> None:
    _, fd = sink_file
    with pytest.raises(IntegrityError, match="br"):
        NarSink(fd, expected_for(NAR, NAR, "br"))


def test_sync_closes_the_descriptor_after_finish(sink_file: tuple[Path, int]) -> None:
    path, fd = sink_file
    file = compressed("zstd")
    sink = NarSink(fd, expected_for(NAR, file, "zstd"))
    feed(sink, file)
    assert sink.finish_thd() == len(file)
    os.fstat(fd)  # still open: verified, not yet durable
    sink.sync_thd()
    with pytest.raises(OSError):
        os.fstat(fd)
    assert path.read_bytes() == file


# -- hostile bodies: bounded and linear ------------------------------------------------

TINY = random_nar(100, seed=8)
JUNK = 20 << 20
CHUNK = 64 << 10


def _crc(data: bytes) -> bytes:
    return struct.pack("<I", zlib.crc32(data))


def xz_stream_of_empty_blocks(size: int) -> bytes:
    """An .xz stream header followed by ``size`` bytes of empty LZMA2 blocks."""
    flags = b"\x00\x00"  # no integrity check
    header = b"\xfd7zXZ\x00" + flags + _crc(flags)
    block_header = bytes([2, 0, 0x21, 1, 0, 0, 0, 0])
    block = block_header + _crc(block_header) + b"\x00" + b"\x00" * 3
    return header + block * (size // len(block))


def feed_until_refused(sink: NarSink, data: bytes) -> int:
    """Feed ``data`` in CHUNK pieces until the sink refuses; the bytes fed."""
    fed = 0
    with pytest.raises(IntegrityError, match="the most a NAR of NarSize"):
        for piece in pieces(data, CHUNK):
            fed += len(piece)
            sink.write_thd([piece])
    return fed


def test_cap_without_file_size_leaves_room_for_incompressible_data() -> None:
    for nar_size in (1, 100, 4096, 1 << 20, 1 << 30):
        assert compressed_cap(nar_size) > nar_size * 1.01 + 1000
        assert compressed_cap(nar_size) < nar_size * 1.05 + (1 << 20)
    incompressible = os.urandom(1 << 20)
    for compression in ("xz", "zstd", "bzip2"):
        file = compress(incompressible, compression)
        assert len(file) < compressed_cap(len(incompressible))


def test_endless_xz_stream_of_empty_blocks_is_refused_after_the_cap(
    sink_file: tuple[Path, int],
) -> None:
    path, fd = sink_file
    exp = expected_for(TINY, b"", "xz", file_size=None, file_hash=None)
    sink = NarSink(fd, exp)
    fed = feed_until_refused(sink, xz_stream_of_empty_blocks(JUNK))
    cap = compressed_cap(len(TINY))
    assert cap < fed <= cap + CHUNK
    assert sink.decoder.fed <= 2 * fed  # type: ignore[attr-defined]
    assert path.stat().st_size <= cap + CHUNK


def test_concatenated_empty_xz_streams_are_refused_after_the_cap(
    sink_file: tuple[Path, int],
) -> None:
    _, fd = sink_file
    junk = lzma.compress(b"") * (JUNK // 32)
    sink = NarSink(fd, expected_for(TINY, b"", "xz", file_size=None, file_hash=None))
    fed = feed_until_refused(sink, compress(TINY, "xz") + junk)
    assert fed <= compressed_cap(len(TINY)) + CHUNK


@pytest.mark.parametrize("compression", ["xz", "bzip2"])
def test_many_tiny_streams_are_decoded_in_linear_work(
    sink_file: tuple[Path, int], compression: str
) -> None:
    """Bytes after the end of a stream are handed over again, but few of them."""
    _, fd = sink_file
    one = lzma.compress(b"") if compression == "xz" else bz2.compress(b"")
    file = one * 30_000 + compress(NAR, compression)
    sink = NarSink(fd, expected_for(NAR, file, compression))
    decoder = sink.decoder  # let go of by finish_thd
    for piece in pieces(file, CHUNK):
        sink.write_thd([piece])
    assert sink.finish_thd() == len(file)
    assert decoder.fed <= 2 * len(file)  # type: ignore[attr-defined]


def test_skippable_zstd_frames_count_toward_the_cap(
    sink_file: tuple[Path, int],
) -> None:
    _, fd = sink_file
    frame = struct.pack("<II", 0x184D2A50, 4088) + b"\0" * 4088
    junk = frame * (JUNK // len(frame))
    sink = NarSink(fd, expected_for(TINY, b"", "zstd", file_size=None, file_hash=None))
    fed = feed_until_refused(sink, compress(TINY, "zstd") + junk)
    assert fed <= compressed_cap(len(TINY)) + CHUNK


def test_a_few_skippable_zstd_frames_are_fine(sink_file: tuple[Path, int]) -> None:
    _, fd = sink_file
    frame = struct.pack("<II", 0x184D2A51, 16) + b"\1" * 16
    file = frame + compressed("zstd") + frame
    exp = expected_for(NAR, file, "zstd", file_size=None, file_hash=None)
    assert verify(fd, file, exp) == len(file)


@pytest.mark.parametrize("fmt", [lzma.FORMAT_ALONE, lzma.FORMAT_RAW])
def test_xz_means_the_xz_container_only(sink_file: tuple[Path, int], fmt: int) -> None:
    _, fd = sink_file
    filters = [{"id": lzma.FILTER_LZMA2}] if fmt == lzma.FORMAT_RAW else None
    file = lzma.compress(NAR, format=fmt, filters=filters)
    with pytest.raises(IntegrityError):
        verify(fd, file, expected_for(NAR, file, "xz"))


# -- decoder memory: bounded per stream, given back when the NAR is done ---------------


def zstd_declaring_window(data: bytes, window_log: int) -> bytes:
    """One zstd frame of ``data`` whose header asks for a 2**window_log window."""
    c = zstandard.ZstdCompressor(level=1, write_content_size=False).compressobj()
    frame = bytearray(c.compress(data) + c.flush())
    # No single-segment flag: byte 5 is the window descriptor (exponent
    # window_log - 10, no mantissa), which is all a decoder sizes its window by.
    assert frame[4] & 0x20 == 0
    frame[5] = (window_log - 10) << 3
    return bytes(frame)


def xz_declaring_dictionary(data: bytes, props: int) -> bytes:
    """An .xz stream of ``data`` whose LZMA2 dictionary is (2 | props & 1) <<
    (props // 2 + 11) bytes: only the block header's props byte (and its
    CRC) differ from what xz wrote."""
    stream = bytearray(lzma.compress(data, preset=0))
    size = (stream[12] + 1) * 4
    header = stream[12 : 12 + size - 4]
    assert header[2:4] == b"\x21\x01"  # one LZMA2 filter, one props byte
    header[4] = props
    stream[12 : 12 + size] = header + _crc(bytes(header))
    return bytes(stream)


def test_zstd_window_as_large_as_nix_accepts_decodes(
    sink_file: tuple[Path, int],
) -> None:
    _, fd = sink_file
    assert DECODER_WINDOW == 1 << 27  # libzstd's default limit, Nix's too
    file = zstd_declaring_window(NAR, 27)
    assert verify(fd, file, expected_for(NAR, file, "zstd")) == len(file)


def test_zstd_frame_asking_for_a_larger_window_is_refused(
    sink_file: tuple[Path, int],
) -> None:
    _, fd = sink_file
    file = zstd_declaring_window(NAR, 31)  # a 2 GiB window
    with pytest.raises(IntegrityError, match="zstd NAR does not decode"):
        verify(fd, file, expected_for(NAR, file, "zstd"))


def test_xz_with_the_dictionary_of_xz_9_decodes(sink_file: tuple[Path, int]) -> None:
    _, fd = sink_file
    file = xz_declaring_dictionary(NAR, 28)  # 64 MiB, as xz -9
    assert verify(fd, file, expected_for(NAR, file, "xz")) == len(file)


def test_xz_asking_for_a_larger_dictionary_is_refused(
    sink_file: tuple[Path, int],
) -> None:
    _, fd = sink_file
    file = xz_declaring_dictionary(NAR, 36)  # 1 GiB
    with pytest.raises(IntegrityError, match="does not decode"):
        verify(fd, file, expected_for(NAR, file, "xz"))


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("outcome", ["verified", "refused", "discarded"])
def test_the_decoder_is_let_go_when_the_nar_is_done(
    sink_file: tuple[Path, int], compression: str, outcome: str
) -> None:
    """Its window is native memory the garbage collector does not count: a
    finished download in a reference cycle must not keep it."""
    _, fd = sink_file
    file = compressed(compression)
    exp = expected_for(NAR, file, compression)
    if outcome == "refused":
        exp = attrs.evolve(exp, nar_hash=sha256(b"other"))
    sink = NarSink(fd, exp)
    live = sink.decoder
    feed(sink, file)
    if outcome == "discarded":
        sink.close_thd()
    elif outcome == "refused":
        with pytest.raises(IntegrityError, match="NarHash mismatch"):
            sink.finish_thd()
    else:
        assert sink.finish_thd() == len(file)
    assert sink.decoder is not live
    assert sys.getrefcount(live) == 2  # ours and getrefcount's argument
    with pytest.raises(IntegrityError):
        sink.decoder.feed(b"more")
