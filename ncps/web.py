"""The HTTP surface (Klein): thin handlers that validate, call the cache, shape.

Every request path is checked against a strict allow-list before routing, so
nothing malformed (percent-escapes, ``..``, odd bytes, oversized) reaches the
cache, the database, the storage or an upstream.  Domain errors are mapped to
statuses here and only here.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from typing import Any

from klein import Klein
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from zope.interface import implementer

from ncps.cache import Cache, NarBody
from ncps.errors import (
    DatabaseUnavailable,
    IntegrityError,
    NotFound,
    Overloaded,
    StorageError,
    UpstreamError,
    UpstreamsUnavailable,
)
from ncps.logs import ncps_observer
from ncps.ranges import Unsatisfiable, requested_range
from ncps.sendfile import SendfileServer
from ncps.signing import PublicKey
from ncps.storage.base import EXTENSION_COMPRESSIONS
from ncps.storage.local import LocalNar
from ncps.streaming import FileStreamer, ObjectStreamer, SendfileStreamer
from ncps.transparent import ZstdDecodedNar, client_takes_zstd
from ncps.wire import ConnectionGate, LimitedChannel, WireLimits, request_content

log = Logger(observer=ncps_observer)

MAX_URI = 512
# Everything a Nix client sends: plain path characters and an optional query.
SAFE_URI = re.compile(rb"^/[A-Za-z0-9._/-]*(\?[A-Za-z0-9._=&-]*)?$")
NARINFO_NAME = re.compile(r"^([0-9a-df-np-sv-z]{32})\.narinfo$")
NAR_NAME = re.compile(r"^([0-9a-df-np-sv-z]{52}|[0-9a-f]{64})\.nar(\.[a-z0-9]+)?$")

NARINFO_TYPE = b"text/x-nix-narinfo"
NAR_TYPE = b"application/x-nix-nar"
CACHE_INFO = b"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 10\n"
# What decides how a Compression: none NAR is sent (ncps.transparent).
VARY = b"Accept-Encoding, User-Agent"


class BadRequest(Exception):
    """A request that is malformed; answered with 400 and its message."""


# Answered 503 with a Retry-After.
UNAVAILABLE: tuple[type[Exception], ...] = (
    StorageError,
    DatabaseUnavailable,
    Overloaded,
    UpstreamsUnavailable,
)


class CacheServer:
    """Routes of the binary-cache protocol over a :class:`Cache`."""

    app = Klein()

    def __init__(
        self,
        clock: IReactorTime,
        cache: Cache,
        hostname: str,
        public_key: PublicKey | None,
    ) -> None:
        self._clock = clock
        self._cache = cache
        self._hostname = hostname
        self._public_key = public_key

    def resource(self) -> IResource:
        return GuardResource(self.app.resource(), self.render_hot)

    # -- the two routes every substitution hits, without Klein's routing --------
    #
    # Klein's per-request machinery (URL map binding and matching, nested
    # maybeDeferreds) cost more reactor time than the handlers themselves on
    # a warm closure (bench/README.md, "Profile (issue 8)").  These requests
    # go straight to the same handlers, with the same error mapping and the
    # same cancellation when the client goes away.

    def render_hot(self, request: server.Request) -> Any:
        """Serve ``GET|HEAD /<name>.narinfo`` and ``/nar/<name>``; None for
        anything else (Klein routes it)."""
        if request.method != b"GET" and request.method != b"HEAD":
            return None
        path = request.path
        if path.startswith(b"/nar/"):
            name = path[5:]
            if not name or b"/" in name:
                return None
            handler = self.nar
            narinfo = False
        elif path.endswith(b".narinfo") and path.count(b"/") == 1:
            name = path[1:]
            handler = self.narinfo
            narinfo = True
        else:
            return None
        # The guard admitted only plain ASCII path characters.
        text = name.decode()
        if request.method == b"GET":
            # Warm: answered from memory and the local disk, with no
            # coroutine, no Deferred and no waiting.
            answer = self._answer_at_once(request, narinfo, text)
            if answer is not None:
                return answer
        d: Deferred[Any] = Deferred.fromCoroutine(handler(request, text))
        finished = False

        def gone(_: object) -> None:
            nonlocal finished
            finished = True
            d.cancel()

        request.notifyFinish().addBoth(gone)

        def respond(result: Any) -> None:
            if IResource.providedBy(result):
                request.render(result)
                return
            request.write(result)
            if not finished:
                request.finish()

        def failed(failure: Failure) -> None:
            if finished:
                if not failure.check(CancelledError):
                    log.failure("handling {uri}", failure, uri=request.uri)
                return
            for errors, error_handler in self._error_handlers():
                if failure.check(*errors):
                    respond(error_handler(request, failure))
                    return
            request.processingFailed(failure)

        d.addCallbacks(respond, failed)
        d.addErrback(lambda f: log.failure("writing {uri}", f, uri=request.uri))
        return server.NOT_DONE_YET

    def _answer_at_once(self, request: server.Request, narinfo: bool, name: str) -> Any:
        """What :meth:`render_hot` renders for a GET the cache can answer
        without waiting; None when it cannot (or the name is malformed: the
        handler says so)."""
        if narinfo:
            match = NARINFO_NAME.match(name)
            if match is None:
                return None
            text = self._cache.remembered_narinfo_text(match.group(1))
            if text is None:
                return None
            request.setHeader(b"Content-Type", NARINFO_TYPE)
            request.setHeader(b"Content-Length", b"%d" % len(text))
            return text
        nar = NAR_NAME.match(name)
        if nar is None:
            return None
        compression = EXTENSION_COMPRESSIONS.get(nar.group(2) or "")
        if compression is None:
            return None
        body = self._cache.stored_local_nar(nar.group(1), compression)
        if body is None:
            return None
        if compression == "none":
            request.setHeader(b"Vary", VARY)
        return NarResource(self._clock, body).render(request)

    def _error_handlers(
        self,
    ) -> list[tuple[tuple[type[Exception], ...], Callable[[IRequest, Failure], bytes]]]:
        """The Klein error handlers below, in their order."""
        return [
            ((NotFound,), self.not_found),
            ((BadRequest,), self.bad_request),
            ((UpstreamError, IntegrityError), self.upstream_error),
            (UNAVAILABLE, self.unavailable),
        ]

    @app.route("/", methods=["GET"])
    def index(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        body = {
            "hostname": self._hostname,
            "publicKey": self._public_key.to_text() if self._public_key else "",
        }
        return (json.dumps(body) + "\n").encode()

    @app.route("/nix-cache-info", methods=["GET", "HEAD"])
    def cache_info(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", b"text/x-nix-cache-info")
        return CACHE_INFO

    @app.route("/pubkey", methods=["GET"])
    def pubkey(self, request: IRequest) -> bytes:
        if self._public_key is None:
            raise NotFound("narinfo signing is off")
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return self._public_key.to_text().encode()

    @app.route("/healthz", methods=["GET", "HEAD"])
    def healthz(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"ok\n"

    @app.route("/<string:name>", methods=["GET", "HEAD"])
    async def narinfo(self, request: IRequest, name: str) -> bytes:
        match = NARINFO_NAME.match(name)
        if match is None:
            if name.endswith(".narinfo"):
                raise BadRequest("malformed narinfo name")
            raise NotFound(name)
        body = await self._cache.narinfo_text(match.group(1))
        request.setHeader(b"Content-Type", NARINFO_TYPE)
        request.setHeader(b"Content-Length", b"%d" % len(body))
        return body

    @app.route("/nar/<string:name>", methods=["GET", "HEAD"])
    async def nar(self, request: IRequest, name: str) -> Any:
        match = NAR_NAME.match(name)
        if match is None:
            raise BadRequest("malformed NAR name")
        ext = match.group(2) or ""
        compression = EXTENSION_COMPRESSIONS.get(ext)
        if compression is None:
            raise BadRequest("file extension is not known")
        nar_key = match.group(1)
        if compression == "none":
            # Sent as stored or decoded, depending on these (ncps.transparent).
            request.setHeader(b"Vary", VARY)
        if request.method == b"HEAD":
            head = await self._cache.nar_head(nar_key, compression)
            request.setHeader(b"Content-Type", NAR_TYPE)
            length = head.size
            if head.encoding is not None and _takes_encoding(request):
                request.setHeader(b"Content-Encoding", head.encoding.encode())
            elif head.encoding is not None:
                length = head.nar_size
                request.setHeader(b"Accept-Ranges", b"bytes")
            elif head.ranges:
                request.setHeader(b"Accept-Ranges", b"bytes")
            if length is not None:
                request.setHeader(b"Content-Length", b"%d" % length)
            return b""
        body = await self._cache.nar(nar_key, compression)
        return NarResource(self._clock, body)

    @app.handle_errors(NotFound)
    def not_found(self, request: IRequest, failure: Failure) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"Not Found\n"

    @app.handle_errors(BadRequest)
    def bad_request(self, request: IRequest, failure: Failure) -> bytes:
        request.setResponseCode(400)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return failure.getErrorMessage().encode() + b"\n"

    # IntegrityError: the download a request waited for delivered bad bytes.
    @app.handle_errors(UpstreamError, IntegrityError)
    def upstream_error(self, request: IRequest, failure: Failure) -> bytes:
        log.warn(
            "{method} {uri}: {why}",
            method=request.method,
            uri=request.uri,
            why=failure.getErrorMessage(),
        )
        request.setResponseCode(502)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"Bad Gateway\n"

    @app.handle_errors(*UNAVAILABLE)
    def unavailable(self, request: IRequest, failure: Failure) -> bytes:
        log.warn(
            "{method} {uri}: {why}",
            method=request.method,
            uri=request.uri,
            why=failure.getErrorMessage(),
        )
        request.setResponseCode(503)
        request.setHeader(b"Retry-After", b"5")
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"Service Unavailable\n"


@implementer(IResource)
class NarResource(Resource):
    """Sends one opened NAR body: as it arrives, or as stored (maybe one byte
    range of it), or decoded from its stored zstd (ncps.transparent)."""

    isLeaf = True

    def __init__(self, clock: IReactorTime, body: NarBody) -> None:
        super().__init__()
        self._clock = clock
        self._body = body

    def render_GET(self, request: server.Request) -> Any:
        request.setHeader(b"Content-Type", NAR_TYPE)
        body = self._body
        if body.download is not None:
            # Still arriving: all of it, as it comes.
            assert body.fd is not None
            if body.size is not None:
                request.setHeader(b"Content-Length", b"%d" % body.size)
            FileStreamer(
                self._clock, request, body.fd, body.size, body.download
            ).start()
            return server.NOT_DONE_YET
        if body.encoding is not None and _takes_encoding(request):
            # As stored: Nix does not resume an encoded body, so no ranges.
            assert body.size is not None
            request.setHeader(b"Content-Encoding", body.encoding.encode())
            request.setHeader(b"Content-Length", b"%d" % body.size)
            self._stream(request, body, 0, body.size, decode=False)
            return server.NOT_DONE_YET
        return self._send_stored(request, body)

    def _send_stored(self, request: server.Request, body: NarBody) -> Any:
        """A whole, verified NAR (decoded if it is stored encoded): all of it,
        or the one range asked for."""
        size = body.nar_size if body.encoding is not None else body.size
        assert size is not None
        request.setHeader(b"Accept-Ranges", b"bytes")
        try:
            wanted = requested_range(
                request.getHeader(b"range"),
                size,
                if_range=request.getHeader(b"if-range"),
            )
        except Unsatisfiable as e:
            self._release(body)
            request.setResponseCode(416)
            request.setHeader(b"Content-Range", e.content_range())
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"Range Not Satisfiable\n"
        first, length = 0, size
        if wanted is not None:
            request.setResponseCode(206)
            request.setHeader(b"Content-Range", wanted.content_range())
            first, length = wanted.first, wanted.length
        request.setHeader(b"Content-Length", b"%d" % length)
        self._stream(request, body, first, length, decode=body.encoding is not None)
        return server.NOT_DONE_YET

    def _stream(
        self,
        request: server.Request,
        body: NarBody,
        first: int,
        length: int,
        *,
        decode: bool,
    ) -> None:
        """Send bytes [first, first + length) of the stored body, or of what
        it decodes to."""
        stored = body.stored
        if decode:
            assert body.nar_size is not None
            if stored is None:
                assert body.fd is not None
                stored = LocalNar(body.fd)
            stored = ZstdDecodedNar(stored, body.nar_size)
        if stored is None:
            assert body.fd is not None
            transport: object = request.channel.transport if request.channel else None
            if isinstance(transport, SendfileServer):
                SendfileStreamer(
                    request, transport, body.fd, first + length, start=first
                ).start()
            else:
                FileStreamer(
                    self._clock, request, body.fd, first + length, start=first
                ).start()
            return
        assert body.reader is not None
        ObjectStreamer(request, stored, body.reader.run, first, length).start()

    def _release(self, body: NarBody) -> None:
        """Close a body that will not be sent."""
        if body.stored is not None and body.reader is not None:
            body.reader.run(body.stored.close_thd).addErrback(
                lambda f: log.warn("closing a NAR: {why}", why=f.getErrorMessage())
            )
        elif body.fd is not None:
            os.close(body.fd)


def _takes_encoding(request: IRequest) -> bool:
    """Whether the client gets a stored zstd NAR as it is (ncps.transparent)."""
    return client_takes_zstd(
        request.getHeader(b"accept-encoding"), request.getHeader(b"user-agent")
    )


@implementer(IResource)
class GuardResource(Resource):
    """Refuses malformed request targets before anything routes them."""

    isLeaf = True

    def __init__(
        self,
        inner: IResource,
        hot: Callable[[server.Request], Any] | None = None,
    ) -> None:
        """``hot`` may answer a request itself (anything but None) before
        ``inner`` renders it."""
        super().__init__()
        self._inner = inner
        self._hot = hot

    def render(self, request: server.Request) -> Any:
        uri = request.uri
        if len(uri) > MAX_URI:
            request.setResponseCode(414)
            return b"URI Too Long\n"
        if SAFE_URI.match(uri) is None or b"/." in uri or b"//" in uri:
            request.setResponseCode(400)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"malformed request path\n"
        if self._hot is not None:
            result = self._hot(request)
            if result is not None:
                return result
        return self._inner.render(request)


class QuietSite(server.Site):
    """Our HTTP server: the wire limits of :mod:`ncps.wire`, no access log.

    ``gate`` (optional) counts the open connections against the listener's
    limit.  Twisted's idle timer is off: :class:`~ncps.wire.LimitedChannel`
    keeps its own deadlines on ``reactor``.
    """

    noisy = False
    # The channel itself, not twisted's HTTP/2-negotiating wrapper: we speak
    # plain HTTP/1.1 and the limits live on the channel.
    protocol = LimitedChannel  # type: ignore[assignment]

    def __init__(
        self,
        resource: IResource,
        *,
        limits: WireLimits | None = None,
        gate: ConnectionGate | None = None,
        reactor: IReactorTime | None = None,
    ) -> None:
        super().__init__(
            resource, timeout=None, reactor=reactor, parsePOSTFormSubmission=False
        )
        self.limits = limits or WireLimits()
        self.gate = gate

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        channel.limits = self.limits
        channel.gate = self.gate
        return channel

    def getContentFile(self, length: int | None) -> Any:
        # Bodies are capped by the channel; none is ever spooled to disk.
        return request_content(length)

    def log(self, request: Any) -> None:
        pass
