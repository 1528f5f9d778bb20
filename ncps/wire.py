"""Limits on the wire of our own HTTP server.

:class:`LimitedChannel` is the HTTP/1.1 channel of :class:`ncps.web.QuietSite`.
Over twisted's channel it adds:

* a real deadline for the request head: the request line and headers must
  arrive within ``read_header_timeout`` of the connection's start (or of the
  first byte of a later request), however slowly the bytes drip in;
* an idle timeout between keep-alive requests;
* an immediate 400 for input that cannot be HTTP: binary bytes, a TLS
  ClientHello, control characters, bare CR or bare LF line endings (Nix
  clients always send CRLF; refusing at once beats a 60 s wait);
* a GET or HEAD with a body is refused (400, close) before any body byte is
  read; other methods get 413 beyond a small cap, and bodies are never
  spooled to disk.

:class:`ConnectionGate` and :class:`GatedPort` keep the number of open client
connections under a limit by pausing ``accept()`` at the limit: a client
above it waits in the kernel's listen backlog instead of being refused.
Everything here runs on the reactor thread.
"""

from __future__ import annotations

import re
from io import BytesIO
from typing import Any

import attr
from twisted.internet import tcp
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http

from ncps.logs import ncps_observer

log = Logger(observer=ncps_observer)

# Pausing accept() keeps clients in this queue; systemd-style bursts of a few
# hundred connections fit.
LISTEN_BACKLOG = 1024
# A cut-off peer that will not read our last bytes is aborted after this.
ABORT_AFTER = 5.0
# Repeat the "connection limit reached" warning at most this often.
LIMIT_LOG_INTERVAL = 600.0

# Any prefix of a request line: a method token, a target, "HTTP/d.d".
_REQUEST_LINE_PREFIX = re.compile(
    rb"[!#$%&'*+.^_`|~0-9A-Za-z-]{0,32}"
    rb"(?: [\x21-\x7e]*"
    rb"(?: (?:H(?:T(?:T(?:P(?:/(?:[0-9](?:\.[0-9]?)?)?)?)?)?)?)?)?)?"
)
# Control characters never allowed in a request head (tab is).
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_BODYLESS = (b"GET", b"HEAD")


@attr.frozen
class WireLimits:
    """What one client may send us; see the module docstring."""

    read_header_timeout: float = 10.0
    idle_timeout: float = 60.0
    # A client that takes none of our bytes for this long is cut off: a
    # response it stopped reading must not hold its connection for ever.
    send_timeout: float = 60.0
    # Bodies of methods other than GET/HEAD (none is routed yet).
    max_body: int = 64 * 1024
    # One line of the head (request line or header) and the whole head.
    max_line: int = 8 * 1024
    max_head: int = 16 * 1024
    max_headers: int = 100


def _response(status: bytes, message: bytes) -> bytes:
    body = message + b"\n"
    return (
        b"HTTP/1.1 " + status + b"\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: %d\r\n"
        b"Connection: close\r\n\r\n" % len(body)
    ) + body


class LimitedChannel(http.HTTPChannel):
    """An HTTP channel with deadlines, input checks and body caps.

    Built by :class:`ncps.web.QuietSite`, which sets ``limits``, ``gate`` and
    ``callLater`` (its reactor's) on each instance.  Twisted's own idle timer
    (``timeOut``, reset by every byte) is off: the site passes ``timeout=None``.
    """

    limits = WireLimits()
    gate: ConnectionGate | None = None

    def __init__(self) -> None:
        super().__init__()
        self._deadline: IDelayedCall | None = None
        self._idle: IDelayedCall | None = None
        self._stalled: IDelayedCall | None = None
        self._at_request_line = True
        self._gated = False

    # -- connection life ---------------------------------------------------

    def connectionMade(self) -> None:
        limits = self.limits
        self.MAX_LENGTH = limits.max_line
        self.totalHeadersSize = limits.max_head
        self.maxHeaders = limits.max_headers
        if self.gate is not None:
            self.gate.opened()
            self._gated = True
        super().connectionMade()
        self._start_deadline()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_timers()
        self._cancel_stall()
        if self._gated and self.gate is not None:
            self._gated = False
            self.gate.closed()
        super().connectionLost(reason)

    def dataReceived(self, data: bytes) -> None:
        if self._idle is not None:
            # The first byte of the next request: its head is now due.
            self._idle.cancel()
            self._idle = None
            self._start_deadline()
        super().dataReceived(data)
        if self.line_mode and not self._handlingRequest and not self._closing():
            self._check_partial_line(self._buffer)

    def lineReceived(self, line: bytes) -> None:
        if _CONTROL.search(line) is not None:
            self._refuse(b"400 Bad Request", b"malformed request")
            return
        if line:
            self._at_request_line = False
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        if self._at_request_line:
            self._refuse(b"414 URI Too Long", b"request line too long")
        else:
            self._refuse(
                b"431 Request Header Fields Too Large", b"request header too long"
            )

    # -- bodies --------------------------------------------------------------

    def body_limit(self, method: bytes) -> int:
        """The largest body a request with ``method`` may carry (0: none)."""
        return 0 if method in _BODYLESS else self.limits.max_body

    def _maybeChooseTransferDecoder(self, header: bytes, data: bytes) -> bool:
        if header not in (b"Content-Length", b"Transfer-Encoding"):
            return bool(super()._maybeChooseTransferDecoder(header, data))
        method: bytes = self._command
        limit = self.body_limit(method)
        declared = int(data) if header == b"Content-Length" and data.isdigit() else None
        if declared is not None and declared <= limit:
            return bool(super()._maybeChooseTransferDecoder(header, data))
        if method in _BODYLESS:
            self._refuse(b"400 Bad Request", b"a GET or HEAD request has no body")
            return False
        if declared is not None:
            self._refuse(b"413 Content Too Large", b"request body too large")
            return False
        if not super()._maybeChooseTransferDecoder(header, data):
            return False
        decoder = self._transferDecoder
        if decoder is not None:
            decoder.dataCallback = _Capped(self, decoder.dataCallback, limit)
        return True

    def rawDataReceived(self, data: bytes) -> None:
        if not self._closing():
            super().rawDataReceived(data)

    def _finishRequestBody(self, data: bytes) -> None:
        # A refused body is never dispatched, even if its last chunk came.
        if not self._closing():
            super()._finishRequestBody(data)

    def allContentReceived(self) -> None:
        # The request is whole: no deadline while it is answered.
        self._cancel_timers()
        self._at_request_line = True
        super().allContentReceived()

    def requestDone(self, request: http.Request) -> None:
        # Wait for the next request; buffered pipelined bytes, replayed by
        # the parent, start its deadline at once (see dataReceived).
        if self.persistent and not self._closing():
            self._cancel_timers()
            self._idle = self.callLater(self.limits.idle_timeout, self._idle_passed)
        super().requestDone(request)

    # -- a client that stops reading ------------------------------------------

    def pauseProducing(self) -> None:
        # The transport's send buffer is full: the client is not reading.
        super().pauseProducing()
        if self._stalled is None and not self._closing():
            self._stalled = self.callLater(self.limits.send_timeout, self._stall_passed)

    def resumeProducing(self) -> None:
        self._cancel_stall()
        super().resumeProducing()

    def _stall_passed(self) -> None:
        self._stalled = None
        transport = self.transport
        if transport is None:
            return
        log.debug(
            "client took no bytes for {seconds} s; connection aborted",
            seconds=self.limits.send_timeout,
        )
        abort = getattr(transport, "abortConnection", transport.loseConnection)
        abort()

    def _cancel_stall(self) -> None:
        call, self._stalled = self._stalled, None
        if call is not None and call.active():
            call.cancel()

    # -- refusing --------------------------------------------------------------

    def _respondToBadRequestAndDisconnect(self) -> None:
        self._refuse(b"400 Bad Request", b"malformed request")

    def _refuse(self, status: bytes, message: bytes) -> None:
        """Answer ``status`` and close; nothing more is read from the client."""
        transport = self.transport
        if transport is None or self._closing():
            return
        self._cancel_timers()
        transport.write(_response(status, message))
        self.loseConnection()
        self._abort_later()

    def _check_partial_line(self, partial: bytes) -> None:
        # The bytes of a line whose CRLF has not come yet.  A trailing CR
        # may be the first half of one; any other CR or LF is a bare one.
        if partial.endswith(b"\r"):
            partial = partial[:-1]
        if self._at_request_line:
            ok = _REQUEST_LINE_PREFIX.fullmatch(partial) is not None
        else:
            ok = _CONTROL.search(partial) is None
        if not ok:
            self._refuse(b"400 Bad Request", b"malformed request")

    # -- timers ------------------------------------------------------------------

    def _start_deadline(self) -> None:
        self._cancel_timers()
        self._deadline = self.callLater(
            self.limits.read_header_timeout, self._deadline_passed
        )

    def _deadline_passed(self) -> None:
        self._deadline = None
        self._refuse(b"408 Request Timeout", b"request head not received in time")

    def _idle_passed(self) -> None:
        self._idle = None
        if not self._closing():
            self.loseConnection()
            self._abort_later()

    def _cancel_timers(self) -> None:
        for call in (self._deadline, self._idle):
            if call is not None and call.active():
                call.cancel()
        self._deadline = self._idle = None

    def _abort_later(self) -> None:
        if self._abortingCall is None:
            self._abortingCall = self.callLater(ABORT_AFTER, self.forceAbortClient)

    def _closing(self) -> bool:
        transport = self.transport
        return transport is None or bool(getattr(transport, "disconnecting", False))


class _Capped:
    """Forwards chunks of a chunked body until the body passes ``limit``."""

    def __init__(self, channel: LimitedChannel, forward: Any, limit: int) -> None:
        self._channel = channel
        self._forward = forward
        self._left = limit

    def __call__(self, data: bytes) -> None:
        self._left -= len(data)
        if self._left < 0:
            self._channel._refuse(b"413 Content Too Large", b"request body too large")
            return
        self._forward(data)


def request_content(length: int | None) -> BytesIO:
    """Where a request body goes: memory, as :class:`LimitedChannel` caps it."""
    return BytesIO()


class ConnectionGate:
    """Counts open client connections; pauses accepting at ``limit``.

    At the limit the listening port stops reading, so new clients wait in the
    kernel's backlog; it reads again as soon as one connection closes.
    """

    def __init__(self, clock: IReactorTime, limit: int) -> None:
        if limit < 1:
            raise ValueError("the connection limit must be at least 1")
        self._clock = clock
        self.limit = limit
        self.open = 0
        self.paused = False
        self._port: GatedPort | None = None
        self._logged_at: float | None = None

    @property
    def free(self) -> int:
        return self.limit - self.open

    def attach(self, port: GatedPort) -> None:
        self._port = port

    def opened(self) -> None:
        self.open += 1
        if self.open >= self.limit and not self.paused:
            self.paused = True
            if self._port is not None:
                self._port.stopReading()
            now = self._clock.seconds()
            if self._logged_at is None or now - self._logged_at >= LIMIT_LOG_INTERVAL:
                self._logged_at = now
                log.warn(
                    "{limit} client connections open (the limit): new clients "
                    "wait until one closes (see --server-max-connections)",
                    limit=self.limit,
                )

    def closed(self) -> None:
        self.open -= 1
        if self.paused and self.open < self.limit:
            self.paused = False
            port = self._port
            if port is not None and port.connected and not port.disconnecting:
                port.startReading()


class GatedPort(tcp.Port):
    """A TCP port that never accepts more connections than its gate allows.

    Twisted accepts connections in batches (up to ``numberAccepts`` per
    wakeup); the batch is cut to the free slots, so the limit holds exactly.
    """

    def __init__(
        self,
        port: int,
        factory: Any,
        gate: ConnectionGate,
        *,
        backlog: int = LISTEN_BACKLOG,
        interface: str = "",
        reactor: Any = None,
    ) -> None:
        super().__init__(port, factory, backlog, interface, reactor)
        self._gate = gate
        gate.attach(self)

    def startReading(self) -> None:
        if self._gate.free > 0:
            super().startReading()

    def doRead(self) -> None:
        free = self._gate.free
        if free <= 0:
            self.stopReading()
            return
        self.numberAccepts = max(1, min(self.numberAccepts, free))
        super().doRead()
