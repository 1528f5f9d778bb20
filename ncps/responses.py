"""Upstream HTTP responses: reading a capped body, or letting one go.

Every response the upstream client receives is either read whole (a narinfo,
``nix-cache-info``; with a size cap and a deadline), handed to a download (a
NAR) or let go with :func:`release` / :func:`abort`, so that no error path
keeps a connection busy.  Runs on the reactor thread; time comes from the
``IReactorTime`` passed in.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

from ncps.errors import UpstreamError

# A body we will not use is read and dropped up to this size (so the
# connection can be reused), within this time; beyond either, it is closed.
DRAIN_MAX_BYTES = 64 * 1024
DRAIN_TIMEOUT = 5.0


class Unreachable(UpstreamError):
    """The upstream could not be reached, was too slow or answered 5xx."""


def describe(e: BaseException) -> str:
    """One short line about a transport failure (Agent wraps the real cause)."""
    if isinstance(e, CancelledError | TimeoutError):
        return "timed out"
    if isinstance(e, ResponseNeverReceived | ResponseFailed) and e.reasons:
        if any(r.check(CancelledError, TimeoutError) for r in e.reasons):
            return "timed out"
        return describe(e.reasons[0].value)
    text = str(e) or type(e).__name__
    return text.splitlines()[0][:200]


def is_cancellation(e: BaseException) -> bool:
    """Whether ``e`` is (Agent's wrapping of) a cancelled request."""
    if isinstance(e, CancelledError):
        return True
    if isinstance(e, ResponseNeverReceived | ResponseFailed):
        return any(r.check(CancelledError) for r in e.reasons)
    return False


def release(response: IResponse, clock: IReactorTime) -> None:
    """Let go of a response whose body will not be read.

    A small body is read and dropped so the connection returns to the pool;
    a large or slow one closes the connection.  Only for a response whose
    body has not been delivered yet.
    """
    length = response.length
    if length is not UNKNOWN_LENGTH and length > DRAIN_MAX_BYTES:
        abort(response, clock)
        return
    response.deliverBody(_Drain(clock, DRAIN_MAX_BYTES, DRAIN_TIMEOUT))


def abort(response: IResponse, clock: IReactorTime) -> None:
    """Close the connection of a response whose body will not be read.

    For a body already delivered to a protocol, call that protocol's
    ``transport.stopProducing()`` instead: it closes the connection too.
    """
    response.deliverBody(_Drain(clock, 0, 0.0))


async def read_capped(
    response: IResponse, limit: int, clock: IReactorTime, timeout: float
) -> bytes:
    """The whole body, failing if it exceeds ``limit`` bytes or ``timeout`` s.

    Raises :class:`UpstreamError` when too large and :class:`Unreachable`
    when too slow or broken; the connection is closed in both cases.
    """
    length = response.length
    if length is not UNKNOWN_LENGTH and length > limit:
        abort(response, clock)
        raise UpstreamError(f"response of {length} bytes is too large")
    if length == 0:
        return b""
    finished: Deferred[bytes] = Deferred()
    response.deliverBody(_CappedReader(finished, clock, limit, timeout))
    return await finished


class _Drain(Protocol):
    """Reads and drops a body; past ``limit`` bytes or ``timeout`` s, closes it.

    ``limit`` 0 closes the connection at once.
    """

    def __init__(self, clock: IReactorTime, limit: int, timeout: float) -> None:
        self._clock = clock
        self._limit = limit
        self._timeout = timeout
        self._seen = 0
        self._timer: IDelayedCall | None = None
        self._over = False

    def connectionMade(self) -> None:
        if self._limit <= 0:
            self._stop()
        else:
            self._timer = self._clock.callLater(self._timeout, self._stop)

    def dataReceived(self, data: bytes) -> None:
        self._seen += len(data)
        if self._seen > self._limit:
            self._stop()

    def _stop(self) -> None:
        self._cancel_timer()
        if not self._over and self.transport is not None:
            self._over = True
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._over = True
        self._cancel_timer()


class _CappedReader(Protocol):
    """Collects at most ``limit`` bytes within ``timeout`` s into ``finished``.

    Past either limit it closes the connection and fails ``finished``.
    """

    def __init__(
        self,
        finished: Deferred[bytes],
        clock: IReactorTime,
        limit: int,
        timeout: float,
    ) -> None:
        self._finished: Deferred[bytes] | None = finished
        self._clock = clock
        self._limit = limit
        self._timeout = timeout
        self._chunks: list[bytes] = []
        self._size = 0
        self._timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self._timer = self._clock.callLater(self._timeout, self._expired)

    def dataReceived(self, data: bytes) -> None:
        if self._finished is None:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._fail(UpstreamError(f"response is larger than {self._limit} bytes"))
            return
        self._chunks.append(data)

    def _expired(self) -> None:
        self._timer = None
        self._fail(Unreachable("reading body: timed out"))

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _fail(self, error: UpstreamError) -> None:
        finished, self._finished = self._finished, None
        self._cancel_timer()
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]
        if finished is not None:
            finished.errback(Failure(error))

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._cancel_timer()
        finished, self._finished = self._finished, None
        if finished is None:
            return
        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            finished.callback(b"".join(self._chunks))
        else:
            why = describe(reason.value) if reason.value is not None else "lost"
            error = Unreachable(f"reading body: {why}")
            finished.errback(Failure(error))
