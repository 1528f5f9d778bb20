"""ncps.download.NarDownload driven by hand: a fake transport, a Clock, a fake pool."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from ncps import download as download_mod
from ncps.download import (
    HIGH_WATER,
    IDLE_TIMEOUT,
    THROUGHPUT_FLOOR,
    THROUGHPUT_WINDOW,
    NarDownload,
)
from ncps.errors import IntegrityError, UpstreamError
from ncps.narsink import Expected, NarSink
from ncps.testing import (
    ManualRunner,
    RecordingTransport,
    SyncRunner,
    compress,
    random_nar,
    result_of,
    sha256,
)


@attrs.define
class Rig:
    """One download wired to fakes, and what happened to it."""

    download: NarDownload
    protocol: Protocol
    transport: RecordingTransport
    clock: Clock
    temp: Path
    commits: list[int] = attrs.Factory(list)
    discards: list[int] = attrs.Factory(list)

    def feed(self, data: bytes, piece: int = 4096) -> None:
        for i in range(0, len(data), piece):
            self.protocol.dataReceived(data[i : i + piece])

    def end(self, reason: Failure | None = None) -> None:
        self.protocol.connectionLost(reason or Failure(ResponseDone()))


NAR = random_nar(50_000, seed=3)
FILE = compress(NAR, "xz")


def expected(nar: bytes = NAR, file: bytes = FILE, **changes: Any) -> Expected:
    exp = Expected("xz", sha256(nar), len(nar), sha256(file), len(file))
    return attrs.evolve(exp, **changes)


@pytest.fixture
def make_rig(tmp_path: Path) -> Iterator[Any]:
    fds: list[int] = []

    def make(exp: Expected | None = None, runner: Any = None) -> Rig:
        temp = tmp_path / f"nar-{len(fds)}.part"
        write_fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        read_fd = os.open(temp, os.O_RDONLY)
        fds.append(write_fd)
        clock = Clock()
        commits: list[int] = []
        discards: list[int] = []

        def commit() -> Deferred[None]:
            commits.append(1)
            return succeed(None)

        def discard() -> Deferred[None]:
            discards.append(1)
            os.unlink(temp)
            return succeed(None)

        download = NarDownload(
            clock=clock,
            name="nar/test.nar.xz",
            temp_path=temp,
            sink=NarSink(write_fd, exp or expected()),
            run_io=(runner or SyncRunner()).run,
            commit=commit,
            discard=discard,
            expected_length=None,
            read_fd=read_fd,
        )
        protocol = download.body_protocol()
        transport = RecordingTransport()
        protocol.makeConnection(transport)  # type: ignore[arg-type]
        return Rig(download, protocol, transport, clock, temp, commits, discards)

    yield make
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def test_good_body_ends_in_commit(make_rig: Any) -> None:
    rig: Rig = make_rig()
    done = rig.download.when_done()
    rig.feed(FILE)
    assert rig.commits == []
    rig.end()
    assert rig.commits == [1]
    assert rig.discards == []
    assert result_of(done) is None
    assert rig.download.verified and rig.download.done
    assert rig.download.written == len(FILE)
    assert rig.temp.read_bytes() == FILE
    assert rig.transport.events == []
    assert rig.clock.getDelayedCalls() == []


@pytest.mark.parametrize("reason", [PotentialDataLoss(), ConnectionDone()])
def test_body_without_length_ends_with_the_connection(
    make_rig: Any, reason: Exception
) -> None:
    rig: Rig = make_rig()
    rig.feed(FILE)
    rig.end(Failure(reason))
    assert rig.commits == [1]


def test_readable_holds_back_the_last_byte_until_verified(make_rig: Any) -> None:
    rig: Rig = make_rig()
    seen: list[int] = []
    rig.download.subscribe(lambda: seen.append(rig.download.readable))
    assert rig.download.readable == 0
    rig.feed(FILE[:1000], piece=1000)
    assert rig.download.written == 1000
    assert rig.download.readable == 999
    rig.feed(FILE[1000:])
    assert rig.download.readable == len(FILE) - 1
    assert not rig.download.verified
    rig.end()
    assert rig.download.readable == len(FILE)
    assert seen[0] == 999
    assert seen[-1] == len(FILE)
    assert max(seen[:-1]) == len(FILE) - 1


def test_reader_sees_the_bytes_written_so_far(make_rig: Any) -> None:
    rig: Rig = make_rig()
    rig.feed(FILE[:5000])
    fd = rig.download.open_reader()
    try:
        assert os.pread(fd, 10_000, 0) == FILE[:5000]
    finally:
        os.close(fd)


def test_pauses_above_high_water_and_resumes_when_the_pool_takes_the_batch(
    make_rig: Any,
) -> None:
    runner = ManualRunner()
    big = random_nar(HIGH_WATER + (4 << 20), seed=9)
    exp = Expected("none", sha256(big), len(big), None, None)
    rig: Rig = make_rig(exp, runner)
    chunk = 1 << 20
    # The first chunk goes to the pool at once; the rest accumulate.
    rig.protocol.dataReceived(big[:chunk])
    assert len(runner.queue) == 1
    offset = chunk
    while "pause" not in rig.transport.events:
        assert offset - chunk <= HIGH_WATER, "did not pause above the high-water mark"
        rig.protocol.dataReceived(big[offset : offset + chunk])
        offset += chunk
    assert offset - chunk > HIGH_WATER
    assert rig.transport.events == ["pause"]
    assert len(runner.queue) == 1
    runner.run_next()  # first batch written: the backlog goes, upstream resumes
    assert rig.transport.events == ["pause", "resume"]
    rig.protocol.dataReceived(big[offset:])  # a big piece: pauses again
    rig.end()
    runner.run_all()
    assert rig.commits == [1]
    assert rig.temp.read_bytes() == big
    assert rig.transport.events == ["pause", "resume", "pause"]


def test_verified_bytes_are_released_before_the_commit(make_rig: Any) -> None:
    runner = ManualRunner()
    rig: Rig = make_rig(runner=runner)
    done = rig.download.when_done()
    rig.feed(FILE)
    rig.end()
    while not rig.download.verified:
        assert rig.download.readable == max(0, rig.download.written - 1)
        runner.run_next()
    assert rig.download.readable == len(FILE)
    assert rig.commits == [] and not done.called  # durable and recorded later
    runner.run_all()
    assert rig.commits == [1]
    assert result_of(done) is None


def test_mismatch_fails_discards_and_never_commits(make_rig: Any) -> None:
    wrong = expected(nar_hash=sha256(b"something else"))
    rig: Rig = make_rig(wrong)
    done = rig.download.when_done()
    notified: list[bool] = []
    rig.download.subscribe(lambda: notified.append(rig.download.done))
    rig.feed(FILE)
    rig.end()
    assert rig.commits == []
    assert rig.discards == [1]
    assert not rig.temp.exists()
    assert isinstance(rig.download.failure, Failure)
    assert rig.download.failure.check(IntegrityError)
    assert rig.download.readable == len(FILE) - 1
    assert notified[-1] is True
    with pytest.raises(IntegrityError, match="NarHash"):
        result_of(done)
    with pytest.raises(IntegrityError):
        result_of(rig.download.when_done())


def test_oversized_body_fails_while_streaming_and_stops_the_upstream(
    make_rig: Any,
) -> None:
    rig: Rig = make_rig(expected(file_size=len(FILE) - 10))
    rig.feed(FILE)
    assert rig.download.failure is not None
    assert rig.transport.events == ["stop"]
    assert rig.discards == [1]
    rig.end(Failure(ConnectionDone()))
    assert rig.commits == []


def test_broken_upstream_body_fails(make_rig: Any) -> None:
    rig: Rig = make_rig()
    done = rig.download.when_done()
    rig.feed(FILE[:1000])
    rig.end(Failure(ConnectionLost("reset")))
    with pytest.raises(UpstreamError, match="broke"):
        result_of(done)
    assert rig.commits == [] and rig.discards == [1]


def test_idle_upstream_times_out(
    make_rig: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(download_mod, "THROUGHPUT_FLOOR", 0)
    rig: Rig = make_rig()
    done = rig.download.when_done()
    rig.feed(FILE[:1000])
    rig.clock.advance(IDLE_TIMEOUT - 1)
    rig.feed(FILE[1000:2000])  # activity resets the timer
    rig.clock.advance(IDLE_TIMEOUT - 1)
    assert not done.called
    rig.clock.advance(1)
    assert rig.transport.stopped
    assert "pause" not in rig.transport.events
    with pytest.raises(UpstreamError, match="stalled"):
        result_of(done)
    assert rig.commits == [] and rig.discards == [1]
    # The transport then reports the connection lost: nothing changes.
    rig.end(Failure(ConnectionDone()))
    assert rig.commits == [] and rig.discards == [1]


def test_cancelling_when_done_detaches_only_that_caller(make_rig: Any) -> None:
    rig: Rig = make_rig()
    leaving = rig.download.when_done()
    staying = rig.download.when_done()
    rig.feed(FILE[:1000])
    leaving.cancel()
    with pytest.raises(CancelledError):
        result_of(leaving)
    assert rig.transport.events == []
    rig.feed(FILE[1000:])
    rig.end()
    assert rig.commits == [1]
    assert result_of(staying) is None


def test_when_done_after_the_end(make_rig: Any) -> None:
    rig: Rig = make_rig()
    rig.feed(FILE)
    rig.end()
    assert result_of(rig.download.when_done()) is None


def test_failure_while_the_pool_is_busy_cleans_up_after_the_batch(
    make_rig: Any,
) -> None:
    runner = ManualRunner()
    rig: Rig = make_rig(runner=runner)
    rig.feed(FILE[:1000], piece=1000)
    assert len(runner.queue) == 1  # a write is in flight
    rig.end(Failure(ConnectionLost("reset")))
    assert rig.discards == []  # never close the sink under a running write
    runner.run_all()
    assert rig.discards == [1]
    assert rig.commits == []


def test_memory_per_download_is_small() -> None:
    assert HIGH_WATER <= 1 << 20


def test_a_dripping_body_is_aborted_after_one_window(make_rig: Any) -> None:
    rig: Rig = make_rig()
    done = rig.download.when_done()
    released = rig.download.when_released()
    steps = int(THROUGHPUT_WINDOW)
    for i in range(steps - 1):
        rig.protocol.dataReceived(FILE[i : i + 1])  # a byte a second: never idle
        rig.clock.advance(1)
    assert not done.called
    rig.clock.advance(1)
    assert rig.transport.events == ["stop"]
    with pytest.raises(UpstreamError, match="too slow"):
        result_of(done)
    assert rig.discards == [1] and not rig.temp.exists()
    assert result_of(released) is None
    assert rig.clock.getDelayedCalls() == []


def test_a_body_above_the_floor_goes_on_window_after_window(make_rig: Any) -> None:
    nar = random_nar(THROUGHPUT_FLOOR * 8, seed=12)
    exp = Expected("none", sha256(nar), len(nar), None, None)
    rig: Rig = make_rig(exp)
    done = rig.download.when_done()
    step = THROUGHPUT_FLOOR // 2
    for i in range(0, len(nar), step):
        rig.protocol.dataReceived(nar[i : i + step])
        rig.clock.advance(THROUGHPUT_WINDOW / 2)
    assert not done.called
    rig.end()
    assert result_of(done) is None


def test_time_paused_for_backpressure_is_not_held_against_the_upstream(
    make_rig: Any,
) -> None:
    runner = ManualRunner()
    big = random_nar(HIGH_WATER * 3, seed=13)
    exp = Expected("none", sha256(big), len(big), None, None)
    rig: Rig = make_rig(exp, runner)
    done = rig.download.when_done()
    rig.clock.advance(THROUGHPUT_WINDOW - 1)  # a slow start, almost a window
    piece = 64 << 10
    offset = 0
    while "pause" not in rig.transport.events:
        rig.protocol.dataReceived(big[offset : offset + piece])
        offset += piece
    # The pool is stuck for long: neither the idle timer nor the floor fire.
    rig.clock.advance(IDLE_TIMEOUT * 3)
    assert not done.called and not rig.transport.stopped
    runner.run_next()
    assert rig.transport.events == ["pause", "resume"]
    rig.protocol.dataReceived(big[offset:])
    rig.end()
    runner.run_all()
    assert result_of(done) is None


def test_released_after_the_commit(make_rig: Any) -> None:
    rig: Rig = make_rig()
    released = rig.download.when_released()
    rig.feed(FILE)
    assert not released.called
    rig.end()
    assert result_of(released) is None
    assert result_of(rig.download.when_released()) is None


def test_a_write_failing_after_the_body_broke_still_removes_the_temp_file(
    make_rig: Any,
) -> None:
    runner = ManualRunner()
    rig: Rig = make_rig(expected(file_size=100), runner)
    released = rig.download.when_released()
    rig.protocol.dataReceived(FILE[:1000])  # the pool will refuse it (FileSize)
    rig.end(Failure(ConnectionLost("reset")))
    assert rig.discards == [] and not released.called
    runner.run_all()
    assert rig.discards == [1] and not rig.temp.exists()
    assert result_of(released) is None
