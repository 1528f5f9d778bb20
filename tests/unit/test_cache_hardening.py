"""ncps.cache under pressure: download slots, prefetches, the negative cache,
upstream backoff, the 404/503 decision, NAR failover and download error paths.

The cache runs over real SQLite and a real local store in a temp dir, with
fake upstreams behind a StubTreq; every pool is a SyncRunner and time is a
Clock.  NAR requests the test wants to hold open are canned with
``hold=True`` and answered with ``FakeUpstream.answer``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.logger import formatEvent
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse

from ncps.cache import Cache, NarBody
from ncps.db.queries import Database, NarInfoRecord, get_nar_file_thd
from ncps.errors import (
    IntegrityError,
    NotFound,
    Overloaded,
    StorageError,
    UpstreamError,
    UpstreamsUnavailable,
)
from ncps.nars import CLIENT_WAIT
from ncps.signing import TrustedKeys
from ncps.storage.local import LocalStore
from ncps.testing import (
    TEST_CACHE_KEY,
    TEST_UPSTREAM_KEY,
    WRONG_UPSTREAM_KEY,
    FakeUpstream,
    NarFixture,
    SyncRunner,
    captured_log,
    fake_upstream_pool,
    make_nar_fixture,
    random_nar,
    result_of,
    sqlite_db_and_local_store,
    store_path,
)
from ncps.upstream import UpstreamPool

MISSING = store_path("missing-1.0", b"nobody has it").split("/")[3][:32]


@attrs.define
class Rig:
    clock: Clock
    db: Database
    store: LocalStore
    pool: UpstreamPool
    stub: StubTreq
    cache: Cache
    up1: FakeUpstream
    up2: FakeUpstream
    aborted: list[IResponse] = attrs.Factory(list)

    def settle(self, rounds: int = 30) -> None:
        """Let every pending in-memory exchange and due call run."""
        for _ in range(rounds):
            self.clock.advance(0)
            self.stub.flush()

    def narinfo(self, hash_part: str) -> Deferred[NarInfoRecord]:
        d = Deferred.fromCoroutine(self.cache.narinfo(hash_part))
        self.settle()
        return d

    def nar(self, fx: NarFixture) -> Deferred[NarBody]:
        coro = self.cache.nar(fx.nar_key, fx.narinfo.compression)
        d = Deferred.fromCoroutine(coro)
        self.settle()
        return d

    def store_narinfo(self, fx: NarFixture, host: str = "up1.test") -> None:
        """Record ``fx``'s narinfo as if ``host`` had served it (no prefetch)."""
        record = self.cache.ingest(f"http://{host}/", fx.hash_part, fx.narinfo_text)
        result_of(self.db.put_narinfo(record))

    def committed(self, fx: NarFixture) -> bytes | None:
        row = self.db.call_thd(get_nar_file_thd, fx.nar_key, fx.narinfo.compression)
        path = self.store.nar_path(fx.nar_key, fx.narinfo.compression)
        if row is None:
            assert not path.exists()
            return None
        return path.read_bytes()

    def temp_files(self) -> list[Path]:
        return list(self.store.temp_dir.iterdir())

    def narinfo_asks(self, up: FakeUpstream, hash_part: str) -> int:
        return up.uris().count(f"/{hash_part}.narinfo".encode())


Build = Callable[..., Rig]


@pytest.fixture
def build(tmp_path: Path) -> Iterator[Build]:
    rigs: list[Rig] = []

    def make(
        max_downloads: int = 32,
        negative_ttl: float = 10.0,
        header_timeout: float = 3.0,
    ) -> Rig:
        clock = Clock()
        runner = SyncRunner()
        db, store = sqlite_db_and_local_store(tmp_path / f"rig{len(rigs)}", runner)
        up1, up2 = FakeUpstream(priority=10), FakeUpstream(priority=20)
        pool, stub = fake_upstream_pool(
            clock, {"up1.test": up1, "up2.test": up2}, header_timeout=header_timeout
        )
        cache = Cache(
            clock=clock,
            db=db,
            store=store,
            upstreams=pool,
            trusted=TrustedKeys([TEST_UPSTREAM_KEY.public_key()]),
            signer=TEST_CACHE_KEY,
            io=runner,  # type: ignore[arg-type]
            max_downloads=max_downloads,
            negative_ttl=negative_ttl,
        )
        rig = Rig(clock, db, store, pool, stub, cache, up1, up2)
        real_abort = pool.abort

        def counting_abort(response: IResponse) -> None:
            rig.aborted.append(response)
            real_abort(response)

        pool.abort = counting_abort  # type: ignore[method-assign]
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.db.engine.dispose()


def logged(events: list[dict[str, Any]]) -> list[str]:
    return [formatEvent(e) for e in events]


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    with captured_log("debug") as seen:
        yield seen


def failure_of(d: Deferred[Any]) -> BaseException:
    """The exception a fired Deferred failed with (the failure is consumed)."""
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    assert outcome, f"{d!r} has not fired"
    assert isinstance(outcome[0], Failure), f"{d!r} succeeded with {outcome[0]!r}"
    return outcome[0].value


def release(body: NarBody) -> None:
    """Close the descriptor a client would have sent the NAR from."""
    if body.fd is not None:
        os.close(body.fd)


def fixtures(count: int) -> list[NarFixture]:
    return [make_nar_fixture(name=f"p{i}-1.0", seed=100 + i) for i in range(count)]


def nar_uri(fx: NarFixture) -> bytes:
    return f"/{fx.nar_path}".encode()


def serve(up: FakeUpstream, fx: NarFixture, *, hold: bool = True) -> None:
    """``up`` has ``fx``; its NAR waits for ``up.answer`` if ``hold``."""
    up.add(fx)
    up.set(fx.nar_path, fx.file, hold=hold)


# -- the download limit ----------------------------------------------------------------


def test_downloads_never_exceed_the_limit(build: Build) -> None:
    rig = build(max_downloads=2)
    fxs = fixtures(6)
    for fx in fxs:
        serve(rig.up1, fx)
        rig.store_narinfo(fx)
    pending = [rig.nar(fx) for fx in fxs]
    assert rig.up1.open == 2 and len(rig.up1.held) == 2
    assert rig.cache.nars.slots.running == 2 and rig.cache.nars.slots.waiting == 4
    while rig.up1.held:
        rig.up1.answer()
        rig.settle()
        assert rig.up1.open <= 2 and rig.cache.nars.slots.running <= 2
    bodies = [result_of(d) for d in pending]
    for body in bodies:
        release(body)
    assert [rig.committed(fx) for fx in fxs] == [fx.file for fx in fxs]
    assert rig.up1.peak_open == 2 and rig.cache.nars.slots.peak == 2
    assert rig.cache.nars.slots.running == 0 and rig.cache.nars.slots.waiting == 0
    assert rig.temp_files() == []
    assert rig.up1.lost == []


def test_client_nars_go_ahead_of_prefetches_and_narinfos_never_wait(
    build: Build,
) -> None:
    rig = build(max_downloads=2)
    a, b, pre, c = fxs = fixtures(4)
    for fx in fxs:
        serve(rig.up1, fx)
    for fx in (a, b, c):
        rig.store_narinfo(fx)
    da, db = rig.nar(a), rig.nar(b)
    assert rig.up1.held_uris() == [nar_uri(a), nar_uri(b)]
    # Every slot is taken, yet the narinfo is answered at once; its
    # prefetch waits.
    record = result_of(rig.narinfo(pre.hash_part))
    assert record.narinfo.store_path == pre.narinfo.store_path
    dc = rig.nar(c)
    rig.up1.answer(nar_uri(a))
    rig.settle()
    assert rig.up1.held_uris() == [nar_uri(b), nar_uri(c)]  # the client first
    rig.up1.answer(nar_uri(b))
    rig.settle()
    assert rig.up1.held_uris() == [nar_uri(c), nar_uri(pre)]
    rig.up1.answer()
    rig.up1.answer()
    rig.settle()
    for d in (da, db, dc):
        release(result_of(d))
    assert rig.committed(pre) == pre.file
    nar_requests = [u for u in rig.up1.uris() if u.startswith(b"/nar/")]
    assert nar_requests == [nar_uri(fx) for fx in (a, b, c, pre)]


def test_a_queued_prefetch_a_client_asks_for_is_promoted(build: Build) -> None:
    rig = build(max_downloads=2)  # prefetches get at most 1 of the 2 slots
    p1, c1, p2 = fxs = fixtures(3)
    for fx in fxs:
        serve(rig.up1, fx)
    rig.store_narinfo(c1)
    result_of(rig.narinfo(p1.hash_part))  # its prefetch takes the prefetch slot
    dc1 = rig.nar(c1)
    result_of(rig.narinfo(p2.hash_part))  # its prefetch waits
    assert rig.up1.held_uris() == [nar_uri(p1), nar_uri(c1)]
    dp2 = rig.nar(p2)  # a client wants it now
    assert not dp2.called
    rig.up1.answer(nar_uri(c1))
    rig.settle()
    # Started although the one prefetch slot is still p1's: it is a
    # client's download now.
    assert rig.up1.held_uris() == [nar_uri(p1), nar_uri(p2)]
    rig.up1.answer(nar_uri(p2))
    rig.settle()
    release(result_of(dc1))
    release(result_of(dp2))
    assert rig.committed(p2) == p2.file
    rig.up1.answer()
    rig.settle()
    assert rig.up1.uris().count(nar_uri(p2)) == 1
    assert rig.cache.nars.slots.running == 0


def test_a_client_waiting_too_long_for_a_slot_is_overloaded(build: Build) -> None:
    rig = build(max_downloads=1, header_timeout=1000.0)
    a, b = fixtures(2)
    for fx in (a, b):
        serve(rig.up1, fx)
        rig.store_narinfo(fx)
    da = rig.nar(a)
    db = rig.nar(b)
    rig.clock.advance(CLIENT_WAIT - 1)
    rig.settle()
    assert not db.called
    rig.clock.advance(1)
    assert isinstance(failure_of(db), Overloaded)
    assert rig.cache.nars.slots.waiting == 0
    rig.up1.answer()
    rig.settle()
    release(result_of(da))
    assert nar_uri(b) not in rig.up1.uris()  # nobody wanted it any more
    assert rig.cache.nars.slots.running == 0
    # The next ask gets a slot at once.
    db = rig.nar(b)
    rig.up1.answer()
    rig.settle()
    release(result_of(db))
    assert rig.committed(b) == b.file


def test_a_cancelled_waiter_frees_its_place_and_downloads_nothing(
    build: Build,
) -> None:
    rig = build(max_downloads=1)
    a, b, c = fxs = fixtures(3)
    for fx in fxs:
        serve(rig.up1, fx)
        rig.store_narinfo(fx)
    da, db, dc = rig.nar(a), rig.nar(b), rig.nar(c)
    assert rig.cache.nars.slots.waiting == 2
    db.cancel()  # the client went away
    assert isinstance(failure_of(db), CancelledError)
    assert rig.cache.nars.slots.waiting == 1
    rig.up1.answer()
    rig.settle()
    assert rig.up1.held_uris() == [nar_uri(c)]
    rig.up1.answer()
    rig.settle()
    release(result_of(da))
    release(result_of(dc))
    assert nar_uri(b) not in rig.up1.uris()
    assert rig.committed(b) is None
    assert rig.cache.nars.slots.running == rig.cache.nars.slots.waiting == 0


def test_prefetches_beyond_the_bound_are_dropped_without_error(build: Build) -> None:
    rig = build(max_downloads=1)
    rig.cache.nars.slots.prefetch_queue = 2
    busy, *fxs = fixtures(6)
    serve(rig.up1, busy)
    rig.store_narinfo(busy)
    d_busy = rig.nar(busy)
    for fx in fxs:
        serve(rig.up1, fx)
    records = [result_of(rig.narinfo(fx.hash_part)) for fx in fxs]
    assert [r.narinfo.store_path for r in records] == [
        fx.narinfo.store_path for fx in fxs
    ]
    assert rig.cache.nars.slots.waiting == 2  # two queued, three dropped
    while rig.up1.held:
        rig.up1.answer()
        rig.settle()
    release(result_of(d_busy))
    fetched = [fx for fx in fxs if rig.committed(fx) is not None]
    assert fetched == fxs[:2]
    # A dropped prefetch is fetched when a client asks for it.
    d = rig.nar(fxs[4])
    rig.up1.answer()
    rig.settle()
    release(result_of(d))
    assert rig.committed(fxs[4]) == fxs[4].file


# -- the negative cache ----------------------------------------------------------------


def test_a_missing_narinfo_asks_the_upstreams_once_per_ttl(build: Build) -> None:
    rig = build(negative_ttl=10.0)
    concurrent = [
        Deferred.fromCoroutine(rig.cache.narinfo(MISSING)) for _ in range(1000)
    ]
    rig.settle()
    assert all(isinstance(failure_of(d), NotFound) for d in concurrent)
    for _ in range(1000):
        assert isinstance(failure_of(rig.narinfo(MISSING)), NotFound)
    assert rig.narinfo_asks(rig.up1, MISSING) == rig.narinfo_asks(rig.up2, MISSING) == 1
    rig.clock.advance(9.9)
    assert isinstance(failure_of(rig.narinfo(MISSING)), NotFound)
    assert rig.narinfo_asks(rig.up1, MISSING) == 1
    rig.clock.advance(0.1)
    assert isinstance(failure_of(rig.narinfo(MISSING)), NotFound)
    assert rig.narinfo_asks(rig.up1, MISSING) == rig.narinfo_asks(rig.up2, MISSING) == 2


def test_a_narinfo_an_upstream_failed_on_is_unavailable_not_missing(
    build: Build,
) -> None:
    rig = build()
    rig.up1.set(f"{MISSING}.narinfo", b"boom", status=500)
    for asks in (1, 2, 3):
        # up1 might have it: a 503 that Nix retries, never a 404 it keeps.
        assert isinstance(failure_of(rig.narinfo(MISSING)), UpstreamsUnavailable)
        assert rig.narinfo_asks(rig.up2, MISSING) == asks
    # up1 failed once and is skipped during its backoff window.
    assert rig.narinfo_asks(rig.up1, MISSING) == 1
    rig.clock.advance(1)
    rig.up1.responses.pop(f"{MISSING}.narinfo")  # now a clean 404 from both
    assert isinstance(failure_of(rig.narinfo(MISSING)), NotFound)
    assert isinstance(failure_of(rig.narinfo(MISSING)), NotFound)
    assert rig.narinfo_asks(rig.up1, MISSING) == 2
    assert rig.narinfo_asks(rig.up2, MISSING) == 4


def test_an_upstream_down_for_minutes_counts_as_absent(build: Build) -> None:
    rig = build()
    rig.up1.set(f"{MISSING}.narinfo", b"", status=502)
    up1 = rig.pool.upstreams[0]
    answers = []
    # Keep up1 failing, one probe per window, until its window is the cap.
    while not up1.backoff.down:
        answers.append(failure_of(rig.narinfo(MISSING)))
        rig.clock.advance(61)
    assert all(isinstance(a, UpstreamsUnavailable) for a in answers[:-1])
    assert up1.backoff.failures >= 7
    # Down: a miss is a 404 (as Nix disables a failing substituter), but not
    # remembered, so its return is seen at once.
    assert isinstance(failure_of(rig.narinfo(MISSING)), NotFound)
    asked = rig.narinfo_asks(rig.up2, MISSING)
    assert isinstance(failure_of(rig.narinfo(MISSING)), NotFound)
    assert rig.narinfo_asks(rig.up2, MISSING) == asked + 1
    # It comes back: one success ends the outage.
    rig.clock.advance(61)
    rig.up1.responses.pop(f"{MISSING}.narinfo")
    assert isinstance(failure_of(rig.narinfo(MISSING)), NotFound)
    assert not up1.backoff.active


# -- backoff ---------------------------------------------------------------------------


def test_a_hanging_upstream_costs_one_timeout_per_backoff_window(
    build: Build, events: list[dict[str, Any]]
) -> None:
    rig = build(header_timeout=3.0)
    fxs = fixtures(5)
    for fx in fxs:
        rig.up2.add(fx)
        rig.up1.set(f"{fx.hash_part}.narinfo", stall=True)
    first = rig.narinfo(fxs[0].hash_part)
    assert not first.called
    rig.clock.advance(3)  # up1's timeout
    rig.settle()
    assert result_of(first).upstream_url.startswith("http://up2.test/")
    # Within the window: up1 is not asked, and nothing waits.
    second = rig.narinfo(fxs[1].hash_part)
    assert result_of(second).upstream_url.startswith("http://up2.test/")
    assert rig.narinfo_asks(rig.up1, fxs[1].hash_part) == 0
    # The window is over: one request probes up1, the others skip it.
    rig.clock.advance(1)
    probe = rig.narinfo(fxs[2].hash_part)
    other = rig.narinfo(fxs[3].hash_part)
    assert not probe.called
    assert result_of(other).upstream_url.startswith("http://up2.test/")
    assert rig.narinfo_asks(rig.up1, fxs[2].hash_part) == 1
    assert rig.narinfo_asks(rig.up1, fxs[3].hash_part) == 0
    rig.clock.advance(3)
    rig.settle()
    assert result_of(probe).upstream_url.startswith("http://up2.test/")
    # The probe failed: the next window is longer (2 s).
    rig.clock.advance(1.5)
    rig.up1.add(fxs[4])
    early = rig.narinfo(fxs[4].hash_part)
    assert result_of(early).upstream_url.startswith("http://up2.test/")
    assert rig.narinfo_asks(rig.up1, fxs[4].hash_part) == 0
    assert rig.up1.uris().count(b"/nix-cache-info") == 1
    text = logged(events)
    assert sum("skipping it" in t for t in text) == 1
    assert not any("backing off" in t for t in text)  # skips are silent


def test_an_upstream_backing_off_since_the_request_began_is_skipped_silently(
    build: Build, events: list[dict[str, Any]]
) -> None:
    rig = build(header_timeout=0.5)
    x, y = fixtures(2)
    rig.up1.set(f"{x.hash_part}.narinfo", stall=True)
    rig.up2.add(x)
    rig.up2.set(f"{y.hash_part}.narinfo", b"", status=500)
    dx = rig.narinfo(x.hash_part)  # waits for up1; up2 still looks fine
    dy = rig.narinfo(y.hash_part)  # up1: 404; up2: 500, so up2 backs off
    assert isinstance(failure_of(dy), UpstreamsUnavailable)
    rig.clock.advance(0.5)  # up1 times out for x; up2 is backing off now
    rig.settle()
    assert isinstance(failure_of(dx), UpstreamsUnavailable)
    assert rig.narinfo_asks(rig.up2, x.hash_part) == 0
    assert not any("backing off" in t for t in logged(events))


def test_after_the_window_a_successful_probe_ends_the_backoff(build: Build) -> None:
    rig = build()
    a, b, c = fixtures(3)
    rig.up1.set(f"{a.hash_part}.narinfo", b"", status=503)
    rig.up2.add(a)
    assert result_of(rig.narinfo(a.hash_part)).upstream_url.startswith(
        "http://up2.test/"
    )
    up1 = rig.pool.upstreams[0]
    assert rig.pool.backing_off(up1)
    rig.up1.add(b)
    rig.up2.add(b)
    assert result_of(rig.narinfo(b.hash_part)).upstream_url.startswith(
        "http://up2.test/"
    )
    rig.clock.advance(1)
    rig.up1.add(c)
    assert result_of(rig.narinfo(c.hash_part)).upstream_url.startswith(
        "http://up1.test/"
    )
    assert not up1.backoff.active


# -- 404 or 503 ------------------------------------------------------------------------


def test_no_upstream_answering_is_unavailable_never_404(build: Build) -> None:
    rig = build(header_timeout=3.0)
    rig.up1.set(f"{MISSING}.narinfo", stall=True)
    rig.up2.set(f"{MISSING}.narinfo", b"", status=500)
    d = rig.narinfo(MISSING)
    assert not d.called
    rig.clock.advance(3)  # up1 times out, then up2 fails
    rig.settle()
    assert isinstance(failure_of(d), UpstreamsUnavailable)
    # Both are backing off now: answered at once, nobody asked.
    asked = len(rig.up1.requests) + len(rig.up2.requests)
    assert isinstance(failure_of(rig.narinfo(MISSING)), UpstreamsUnavailable)
    assert len(rig.up1.requests) + len(rig.up2.requests) == asked
    # Not remembered as missing: once they answer, they are asked.
    rig.clock.advance(1)
    rig.up1.responses.pop(f"{MISSING}.narinfo")
    rig.up2.responses.pop(f"{MISSING}.narinfo")
    assert isinstance(failure_of(rig.narinfo(MISSING)), NotFound)
    assert rig.narinfo_asks(rig.up2, MISSING) == 2


def test_a_rejected_narinfo_is_404_but_not_remembered(build: Build) -> None:
    # As Nix skips a narinfo without a trusted signature: not substitutable
    # here, so the client builds it; a 503 would fail its build every time.
    rig = build()
    bad = make_nar_fixture(key=WRONG_UPSTREAM_KEY)
    rig.up1.add(bad)
    rig.up2.set(f"{bad.hash_part}.narinfo", b"", status=404)
    assert isinstance(failure_of(rig.narinfo(bad.hash_part)), NotFound)
    assert isinstance(failure_of(rig.narinfo(bad.hash_part)), NotFound)
    assert rig.narinfo_asks(rig.up1, bad.hash_part) == 2
    # With the other upstream failing, it is the failure that decides.
    rig.up2.set(f"{bad.hash_part}.narinfo", b"", status=502)
    assert isinstance(failure_of(rig.narinfo(bad.hash_part)), UpstreamsUnavailable)


def test_one_404_and_one_failure_is_503_and_not_remembered(build: Build) -> None:
    rig = build()
    rig.up1.set(f"{MISSING}.narinfo", b"", status=404)
    rig.up2.set(f"{MISSING}.narinfo", b"", status=500)
    assert isinstance(failure_of(rig.narinfo(MISSING)), UpstreamsUnavailable)
    # up2 backs off; still not a 404 while it may have the path.
    assert isinstance(failure_of(rig.narinfo(MISSING)), UpstreamsUnavailable)
    assert rig.narinfo_asks(rig.up1, MISSING) == 2


# -- NAR failover ----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["404", "500", "corrupt"])
def test_a_failing_nar_is_fetched_from_the_next_upstream(
    build: Build, how: str
) -> None:
    rig = build()
    fx = make_nar_fixture(compression="none", nar=random_nar(100_000, seed=5))
    rig.up1.add(fx)
    rig.up2.add(fx)
    if how == "404":
        rig.up1.responses.pop(fx.nar_path)
    elif how == "500":
        rig.up1.set(fx.nar_path, b"oops", status=500)
    else:
        corrupt = bytearray(fx.file)
        corrupt[len(corrupt) // 2] ^= 0xFF
        rig.up1.set(fx.nar_path, bytes(corrupt))
    rig.store_narinfo(fx, "up1.test")
    d = rig.nar(fx)
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    if isinstance(outcome[0], NarBody):
        release(outcome[0])
    else:
        # Corrupt bytes found after the body started: that client is
        # aborted, but the cache is filled from up2 all the same.
        assert how == "corrupt" and outcome[0].check(IntegrityError)
    assert rig.committed(fx) == fx.file
    assert rig.up1.uris().count(nar_uri(fx)) == 1
    assert rig.up2.uris().count(nar_uri(fx)) == 1
    assert rig.temp_files() == []
    release(result_of(rig.nar(fx)))  # and from the store from now on
    assert rig.up2.uris().count(nar_uri(fx)) == 1


def test_no_failover_to_an_upstream_with_another_nar_hash(build: Build) -> None:
    rig = build()
    fx = make_nar_fixture(seed=41)
    other = make_nar_fixture(
        nar=random_nar(4096, seed=42), store_path=fx.narinfo.store_path
    )
    assert other.narinfo.nar_hash != fx.narinfo.nar_hash
    rig.up1.add(fx)
    rig.up1.responses.pop(fx.nar_path)
    rig.up2.add(other)
    rig.store_narinfo(fx, "up1.test")
    assert isinstance(failure_of(rig.nar(fx)), NotFound)
    assert rig.narinfo_asks(rig.up2, fx.hash_part) == 1  # it was considered
    assert nar_uri(other) not in rig.up2.uris()
    assert rig.committed(fx) is None


# -- error paths of a download ---------------------------------------------------------


def _two_in_line(
    rig: Rig,
) -> tuple[NarFixture, NarFixture, Deferred[NarBody], Deferred[NarBody]]:
    """Two NAR downloads, the second waiting for the one slot."""
    a = make_nar_fixture(name="a-1.0", compression="none", nar=random_nar(100_000, 7))
    b = make_nar_fixture(name="b-1.0", seed=8)
    for fx in (a, b):
        serve(rig.up1, fx)
        rig.store_narinfo(fx)
    da, db = rig.nar(a), rig.nar(b)
    assert rig.up1.held_uris() == [nar_uri(a)]
    return a, b, da, db


def _next_one_runs(rig: Rig, b: NarFixture, db: Deferred[NarBody]) -> None:
    """The slot came back: the waiting download starts and completes."""
    assert rig.up1.held_uris() == [nar_uri(b)]
    rig.up1.answer()
    rig.settle()
    release(result_of(db))
    assert rig.committed(b) == b.file
    assert rig.cache.nars.slots.running == 0


def _failed(d: Deferred[NarBody]) -> BaseException:
    """What the client of ``d`` saw fail: the request, or the download it tails."""
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    assert outcome
    if isinstance(outcome[0], Failure):
        return outcome[0].value
    body: NarBody = outcome[0]
    release(body)
    assert body.download is not None and body.download.failure is not None
    return body.download.failure.value


def test_a_connection_dropped_mid_body(build: Build) -> None:
    rig = build(max_downloads=1)
    a, b, da, db = _two_in_line(rig)
    request = rig.up1.answer(nar_uri(a), upto=30_000)
    rig.settle()
    body = result_of(da)  # the body was flowing
    assert body.download is not None and rig.temp_files() != []
    rig.up1.cut(request)
    rig.settle()
    release(body)
    assert body.download.failure is not None
    assert body.download.failure.check(UpstreamError)
    assert rig.temp_files() == []
    assert rig.committed(a) is None
    assert rig.pool.backing_off(rig.pool.upstreams[0])  # recorded as a failure
    _next_one_runs(rig, b, db)


def test_a_verification_failure_mid_body_closes_the_connection(build: Build) -> None:
    rig = build(max_downloads=1)
    a, b, da, db = _two_in_line(rig)
    # More bytes than the narinfo's FileSize: refused as they arrive.
    rig.up1.set(a.nar_path, a.file + b"\0" * 50_000, hold=True)
    rig.up1.answer(nar_uri(a), upto=len(a.file) + 10_000)
    rig.settle()
    assert isinstance(_failed(da), IntegrityError)
    assert rig.up1.lost == [nar_uri(a)]  # we closed it: no need to read the rest
    assert rig.temp_files() == []
    assert not rig.pool.backing_off(rig.pool.upstreams[0])  # it did answer
    _next_one_runs(rig, b, db)


def test_a_failing_store_commit(build: Build) -> None:
    rig = build(max_downloads=1)
    a, b, da, db = _two_in_line(rig)
    real_commit = rig.store.commit_thd

    def broken(temp: Path, nar_key: str, compression: str) -> None:
        if nar_key == a.nar_key:
            raise OSError(28, "No space left on device")
        real_commit(temp, nar_key, compression)

    rig.store.commit_thd = broken  # type: ignore[method-assign]
    rig.up1.answer(nar_uri(a))
    rig.settle()
    assert isinstance(_failed(da), StorageError | OSError)
    assert rig.committed(a) is None
    assert rig.temp_files() == []
    assert rig.narinfo_asks(rig.up2, a.hash_part) == 0  # our fault: no failover
    _next_one_runs(rig, b, db)


def test_a_failing_temp_file_releases_the_response(build: Build) -> None:
    rig = build(max_downloads=1)
    a, b, da, db = _two_in_line(rig)
    real_new = rig.store.new_temp_file_thd

    def broken(nar_key: str) -> tuple[int, Path]:
        if nar_key == a.nar_key:
            raise OSError(28, "No space left on device")
        return real_new(nar_key)

    rig.store.new_temp_file_thd = broken  # type: ignore[method-assign]
    rig.up1.answer(nar_uri(a))
    rig.settle()
    assert isinstance(failure_of(da), StorageError)
    assert len(rig.aborted) == 1 and rig.aborted[0].code == 200
    assert rig.temp_files() == []
    _next_one_runs(rig, b, db)
