"""ncps.web + ncps.cache through StubTreq: our app, real SQLite, fake upstreams.

Everything runs on the test's thread: the database and the io pool are a
SyncRunner, time is a Clock, and both HTTP sides are in-memory StubTreqs.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import zstandard
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse
from twisted.web.resource import IResource
from twisted.web.server import Site

from ncps import narinfo as narinfo_mod
from ncps import transparent
from ncps.cache import Cache
from ncps.db.queries import Database, get_nar_file_thd, get_narinfo_thd
from ncps.signing import SecretKey, TrustedKeys
from ncps.storage.base import ZSTD_NONE
from ncps.storage.local import LocalStore
from ncps.testing import (
    TEST_CACHE_KEY,
    TEST_UPSTREAM_KEY,
    WRONG_UPSTREAM_KEY,
    FakeUpstream,
    ManualRunner,
    NarFixture,
    SyncRunner,
    drive,
    fake_upstream_pool,
    make_nar_fixture,
    nar_of_file,
    random_nar,
    result_of,
    sqlite_db_and_local_store,
)
from ncps.web import CACHE_INFO, CacheServer

ORIGIN = "http://cache.test"


@attrs.define
class App:
    clock: Clock
    db: Database
    store: LocalStore
    cache: Cache
    resource: IResource
    client: StubTreq
    upstream_http: StubTreq
    up1: FakeUpstream
    up2: FakeUpstream
    io: SyncRunner | ManualRunner

    def pumps(self) -> list[Any]:
        pumps: list[Any] = [self.client, self.upstream_http]
        if isinstance(self.io, ManualRunner):
            pumps.append(self.io)
        return pumps

    def _drive(self, d: Deferred[Any]) -> Any:
        return result_of(drive(d, self.clock, *self.pumps()))

    def request(self, path: str, method: str = "GET") -> tuple[IResponse, bytes]:
        response = self._drive(self.client.request(method, ORIGIN + path))
        body = self._drive(self.client.content(response))
        self.settle()
        return response, body

    def raw(self, path: str, method: str = "GET", headers: str = "") -> bytes:
        """The raw HTTP/1.1 response, headers included (treq hides Content-Length).

        ``headers``: more request header lines, each ending in CRLF.
        """
        site = Site(self.resource, reactor=self.clock)
        protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(
            f"{method} {path} HTTP/1.1\r\nHost: cache.test\r\n{headers}"
            "Connection: close\r\n\r\n".encode()
        )
        for _ in range(50):
            if transport.disconnecting:
                break
            self.settle(1)
        assert transport.disconnecting, "the response did not end"
        return transport.value()

    def settle(self, rounds: int = 20) -> None:
        """Let background work (prefetches, commits) run to its end."""
        for _ in range(rounds):
            self.clock.advance(0)
            for pump in self.pumps():
                pump.flush()

    def content_requests(self) -> list[bytes]:
        return self.up1.content_requests() + self.up2.content_requests()

    def narinfo_row(self, hash_part: str) -> Any:
        return self.db.call_thd(get_narinfo_thd, hash_part)

    def nar_row(self, fixture: NarFixture) -> Any:
        return self.db.call_thd(
            get_nar_file_thd, fixture.nar_key, fixture.narinfo.compression
        )

    def temp_files(self) -> list[Path]:
        return list(self.store.temp_dir.iterdir())


def build_app(
    tmp_path: Path,
    signer: SecretKey | None = TEST_CACHE_KEY,
    io: SyncRunner | ManualRunner | None = None,
    transparent_zstd: bool = False,
) -> App:
    clock = Clock()
    runner = SyncRunner()
    io = io or runner
    db, store = sqlite_db_and_local_store(tmp_path, runner)
    up1, up2 = FakeUpstream(priority=10), FakeUpstream(priority=20)
    pool, upstream_http = fake_upstream_pool(clock, {"up1.test": up1, "up2.test": up2})
    cache = Cache(
        clock=clock,
        db=db,
        store=store,
        upstreams=pool,
        trusted=TrustedKeys([TEST_UPSTREAM_KEY.public_key()]),
        signer=signer,
        io=io,  # type: ignore[arg-type]
        transparent_zstd=transparent_zstd,
    )
    server = CacheServer(
        clock, cache, "cache.test", signer.public_key() if signer else None
    )
    resource = server.resource()
    return App(
        clock,
        db,
        store,
        cache,
        resource,
        StubTreq(resource),
        upstream_http,
        up1,
        up2,
        io,
    )


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    built = build_app(tmp_path)
    yield built
    built.db.engine.dispose()


def header(response: IResponse, name: bytes) -> bytes | None:
    values = response.headers.getRawHeaders(name)
    return values[-1] if values else None


# -- narinfo ---------------------------------------------------------------------------


def test_narinfo_miss_is_fetched_resigned_rewritten_and_stored(app: App) -> None:
    fx = make_nar_fixture()
    app.up1.add(fx)
    response, body = app.request(f"/{fx.hash_part}.narinfo")
    assert response.code == 200
    assert header(response, b"content-type") == b"text/x-nix-narinfo"
    served = narinfo_mod.parse(body)
    assert served.store_path == fx.narinfo.store_path
    assert served.nar_hash == fx.narinfo.nar_hash
    assert served.url == f"nar/{fx.nar_key}.nar.xz"
    assert TrustedKeys([TEST_CACHE_KEY.public_key()]).verify_narinfo(served)
    assert TrustedKeys([TEST_UPSTREAM_KEY.public_key()]).verify_narinfo(served)
    row = app.narinfo_row(fx.hash_part)
    assert row is not None
    assert row.upstream_url == "http://up1.test/" + fx.narinfo.url
    assert row.nar_key == fx.nar_key


def test_second_narinfo_request_is_served_from_the_database(app: App) -> None:
    fx = make_nar_fixture()
    app.up1.add(fx)
    _, first = app.request(f"/{fx.hash_part}.narinfo")
    seen = list(app.up1.requests)
    app.up1.responses.clear()  # the upstream forgets everything
    response, second = app.request(f"/{fx.hash_part}.narinfo")
    assert response.code == 200
    assert second == first
    assert app.up1.requests == seen


def test_narinfo_and_nar_are_served_from_storage_after_a_restart(
    tmp_path: Path,
) -> None:
    fx = make_nar_fixture()
    first = build_app(tmp_path)
    first.up1.add(fx)
    _, narinfo = first.request(f"/{fx.hash_part}.narinfo")
    first.db.engine.dispose()
    second = build_app(tmp_path)  # same database and store, empty upstreams
    response, again = second.request(f"/{fx.hash_part}.narinfo")
    assert (response.code, again) == (200, narinfo)
    response, nar = second.request(fx.cache_nar_path())
    assert (response.code, nar) == (200, fx.file)
    assert second.up1.requests == [] and second.up2.requests == []
    second.db.engine.dispose()


def test_narinfo_prefetches_the_nar_once(app: App) -> None:
    fx = make_nar_fixture()
    app.up1.add(fx)
    app.request(f"/{fx.hash_part}.narinfo")
    assert app.up1.uris().count(f"/{fx.nar_path}".encode()) == 1
    assert app.nar_row(fx) is not None
    assert app.store.nar_path(fx.nar_key, "xz").read_bytes() == fx.file


def test_concurrent_narinfo_misses_fetch_once(app: App) -> None:
    fx = make_nar_fixture()
    app.up1.add(fx)
    url = f"{ORIGIN}/{fx.hash_part}.narinfo"
    d1, d2 = app.client.get(url), app.client.get(url)
    r1, r2 = app._drive(d1), app._drive(d2)
    assert r1.code == r2.code == 200
    assert app.up1.uris().count(f"/{fx.hash_part}.narinfo".encode()) == 1


def _rejected(app: App, served_as: str, fixture: NarFixture) -> None:
    app.up1.set(f"{served_as}.narinfo", fixture.narinfo_text)
    app.up1.set(fixture.nar_path, fixture.file)
    response, _ = app.request(f"/{served_as}.narinfo")
    assert response.code == 404
    assert app.up1.uris().count(f"/{served_as}.narinfo".encode()) == 1
    assert app.narinfo_row(served_as) is None
    assert f"/{fixture.nar_path}".encode() not in app.up1.uris()


def test_store_path_mismatch_is_rejected(app: App) -> None:
    fx = make_nar_fixture()
    other = make_nar_fixture(name="other-1.0", seed=7)
    _rejected(app, other.hash_part, fx)


def test_unsigned_narinfo_is_rejected(app: App) -> None:
    fx = make_nar_fixture(key=None)
    _rejected(app, fx.hash_part, fx)


def test_narinfo_signed_by_an_untrusted_key_is_rejected(app: App) -> None:
    fx = make_nar_fixture(key=WRONG_UPSTREAM_KEY)
    _rejected(app, fx.hash_part, fx)


def test_narinfo_altered_after_signing_is_rejected(app: App) -> None:
    fx = make_nar_fixture()
    tampered = attrs.evolve(
        fx, narinfo=attrs.evolve(fx.narinfo, nar_size=fx.narinfo.nar_size + 1)
    )
    _rejected(app, fx.hash_part, tampered)


def test_narinfo_with_an_absolute_nar_url_is_rejected(app: App) -> None:
    fx = make_nar_fixture(url="http://evil.test/nar/x.nar.xz")
    _rejected(app, fx.hash_part, fx)


def test_failover_to_the_next_upstream(app: App) -> None:
    fx = make_nar_fixture()
    app.up1.set(f"{fx.hash_part}.narinfo", b"boom", status=500)
    app.up2.add(fx)
    response, body = app.request(f"/{fx.hash_part}.narinfo")
    assert response.code == 200
    assert narinfo_mod.parse(body).store_path == fx.narinfo.store_path
    assert app.up1.uris().count(f"/{fx.hash_part}.narinfo".encode()) == 1
    assert app.narinfo_row(fx.hash_part).upstream_url.startswith("http://up2.test/")
    assert app.nar_row(fx) is not None


def test_rejected_narinfo_falls_through_to_the_next_upstream(app: App) -> None:
    fx = make_nar_fixture()
    bad = make_nar_fixture(key=WRONG_UPSTREAM_KEY)  # same store path, bad signature
    app.up1.add(bad)
    app.up2.add(fx)
    response, _ = app.request(f"/{fx.hash_part}.narinfo")
    assert response.code == 200
    assert app.narinfo_row(fx.hash_part).upstream_url.startswith("http://up2.test/")


def test_narinfo_nobody_has_is_404(app: App) -> None:
    response, _ = app.request(f"/{'1' * 32}.narinfo")
    assert response.code == 404
    assert (
        app.up1.content_requests()
        == app.up2.content_requests()
        == [f"/{'1' * 32}.narinfo".encode()]
    )


def test_without_signing_the_upstream_signature_is_served(tmp_path: Path) -> None:
    app = build_app(tmp_path, signer=None)
    fx = make_nar_fixture()
    app.up1.add(fx)
    _, body = app.request(f"/{fx.hash_part}.narinfo")
    served = narinfo_mod.parse(body)
    assert served.signatures == fx.narinfo.signatures
    response, _ = app.request("/pubkey")
    assert response.code == 404
    app.db.engine.dispose()


# -- NAR -------------------------------------------------------------------------------


def test_nar_is_served_whole_and_then_from_the_store(app: App) -> None:
    fx = make_nar_fixture(nar=None, seed=11)
    app.up1.add(fx)
    app.request(f"/{fx.hash_part}.narinfo")
    response, body = app.request(fx.cache_nar_path())
    assert response.code == 200
    assert body == fx.file
    assert header(response, b"content-type") == b"application/x-nix-nar"
    assert response.length == len(fx.file)
    before = list(app.up1.requests)
    app.up1.responses.clear()
    response, again = app.request(fx.cache_nar_path())
    assert (response.code, again) == (200, fx.file)
    assert app.up1.requests == before


def test_a_committed_nar_is_served_without_a_database_round_trip(app: App) -> None:
    fx = make_nar_fixture(seed=12)
    app.up1.add(fx)
    app.request(f"/{fx.hash_part}.narinfo")  # the prefetch commits it
    assert app.nar_row(fx) is not None
    lookups: list[tuple[str, str]] = []
    find_nar_file = app.db.find_nar_file

    def counted(nar_key: str, compression: str) -> Any:
        lookups.append((nar_key, compression))
        return find_nar_file(nar_key, compression)

    app.db.find_nar_file = counted  # type: ignore[method-assign]
    for _ in range(2):
        response, body = app.request(fx.cache_nar_path())
        assert (response.code, body) == (200, fx.file)
    response, _ = app.request(fx.cache_nar_path(), method="HEAD")
    assert response.code == 200
    assert lookups == []


def test_a_nar_stored_before_a_restart_is_looked_up_once(tmp_path: Path) -> None:
    fx = make_nar_fixture(seed=13)
    first = build_app(tmp_path)
    first.up1.add(fx)
    first.request(f"/{fx.hash_part}.narinfo")
    first.db.engine.dispose()
    app = build_app(tmp_path)
    try:
        lookups: list[str] = []
        find_nar_file = app.db.find_nar_file

        def counted(nar_key: str, compression: str) -> Any:
            lookups.append(nar_key)
            return find_nar_file(nar_key, compression)

        app.db.find_nar_file = counted  # type: ignore[method-assign]
        for _ in range(3):
            response, body = app.request(fx.cache_nar_path())
            assert (response.code, body) == (200, fx.file)
        assert lookups == [fx.nar_key]
    finally:
        app.db.engine.dispose()


def test_an_unexpected_error_in_a_handler_is_a_500(app: App) -> None:
    async def broken(hash_part: str) -> bytes:
        raise RuntimeError("a bug")

    app.cache.narinfo_text = broken  # type: ignore[method-assign]
    response, _ = app.request(f"/{GOOD_HASH}.narinfo")
    assert response.code == 500


def test_a_client_that_goes_away_cancels_its_handler(app: App) -> None:
    waiting: Deferred[bytes] = Deferred()

    async def slow(hash_part: str) -> bytes:
        return await waiting

    app.cache.narinfo_text = slow  # type: ignore[method-assign]
    site = Site(app.resource, reactor=app.clock)
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(
        f"GET /{GOOD_HASH}.narinfo HTTP/1.1\r\nHost: cache.test\r\n\r\n".encode()
    )
    assert not waiting.called
    protocol.connectionLost(Failure(ConnectionDone()))
    assert waiting.called  # cancelled through the handler's await
    assert transport.value() == b""


@pytest.mark.parametrize("compression", ["none", "zstd", "bzip2"])
def test_other_compressions(app: App, compression: str) -> None:
    fx = make_nar_fixture(compression=compression)
    app.up1.add(fx)
    app.request(f"/{fx.hash_part}.narinfo")
    response, body = app.request(fx.cache_nar_path())
    assert (response.code, body) == (200, fx.file)


def test_nar_download_waits_for_the_narinfo(app: App) -> None:
    """A NAR whose narinfo we never stored is not fetched (it could not be verified)."""
    fx = make_nar_fixture()
    app.up1.add(fx)
    response, _ = app.request(fx.cache_nar_path())
    assert response.code == 404
    assert app.up1.requests == []


def _corrupt_fixture(app: App) -> NarFixture:
    fx = make_nar_fixture(compression="none", nar=random_nar(100_000, seed=4))
    corrupt = bytearray(fx.file)
    corrupt[len(corrupt) // 2] ^= 0xFF
    app.up1.add(fx, file=bytes(corrupt))
    return fx


def test_corrupt_nar_is_never_committed_and_the_client_gets_502(app: App) -> None:
    """With a synchronous io pool the mismatch is known before any byte is sent."""
    fx = _corrupt_fixture(app)
    app.request(f"/{fx.hash_part}.narinfo")  # its prefetch fails
    assert app.nar_row(fx) is None
    response, _ = app.request(fx.cache_nar_path())
    assert response.code == 502
    assert app.up1.uris().count(f"/{fx.nar_path}".encode()) == 2
    assert app.nar_row(fx) is None
    assert not app.store.nar_path(fx.nar_key, "none").exists()
    assert app.temp_files() == []


def test_corrupt_nar_found_mid_stream_aborts_the_response(tmp_path: Path) -> None:
    """With a busy io pool the response has started: it must end in an error."""
    app = build_app(tmp_path, io=ManualRunner())
    fx = _corrupt_fixture(app)
    record = app.cache.ingest("http://up1.test/", fx.hash_part, fx.narinfo_text)
    result_of(app.db.put_narinfo(record))
    raw = app.raw(fx.cache_nar_path())
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"Content-Length: %d" % len(fx.file) in head
    assert len(body) < len(fx.file)  # short of its Content-Length: never a whole NAR
    served = app.up1.responses[fx.nar_path].body
    assert len(body) > 0 and body == served[: len(body)]  # it had started streaming
    app.settle()
    assert app.nar_row(fx) is None
    assert not app.store.nar_path(fx.nar_key, "none").exists()
    assert app.temp_files() == []
    app.db.engine.dispose()


def test_nar_streams_while_the_download_is_in_flight(tmp_path: Path) -> None:
    app = build_app(tmp_path, io=ManualRunner())
    fx = make_nar_fixture(compression="none", nar=random_nar(100_000, seed=6))
    app.up1.add(fx)
    record = app.cache.ingest("http://up1.test/", fx.hash_part, fx.narinfo_text)
    result_of(app.db.put_narinfo(record))
    raw = app.raw(fx.cache_nar_path())
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"Content-Length: %d" % len(fx.file) in head
    assert body == fx.file
    app.settle()  # the fsync, rename and database row come after the last byte
    assert app.nar_row(fx) is not None
    app.db.engine.dispose()


def test_concurrent_nar_requests_share_one_download(app: App) -> None:
    fx = make_nar_fixture(seed=21)
    app.up1.add(fx)
    # Store the narinfo without the prefetch the HTTP route would start.
    record = app.cache.ingest("http://up1.test/", fx.hash_part, fx.narinfo_text)
    result_of(app.db.put_narinfo(record))
    url = ORIGIN + fx.cache_nar_path()
    responses = [app.client.get(url), app.client.get(url)]
    bodies = [app._drive(app.client.content(app._drive(d))) for d in responses]
    assert bodies == [fx.file, fx.file]
    assert app.up1.uris().count(f"/{fx.nar_path}".encode()) == 1


def test_head_on_an_unknown_nar_is_404_and_downloads_nothing(app: App) -> None:
    fx = make_nar_fixture()
    app.up1.add(fx)
    record = app.cache.ingest("http://up1.test/", fx.hash_part, fx.narinfo_text)
    result_of(app.db.put_narinfo(record))  # known narinfo, NAR not fetched yet
    response, body = app.request(fx.cache_nar_path(), method="HEAD")
    assert response.code == 404
    assert body == b""
    assert app.up1.requests == []
    assert app.temp_files() == []


def test_head_on_a_stored_nar_gives_its_length(app: App) -> None:
    fx = make_nar_fixture()
    app.up1.add(fx)
    app.request(f"/{fx.hash_part}.narinfo")
    before = list(app.up1.requests)
    response, body = app.request(fx.cache_nar_path(), method="HEAD")
    assert (response.code, body) == (200, b"")
    head = app.raw(fx.cache_nar_path(), method="HEAD")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"\r\nContent-Length: %d\r\n" % len(fx.file) in head
    assert head.endswith(b"\r\n\r\n")
    assert app.up1.requests == before


# -- malformed requests ----------------------------------------------------------------

GOOD_HASH = "0123456789abcdfghijklmnpqrsvwxyz"
NAR_KEY = "1" * 52


@pytest.mark.parametrize(
    ("path", "status"),
    [
        (f"/{GOOD_HASH[:31]}.narinfo", 400),
        (f"/{GOOD_HASH[:31]}e.narinfo", 400),
        (f"/{GOOD_HASH.upper()}.narinfo", 400),
        (f"/{GOOD_HASH}0.narinfo", 400),
        ("/nar/x.nar.exe", 400),
        (f"/nar/{NAR_KEY}.nar.exe", 400),
        (f"/nar/{NAR_KEY[:51]}.nar.xz", 400),
        (f"/nar/{NAR_KEY}.narxz", 400),
        (f"/%2e%2e/{GOOD_HASH}.narinfo", 400),
        (f"/nar/%2e%2e/{GOOD_HASH}.narinfo", 400),
        (f"/nar/../{GOOD_HASH}.narinfo", 400),
        ("/..", 400),
        ("/../../etc/passwd", 400),
        (f"/./{GOOD_HASH}.narinfo", 400),
        (f"//{GOOD_HASH}.narinfo", 400),
        (f"/{GOOD_HASH}.narinfo?x=<script>", 400),
        ("/nar\\x.nar", 400),
        ("/" + "a" * 600 + ".narinfo", 414),
        (f"/nar/{NAR_KEY}.nar.xz/" + "b" * 1000, 414),
    ],
)
def test_malformed_paths_are_refused_before_any_upstream_is_asked(
    app: App, path: str, status: int
) -> None:
    response, _ = app.request(path)
    assert response.code == status, (path, response.code)
    assert app.up1.requests == [] and app.up2.requests == []
    assert app.temp_files() == []


def test_very_long_path_is_414(app: App) -> None:
    response, _ = app.request("/" + "a" * 600)
    assert response.code == 414


# -- fixed routes ----------------------------------------------------------------------


def test_nix_cache_info(app: App) -> None:
    response, body = app.request("/nix-cache-info")
    assert response.code == 200
    assert body == CACHE_INFO
    assert body.startswith(b"StoreDir: /nix/store\n")
    assert header(response, b"content-type") == b"text/x-nix-cache-info"


def test_pubkey(app: App) -> None:
    response, body = app.request("/pubkey")
    assert response.code == 200
    assert body.decode() == TEST_CACHE_KEY.public_key().to_text()
    assert header(response, b"content-type") == b"text/plain; charset=utf-8"


def test_index_json(app: App) -> None:
    response, body = app.request("/")
    assert response.code == 200
    assert header(response, b"content-type") == b"application/json"
    assert json.loads(body) == {
        "hostname": "cache.test",
        "publicKey": TEST_CACHE_KEY.public_key().to_text(),
    }


def test_healthz(app: App) -> None:
    response, body = app.request("/healthz")
    assert (response.code, body) == (200, b"ok\n")
    assert header(response, b"content-type") == b"text/plain; charset=utf-8"


def test_fixed_routes_never_touch_the_upstreams(app: App) -> None:
    for path in ("/", "/nix-cache-info", "/pubkey", "/healthz"):
        app.request(path)
    assert app.up1.requests == [] and app.up2.requests == []


# -- byte ranges (resume) ------------------------------------------------------------


def split_raw(raw: bytes) -> tuple[bytes, dict[bytes, bytes], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    fields = {}
    for line in lines:
        name, _, value = line.partition(b": ")
        fields[name.lower()] = value
    return status, fields, body


@pytest.fixture
def stored(app: App) -> NarFixture:
    fx = make_nar_fixture(compression="none", nar=random_nar(50_000, seed=31))
    app.up1.add(fx)
    app.request(f"/{fx.hash_part}.narinfo")
    app.settle()
    assert app.nar_row(fx) is not None
    return fx


def test_a_stored_nar_announces_byte_ranges(app: App, stored: NarFixture) -> None:
    status, fields, body = split_raw(app.raw(stored.cache_nar_path()))
    assert status.startswith(b"HTTP/1.1 200 ")
    assert fields[b"accept-ranges"] == b"bytes"
    assert body == stored.file


@pytest.mark.parametrize(
    ("spec", "first", "last"),
    [
        ("bytes=10000-", 10000, None),
        ("bytes=5-9", 5, 9),
        ("bytes=-7", -7, None),
        ("bytes=0-99999999999999", 0, None),
        ("bytes = 100 - 199", 100, 199),
    ],
)
def test_one_range_of_a_stored_nar_is_206(
    app: App, stored: NarFixture, spec: str, first: int, last: int | None
) -> None:
    size = len(stored.file)
    status, fields, body = split_raw(
        app.raw(stored.cache_nar_path(), headers=f"Range: {spec}\r\n")
    )
    want = stored.file[first : None if last is None else last + 1]
    start = first % size
    assert status.startswith(b"HTTP/1.1 206 ")
    assert body == want
    assert fields[b"content-length"] == b"%d" % len(want)
    assert fields[b"content-range"] == b"bytes %d-%d/%d" % (
        start,
        start + len(want) - 1,
        size,
    )


def test_a_range_past_the_end_is_416(app: App, stored: NarFixture) -> None:
    size = len(stored.file)
    status, fields, _ = split_raw(
        app.raw(stored.cache_nar_path(), headers=f"Range: bytes={size}-\r\n")
    )
    assert status.startswith(b"HTTP/1.1 416 ")
    assert fields[b"content-range"] == b"bytes */%d" % size


@pytest.mark.parametrize(
    "header",
    [
        "Range: bytes=0-1,5-9",  # several ranges
        "Range: bytes=9-5",  # inverted
        "Range: bytes=99999999999999999999999-",  # absurd numbers
        "Range: items=0-5",  # another unit
        "Range: bytes=--5",
        "Range: bytes=-",
        'Range: bytes=5-9\r\nIf-Range: "abc"',  # no validators sent, so none match
    ],
)
def test_other_range_headers_get_the_whole_nar(
    app: App, stored: NarFixture, header: str
) -> None:
    status, fields, body = split_raw(
        app.raw(stored.cache_nar_path(), headers=f"{header}\r\n")
    )
    assert status.startswith(b"HTTP/1.1 200 ")
    assert body == stored.file
    assert fields[b"content-length"] == b"%d" % len(stored.file)


def test_a_nar_still_downloading_offers_no_ranges(tmp_path: Path) -> None:
    app = build_app(tmp_path, io=ManualRunner())
    fx = make_nar_fixture(compression="none", nar=random_nar(100_000, seed=6))
    app.up1.add(fx)
    record = app.cache.ingest("http://up1.test/", fx.hash_part, fx.narinfo_text)
    result_of(app.db.put_narinfo(record))
    raw = app.raw(fx.cache_nar_path(), headers="Range: bytes=10-\r\n")
    status, fields, body = split_raw(raw)
    assert status.startswith(b"HTTP/1.1 200 ")
    assert b"accept-ranges" not in fields
    assert body == fx.file
    app.settle()
    app.db.engine.dispose()


# -- transparent zstd ----------------------------------------------------------------

NIX_AGENT = "User-Agent: curl/7.85.0 Nix/2.8.0\r\n"


def compressible_nar(size: int, seed: int) -> bytes:
    words = random.Random(seed).choices(
        [b"nix ", b"store ", b"path ", b"lib\n"], k=size // 4
    )
    return nar_of_file(b"".join(words))


@pytest.fixture
def zapp(tmp_path: Path) -> Iterator[App]:
    built = build_app(tmp_path, transparent_zstd=True)
    yield built
    built.db.engine.dispose()


@pytest.fixture
def packed(zapp: App) -> NarFixture:
    fx = make_nar_fixture(compression="none", nar=compressible_nar(200_000, seed=41))
    zapp.up1.add(fx)
    zapp.request(f"/{fx.hash_part}.narinfo")
    zapp.settle()
    return fx


def test_a_compressible_uncompressed_nar_is_stored_zstd_compressed(
    zapp: App, packed: NarFixture
) -> None:
    assert zapp.nar_row(packed) is None  # no row in the "none" form
    row = zapp.db.call_thd(get_nar_file_thd, packed.nar_key, ZSTD_NONE)
    assert row is not None and row.nar_size == len(packed.file)
    stored = zapp.store.nar_path(packed.nar_key, ZSTD_NONE)
    assert stored.name == f"{packed.nar_key}.nar.transparent.zst"
    assert row.file_size == stored.stat().st_size < len(packed.file) // 4
    assert not zapp.store.nar_path(packed.nar_key, "none").exists()
    assert zstandard.ZstdDecompressor().decompress(stored.read_bytes()) == packed.file
    assert zapp.temp_files() == []
    # The narinfo is the one the upstream signed: nothing about it changes.
    _, text = zapp.request(f"/{packed.hash_part}.narinfo")
    served = narinfo_mod.parse(text)
    assert (served.compression, served.url) == ("none", f"nar/{packed.nar_key}.nar")


@pytest.mark.parametrize(
    "headers",
    [
        "Accept-Encoding: zstd\r\n",
        "Accept-Encoding: gzip, br, ZSTD;q=0.5\r\n",
        "Accept-Encoding: *\r\n",
        NIX_AGENT,  # Nix 2.8 sends no Accept-Encoding and decodes zstd itself
    ],
)
def test_a_client_that_takes_zstd_gets_the_stored_bytes(
    zapp: App, packed: NarFixture, headers: str
) -> None:
    stored = zapp.store.nar_path(packed.nar_key, ZSTD_NONE).read_bytes()
    raw = zapp.raw(packed.cache_nar_path(), headers=headers)
    status, fields, body = split_raw(raw)
    assert status.startswith(b"HTTP/1.1 200 ")
    assert fields[b"content-encoding"] == b"zstd"
    assert fields[b"content-length"] == b"%d" % len(stored)
    assert fields[b"vary"] == b"Accept-Encoding, User-Agent"
    assert b"accept-ranges" not in fields  # Nix would not resume it anyway
    assert body == stored
    assert zstandard.ZstdDecompressor().decompress(body) == packed.file
    head = split_raw(zapp.raw(packed.cache_nar_path(), "HEAD", headers))[1]
    assert {k: head.get(k) for k in fields} == {**fields, b"date": head[b"date"]}


@pytest.mark.parametrize(
    "headers",
    [
        "",
        "User-Agent: curl/8.5.0\r\n",
        "Accept-Encoding: gzip, deflate\r\n",
        "Accept-Encoding: zstd;q=0, *\r\n",
        "Accept-Encoding: identity\r\n" + NIX_AGENT,
    ],
)
def test_any_other_client_gets_the_nar_decoded(
    zapp: App, packed: NarFixture, headers: str
) -> None:
    status, fields, body = split_raw(zapp.raw(packed.cache_nar_path(), headers=headers))
    assert status.startswith(b"HTTP/1.1 200 ")
    assert b"content-encoding" not in fields
    assert fields[b"content-length"] == b"%d" % len(packed.file)
    assert fields[b"accept-ranges"] == b"bytes"
    assert fields[b"vary"] == b"Accept-Encoding, User-Agent"
    assert body == packed.file
    head = split_raw(zapp.raw(packed.cache_nar_path(), "HEAD", headers))[1]
    assert {k: head.get(k) for k in fields} == {**fields, b"date": head[b"date"]}


def test_a_decoded_nar_honours_one_range(zapp: App, packed: NarFixture) -> None:
    size = len(packed.file)
    for spec, first, last in [
        ("bytes=150000-", 150000, size - 1),
        ("bytes=3-9", 3, 9),
        ("bytes=-5", size - 5, size - 1),
    ]:
        status, fields, body = split_raw(
            zapp.raw(packed.cache_nar_path(), headers=f"Range: {spec}\r\n")
        )
        assert status.startswith(b"HTTP/1.1 206 "), spec
        assert body == packed.file[first : last + 1]
        assert fields[b"content-range"] == b"bytes %d-%d/%d" % (first, last, size)
        assert fields[b"content-length"] == b"%d" % (last - first + 1)
    status, fields, _ = split_raw(
        zapp.raw(packed.cache_nar_path(), headers=f"Range: bytes={size}-\r\n")
    )
    assert status.startswith(b"HTTP/1.1 416 ")
    assert fields[b"content-range"] == b"bytes */%d" % size


def test_compressed_nars_never_get_a_content_encoding(zapp: App) -> None:
    for compression in ("xz", "zstd"):
        fx = make_nar_fixture(
            name=f"hello-{compression}",
            compression=compression,
            nar=compressible_nar(50_000, seed=42),
        )
        zapp.up1.add(fx)
        zapp.request(f"/{fx.hash_part}.narinfo")
        zapp.settle()
        for headers in ("Accept-Encoding: zstd\r\n", NIX_AGENT):
            status, fields, body = split_raw(
                zapp.raw(fx.cache_nar_path(), headers=headers)
            )
            assert status.startswith(b"HTTP/1.1 200 ")
            assert b"content-encoding" not in fields and b"vary" not in fields
            assert body == fx.file


def test_an_incompressible_nar_is_kept_as_it_came(zapp: App) -> None:
    fx = make_nar_fixture(compression="none", nar=random_nar(100_000, seed=43))
    zapp.up1.add(fx)
    zapp.request(f"/{fx.hash_part}.narinfo")
    zapp.settle()
    assert zapp.nar_row(fx) is not None
    assert zapp.db.call_thd(get_nar_file_thd, fx.nar_key, ZSTD_NONE) is None
    assert zapp.temp_files() == []
    _, fields, body = split_raw(zapp.raw(fx.cache_nar_path(), headers=NIX_AGENT))
    assert b"content-encoding" not in fields and body == fx.file


def test_transparent_zstd_off_keeps_nars_as_they_came(app: App) -> None:
    fx = make_nar_fixture(compression="none", nar=compressible_nar(100_000, seed=44))
    app.up1.add(fx)
    app.request(f"/{fx.hash_part}.narinfo")
    app.settle()
    assert app.nar_row(fx) is not None
    _, fields, body = split_raw(app.raw(fx.cache_nar_path(), headers=NIX_AGENT))
    assert b"content-encoding" not in fields and body == fx.file


def test_a_nar_still_arriving_is_sent_as_it_comes(tmp_path: Path) -> None:
    app = build_app(tmp_path, io=ManualRunner(), transparent_zstd=True)
    fx = make_nar_fixture(compression="none", nar=compressible_nar(100_000, seed=45))
    app.up1.add(fx)
    record = app.cache.ingest("http://up1.test/", fx.hash_part, fx.narinfo_text)
    result_of(app.db.put_narinfo(record))
    status, fields, body = split_raw(app.raw(fx.cache_nar_path(), headers=NIX_AGENT))
    assert status.startswith(b"HTTP/1.1 200 ")
    assert b"content-encoding" not in fields
    assert body == fx.file
    app.settle()
    # Committed compressed all the same; later clients get it so.
    assert app.db.call_thd(get_nar_file_thd, fx.nar_key, ZSTD_NONE) is not None
    _, fields, body = split_raw(app.raw(fx.cache_nar_path(), headers=NIX_AGENT))
    assert fields[b"content-encoding"] == b"zstd"
    assert zstandard.ZstdDecompressor().decompress(body) == fx.file
    app.db.engine.dispose()


def test_a_damaged_stored_object_is_never_sent_as_a_whole_nar(
    zapp: App, packed: NarFixture
) -> None:
    path = zapp.store.nar_path(packed.nar_key, ZSTD_NONE)
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2 :] = bytes(len(damaged) - len(damaged) // 2)
    path.write_bytes(bytes(damaged))
    # The first read already fails to decode, before the headers went out:
    # the connection drops and the client sees an error, not a short NAR.
    assert zapp.raw(packed.cache_nar_path()) == b""
    # As stored, to a client that takes zstd: Nix checks the NarHash.
    status, _, body = split_raw(zapp.raw(packed.cache_nar_path(), headers=NIX_AGENT))
    assert status.startswith(b"HTTP/1.1 200 ") and body == bytes(damaged)


def test_warm_requests_are_answered_at_once(app: App) -> None:
    fx = make_nar_fixture(seed=51)
    app.up1.add(fx)
    app.request(f"/{fx.hash_part}.narinfo")
    app.settle()
    _, narinfo = app.request(f"/{fx.hash_part}.narinfo")  # now remembered
    app.request(fx.cache_nar_path())  # its row is known now

    async def unused(*args: object) -> bytes:
        raise AssertionError("the waiting path was taken")

    app.cache.narinfo_text = unused  # type: ignore[method-assign]
    app.cache.nar = unused  # type: ignore[method-assign,assignment]
    for path, body in [
        (f"/{fx.hash_part}.narinfo", narinfo),
        (fx.cache_nar_path(), fx.file),
    ]:
        protocol = Site(app.resource, reactor=app.clock).buildProtocol(
            IPv4Address("TCP", "127.0.0.1", 40000)
        )
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(
            f"GET {path} HTTP/1.1\r\nHost: cache.test\r\n\r\n".encode()
        )
        # No clock step, no pool run: the whole answer is written already.
        status, fields, sent = split_raw(transport.value())
        assert status.startswith(b"HTTP/1.1 200 "), path
        assert sent == body
        assert fields[b"content-length"] == b"%d" % len(body)


def test_a_refetched_nar_packed_to_another_size_is_recorded_so(
    zapp: App, packed: NarFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = zapp.store.nar_path(packed.nar_key, ZSTD_NONE)
    path.write_bytes(path.read_bytes()[:100])  # damaged
    # And the next pack comes out another size (a zstd upgrade, a level).
    monkeypatch.setattr(transparent, "LEVEL", 19)
    before = len(zapp.content_requests())
    for _ in range(4):
        _, body = zapp.request(packed.cache_nar_path())
        assert body == packed.file
        zapp.settle()
    # Fetched again once, then served from the replaced object.
    assert len(zapp.content_requests()) == before + 1
    row = zapp.db.call_thd(get_nar_file_thd, packed.nar_key, ZSTD_NONE)
    assert row.file_size == path.stat().st_size
