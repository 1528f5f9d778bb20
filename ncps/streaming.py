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

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.web.server import Request
from zope.interface import implementer

from ncps.download import NarDownload
from ncps.logs import ncps_observer

log = Logger(observer=ncps_observer)

CHUNK = 512 * 1024
# Yield to the reactor after this much in one go, so one fast client cannot
# starve the others.
BURST = 4 << 20


@implementer(IPushProducer)
class FileStreamer:
    """Streams ``fd`` (from offset 0) to ``request``.

    With ``download`` set, only :attr:`NarDownload.readable` bytes are sent
    and the stream ends when the download is verified; if it fails, the client
    connection is aborted so the client sees an error, never a short NAR.
    Without it, ``size`` bytes are sent.  :meth:`start` returns a Deferred
    that fires when the response is over (never with an error).
    """

    def __init__(
        self,
        clock: IReactorTime,
        request: Request,
        fd: int,
        size: int | None = None,
        download: NarDownload | None = None,
    ) -> None:
        self._clock = clock
        self._request = request
        self._fd = fd
        self._size = size
        self._download = download
        self._offset = 0
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
