"""Byte ranges of stored NARs (RFC 9110 section 14), so a client can resume.

Nix resumes a broken NAR download with ``Range: bytes=<n>-`` when the server
sent ``Accept-Ranges: bytes`` and no ``Content-Encoding``.  We honour a single
range of a whole, stored NAR.  Anything else is answered whole (200), as
RFC 9110 allows: several ranges, an ``If-Range`` (we send no validators), an
unknown unit, or a header that does not parse.  A syntactically good range
that starts at or past the end is 416.
"""

from __future__ import annotations

import re

import attrs

# One range; the digit counts are capped so a hostile header costs nothing.
_ONE_RANGE = re.compile(rb"bytes=(\d{0,19})-(\d{0,19})")


@attrs.frozen
class ByteRange:
    """Bytes ``first`` to ``last`` (inclusive) of a body of ``size`` bytes."""

    first: int
    last: int
    size: int

    @property
    def length(self) -> int:
        return self.last - self.first + 1

    def content_range(self) -> bytes:
        return b"bytes %d-%d/%d" % (self.first, self.last, self.size)


class Unsatisfiable(Exception):
    """A good range that no byte of the body is in (416)."""

    def __init__(self, size: int) -> None:
        super().__init__(f"no byte of the {size} is in the range")
        self.size = size

    def content_range(self) -> bytes:
        return b"bytes */%d" % self.size


def requested_range(
    header: bytes | None, size: int, *, if_range: bytes | None = None
) -> ByteRange | None:
    """The one range to send of a ``size``-byte body, or None for all of it.

    Raises :class:`Unsatisfiable` for a range beyond the end.
    """
    if header is None or if_range is not None:
        return None
    match = _ONE_RANGE.fullmatch(header.strip().replace(b" ", b""))
    if match is None:
        return None  # several ranges, another unit, or garbage: send it whole
    first_text, last_text = match.groups()
    if not first_text:
        if not last_text:
            return None  # "bytes=-" is no range at all
        suffix = int(last_text)
        if suffix == 0:
            raise Unsatisfiable(size)
        first = max(0, size - suffix)
        last = size - 1
    else:
        first = int(first_text)
        if last_text and int(last_text) < first:
            return None  # inverted: invalid, so ignored
        if first >= size:
            raise Unsatisfiable(size)
        last = min(int(last_text), size - 1) if last_text else size - 1
    if size == 0:
        raise Unsatisfiable(size)
    return ByteRange(first, last, size)
