"""One upstream NAR download, shared by every client that asks for it meanwhile.

The upstream body arrives on the reactor thread; batches of it go to the io pool,
where a :class:`~ncps.narsink.NarSink` appends them to a temp file, hashes them
and decompresses them to check NarHash/NarSize.  Only one batch per download is
in the pool at a time (so the sink needs no locks and order is kept); while a
batch is being written the next one accumulates, and the upstream transport is
paused when too much is waiting (memory stays flat whatever the NAR size).

Clients tail the temp file (see ``ncps.streaming``) up to :attr:`readable`,
which always holds back the last byte until the whole download is verified: a
client never receives a complete NAR that did not verify, and on a mismatch its
connection is aborted.

The download belongs to nobody's request: clients come and go, it carries on
to the end and commits the object (rename, then the database row).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from ncps.errors import IntegrityError, UpstreamError
from ncps.logs import ncps_observer
from ncps.narsink import NarSink

log = Logger(observer=ncps_observer)

# Pause the upstream when this much is waiting for the io pool; the waiting
# bytes go to the pool as one batch, and the upstream resumes as soon as the
# pool takes that batch.  A download holds at most about two batches (one
# waiting, one being written): some 2 MiB, whatever the NAR size.
HIGH_WATER = 1 << 20
# Abort an upstream body that sends nothing for this long.
IDLE_TIMEOUT = 120.0
# Throughput floor: in every THROUGHPUT_WINDOW seconds during which the body
# was flowing (time while we paused the upstream for backpressure does not
# count), at least THROUGHPUT_FLOOR bytes must arrive.  A body dripping a few
# bytes at a time resets the idle timer forever; this ends it after a window.
THROUGHPUT_WINDOW = 30.0
THROUGHPUT_FLOOR = 16 << 10

Listener = Callable[[], None]


class NarDownload:
    """State of one download; lives on the reactor thread.

    ``run_io(fn, *args)`` runs a blocking function on the io pool and returns a
    Deferred.  ``commit()`` is called once the bytes verified; it moves the temp
    file into the store and records it, returning a Deferred.
    """

    def __init__(
        self,
        *,
        clock: IReactorTime,
        name: str,
        temp_path: Path,
        sink: NarSink,
        run_io: Callable[..., Deferred[Any]],
        commit: Callable[[], Deferred[None]],
        discard: Callable[[], Deferred[None]],
        expected_length: int | None,
        read_fd: int,
    ) -> None:
        self.name = name
        self._read_fd = read_fd
        self.temp_path = temp_path
        self.expected_length = expected_length
        self._clock = clock
        self._sink = sink
        self._run_io = run_io
        self._commit = commit
        self._discard = discard
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._io_busy = False
        self._body_done = False
        self._paused = False
        self._transport: IPushProducer | None = None
        self._idle: IDelayedCall | None = None
        # The throughput window: bytes in it, flowing seconds left in it, and
        # when the flowing part that is running now began.
        self._window: IDelayedCall | None = None
        self._window_bytes = 0
        self._window_left = THROUGHPUT_WINDOW
        self._window_since = 0.0
        self.written = 0
        self.verified = False  # every byte checked: clients may have all of it
        self.committed = False  # durable in the store and recorded
        self.failure: Failure | None = None
        self._listeners: set[Listener] = set()
        self._finished: list[Deferred[None]] = []
        self._released = False
        self._on_released: list[Deferred[None]] = []

    # -- observers -------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.committed or self.failure is not None

    @property
    def readable(self) -> int:
        """Bytes of the temp file a client may be sent now."""
        if self.verified:
            return self.written
        return max(0, self.written - 1)

    def open_reader(self) -> int:
        """A new read-only descriptor of the temp file, owned by the caller.

        Only valid while the download is neither committed nor failed (the
        temp file may be renamed or deleted after that).
        """
        assert self._read_fd >= 0, "download is over"
        return os.dup(self._read_fd)

    def _close_reader(self) -> None:
        if self._read_fd >= 0:
            os.close(self._read_fd)
            self._read_fd = -1

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener()`` whenever more bytes are readable or it is done."""
        self._listeners.add(listener)

    def unsubscribe(self, listener: Listener) -> None:
        self._listeners.discard(listener)

    def when_done(self) -> Deferred[None]:
        """A new Deferred that fires when committed or fails with the reason.

        Cancelling it detaches only that caller; the download goes on.
        """
        d: Deferred[None] = Deferred(lambda d: self._finished.remove(d))
        if self.committed:
            d.callback(None)
        elif self.failure is not None:
            d.errback(self.failure)
        else:
            self._finished.append(d)
        return d

    def when_released(self) -> Deferred[None]:
        """A new Deferred that fires (never fails) once the download holds
        nothing any more: the upstream connection is closed or finished, and
        the temp file is closed and committed or deleted.  Descriptors that
        :meth:`open_reader` handed out belong to their callers."""
        d: Deferred[None] = Deferred()
        if self._released:
            d.callback(None)
        else:
            self._on_released.append(d)
        return d

    def _release(self) -> None:
        if self._released:
            return
        self._released = True
        waiters, self._on_released = self._on_released, []
        for d in waiters:
            d.callback(None)

    def _notify(self) -> None:
        for listener in list(self._listeners):
            listener()

    # -- the upstream body ---------------------------------------------------------

    def body_protocol(self) -> Protocol:
        """The protocol to hand to ``IResponse.deliverBody``."""
        return _BodyReceiver(self)

    def _connected(self, transport: IPushProducer) -> None:
        self._transport = transport
        self._reset_idle()
        self._start_window()

    def _reset_idle(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.reset(IDLE_TIMEOUT)
        else:
            self._idle = self._clock.callLater(IDLE_TIMEOUT, self._idle_expired)

    def _stop_timers(self) -> None:
        for call in (self._idle, self._window):
            if call is not None and call.active():
                call.cancel()
        self._idle = self._window = None

    def _idle_expired(self) -> None:
        self._idle = None
        self._give_up(f"upstream stalled on {self.name}")

    def _start_window(self) -> None:
        self._window_since = self._clock.seconds()
        self._window = self._clock.callLater(self._window_left, self._window_over)

    def _window_over(self) -> None:
        self._window = None
        if self._window_bytes < THROUGHPUT_FLOOR:
            self._give_up(
                f"upstream too slow on {self.name}: {self._window_bytes} bytes "
                f"in {THROUGHPUT_WINDOW:g} s"
            )
            return
        self._window_bytes = 0
        self._window_left = THROUGHPUT_WINDOW
        self._start_window()

    def _give_up(self, why: str) -> None:
        self._fail(Failure(UpstreamError(why)))  # stops the upstream too

    def _pause(self) -> None:
        """Stop the upstream for backpressure; its timers stop with it."""
        assert self._transport is not None
        self._paused = True
        self._transport.pauseProducing()
        elapsed = self._clock.seconds() - self._window_since
        self._window_left = max(0.0, self._window_left - elapsed)
        self._stop_timers()

    def _resume(self) -> None:
        assert self._transport is not None
        self._paused = False
        self._transport.resumeProducing()
        self._reset_idle()
        self._start_window()

    def _data(self, data: bytes) -> None:
        if self.done:
            return
        self._window_bytes += len(data)
        if not self._paused:
            self._reset_idle()
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes > HIGH_WATER and not self._paused and self._transport:
            self._pause()
        self._flush()

    def _body_end(self, reason: Failure) -> None:
        self._stop_timers()
        self._transport = None
        if self.done:
            return
        if not reason.check(ResponseDone):
            if reason.check(PotentialDataLoss, ConnectionDone):
                # No Content-Length: the end of the connection is the end of
                # the body.  The hashes and sizes decide whether it is whole.
                pass
            else:
                self._fail(
                    Failure(
                        UpstreamError(
                            f"upstream body of {self.name} broke: "
                            f"{reason.getErrorMessage()}"
                        )
                    )
                )
                return
        self._body_done = True
        self._flush()

    # -- the io pool -------------------------------------------------------------

    def _flush(self) -> None:
        if self._io_busy or self.done:
            return
        if self._pending:
            batch, self._pending = self._pending, []
            self._pending_bytes = 0
            self._io_busy = True
            self._run_io(self._sink.write_thd, batch).addCallbacks(
                self._written, self._io_failed
            )
            if self._paused and self._transport is not None:
                self._resume()
        elif self._body_done:
            self._io_busy = True
            d = self._run_io(self._sink.finish_thd)
            d.addCallback(self._verified)
            d.addCallback(lambda _: self._run_io(self._sink.sync_thd))
            d.addCallback(lambda _: self._commit())
            d.addCallbacks(self._committed, self._io_failed)

    def _written(self, size: int) -> None:
        self._io_busy = False
        if self.failure is not None:
            self._cleanup()
            return
        self.written = size
        self._notify()
        self._flush()

    def _io_failed(self, failure: Failure) -> None:
        self._io_busy = False
        if self.failure is not None:
            # Failed meanwhile (the upstream broke during the write): the
            # temp file waited for this write to end before going.
            self._cleanup()
        else:
            self._fail(failure)

    def _verified(self, size: int) -> None:
        # Release the held-back byte now: the clients need not wait for the
        # fsync and the rename, only the database row does.
        self.written = size
        self.verified = True
        self._notify()

    def _committed(self, _: object) -> None:
        self._io_busy = False
        self.committed = True
        self._close_reader()
        self._release()
        waiters, self._finished = self._finished, []
        for d in waiters:
            d.callback(None)

    def _fail(self, failure: Failure) -> None:
        if self.failure is not None or self.committed:
            return
        self.failure = failure
        self._close_reader()
        if failure.check(IntegrityError):
            log.error(
                "discarded NAR {name}: {reason}",
                name=self.name,
                reason=failure.getErrorMessage(),
            )
        else:
            log.warn(
                "download of NAR {name} failed: {reason}",
                name=self.name,
                reason=failure.getErrorMessage(),
            )
        self._stop_timers()
        if self._transport is not None:
            transport, self._transport = self._transport, None
            transport.stopProducing()
        self._pending = []
        if not self._io_busy:
            self._cleanup()
        self._notify()
        waiters, self._finished = self._finished, []
        for d in waiters:
            d.errback(failure)

    def _cleanup(self) -> None:
        """Close and delete the temp file (never while the sink is in use)."""
        self._io_busy = True

        def closed(_: object) -> Deferred[None]:
            return self._discard()

        def discarded(result: object) -> None:
            if isinstance(result, Failure):
                log.warn(
                    "deleting the temp file of {name}: {why}",
                    name=self.name,
                    why=result.getErrorMessage(),
                )
            self._io_busy = False
            self._release()  # _fail let go of the upstream before this

        self._run_io(self._sink.close_thd).addBoth(closed).addBoth(discarded)


class _BodyReceiver(Protocol):
    def __init__(self, download: NarDownload) -> None:
        self.download = download

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.download._connected(self.transport)  # type: ignore[arg-type]

    def dataReceived(self, data: bytes) -> None:
        self.download._data(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.download._body_end(reason)
