"""Sending NAR bytes to a client: from a committed file or a download in flight.

:class:`FileStreamer` is a push producer registered with the request.  It reads
the file in pieces and writes them to the request while the transport wants
more; when it has caught up with a download in flight it waits for the
download to announce more readable bytes.  It owns its file descriptor and
closes it however the response ends.

Reads are of page-cached bytes just written or recently served, in 512 KiB
pieces, and are done on the reactor thread, as ``twisted.web.static`` does; a
round trip through a pool per piece would cost more than the read.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request
from zope.interface import implementer

from ncps.download import NarDownload
from ncps.logs import ncps_observer
from ncps.sendfile import SendfileServer
from ncps.storage.base import StoredNar

log = Logger(observer=ncps_observer)

CHUNK = 512 * 1024
# Yield to the reactor after this much in one go, so one fast client cannot
# starve the others.
BURST = 4 << 20


@implementer(IPushProducer)
class FileStreamer:
    """Streams ``fd`` (from offset ``start``, 0 unless a range) to ``request``.

    With ``download`` set, only :attr:`NarDownload.readable` bytes are sent
    and the stream ends when the download is verified; if it fails, the client
    connection is aborted so the client sees an error, never a short NAR.
    Without it, the bytes up to offset ``size`` are sent.  :meth:`start`
    returns a Deferred that fires when the response is over (never with an
    error).
    """

    def __init__(
        self,
        clock: IReactorTime,
        request: Request,
        fd: int,
        size: int | None = None,
        download: NarDownload | None = None,
        start: int = 0,
    ) -> None:
        self._clock = clock
        self._request = request
        self._fd = fd
        self._size = size
        self._download = download
        self._offset = start
        self._paused = False
        self._stopped = False
        self._scheduled = False
        self._done: Deferred[None] = Deferred()

    def start(self) -> Deferred[None]:
        self._request.registerProducer(self, True)
        self._request.notifyFinish().addErrback(lambda _: self.stopProducing())
        if self._download is not None:
            self._download.subscribe(self._wake)
        self._pump()
        return self._done

    # IPushProducer
    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        # Called by the transport when its buffer drained: refill it at once.
        self._paused = False
        if not self._stopped and not self._scheduled:
            self._pump()

    def stopProducing(self) -> None:
        self._close()

    def _wake(self) -> None:
        if not self._scheduled and not self._stopped and not self._paused:
            self._scheduled = True
            self._clock.callLater(0, self._pump)

    def _limit(self) -> tuple[int, bool]:
        """(bytes that may be sent, whether that is the end)."""
        if self._download is None:
            assert self._size is not None
            return self._size, True
        return self._download.readable, self._download.verified

    def _pump(self) -> None:
        self._scheduled = False
        sent = 0
        while not self._paused and not self._stopped:
            download = self._download
            if (
                download is not None
                and download.failure is not None
                and not download.verified
            ):
                self._abort()
                return
            limit, final = self._limit()
            if self._offset >= limit:
                if final:
                    self._finish()
                return  # wait for the download to announce more
            want = min(CHUNK, limit - self._offset)
            data = os.pread(self._fd, want, self._offset)
            if not data:
                log.error("NAR file ended early at {offset}", offset=self._offset)
                self._abort()
                return
            self._offset += len(data)
            self._request.write(data)
            sent += len(data)
            if sent >= BURST:
                self._wake()
                return

    def _finish(self) -> None:
        self._close()
        self._request.unregisterProducer()
        self._request.finish()

    def _abort(self) -> None:
        self._close()
        transport = self._request.channel.transport if self._request.channel else None
        if transport is not None:
            transport.abortConnection()  # type: ignore[attr-defined]

    def _close(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._download is not None:
            self._download.unsubscribe(self._wake)
        os.close(self._fd)
        self._done.callback(None)


# Remote objects are read in pieces this big, one read in flight at a time.
OBJECT_CHUNK = 1 << 20


@implementer(IPushProducer)
class ObjectStreamer:
    """Streams a committed object read on a pool (S3, or decoded) to ``request``.

    Reads run on the store's pool (``run(fn, *args)`` returns a Deferred), one
    at a time, and only while the transport wants more: a slow client slows
    the reads, and at most one piece is held in memory.  If a read fails or
    the object ends before ``stored.size`` bytes, the connection is aborted
    so the client sees an error, never a short NAR.  With ``length``, only
    the bytes [``first``, ``first + length``) are sent (a byte range).
    """

    def __init__(
        self,
        request: Request,
        stored: StoredNar,
        run: Callable[..., Deferred[Any]],
        first: int = 0,
        length: int | None = None,
    ) -> None:
        self._request = request
        self._stored = stored
        self._run = run
        self._offset = first
        self._end = stored.size if length is None else first + length
        self._seek_to: int | None = first if first else None
        self._paused = False
        self._stopped = False
        self._reading = False
        self._closed = False
        self._done: Deferred[None] = Deferred()

    def start(self) -> Deferred[None]:
        self._request.registerProducer(self, True)
        self._request.notifyFinish().addErrback(lambda _: self.stopProducing())
        self._read_next()
        return self._done

    # IPushProducer
    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._read_next()

    def stopProducing(self) -> None:
        self._stop()

    def _read_next(self) -> None:
        if self._reading or self._paused or self._stopped:
            return
        if self._seek_to is not None:
            offset, self._seek_to = self._seek_to, None
            self._reading = True
            d = self._run(self._stored.seek_thd, offset)
            d.addCallbacks(self._sought, self._failed)
            return
        want = min(OBJECT_CHUNK, self._end - self._offset)
        if want <= 0:
            if self._end < self._stored.size:
                self._finish()  # the end of a range
                return
            want = 1  # expect b"": proves the object ends where it should
        self._reading = True
        self._run(self._stored.read_thd, want).addCallbacks(self._got, self._failed)

    def _sought(self, _: object) -> None:
        self._reading = False
        if self._stopped:
            self._close()
            return
        self._read_next()

    def _finish(self) -> None:
        self._stop()
        self._request.unregisterProducer()
        self._request.finish()

    def _got(self, data: bytes) -> None:
        self._reading = False
        if self._stopped:
            self._close()
            return
        if not data:
            if self._offset == self._end:
                self._finish()
            else:
                log.error(
                    "stored NAR ended at {offset} of {size} bytes",
                    offset=self._offset,
                    size=self._stored.size,
                )
                self._abort()
            return
        self._offset += len(data)
        if self._offset > self._end:
            log.error("stored NAR is longer than {size} bytes", size=self._stored.size)
            self._abort()
            return
        self._request.write(data)
        self._read_next()

    def _failed(self, failure: Failure) -> None:
        self._reading = False
        if not self._stopped:
            log.warn(
                "reading a stored NAR failed at {offset}: {why}",
                offset=self._offset,
                why=failure.getErrorMessage(),
            )
            self._abort()
        else:
            self._close()

    def _abort(self) -> None:
        self._stop()
        transport = self._request.channel.transport if self._request.channel else None
        if transport is not None:
            transport.abortConnection()  # type: ignore[attr-defined]

    def _stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if not self._reading:
            self._close()
        self._done.callback(None)

    def _close(self) -> None:
        """Release the object once no read is in flight (never concurrently)."""
        if self._closed:
            return
        self._closed = True
        self._run(self._stored.close_thd).addErrback(
            lambda f: log.warn("closing a stored NAR: {why}", why=f.getErrorMessage())
        )


class SendfileStreamer:
    """Sends bytes [start, end) of a stored local file with sendfile(2).

    Only on a :class:`~ncps.sendfile.SendfileServer` connection.  The head is
    written first; the transport then moves the file region itself, with no
    copy through Python.  Owns ``fd`` and closes it however the response ends.
    """

    def __init__(
        self,
        request: Request,
        transport: SendfileServer,
        fd: int,
        end: int,
        start: int = 0,
    ) -> None:
        self._request = request
        self._transport = transport
        self._fd = fd
        self._start = start
        self._end = end
        self._gone = False

    def start(self) -> Deferred[None]:
        """Fires when the response is over (never with an error)."""
        self._request.notifyFinish().addErrback(self._client_gone)
        self._request.write(b"")  # the status line and headers
        done = self._transport.send_file(self._fd, self._start, self._end)
        done.addCallbacks(self._sent, self._lost)
        return done

    def _client_gone(self, _: Failure) -> None:
        self._gone = True

    def _sent(self, _: object) -> None:
        os.close(self._fd)
        if not self._gone:
            self._request.finish()

    def _lost(self, _: Failure) -> None:
        os.close(self._fd)
