"""ncps.streaming.ObjectStreamer: a stored remote object (S3) sent to a client.

The object's reads run on a pool (a ManualRunner here, so the test decides
when each read completes); the request is Twisted's DummyRequest with a
transport that records an abort.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.web.test.requesthelper import DummyChannel, DummyRequest

from ncps.errors import StorageError
from ncps.streaming import OBJECT_CHUNK, ObjectStreamer
from ncps.testing import ManualRunner


class FakeStoredNar:
    """A remote object of ``size`` bytes whose body holds ``data`` (maybe less)."""

    fd = None

    def __init__(self, data: bytes, size: int | None = None, fail_at: int = -1) -> None:
        self.data = data
        self.size = len(data) if size is None else size
        self.fail_at = fail_at
        self.offset = 0
        self.reads = 0
        self.closed = 0
        self.reading = False

    def read_thd(self, n: int) -> bytes:
        assert not self.closed, "read after close"
        self.reads += 1
        if self.fail_at >= 0 and self.offset >= self.fail_at:
            raise StorageError("s3 read: connection reset")
        piece = self.data[self.offset : self.offset + n]
        self.offset += len(piece)
        return piece

    def close_thd(self) -> None:
        self.closed += 1


class Request(DummyRequest):
    def __init__(self) -> None:
        super().__init__([b"nar", b"x.nar"])
        self.channel = DummyChannel()
        self.aborted = False
        self.channel.transport.abortConnection = self._abort  # type: ignore[attr-defined]

    def _abort(self) -> None:
        self.aborted = True

    # DummyRequest drives a pull producer in a loop; ours is a push producer.
    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    @property
    def body(self) -> bytes:
        return b"".join(self.written)


def drain(runner: ManualRunner, limit: int = 1000) -> None:
    for _ in range(limit):
        if not runner.queue:
            return
        runner.run_next()
    raise AssertionError("the streamer never stopped reading")


def start(data: bytes, **kw: Any) -> tuple[Request, FakeStoredNar, ManualRunner]:
    request, stored, runner = Request(), FakeStoredNar(data, **kw), ManualRunner()
    ObjectStreamer(request, stored, runner.run).start()  # type: ignore[arg-type]
    return request, stored, runner


def test_whole_object_is_sent_then_finished_and_closed() -> None:
    data = bytes(range(256)) * (OBJECT_CHUNK // 256 * 3 + 7)
    request, stored, runner = start(data)
    drain(runner)
    assert request.body == data
    assert request.finished == 1
    assert not request.aborted
    assert stored.closed == 1
    # 1 MiB pieces, plus the final empty read proving the end.
    assert stored.reads == len(data) // OBJECT_CHUNK + 2


def test_empty_object() -> None:
    request, stored, runner = start(b"")
    drain(runner)
    assert request.finished == 1 and request.body == b"" and stored.closed == 1


@pytest.mark.parametrize("short_by", [1, OBJECT_CHUNK + 5])
def test_object_shorter_than_announced_aborts(short_by: int) -> None:
    data = b"x" * (2 * OBJECT_CHUNK)
    request, stored, runner = start(data[:-short_by], size=len(data))
    drain(runner)
    assert request.aborted
    assert not request.finished
    assert len(request.body) < len(data)
    assert stored.closed == 1


def test_object_longer_than_announced_aborts() -> None:
    request, stored, runner = start(b"y" * 100, size=50)
    drain(runner)
    assert request.aborted and not request.finished and stored.closed == 1


def test_read_error_mid_stream_aborts() -> None:
    data = b"z" * (3 * OBJECT_CHUNK)
    request, stored, runner = start(data, fail_at=OBJECT_CHUNK)
    drain(runner)
    assert request.aborted
    assert not request.finished
    assert request.body == data[:OBJECT_CHUNK]
    assert stored.closed == 1


def test_paused_transport_stops_reads_until_resumed() -> None:
    data = b"p" * (4 * OBJECT_CHUNK)
    request, stored, runner = start(data)
    runner.run_next()  # first piece written
    streamer = request.producer
    streamer.pauseProducing()
    drain(runner)  # the read already queued completes, no new one is queued
    reads = stored.reads
    assert not runner.queue
    assert len(request.body) == 2 * OBJECT_CHUNK
    streamer.resumeProducing()
    drain(runner)
    assert stored.reads > reads
    assert request.body == data and request.finished == 1


def test_client_gone_while_a_read_is_in_flight_closes_after_it() -> None:
    data = b"q" * (3 * OBJECT_CHUNK)
    request, stored, runner = start(data)
    runner.run_next()
    assert runner.queue  # the next read is in flight
    request.producer.stopProducing()
    assert stored.closed == 0  # never closed under a running read
    drain(runner)
    assert stored.closed == 1
    assert len(request.body) == OBJECT_CHUNK  # nothing written after the stop
    assert not request.finished


class SeekableStoredNar(FakeStoredNar):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.seeks: list[int] = []

    def seek_thd(self, offset: int) -> None:
        assert self.reads == 0, "seek after a read"
        self.seeks.append(offset)
        self.offset = offset


@pytest.mark.parametrize(("first", "length"), [(0, 10), (5, 100), (3_000_000, 1)])
def test_a_range_is_sought_then_sent_and_ends_where_it_should(
    first: int, length: int
) -> None:
    data = bytes(range(256)) * 20_000
    stored = SeekableStoredNar(data)
    runner = ManualRunner()
    request = Request()
    ObjectStreamer(request, stored, runner.run, first, length).start()  # type: ignore[arg-type]
    drain(runner)
    assert stored.seeks == ([first] if first else [])
    assert request.body == data[first : first + length]
    assert request.finished == 1 and not request.aborted
    assert stored.closed == 1
