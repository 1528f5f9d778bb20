"""Transparent zstd with a real Nix client.

An upstream that serves NARs uncompressed (``Compression: none``, as
nix-serve and harmonia do): ncps keeps each compressible one zstd-compressed
(``<key>.nar.transparent.zst``) and sends it as stored, with
``Content-Encoding: zstd``, to Nix, which sends no Accept-Encoding but decodes
the body itself.  A plain HTTP client gets the NAR itself.
"""

from __future__ import annotations

import hashlib
import socket

import pytest
from e2e_harness import HttpRelay, wait_for_committed_nar

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.parametrize("e2e_backend_name", ["sqlite-local", "postgres-s3"]),
]


class HeadRecordingRelay(HttpRelay):
    """Relays HTTP to ncps and records, per NAR request, the response's head.

    Nix does not pipeline, and every ncps NAR response has a Content-Length
    (or is a HEAD), so responses are told apart by reading heads and skipping
    bodies.
    """

    def __init__(self, target_port: int) -> None:
        self.exchanges: list[tuple[str, dict[str, str]]] = []
        super().__init__(target_port)

    def new_state(self) -> list[tuple[str, str]]:
        return []  # (method, path) of the requests not answered yet

    def relay_requests(
        self, src: socket.socket, dst: socket.socket, asked: list
    ) -> None:
        buffer = b""
        try:
            while data := src.recv(65536):
                buffer += data
                while b"\r\n\r\n" in buffer:
                    head, _, buffer = buffer.partition(b"\r\n\r\n")
                    method, path, _ = head.decode("latin-1").split(" ", 2)
                    asked.append((method, path))
                dst.sendall(data)
        except OSError:
            pass

    def relay_responses(
        self, src: socket.socket, dst: socket.socket, asked: list
    ) -> None:
        buffer = b""
        skip = 0
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                buffer += data
                while True:
                    if skip:
                        taken = min(skip, len(buffer))
                        buffer, skip = buffer[taken:], skip - taken
                        if skip:
                            break
                    if b"\r\n\r\n" not in buffer:
                        break
                    head, _, buffer = buffer.partition(b"\r\n\r\n")
                    fields = {}
                    for line in head.decode("latin-1").split("\r\n")[1:]:
                        name, _, value = line.partition(":")
                        fields[name.strip().lower()] = value.strip()
                    method, path = asked.pop(0) if asked else ("?", "?")
                    if method != "HEAD":
                        skip = int(fields.get("content-length", "0"))
                    with self._lock:
                        self.exchanges.append((path, fields))
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def test_nix_gets_stored_zstd_and_plain_clients_the_nar(
    nix_fixture, upstream_factory, ncps_factory, nix_client_factory
):
    ncps = ncps_factory(upstream_factory("none"))
    key = ncps.pubkey()
    names = ["leaf", "app", "big"]
    nar_paths = {}
    for name in names:
        narinfo = ncps.narinfo(nix_fixture.hash(name))
        assert narinfo["Compression"] == "none", narinfo
        nar_paths[name] = "/" + str(narinfo["URL"])
    stored = {
        name: wait_for_committed_nar(ncps, nix_fixture.nar_sha256(name))
        for name in names
    }
    # The small paths compress; the big one is random bytes and is kept as
    # it came (zstd would not save a tenth).
    assert stored["leaf"].endswith(".nar.transparent.zst"), stored
    assert stored["app"].endswith(".nar.transparent.zst"), stored
    assert stored["big"].endswith(".nar"), stored

    relay = HeadRecordingRelay(ncps.port)
    try:
        client = nix_client_factory()
        res = client.substitute([nix_fixture.path(n) for n in names], relay.url, [key])
    finally:
        relay.close()
    assert res.rc == 0, str(res)
    for name in [*names, "dir"]:
        assert client.nar_sha256(nix_fixture.path(name)) == nix_fixture.nar_sha256(
            name
        ), name
    assert client.verify([key]).rc == 0

    heads = dict(relay.exchanges)
    for name in ("leaf", "app"):
        fields = heads[nar_paths[name]]
        assert fields.get("content-encoding") == "zstd", (name, fields)
        assert "accept-ranges" not in fields
    big = heads[nar_paths["big"]]
    assert "content-encoding" not in big and big["accept-ranges"] == "bytes"

    # A client that does not take zstd (no Accept-Encoding, not Nix) gets
    # the NAR itself, with its own length, and a HEAD that says the same.
    for name in ("leaf", "app"):
        got = ncps.get(nar_paths[name])
        assert got.status == 200
        assert "content-encoding" not in got.headers
        assert hashlib.sha256(got.body).hexdigest() == nix_fixture.nar_sha256(name)
        assert int(got.headers["content-length"]) == len(got.body)
        head = ncps.get(nar_paths[name], method="HEAD")
        assert head.headers["content-length"] == got.headers["content-length"]
