"""The pool's own HTTP client on a real socket: what treq did per request
(gzip decoding, a cookie jar, credentials only on the upstream's origin,
redirects followed by the pool) still happens."""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator

import pytest_twisted
from twisted.internet import reactor
from twisted.web import server
from twisted.web.resource import Resource

from ncps.upstream import UpstreamPool

HASH = "0" * 32


class Recording(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bytes, dict[bytes, bytes]]] = []

    def render_GET(self, request: server.Request) -> bytes:
        headers = {
            k.lower(): v[0] for k, v in request.requestHeaders.getAllRawHeaders()
        }
        self.seen.append((request.uri, headers))
        if request.uri.startswith(b"/moved/"):
            request.setResponseCode(302)
            request.setHeader(b"location", b"/" + request.uri[len(b"/moved/") :])
            return b""
        request.addCookie(b"session", b"abc", path=b"/")
        body = b"StorePath: /nix/store/" + HASH.encode() + b"-x\n"
        if b"gzip" in headers.get(b"accept-encoding", b""):
            request.setHeader(b"content-encoding", b"gzip")
            return gzip.compress(body)
        return body


@pytest_twisted.async_yield_fixture
async def served() -> AsyncIterator[tuple[Recording, UpstreamPool]]:
    resource = Recording()
    port = reactor.listenTCP(0, server.Site(resource), interface="127.0.0.1")
    url = f"http://alice:s3cret@127.0.0.1:{port.getHost().port}/"
    pool = UpstreamPool(reactor, [url], dialer_timeout=3.0, header_timeout=3.0)
    yield resource, pool
    await pool.close()
    await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_gzip_cookies_credentials_and_redirects(
    served: tuple[Recording, UpstreamPool],
) -> None:
    resource, pool = served
    upstream = pool.upstreams[0]
    body = await pool.fetch_narinfo(upstream, HASH)
    assert body == b"StorePath: /nix/store/" + HASH.encode() + b"-x\n"
    uri, first = resource.seen[-1]
    assert uri == f"/{HASH}.narinfo".encode()
    assert first[b"authorization"] == b"Basic YWxpY2U6czNjcmV0"
    assert first[b"user-agent"].startswith(b"ncps")
    assert b"cookie" not in first
    # A redirect on the same origin: followed, credentials and cookie kept.
    response = await pool.open_nar(upstream, upstream.url + f"moved/{HASH}.narinfo")
    pool.release(response)
    assert [uri for uri, _ in resource.seen[-2:]] == [
        f"/moved/{HASH}.narinfo".encode(),
        f"/{HASH}.narinfo".encode(),
    ]
    for _, headers in resource.seen[-2:]:
        assert headers[b"cookie"] == b"session=abc"
        assert headers[b"authorization"] == b"Basic YWxpY2U6czNjcmV0"
