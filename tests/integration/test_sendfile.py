"""Stored files sent with sendfile(2) on a real reactor and real sockets.

A resource sends a file region through :class:`ncps.streaming.SendfileStreamer`
on a :class:`ncps.sendfile.SendfilePort`, with the wire limits of the daemon.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as global_reactor
from twisted.internet import threads
from twisted.internet.task import deferLater
from twisted.web import resource, server

from ncps.sendfile import SendfilePort, SendfileServer
from ncps.streaming import SendfileStreamer
from ncps.web import QuietSite
from ncps.wire import ConnectionGate, WireLimits

reactor: Any = global_reactor
SIZE = 48 << 20


class Region(resource.Resource):
    """``GET /<first>/<end>``: bytes [first, end) of ``path``."""

    isLeaf = True

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.fds: list[int] = []

    def render_GET(self, request: server.Request) -> Any:
        first, end = (int(x) for x in request.path.decode().strip("/").split("/"))
        transport = request.channel.transport
        assert isinstance(transport, SendfileServer)
        fd = os.open(self.path, os.O_RDONLY)
        self.fds.append(fd)
        request.setHeader(b"Content-Length", b"%d" % (end - first))
        SendfileStreamer(request, transport, fd, end, start=first).start()
        return server.NOT_DONE_YET

    def open_fds(self) -> list[int]:
        still = []
        for fd in self.fds:
            try:
                os.fstat(fd)
            except OSError:
                continue
            still.append(fd)
        return still


@pytest.fixture
def data(tmp_path: Path) -> tuple[Path, bytes]:
    body = os.urandom(SIZE)
    path = tmp_path / "nar"
    path.write_bytes(body)
    return path, body


def listen(site: QuietSite) -> SendfilePort:
    gate = ConnectionGate(reactor, 16)
    site.gate = gate
    port = SendfilePort(0, site, gate, interface="127.0.0.1", reactor=reactor)
    port.startListening()
    return port


def read_response(s: socket.socket) -> tuple[bytes, bytes]:
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        if not chunk:
            raise AssertionError(f"closed in the head: {head!r}")
        head += chunk
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    body = bytearray()
    while len(body) < length:
        chunk = s.recv(min(1 << 20, length - len(body)))
        if not chunk:
            break
        body += chunk
    return head, bytes(body)


def read_to_close(s: socket.socket) -> tuple[int, bool]:
    """(bytes read until the server closed, whether it reset the connection)."""
    got = 0
    try:
        while block := s.recv(1 << 20):
            got += len(block)
    except ConnectionResetError:
        return got, True
    return got, False


@pytest_twisted.ensureDeferred
async def test_regions_go_out_whole_one_after_another_on_one_connection(
    data: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, body = data
    calls: list[int] = []
    real = os.sendfile

    def counting(out: int, fd: int, offset: int | None, count: int) -> int:
        calls.append(count)
        return real(out, fd, offset, count)

    monkeypatch.setattr(os, "sendfile", counting)
    region = Region(path)
    port = listen(QuietSite(region, reactor=reactor))
    number = port.getHost().port

    def client() -> list[tuple[bytes, bytes]]:
        with socket.create_connection(("127.0.0.1", number), timeout=20) as s:
            got = []
            for first, end in [(0, SIZE), (5, 1005), (SIZE - 7, SIZE)]:
                s.sendall(b"GET /%d/%d HTTP/1.1\r\nHost: t\r\n\r\n" % (first, end))
                got.append(read_response(s))
            return got

    try:
        got = await threads.deferToThread(client)
    finally:
        await port.stopListening()
    assert [b for _, b in got] == [body, body[5:1005], body[SIZE - 7 :]]
    assert all(h.startswith(b"HTTP/1.1 200 OK") for h, _ in got)
    assert calls, "sendfile was not used"
    assert region.open_fds() == []


@pytest_twisted.ensureDeferred
async def test_a_client_that_stops_reading_is_cut_off_and_the_file_closed(
    data: tuple[Path, bytes],
) -> None:
    path, _ = data
    stall = 1.5
    region = Region(path)
    site = QuietSite(region, limits=WireLimits(send_timeout=stall), reactor=reactor)
    port = listen(site)
    number = port.getHost().port

    def stop_reading() -> tuple[int, bool]:
        with socket.create_connection(("127.0.0.1", number), timeout=10) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
            s.sendall(b"GET /0/%d HTTP/1.1\r\nHost: t\r\n\r\n" % SIZE)
            s.recv(1024)
            time.sleep(stall + 2.0)  # takes nothing: the socket fills
            return read_to_close(s)

    try:
        got, cut = await threads.deferToThread(stop_reading)
        await deferLater(reactor, 0.2, lambda: None)
    finally:
        await port.stopListening()
    assert got < SIZE // 2 and (cut or got < SIZE)
    assert region.open_fds() == []


@pytest_twisted.ensureDeferred
async def test_a_client_going_away_mid_file_leaves_nothing_open(
    data: tuple[Path, bytes],
) -> None:
    path, _ = data
    region = Region(path)
    port = listen(QuietSite(region, reactor=reactor))
    number = port.getHost().port

    def leave_early() -> None:
        with socket.create_connection(("127.0.0.1", number), timeout=10) as s:
            s.sendall(b"GET /0/%d HTTP/1.1\r\nHost: t\r\n\r\n" % SIZE)
            s.recv(1 << 20)

    try:
        await threads.deferToThread(leave_early)
        for _ in range(50):
            if region.fds and not region.open_fds():
                break
            await deferLater(reactor, 0.05, lambda: None)
    finally:
        await port.stopListening()
    assert region.fds and region.open_fds() == []


@pytest_twisted.ensureDeferred
async def test_a_file_shorter_than_announced_drops_the_connection(
    data: tuple[Path, bytes],
) -> None:
    path, _ = data
    region = Region(path)
    port = listen(QuietSite(region, reactor=reactor))
    number = port.getHost().port

    def ask_too_much() -> tuple[int, int]:
        with socket.create_connection(("127.0.0.1", number), timeout=10) as s:
            s.sendall(b"GET /0/%d HTTP/1.1\r\nHost: t\r\n\r\n" % (SIZE + 1000))
            got, _ = read_to_close(s)
            return got, SIZE + 1000

    try:
        got, announced = await threads.deferToThread(ask_too_much)
    finally:
        await port.stopListening()
    # The head and the whole file, then the connection closed (no hang, and
    # 1000 bytes short of what the head announced).
    assert SIZE < got < announced
    assert region.open_fds() == []


@pytest_twisted.ensureDeferred
async def test_pipelined_requests_each_get_their_file(
    data: tuple[Path, bytes],
) -> None:
    path, body = data
    region = Region(path)
    port = listen(QuietSite(region, reactor=reactor))
    number = port.getHost().port

    def client() -> list[tuple[bytes, bytes]]:
        with socket.create_connection(("127.0.0.1", number), timeout=10) as s:
            s.sendall(  # both at once: the second waits behind the first
                b"GET /0/1000 HTTP/1.1\r\nHost: t\r\n\r\n"
                b"GET /5/1005 HTTP/1.1\r\nHost: t\r\n\r\n"
                b"GET /0/%d HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" % SIZE
            )
            return [read_response(s) for _ in range(3)]

    try:
        got = await threads.deferToThread(client)
    finally:
        await port.stopListening()
    assert [b for _, b in got] == [body[:1000], body[5:1005], body]
    assert region.open_fds() == []
