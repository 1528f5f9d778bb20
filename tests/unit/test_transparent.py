"""Transparent zstd's pieces: who takes zstd, packing, decoding back."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import zstandard

from ncps.errors import StorageError
from ncps.storage.local import LocalNar
from ncps.transparent import ZstdDecodedNar, client_takes_zstd, pack_thd

NIX = b"curl/7.85.0 Nix/2.8.0"


@pytest.mark.parametrize(
    ("accept", "agent", "takes"),
    [
        (None, NIX, True),
        (None, b"curl/8.5.0", False),
        (None, None, False),
        (None, b"NotNix/2.8", False),
        (b"zstd", None, True),
        (b"gzip, deflate, br, zstd", b"curl/8.5.0", True),
        (b"ZStd ; q=0.2", None, True),
        (b"gzip", NIX, False),
        (b"identity", NIX, False),
        (b"", NIX, False),
        (b"zstd;q=0", None, False),
        (b"zstd; q=0.000, *", None, False),
        (b"*", None, True),
        (b"*;q=0", None, False),
        (b"zstd;q=abc", None, False),
        (b"zstd;q=2", None, False),
        (b"gzip;q=1.0, zstd;q=nan", None, False),
    ],
)
def test_who_takes_zstd(accept: bytes | None, agent: bytes | None, takes: bool) -> None:
    assert client_takes_zstd(accept, agent) is takes


def text_like(size: int, seed: int = 0) -> bytes:
    words = [b"lib", b"share", b"bin", b"nix", b"store", b"\n", b"/"]
    return b"".join(random.Random(seed).choices(words, k=size // 3))[:size]


def pack(tmp_path: Path, data: bytes) -> tuple[Path, int | None]:
    source = tmp_path / "raw"
    source.write_bytes(data)
    target = tmp_path / "packed"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        return target, pack_thd(source, fd)
    finally:
        os.close(fd)


def read_all(nar: ZstdDecodedNar, n: int) -> bytes:
    out = []
    while data := nar.read_thd(n):
        out.append(data)
    return b"".join(out)


def test_a_packed_nar_decodes_to_itself_in_any_read_size(tmp_path: Path) -> None:
    data = text_like(3 << 20)
    target, size = pack(tmp_path, data)
    assert size == target.stat().st_size and size < len(data) // 3
    assert zstandard.ZstdDecompressor().decompress(target.read_bytes()) == data
    for n in (1000, 1 << 20, 5 << 20):
        nar = ZstdDecodedNar(LocalNar(os.open(target, os.O_RDONLY)), len(data))
        assert nar.size == len(data)
        assert read_all(nar, n) == data
        nar.close_thd()


def test_a_seek_decodes_and_drops_what_comes_before(tmp_path: Path) -> None:
    data = text_like(3 << 20, seed=1)
    target, _ = pack(tmp_path, data)
    for first in (1, 123_456, (2 << 20) + 5, len(data) - 1):
        nar = ZstdDecodedNar(LocalNar(os.open(target, os.O_RDONLY)), len(data))
        nar.seek_thd(first)
        assert nar.size == len(data)
        assert read_all(nar, 64 << 10) == data[first:]
        nar.close_thd()


def test_incompressible_bytes_are_not_packed(tmp_path: Path) -> None:
    _, size = pack(tmp_path, random.Random(2).randbytes(1 << 20))
    assert size is None


def test_bytes_that_do_not_decode_are_a_storage_error(tmp_path: Path) -> None:
    data = text_like(1 << 20, seed=3)
    target, _ = pack(tmp_path, data)
    damaged = bytearray(target.read_bytes())
    damaged[100:200] = bytes(100)
    target.write_bytes(bytes(damaged))
    nar = ZstdDecodedNar(LocalNar(os.open(target, os.O_RDONLY)), len(data))
    with pytest.raises(StorageError, match="does not decode"):
        read_all(nar, 1 << 20)
    nar.close_thd()


def test_incompressible_bytes_are_given_up_on_early(tmp_path: Path) -> None:
    # 64 MiB that zstd cannot shrink, then text it could: not worth packing,
    # and found out from the first 16 MiB, not after the whole file.
    data = random.Random(4).randbytes(64 << 20) + text_like(1 << 20)
    target, size = pack(tmp_path, data)
    assert size is None
    assert target.stat().st_size < 20 << 20
