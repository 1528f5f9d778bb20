"""In-memory fakes of ncps's ports, and fixtures to feed them.

Shipped with the package so that cache logic (and code built on ncps) can be
tested without sockets or threads:

* :class:`SyncRunner` stands in for :class:`ncps.threads.Runner`: it runs a
  ``*_thd`` function at once on the calling thread and returns a fired
  Deferred.  :class:`ManualRunner` queues the calls instead, for tests that
  need a busy pool.
* :class:`FakeUpstream` is a binary cache as a Twisted ``Resource`` (serve it
  through ``treq.testing.StubTreq``); :class:`HostRouter` puts several behind
  one StubTreq, chosen by the ``Host`` header.  :func:`fake_upstream_pool`
  builds an :class:`~ncps.upstream.UpstreamPool` over them.
* :func:`make_nar_fixture` makes NAR bytes, their compressed file and a
  narinfo signed with a test :class:`~ncps.signing.SecretKey`.
* :class:`RecordingTransport` is a producer that records
  ``pauseProducing``/``resumeProducing``/``stopProducing``, for protocols fed
  by hand.
* :func:`drive` pumps StubTreqs, ManualRunners and a
  :class:`~twisted.internet.task.Clock` until a Deferred has fired.
* :func:`sqlite_db_and_local_store` gives a migrated SQLite database and a
  prepared local NAR store in a directory, laid out as ``ncps serve`` does.
* :func:`captured_log` collects the log events emitted while it is active.

Nothing here runs in production code.
"""

from __future__ import annotations

import bz2
import hashlib
import lzma
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import attrs
import zstandard
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource
from zope.interface import implementer

from ncps.db.engine import migrate, open_engine
from ncps.db.queries import Database
from ncps.logs import set_level
from ncps.narinfo import NarInfo
from ncps.nix32 import ALPHABET
from ncps.nix32 import encode as nix32_encode
from ncps.nixhash import NixHash
from ncps.signing import SecretKey, sign_narinfo
from ncps.storage.local import COMPRESSION_EXTENSIONS, LocalStore
from ncps.threads import Runner
from ncps.upstream import UpstreamPool

T = TypeVar("T")

#: The key the fake upstreams sign with (a fixed seed: tests are repeatable).
TEST_UPSTREAM_KEY = SecretKey("upstream.test-1", bytes(range(32)))
#: A different key under the same name: its signatures must not verify.
WRONG_UPSTREAM_KEY = SecretKey("upstream.test-1", bytes(range(100, 132)))
#: The key the cache under test signs with.
TEST_CACHE_KEY = SecretKey("cache.test-1", bytes(range(50, 82)))


# -- runners -----------------------------------------------------------------------


class SyncRunner:
    """A :class:`ncps.threads.Runner` that runs everything on the calling thread.

    ``run`` returns an already-fired Deferred (the value, or the exception as
    a failure).  ``calls`` records the names of the functions run.
    """

    def __init__(self) -> None:
        self.calls: list[str] = []

    def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Deferred[T]:
        self.calls.append(getattr(fn, "__name__", repr(fn)))
        try:
            result = fn(*args, **kwargs)
        except Exception:
            return fail()
        return succeed(result)


class ManualRunner:
    """A :class:`ncps.threads.Runner` whose work waits until the test runs it.

    Models a pool that is busy: ``run`` queues the call and returns an unfired
    Deferred; :meth:`run_next` runs the oldest call and fires its Deferred.
    """

    def __init__(self) -> None:
        self.queue: list[
            tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], Deferred[Any]]
        ] = []

    def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Deferred[T]:
        d: Deferred[T] = Deferred()
        self.queue.append((fn, args, kwargs, d))
        return d

    def run_next(self) -> None:
        fn, args, kwargs, d = self.queue.pop(0)
        try:
            result = fn(*args, **kwargs)
        except Exception:
            d.errback(Failure())
        else:
            d.callback(result)

    def run_all(self) -> int:
        """Run queued calls (and whatever they queue) until none is left."""
        count = 0
        while self.queue:
            self.run_next()
            count += 1
        return count

    def flush(self) -> None:
        """Run the calls queued so far, not those they queue (a :func:`drive` round)."""
        for _ in range(len(self.queue)):
            self.run_next()


@implementer(IPushProducer)
class RecordingTransport:
    """A transport for hand-fed protocols that records flow control calls."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.paused = False
        self.stopped = False

    def pauseProducing(self) -> None:
        self.events.append("pause")
        self.paused = True

    def resumeProducing(self) -> None:
        self.events.append("resume")
        self.paused = False

    def stopProducing(self) -> None:
        self.events.append("stop")
        self.stopped = True

    def loseConnection(self) -> None:
        self.stopProducing()


# -- NARs and narinfos ---------------------------------------------------------------


def _nar_string(data: bytes) -> bytes:
    padding = b"\0" * (-len(data) % 8)
    return len(data).to_bytes(8, "little") + data + padding


def nar_of_file(contents: bytes, executable: bool = False) -> bytes:
    """The NAR serialisation of a single regular file."""
    parts = [b"nix-archive-1", b"(", b"type", b"regular"]
    if executable:
        parts += [b"executable", b""]
    parts += [b"contents", contents, b")"]
    return b"".join(_nar_string(p) for p in parts)


def random_nar(size: int, seed: int = 0) -> bytes:
    """A NAR of one file of ``size`` pseudo-random bytes (repeatable per seed)."""
    return nar_of_file(random.Random(seed).randbytes(size))


def compress(data: bytes, compression: str) -> bytes:
    """``data`` compressed as a binary cache would serve it."""
    if compression == "none":
        return data
    if compression == "xz":
        return lzma.compress(data, preset=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=1).compress(data)
    if compression == "bzip2":
        return bz2.compress(data, 1)
    raise ValueError(f"no test compressor for {compression}")


def sha256(data: bytes) -> NixHash:
    return NixHash("sha256", hashlib.sha256(data).digest())


def store_path(name: str, seed: bytes) -> str:
    """A valid store path whose hash part is derived from ``seed``."""
    digest = hashlib.sha256(seed + name.encode()).digest()
    hash_part = "".join(ALPHABET[b % 32] for b in digest[:32])
    return f"/nix/store/{hash_part}-{name}"


@attrs.frozen
class NarFixture:
    """One store path as an upstream serves it."""

    narinfo: NarInfo
    nar: bytes  # the uncompressed NAR
    file: bytes  # the bytes behind narinfo.url

    @property
    def hash_part(self) -> str:
        return self.narinfo.hash_part

    @property
    def narinfo_text(self) -> bytes:
        return self.narinfo.to_text().encode()

    @property
    def nar_path(self) -> str:
        """``narinfo.url`` without its query: the path on the upstream."""
        return self.narinfo.url.split("?", 1)[0]

    @property
    def nar_key(self) -> str:
        """The key the cache stores the NAR under: FileHash, else NarHash, in nix32."""
        data = self.file if self.narinfo.file_hash is not None else self.nar
        return nix32_encode(hashlib.sha256(data).digest())

    def cache_nar_path(self) -> str:
        """The path the cache serves the NAR under."""
        ext = COMPRESSION_EXTENSIONS[self.narinfo.compression]
        return f"/nar/{self.nar_key}.nar{ext}"


def make_nar_fixture(
    *,
    name: str = "hello-2.12",
    nar: bytes | None = None,
    compression: str = "xz",
    key: SecretKey | None = TEST_UPSTREAM_KEY,
    file_fields: bool = True,
    references: Sequence[str] = (),
    seed: int = 0,
    **overrides: Any,
) -> NarFixture:
    """A NAR, its compressed file and a narinfo signed by ``key`` (unsigned if None).

    ``overrides`` replace narinfo fields after the file fields are computed
    and before signing (e.g. ``store_path=...`` or ``nar_size=...``).
    """
    if nar is None:
        nar = random_nar(4096, seed)
    file = compress(nar, compression)
    file_hash = sha256(file)
    ext = COMPRESSION_EXTENSIONS[compression]
    ni = NarInfo(
        store_path=store_path(name, nar),
        url=f"nar/{file_hash.nix32_digest()}.nar{ext}",
        compression=compression,
        nar_hash=sha256(nar),
        nar_size=len(nar),
        file_hash=file_hash if file_fields else None,
        file_size=len(file) if file_fields else None,
        references=tuple(references),
    )
    ni = attrs.evolve(ni, **overrides)
    if key is not None:
        ni = sign_narinfo(ni, key)
    return NarFixture(narinfo=ni, nar=nar, file=file)


# -- fake upstream caches --------------------------------------------------------------


@attrs.define
class Canned:
    """A canned response; ``stall`` never answers (for timeouts); ``hold``
    waits in :attr:`FakeUpstream.held` until the test calls
    :meth:`FakeUpstream.answer`."""

    body: bytes = b""
    status: int = 200
    headers: Mapping[bytes, bytes] = attrs.Factory(dict)
    stall: bool = False
    hold: bool = False


class FakeUpstream(Resource):
    """A binary cache serving canned responses; 404 for anything else.

    ``requests`` records ``(method, uri)`` of every request it saw and
    ``headers`` the request headers of each (lower-case names, last value).
    Requests other than ``nix-cache-info`` are also counted while they are
    open: ``open`` now, ``peak_open`` at most; ``lost`` lists the URIs of
    those whose connection closed before their response ended (a client
    that gave up, or a cut made by :meth:`answer`).
    """

    isLeaf = True

    def __init__(self, priority: int = 40) -> None:
        super().__init__()
        self.responses: dict[str, Canned] = {}
        self.requests: list[tuple[bytes, bytes]] = []
        self.headers: list[dict[bytes, bytes]] = []
        self.held: list[server.Request] = []
        self.open = 0
        self.peak_open = 0
        self.lost: list[bytes] = []
        self.set(
            "nix-cache-info",
            b"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: %d\n" % priority,
        )

    def set(self, path: str, body: bytes = b"", status: int = 200, **kw: Any) -> None:
        self.responses[path.lstrip("/")] = Canned(body, status, **kw)

    def add(self, fixture: NarFixture, file: bytes | None = None) -> None:
        """Serve ``fixture``'s narinfo and its NAR file (or other bytes)."""
        self.set(
            f"{fixture.hash_part}.narinfo",
            fixture.narinfo_text,
            headers={b"Content-Type": b"text/x-nix-narinfo"},
        )
        self.set(fixture.nar_path, fixture.file if file is None else file)

    def uris(self, method: bytes = b"GET") -> list[bytes]:
        return [uri for m, uri in self.requests if m == method]

    def content_requests(self) -> list[bytes]:
        """URIs requested other than the ``nix-cache-info`` health check."""
        return [uri for _, uri in self.requests if uri != b"/nix-cache-info"]

    def held_uris(self) -> list[bytes]:
        return [r.uri for r in self.held]

    def answer(
        self, uri: bytes | None = None, *, upto: int | None = None
    ) -> server.Request:
        """Answer a held request (the oldest, or the oldest for ``uri``) with
        its canned response, and return it.  With ``upto``, send the headers
        and only that many bytes of the body and leave the response open:
        :meth:`cut` or ``finish()`` it later."""
        request = next(r for r in self.held if uri is None or r.uri == uri)
        self.held.remove(request)
        canned = self.responses[request.path.decode("latin-1").lstrip("/")]
        request.setResponseCode(canned.status)
        for name, value in canned.headers.items():
            request.setHeader(name, value)
        request.setHeader(b"Content-Length", b"%d" % len(canned.body))
        if upto is None:
            request.write(canned.body)
            request.finish()
        else:
            request.write(canned.body[:upto])
        return request

    @staticmethod
    def cut(request: server.Request) -> None:
        """Close a request's connection before its response ended."""
        transport = request.channel.transport if request.channel else None
        assert transport is not None
        transport.loseConnection()

    def _track(self, request: server.Request) -> None:
        if request.uri == b"/nix-cache-info":
            return
        self.open += 1
        self.peak_open = max(self.peak_open, self.open)

        def ended(result: object) -> None:
            self.open -= 1
            if isinstance(result, Failure):
                self.lost.append(request.uri)

        request.notifyFinish().addBoth(ended)

    def render(self, request: server.Request) -> bytes | int:
        self.requests.append((request.method, request.uri))
        self.headers.append(
            {k.lower(): v[-1] for k, v in request.requestHeaders.getAllRawHeaders()}
        )
        self._track(request)
        canned = self.responses.get(request.path.decode("latin-1").lstrip("/"))
        if canned is None:
            request.setResponseCode(404)
            return b"404 not found\n"
        if canned.stall:
            return server.NOT_DONE_YET
        if canned.hold:
            self.held.append(request)
            return server.NOT_DONE_YET
        request.setResponseCode(canned.status)
        for name, value in canned.headers.items():
            request.setHeader(name, value)
        return canned.body


class HostRouter(Resource):
    """Dispatches to one resource per ``Host`` header (e.g. ``up1.test``)."""

    isLeaf = True

    def __init__(self, hosts: Mapping[str, Resource]) -> None:
        super().__init__()
        self.hosts = dict(hosts)

    def render(self, request: server.Request) -> bytes | int:
        host = (request.getHeader(b"host") or b"").decode("latin-1")
        target = self.hosts.get(host)
        if target is None:
            request.setResponseCode(502)
            return b"no such fake host\n"
        result: bytes | int = target.render(request)
        return result


def fake_upstream_pool(
    clock: Clock,
    upstreams: Mapping[str, Resource],
    *,
    header_timeout: float = 3.0,
    urls: Sequence[str] | None = None,
) -> tuple[UpstreamPool, StubTreq]:
    """An :class:`UpstreamPool` over fake upstreams keyed by host name.

    The upstream URLs are ``urls``, by default ``http://<host>/`` in the
    order of ``upstreams``.  Returns the pool and the StubTreq to flush.
    """
    stub = StubTreq(HostRouter(upstreams))
    pool = UpstreamPool(
        clock,
        [f"http://{host}/" for host in upstreams] if urls is None else urls,
        dialer_timeout=3.0,
        header_timeout=header_timeout,
        http=stub,  # type: ignore[arg-type]  # StubTreq mirrors HTTPClient
    )
    return pool, stub


def drive(
    d: Deferred[T], clock: Clock, *pumps: StubTreq | ManualRunner, rounds: int = 1000
) -> Deferred[T]:
    """Flush ``pumps`` and run ``clock``'s due calls until ``d`` has fired.

    ``pumps`` are StubTreqs (their in-memory connections are flushed) or
    ManualRunners (their queued work is run).  Does not advance time; raises
    AssertionError if ``d`` never fires.
    """
    for _ in range(rounds):
        if d.called:
            return d
        clock.advance(0)
        for pump in pumps:
            pump.flush()
    if not d.called:
        raise AssertionError(f"{d!r} did not fire after {rounds} rounds")
    return d


def result_of(d: Deferred[T]) -> T:
    """The value of a fired Deferred (re-raising its failure)."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, f"{d!r} has not fired"
    outcome = results[0]
    if isinstance(outcome, Failure):
        outcome.raiseException()
    value: T = outcome
    return value


# -- storage and logs ------------------------------------------------------------------


def sqlite_db_and_local_store(
    root: Path, runner: Runner | SyncRunner | ManualRunner
) -> tuple[Database, LocalStore]:
    """A migrated SQLite database (``root/db``) and a prepared local NAR store
    (``root/storage``, temp files in ``root/storage/store/tmp``), both real.

    ``runner`` runs the database's ``*_thd`` calls.  The caller disposes of
    ``db.engine``.  Blocks: call it while setting a test up.
    """
    engine = open_engine(f"sqlite:{root}/db/ncps.sqlite3")
    migrate(engine)
    db = Database(engine, runner)  # type: ignore[arg-type]  # the fakes mirror Runner
    store = LocalStore(root / "storage", root / "storage" / "store" / "tmp")
    store.prepare_thd()
    return db, store


@contextmanager
def captured_log(level: str | None = None) -> Iterator[list[LogEvent]]:
    """The events the global log publisher emits meanwhile, in a list.

    With ``level``, ncps messages are shown from that level on meanwhile
    (``"info"`` again afterwards, ncps's default).
    """
    seen: list[LogEvent] = []
    observer: ILogObserver = seen.append  # type: ignore[assignment]
    if level is not None:
        set_level(level)
    globalLogPublisher.addObserver(observer)
    try:
        yield seen
    finally:
        globalLogPublisher.removeObserver(observer)
        if level is not None:
            set_level("info")
