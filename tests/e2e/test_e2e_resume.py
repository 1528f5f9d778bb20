"""A real Nix client resumes a broken NAR download from ncps with a byte range.

A relay between the client and ncps cuts the first response for the big NAR
after a few megabytes.  Nix retries; because ncps announced
``Accept-Ranges: bytes`` for the stored NAR, the retry asks only for the rest
(``Range: bytes=<n>-``), and the path that lands in the client's store is whole.
On S3, ncps asks the bucket for the range.  The big NAR is random bytes, so
transparent zstd keeps it as it came (an encoded body is not resumed by Nix).
"""

from __future__ import annotations

import re
import socket

import pytest
from e2e_harness import HttpRelay, wait_for_committed_nar
from e2e_harness import _reset as reset_socket

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.parametrize("e2e_backend_name", ["sqlite-local", "postgres-s3"]),
]

CUT_AFTER = 3_000_000


class CuttingRelay(HttpRelay):
    """Relays HTTP to ncps; the first response for ``target`` is cut mid-body.

    It sees each request head the client sends (Nix does not pipeline), so it
    can tell which response a connection is carrying and record Range headers.
    """

    def __init__(self, target_port: int, target_path: str) -> None:
        self.target_path = target_path
        self.requests: list[tuple[str, str | None]] = []
        self.cut = False
        super().__init__(target_port)

    def new_state(self) -> dict:
        return {"cutting": False}

    def relay_requests(
        self, src: socket.socket, dst: socket.socket, state: dict
    ) -> None:
        buffer = b""
        try:
            while data := src.recv(65536):
                buffer += data
                while b"\r\n\r\n" in buffer:
                    head, _, buffer = buffer.partition(b"\r\n\r\n")
                    text = head.decode("latin-1")
                    path = text.split(" ", 2)[1]
                    found = re.search(r"(?im)^range:\s*(.+)$", text)
                    rng = found.group(1).strip() if found else None
                    with self._lock:
                        self.requests.append((path, rng))
                        state["cutting"] = path == self.target_path and not self.cut
                        if state["cutting"]:
                            self.cut = True
                dst.sendall(data)
        except OSError:
            pass

    def relay_responses(
        self, src: socket.socket, dst: socket.socket, state: dict
    ) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                if state["cutting"]:
                    sent += len(data)
                    if sent > CUT_AFTER:
                        reset_socket(dst)
                        reset_socket(src)
                        return
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def test_nix_resumes_a_broken_nar_download_with_a_range(
    nix_fixture, upstream_factory, ncps_factory, nix_client_factory
):
    ncps = ncps_factory(upstream_factory("none"))
    key = ncps.pubkey()
    big = nix_fixture.path("big")
    narinfo = ncps.narinfo(nix_fixture.hash("big"))
    nar_path = "/" + str(narinfo["URL"])
    size = int(str(narinfo.get("FileSize", narinfo["NarSize"])))
    assert size > 2 * CUT_AFTER
    # Stored whole first: only a stored NAR offers ranges.
    wait_for_committed_nar(ncps, nix_fixture.nar_sha256("big"))

    relay = CuttingRelay(ncps.port, nar_path)
    try:
        client = nix_client_factory()
        cmd = client.substitute_cmd([big], relay.url, [key])
        cmd += ["--option", "download-attempts", "3"]
        res = client.run(cmd)
    finally:
        relay.close()
    assert res.rc == 0, str(res)
    assert relay.cut, "the relay never saw the NAR request"
    asked = [rng for path, rng in relay.requests if path == nar_path]
    assert len(asked) == 2, relay.requests
    assert asked[0] is None
    resumed = re.fullmatch(r"bytes=(\d+)-", asked[1] or "")
    assert resumed, f"the retry did not resume: {asked[1]!r}"
    assert 0 < int(resumed.group(1)) <= CUT_AFTER + 65536
    assert client.nar_sha256(big) == nix_fixture.nar_sha256("big")
    assert client.verify([key]).rc == 0
