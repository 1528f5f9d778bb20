"""Parsing the Range header of a NAR request (ncps.ranges)."""

from __future__ import annotations

import pytest

from ncps.ranges import ByteRange, Unsatisfiable, requested_range


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        (b"bytes=0-", 100, ByteRange(0, 99, 100)),
        (b"bytes=10-19", 100, ByteRange(10, 19, 100)),
        (b"bytes=90-1000", 100, ByteRange(90, 99, 100)),
        (b"bytes=99-", 100, ByteRange(99, 99, 100)),
        (b"bytes=-10", 100, ByteRange(90, 99, 100)),
        (b"bytes=-1000", 100, ByteRange(0, 99, 100)),
        (b" bytes = 1 - 2 ", 100, ByteRange(1, 2, 100)),
    ],
)
def test_one_range(header: bytes, size: int, expected: ByteRange) -> None:
    got = requested_range(header, size)
    assert got == expected
    assert got is not None and got.length == expected.last - expected.first + 1


@pytest.mark.parametrize(
    "header",
    [
        None,
        b"",
        b"bytes=",
        b"bytes=-",
        b"bytes=5-1",  # inverted
        b"bytes=0-1,4-5",  # several
        b"bytes=0-1, 4-5",
        b"items=0-1",
        b"bytes=a-b",
        b"bytes=1-2-3",
        b"bytes=" + b"9" * 20 + b"-",  # beyond any size: not even parsed
        b"bytes=0-" + b"9" * 20,
    ],
)
def test_anything_else_means_the_whole_body(header: bytes | None) -> None:
    assert requested_range(header, 100) is None


def test_if_range_means_the_whole_body() -> None:
    assert requested_range(b"bytes=0-1", 100, if_range=b'"x"') is None


@pytest.mark.parametrize(
    ("header", "size"),
    [
        (b"bytes=100-", 100),
        (b"bytes=100-200", 100),
        (b"bytes=-0", 100),
        (b"bytes=-5", 0),
    ],
)
def test_nothing_in_range_is_unsatisfiable(header: bytes, size: int) -> None:
    with pytest.raises(Unsatisfiable) as info:
        requested_range(header, size)
    assert info.value.content_range() == b"bytes */%d" % size
