"""Stored NARs sent with sendfile(2): the kernel moves file pages to the socket.

Twisted has no sendfile.  :class:`SendfileServer` is the TCP server transport
of our listener (:class:`SendfilePort`); besides ``write`` it can queue a
region of a file behind whatever it has buffered (the response head).  It
flushes the buffer first, then calls ``os.sendfile`` each time the socket is
writable, and fires a Deferred when the region is sent or the connection is
gone.

While the socket is full it pauses its producer (the HTTP channel), as a full
write buffer does, and resumes it when bytes move again: a client that stops
reading is cut off by the channel's send timeout (:mod:`ncps.wire`) exactly
as with buffered writes.
"""

from __future__ import annotations

import errno
import os
from typing import Any

import attrs
from twisted.internet import main, tcp
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure

from ncps.logs import ncps_observer
from ncps.wire import GatedPort

log = Logger(observer=ncps_observer)

# At most this much per sendfile call, so one fast client does not hold the
# reactor for long.
SENDFILE_CHUNK = 4 << 20


@attrs.define
class _Region:
    fd: int
    offset: int
    end: int
    done: Deferred[None]


class SendfileServer(tcp.Server):
    """A server connection that can send a file region (see the module)."""

    _region: _Region | None = None

    def send_file(self, fd: int, offset: int, end: int) -> Deferred[None]:
        """Send bytes [offset, end) of ``fd`` after everything written so far.

        The Deferred fires when they are all in the socket, or fails with the
        connection's loss (or a file shorter than ``end``: the connection is
        then dropped).  ``fd`` stays the caller's.
        """
        done: Deferred[None] = Deferred()
        if self._region is not None:
            raise RuntimeError("a file region is being sent already")
        if not self.connected or self.disconnecting or self._writeDisconnected:
            done.errback(Failure(ConnectionLost("connection closed before the file")))
            return done
        self._region = _Region(fd, offset, end, done)
        self.startWriting()
        return done

    def sending_file(self) -> bool:
        """Whether a file region is queued or going out."""
        return self._region is not None

    def _buffered(self) -> bool:
        return len(self.dataBuffer) > self.offset or self._tempDataLen > 0

    def doWrite(self) -> Any:
        region = self._region
        if region is None:
            return super().doWrite()
        if self._buffered():
            # The response head (or anything written before) goes first.
            result = super().doWrite()
            if result is None and self._region is not None:
                self.startWriting()
            return result
        want = min(SENDFILE_CHUNK, region.end - region.offset)
        try:
            sent = os.sendfile(self.socket.fileno(), region.fd, region.offset, want)
        except (BlockingIOError, InterruptedError):
            sent = -1
        except OSError as e:
            if e.errno not in (errno.EPIPE, errno.ECONNRESET):
                log.error("sendfile of a stored NAR failed: {why}", why=str(e))
            return main.CONNECTION_LOST
        if sent == 0:
            # The file ended early: never let the client take a short body
            # for a whole one.
            log.error(
                "stored NAR ended at {offset} of {end} bytes",
                offset=region.offset,
                end=region.end,
            )
            return main.CONNECTION_LOST
        if sent > 0:
            region.offset += sent
            self._resume_producer()
        if region.offset < region.end:
            if sent < want:
                self._pause_producer()  # the socket is full
            return None
        self._region = None
        self._resume_producer()
        region.done.callback(None)
        if self.sending_file():
            # The callback answered a pipelined request with a region of its
            # own: stay a writer (draining the buffer would stop writing).
            self.startWriting()
            return None
        # As when a buffer drains: stop writing, resume the producer, or
        # close the connection if it was asked to.
        return super().doWrite()

    def _pause_producer(self) -> None:
        producer = self.producer
        if (
            IPushProducer.providedBy(producer)
            and self.streamingProducer
            and not self.producerPaused
        ):
            self.producerPaused = True
            producer.pauseProducing()

    def _resume_producer(self) -> None:
        producer = self.producer
        if IPushProducer.providedBy(producer) and self.producerPaused:
            self.producerPaused = False
            producer.resumeProducing()

    def connectionLost(self, reason: Failure) -> None:
        region, self._region = self._region, None
        super().connectionLost(reason)
        if region is not None:
            region.done.errback(reason)


class SendfilePort(GatedPort):
    """Our listener: a :class:`GatedPort` whose connections can sendfile."""

    transport = SendfileServer
