"""The wire limits of our HTTP server (ncps.wire) against real sockets.

A QuietSite listens on 127.0.0.1:0 on the real reactor; each client is a
plain blocking socket run in a thread, so the test measures what a peer
sees: an answer, a close, and how long it took.  Bounds are generous: these
are not timing benchmarks, they tell "at once" from "after the deadline".
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import AsyncIterator, Callable

import attrs
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.web import resource, server

from ncps.web import QuietSite
from ncps.wire import ConnectionGate, GatedPort, WireLimits

DEADLINE = 1.5
IDLE = 1.5
GET = b"GET /x HTTP/1.1\r\nHost: cache.test\r\n\r\n"
GET_CLOSE = b"GET /x HTTP/1.1\r\nHost: cache.test\r\nConnection: close\r\n\r\n"


class Hello(resource.Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[bytes, bytes]] = []

    def render(self, request: server.Request) -> bytes:
        assert request.content is not None
        self.requests.append((request.method, request.content.read()))
        return b"hello\n"


class Big(resource.Resource):
    """A response far larger than the socket buffers."""

    isLeaf = True
    size = 64 << 20

    def render(self, request: server.Request) -> bytes:
        return b"x" * self.size


@attrs.define
class Seen:
    """What a client saw: the bytes it got and when the server closed."""

    data: bytes
    closed_after: float | None

    @property
    def status(self) -> bytes:
        return self.data.split(b"\r\n", 1)[0]


def exchange(
    port: int, chunks: list[bytes], *, pause: float = 0.0, wait: float = 8.0
) -> Seen:
    """Send ``chunks`` (``pause`` apart), then read until close or ``wait``."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        data = b""
        try:
            for chunk in chunks:
                if select.select([s], [], [], 0)[0]:
                    break  # answered (or closed): stop talking
                s.sendall(chunk)
                if pause:
                    time.sleep(pause)
        except OSError:
            pass  # closed on us mid-send; what we read tells why
        s.settimeout(max(0.1, wait - (time.monotonic() - started)))
        try:
            while block := s.recv(65536):
                data += block
        except TimeoutError:
            return Seen(data, None)
        except ConnectionResetError:
            pass
        return Seen(data, time.monotonic() - started)


def in_thread(fn: Callable[[], Seen]) -> Deferred[Seen]:
    return threads.deferToThread(fn)


@attrs.define
class Server:
    port: int
    site: QuietSite
    hello: Hello


@pytest_twisted.async_yield_fixture
async def wire() -> AsyncIterator[Server]:
    hello = Hello()
    site = QuietSite(
        hello,
        limits=WireLimits(read_header_timeout=DEADLINE, idle_timeout=IDLE),
        reactor=reactor,
    )
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    yield Server(port.getHost().port, site, hello)
    await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_good_request_is_answered(wire: Server) -> None:
    seen = await in_thread(lambda: exchange(wire.port, [GET_CLOSE]))
    assert seen.status == b"HTTP/1.1 200 OK"
    assert seen.data.endswith(b"hello\n")


@pytest_twisted.ensureDeferred
async def test_dripping_headers_are_cut_at_the_deadline(wire: Server) -> None:
    head = b"GET /x HTTP/1.1\r\nHost: cache.test\r\nX-Slow: " + b"a" * 40
    chunks = [head[i : i + 1] for i in range(len(head))]
    seen = await in_thread(lambda: exchange(wire.port, chunks, pause=0.1))
    assert seen.status == b"HTTP/1.1 408 Request Timeout"
    assert seen.closed_after is not None
    assert DEADLINE - 0.2 < seen.closed_after < DEADLINE + 2
    assert wire.hello.requests == []


@pytest_twisted.ensureDeferred
async def test_a_silent_connection_is_closed_at_the_deadline(wire: Server) -> None:
    seen = await in_thread(lambda: exchange(wire.port, []))
    assert seen.closed_after is not None
    assert DEADLINE - 0.2 < seen.closed_after < DEADLINE + 2


NOT_HTTP = {
    "binary": bytes(range(256)) * 4,
    "tls-client-hello": bytes.fromhex("16030100c4010000c00303") + b"\x00" * 40,
    "bare-cr": b"GET /x HTTP/1.1\rHost: cache.test\r\r",
    "bare-lf": b"GET /x HTTP/1.1\nHost: cache.test\n\n",
    "bare-lf-in-headers": b"GET /x HTTP/1.1\r\nHost: cache.test\nAccept: */*\n\n",
    "control-in-header": b"GET /x HTTP/1.1\r\nHost: cache\x01test\r\n\r\n",
}


@pytest_twisted.ensureDeferred
async def test_what_is_not_http_gets_400_at_once(wire: Server) -> None:
    for name, payload in NOT_HTTP.items():
        seen = await in_thread(lambda p=payload: exchange(wire.port, [p]))  # type: ignore[misc]
        assert seen.status == b"HTTP/1.1 400 Bad Request", name
        assert seen.closed_after is not None and seen.closed_after < 1.0, name
    assert wire.hello.requests == []


@pytest_twisted.ensureDeferred
async def test_get_or_head_with_a_body_is_refused_before_the_body(
    wire: Server,
) -> None:
    for head in (
        b"GET /x HTTP/1.1\r\nHost: a\r\nContent-Length: 104857600\r\n\r\n",
        b"HEAD /x HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
    ):
        # Only the head is sent: the answer cannot wait for the body.
        seen = await in_thread(lambda h=head: exchange(wire.port, [h]))  # type: ignore[misc]
        assert seen.status == b"HTTP/1.1 400 Bad Request", head
        assert seen.closed_after is not None and seen.closed_after < 1.0, head
    assert wire.hello.requests == []


@pytest_twisted.ensureDeferred
async def test_get_with_an_empty_body_is_fine(wire: Server) -> None:
    head = b"GET /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n"
    seen = await in_thread(lambda: exchange(wire.port, [head], wait=0.5))
    assert seen.status == b"HTTP/1.1 200 OK"


@pytest_twisted.ensureDeferred
async def test_other_bodies_are_capped(wire: Server) -> None:
    cap = WireLimits().max_body
    big = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % (cap + 1)
    seen = await in_thread(lambda: exchange(wire.port, [big]))
    assert seen.status == b"HTTP/1.1 413 Content Too Large"
    assert seen.closed_after is not None and seen.closed_after < 1.0

    chunk = b"%x\r\n%s\r\n" % (cap // 2, b"z" * (cap // 2))
    chunked = [b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"]
    chunked += [chunk] * 3 + [b"0\r\n\r\n"]
    seen = await in_thread(lambda: exchange(wire.port, chunked))
    assert seen.status == b"HTTP/1.1 413 Content Too Large"

    small = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nabcde"
    seen = await in_thread(lambda: exchange(wire.port, [small], wait=0.5))
    assert seen.status == b"HTTP/1.1 200 OK"
    assert wire.hello.requests == [(b"POST", b"abcde")]


@pytest_twisted.ensureDeferred
async def test_huge_headers_are_refused(wire: Server) -> None:
    long_line = b"GET /x HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n"
    seen = await in_thread(lambda: exchange(wire.port, [long_line]))
    assert seen.status == b"HTTP/1.1 431 Request Header Fields Too Large"
    many = b"GET /x HTTP/1.1\r\n" + b"X-A: b\r\n" * 150 + b"\r\n"
    seen = await in_thread(lambda: exchange(wire.port, [many]))
    assert seen.status == b"HTTP/1.1 400 Bad Request"
    assert wire.hello.requests == []


@pytest_twisted.ensureDeferred
async def test_keep_alive_idles_out_and_the_deadline_restarts_per_request(
    wire: Server,
) -> None:
    def two_requests() -> tuple[bytes, float]:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", wire.port), timeout=8) as s:
            s.sendall(GET)
            first = s.recv(65536)
            # Longer than the head deadline, shorter than the idle timeout:
            # the connection is still open and the next request is served.
            time.sleep(DEADLINE * 0.7)
            s.sendall(GET)
            second = s.recv(65536)
            data = b""
            while block := s.recv(65536):
                data += block
            return first + second + data, time.monotonic() - started

    data, closed_after = await threads.deferToThread(two_requests)
    assert data.count(b"HTTP/1.1 200 OK") == 2
    assert b"408" not in data  # an idle close says nothing
    assert DEADLINE * 0.7 + IDLE - 0.2 < closed_after < DEADLINE * 0.7 + IDLE + 2


@pytest_twisted.ensureDeferred
async def test_at_the_connection_limit_a_client_waits_then_is_served() -> None:
    hello = Hello()
    gate = ConnectionGate(reactor, 3)
    site = QuietSite(
        hello, limits=WireLimits(idle_timeout=30), gate=gate, reactor=reactor
    )
    port = GatedPort(0, site, gate, interface="127.0.0.1", reactor=reactor)
    port.startListening()
    number = port.getHost().port

    def hold_three() -> list[socket.socket]:
        held = []
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", number), timeout=5)
            s.sendall(GET)
            assert s.recv(65536).startswith(b"HTTP/1.1 200 OK")
            held.append(s)
        return held

    held = await threads.deferToThread(hold_three)
    try:
        assert gate.open == 3 and gate.paused
        fourth = threads.deferToThread(exchange, number, [GET_CLOSE])
        await deferLater(reactor, 0.5, lambda: None)
        assert not fourth.called  # waiting in the backlog, not refused
        assert gate.open == 3
        held.pop().close()
        seen = await fourth
        assert seen.status == b"HTTP/1.1 200 OK"
        assert seen.data.endswith(b"hello\n")
        assert len(hello.requests) == 4
    finally:
        for s in held:
            s.close()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_client_that_stops_reading_is_cut_off() -> None:
    stall = 1.5
    site = QuietSite(
        Big(),
        limits=WireLimits(read_header_timeout=DEADLINE, send_timeout=stall),
        reactor=reactor,
    )
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    number = port.getHost().port

    def stop_reading() -> tuple[int, bool]:
        with socket.create_connection(("127.0.0.1", number), timeout=10) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
            s.sendall(GET)
            s.recv(1024)
            time.sleep(stall + 2.0)  # takes nothing: the server's buffer fills
            got, cut = 0, False
            try:
                while block := s.recv(1 << 20):
                    got += len(block)
            except ConnectionResetError:
                cut = True
            return got, cut

    try:
        got, cut = await threads.deferToThread(stop_reading)
    finally:
        await port.stopListening()
    # Cut off, long before the 64 MiB were sent.
    assert got < Big.size // 2
    assert cut or got < Big.size
