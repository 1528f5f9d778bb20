"""Streaming NARs on a real reactor: real sockets, real thread pools, real SQLite.

The proxy is built from the real objects (as ``ncps.service.build_service``
does) and listens on 127.0.0.1:0; the upstream is a Twisted ``static.File``
over a temp directory, also on 127.0.0.1:0.  A NAR can be "gated": the upstream
sends the first part of it and holds the rest until the test opens the gate,
so a download is reliably in flight while clients come and go.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web import server, static
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.iweb import IResponse
from twisted.web.resource import Resource

from ncps.cache import Cache
from ncps.db.queries import Database, NarFile
from ncps.signing import TrustedKeys
from ncps.storage.local import LocalStore
from ncps.testing import (
    TEST_CACHE_KEY,
    TEST_UPSTREAM_KEY,
    NarFixture,
    make_nar_fixture,
    random_nar,
    sqlite_db_and_local_store,
)
from ncps.threads import Runner
from ncps.upstream import UpstreamPool
from ncps.web import CacheServer, QuietSite

reactor: Any = global_reactor
BIG = 8 << 20


class CountingSite(server.Site):
    """Records ``(method, uri)`` of every request."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource)
        self.seen: list[tuple[bytes, bytes]] = []
        self.noisy = False

    def getResourceFor(self, request: server.Request) -> Any:
        self.seen.append((request.method, request.uri))
        return super().getResourceFor(request)

    def log(self, request: Any) -> None:
        pass


class GatedFile(Resource):
    """Sends ``data[:gate_at]`` at once and the rest when ``gate`` fires."""

    isLeaf = True

    def __init__(self, data: bytes, gate_at: int) -> None:
        super().__init__()
        self.data = data
        self.gate_at = gate_at
        self.gate: Deferred[None] = Deferred()

    def render_GET(self, request: server.Request) -> int:
        request.setHeader(b"Content-Length", b"%d" % len(self.data))
        request.write(self.data[: self.gate_at])
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)

        def rest(_: object) -> None:
            if not gone:
                request.write(self.data[self.gate_at :])
                request.finish()

        self.gate.addCallback(rest)
        return server.NOT_DONE_YET


class Collector(Protocol):
    """Collects a response body; optionally hangs up after ``stop_after`` bytes."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.received = bytearray()
        self.stop_after = stop_after
        self.reason: Failure | None = None
        self._ended: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.stop_after is not None and len(self.received) >= self.stop_after:
            self.stop_after = None
            assert self.transport is not None
            self.transport.stopProducing()

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        self.reason = reason
        self._ended.callback(None)

    @property
    def over(self) -> bool:
        return self.reason is not None

    async def ended(self) -> Failure:
        """Wait for the end of the body; the reason it ended."""
        await self._ended
        assert self.reason is not None
        return self.reason


async def until(
    predicate: Callable[[], bool], timeout: float = 15.0, what: str = ""
) -> None:
    waited = 0.0
    while not predicate():
        if waited > timeout:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await deferLater(reactor, 0.01, lambda: None)
        waited += 0.01


@attrs.define
class Harness:
    tmp: Path
    upstream_dir: Path
    upstream_site: CountingSite
    upstream_nar_dir: static.File
    store: LocalStore
    db: Database
    cache: Cache
    upstreams: UpstreamPool
    pools: list[ThreadPool]
    ports: list[Any]
    engine: Any
    client_pool: HTTPConnectionPool
    proxy_url: str = ""
    upstream_url: str = ""

    def publish(
        self, fx: NarFixture, file: bytes | None = None, gate_at: int | None = None
    ) -> GatedFile | None:
        """Put a NAR and its narinfo on the upstream (optionally gated)."""
        (self.upstream_dir / f"{fx.hash_part}.narinfo").write_bytes(fx.narinfo_text)
        data = fx.file if file is None else file
        if gate_at is None:
            (self.upstream_dir / fx.nar_path).write_bytes(data)
            return None
        gated = GatedFile(data, gate_at)
        self.upstream_nar_dir.putChild(fx.nar_path.split("/")[-1].encode(), gated)
        return gated

    async def remember(self, fx: NarFixture) -> None:
        """Store the narinfo as the cache would, without its prefetch."""
        record = self.cache.ingest(self.upstream_url, fx.hash_part, fx.narinfo_text)
        await self.db.put_narinfo(record)

    def nar_gets(self, fx: NarFixture) -> int:
        return self.upstream_site.seen.count((b"GET", f"/{fx.nar_path}".encode()))

    async def get(
        self, path: str, collector: Collector | None = None
    ) -> tuple[IResponse, Collector]:
        agent = Agent(reactor, pool=self.client_pool)
        response: IResponse = await agent.request(
            b"GET", (self.proxy_url + path).encode()
        )
        collector = collector or Collector()
        response.deliverBody(collector)
        return response, collector

    async def nar_file(self, fx: NarFixture) -> NarFile | None:
        result: NarFile | None = await self.db.get_nar_file(
            fx.nar_key, fx.narinfo.compression
        )
        return result

    async def committed(self, fx: NarFixture, timeout: float = 15.0) -> NarFile:
        """Wait for the NAR's database row (written last, after the rename)."""
        waited = 0.0
        while (row := await self.nar_file(fx)) is None:
            if waited > timeout:
                raise AssertionError(f"{fx.cache_nar_path()} was never committed")
            await deferLater(reactor, 0.01, lambda: None)
            waited += 0.01
        return row

    def temp_files(self) -> list[str]:
        return os.listdir(self.store.temp_dir)


@pytest_twisted.async_yield_fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    upstream_dir = tmp_path / "upstream"
    (upstream_dir / "nar").mkdir(parents=True)
    (upstream_dir / "nix-cache-info").write_bytes(
        b"StoreDir: /nix/store\nPriority: 40\n"
    )
    root = static.File(str(upstream_dir))
    nar_dir = static.File(str(upstream_dir / "nar"))
    root.putChild(b"nar", nar_dir)
    upstream_site = CountingSite(root)
    upstream_port = reactor.listenTCP(0, upstream_site, interface="127.0.0.1")
    upstream_url = f"http://127.0.0.1:{upstream_port.getHost().port}/"

    db_pool = ThreadPool(0, 4, name="test-db")
    io_pool = ThreadPool(0, 8, name="test-io")
    db_pool.start()
    io_pool.start()
    db, store = sqlite_db_and_local_store(tmp_path, Runner(reactor, db_pool))
    upstreams = UpstreamPool(
        reactor, [upstream_url], dialer_timeout=3.0, header_timeout=3.0
    )
    cache = Cache(
        clock=reactor,
        db=db,
        store=store,
        upstreams=upstreams,
        trusted=TrustedKeys([TEST_UPSTREAM_KEY.public_key()]),
        signer=TEST_CACHE_KEY,
        io=Runner(reactor, io_pool),
    )
    site = QuietSite(
        CacheServer(
            reactor, cache, "cache.test", TEST_CACHE_KEY.public_key()
        ).resource()
    )
    proxy_port = reactor.listenTCP(0, site, interface="127.0.0.1")
    client_pool = HTTPConnectionPool(reactor, persistent=False)
    h = Harness(
        tmp=tmp_path,
        upstream_dir=upstream_dir,
        upstream_site=upstream_site,
        upstream_nar_dir=nar_dir,
        store=store,
        db=db,
        cache=cache,
        upstreams=upstreams,
        pools=[db_pool, io_pool],
        ports=[proxy_port, upstream_port],
        engine=db.engine,
        client_pool=client_pool,
        proxy_url=f"http://127.0.0.1:{proxy_port.getHost().port}",
        upstream_url=upstream_url,
    )
    yield h
    await proxy_port.stopListening()
    await client_pool.closeCachedConnections()
    await upstreams.close()
    await upstream_port.stopListening()
    for pool in (io_pool, db_pool):
        pool.stop()
    db.engine.dispose()


@pytest_twisted.ensureDeferred
async def test_big_nar_to_two_concurrent_clients_with_one_upstream_get(
    harness: Harness,
) -> None:
    fx = make_nar_fixture(nar=random_nar(BIG, seed=1), compression="zstd")
    gated = harness.publish(fx, gate_at=len(fx.file) // 2)
    assert gated is not None
    await harness.remember(fx)

    (r1, c1), (r2, c2) = [await harness.get(fx.cache_nar_path()) for _ in range(2)]
    assert r1.code == r2.code == 200
    assert r1.length == r2.length == len(fx.file)
    # Both are tailing the one download in flight, which is stuck at the gate.
    await until(
        lambda: len(c1.received) > 0 and len(c2.received) > 0, what="first bytes"
    )
    assert not c1.over and not c2.over
    assert harness.nar_gets(fx) == 1
    gated.gate.callback(None)

    reasons = [await c1.ended(), await c2.ended()]
    assert all(r.check(ResponseDone) for r in reasons), reasons
    assert bytes(c1.received) == fx.file
    assert bytes(c2.received) == fx.file
    assert harness.nar_gets(fx) == 1
    row = await harness.committed(fx)
    assert row.file_size == len(fx.file)
    assert harness.store.nar_path(fx.nar_key, "zstd").read_bytes() == fx.file


@pytest_twisted.ensureDeferred
async def test_client_leaving_mid_stream_does_not_stop_the_download(
    harness: Harness,
) -> None:
    fx = make_nar_fixture(nar=random_nar(BIG, seed=2), compression="none")
    gated = harness.publish(fx, gate_at=len(fx.file) // 3)
    assert gated is not None
    await harness.remember(fx)

    response, quitter = await harness.get(fx.cache_nar_path(), Collector(stop_after=1))
    assert response.code == 200
    reason = await quitter.ended()
    assert not reason.check(ResponseDone)
    assert len(quitter.received) < len(fx.file)
    gated.gate.callback(None)

    await harness.committed(fx)
    assert harness.store.nar_path(fx.nar_key, "none").read_bytes() == fx.file
    assert harness.temp_files() == []

    # A later client is served from the store, without asking the upstream again.
    response, later = await harness.get(fx.cache_nar_path())
    assert (await later.ended()).check(ResponseDone)
    assert bytes(later.received) == fx.file
    assert harness.nar_gets(fx) == 1


@pytest.mark.parametrize("with_file_size", [True, False])
@pytest_twisted.ensureDeferred
async def test_corrupt_nar_is_never_committed_and_the_client_sees_an_error(
    harness: Harness, with_file_size: bool
) -> None:
    real = random_nar(2 << 20, seed=3)
    fx = make_nar_fixture(nar=real, compression="zstd", file_fields=with_file_size)
    bad_nar = bytearray(real)
    bad_nar[len(bad_nar) // 2] ^= 0x55
    corrupt = make_nar_fixture(nar=bytes(bad_nar), compression="zstd").file
    if with_file_size:
        corrupt = fx.file[:-1] + bytes([fx.file[-1] ^ 1])  # same length, bad FileHash
    harness.publish(fx, file=corrupt)
    await harness.remember(fx)

    response, collector = await harness.get(fx.cache_nar_path())
    reason = await collector.ended()
    assert response.code == 200
    assert not reason.check(ResponseDone), "the client saw a clean end of a bad NAR"
    assert bytes(collector.received) != corrupt
    assert bytes(collector.received) != fx.file
    await until(lambda: harness.temp_files() == [], what="temp file to be discarded")
    assert not harness.store.nar_path(fx.nar_key, "zstd").exists()
    assert await harness.nar_file(fx) is None


@pytest_twisted.ensureDeferred
async def test_narinfo_then_nar_through_the_real_stack(harness: Harness) -> None:
    fx = make_nar_fixture(nar=random_nar(300_000, seed=4), compression="xz")
    harness.publish(fx)
    response, narinfo = await harness.get(f"/{fx.hash_part}.narinfo")
    assert response.code == 200
    assert (await narinfo.ended()).check(ResponseDone)
    assert f"URL: nar/{fx.nar_key}.nar.xz\n".encode() in bytes(narinfo.received)
    response, nar = await harness.get(fx.cache_nar_path())
    assert response.code == 200
    assert (await nar.ended()).check(ResponseDone)
    assert bytes(nar.received) == fx.file
    assert harness.nar_gets(fx) == 1


@pytest_twisted.ensureDeferred
async def test_stored_nar_of_the_wrong_size_is_fetched_again(harness: Harness) -> None:
    """A committed object truncated behind ncps's back is never served as is."""
    fx = make_nar_fixture(nar=random_nar(200_000, seed=5), compression="xz")
    harness.publish(fx)
    await harness.remember(fx)
    response, first = await harness.get(fx.cache_nar_path())
    assert (await first.ended()).check(ResponseDone)
    await harness.committed(fx)
    path = harness.store.nar_path(fx.nar_key, "xz")
    path.chmod(0o644)
    path.write_bytes(fx.file[:1000])

    response, again = await harness.get(fx.cache_nar_path())
    assert response.code == 200
    assert (await again.ended()).check(ResponseDone)
    assert bytes(again.received) == fx.file
    assert harness.nar_gets(fx) == 2
    await until(lambda: path.stat().st_size == len(fx.file), what="object restored")
    assert path.read_bytes() == fx.file
