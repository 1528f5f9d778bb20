"""Redirects, URL credentials and backoff of ncps.upstream (StubTreq + Clock)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import formatEvent

from ncps.backoff import Backoff
from ncps.errors import UpstreamError
from ncps.testing import (
    FakeUpstream,
    captured_log,
    drive,
    fake_upstream_pool,
    result_of,
)
from ncps.upstream import BackingOff, UpstreamPool

HASH = "0" * 32
PASSWORD = "hunter2-s3cret"


def fetch(pool: UpstreamPool, stub: StubTreq, clock: Clock) -> Deferred[bytes]:
    d = Deferred.fromCoroutine(pool.fetch_narinfo(pool.upstreams[0], HASH))
    return drive(d, clock, stub)


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    with captured_log("debug") as seen:
        yield seen


def test_redirect_to_other_host_drops_url_credentials(
    events: list[dict[str, Any]],
) -> None:
    up, s3 = FakeUpstream(), FakeUpstream()
    up.set(f"{HASH}.narinfo", status=307, headers={b"Location": b"/moved.narinfo"})
    up.set(
        "moved.narinfo",
        status=302,
        headers={b"Location": b"http://s3.test:9000/k?sig=1"},
    )
    s3.set("k", b"narinfo text")
    clock = Clock()
    pool, stub = fake_upstream_pool(
        clock,
        {"up.test": up, "s3.test:9000": s3},
        urls=[f"http://alice:{PASSWORD}@up.test"],
    )
    assert pool.upstreams[0].url == "http://up.test/"
    assert PASSWORD not in repr(pool.upstreams[0])
    assert result_of(fetch(pool, stub, clock)) == b"narinfo text"
    assert up.uris() == [f"/{HASH}.narinfo".encode(), b"/moved.narinfo"]
    assert all(h[b"authorization"].startswith(b"Basic ") for h in up.headers)
    assert b"authorization" not in s3.headers[-1]


def test_redirect_limit_and_scheme(events: list[dict[str, Any]]) -> None:
    up = FakeUpstream()
    up.set(f"{HASH}.narinfo", status=301, headers={b"Location": b"/a"})
    up.set("a", status=308, headers={b"Location": b"/" + HASH.encode() + b".narinfo"})
    clock = Clock()
    pool, stub = fake_upstream_pool(
        clock, {"up.test": up}, urls=[f"http://u:{PASSWORD}@up.test/"]
    )
    with pytest.raises(UpstreamError, match="too many redirects") as info:
        result_of(fetch(pool, stub, clock))
    assert len(up.requests) == 6
    assert PASSWORD not in str(info.value)
    up.set(f"{HASH}.narinfo", status=302, headers={b"Location": b"file:///etc/passwd"})
    with pytest.raises(UpstreamError, match="refusing redirect"):
        result_of(fetch(pool, stub, clock))


def test_backoff_skips_probes_once_and_recovers(events: list[dict[str, Any]]) -> None:
    up = FakeUpstream()
    up.set(f"{HASH}.narinfo", stall=True)
    clock = Clock()
    pool, stub = fake_upstream_pool(
        clock, {"up.test": up}, urls=[f"http://u:{PASSWORD}@up.test/"]
    )
    u = pool.upstreams[0]
    d = Deferred.fromCoroutine(pool.fetch_narinfo(u, HASH))
    stub.flush()
    clock.advance(3)
    with pytest.raises(UpstreamError, match="timed out"):
        result_of(d)
    assert pool.available() == [] and pool.backing_off(u)
    with pytest.raises(BackingOff):
        result_of(fetch(pool, stub, clock))
    assert len(up.requests) == 1  # the skip asked nothing
    clock.advance(1)
    assert pool.available() == [u]
    probe = Deferred.fromCoroutine(pool.fetch_narinfo(u, HASH))
    with pytest.raises(BackingOff):  # a second concurrent request is not a probe
        result_of(Deferred.fromCoroutine(pool.fetch_narinfo(u, HASH)))
    stub.flush()
    clock.advance(3)
    with pytest.raises(UpstreamError):
        result_of(probe)
    assert u.backoff.failures == 2
    clock.advance(2)
    up.set(f"{HASH}.narinfo", b"ok")
    assert result_of(fetch(pool, stub, clock)) == b"ok"
    assert not u.backoff.active and pool.available() == [u]
    text = [formatEvent(e) for e in events]
    assert sum("skipping it" in t for t in text) == 1
    assert sum("answering again" in t for t in text) == 1
    assert not any(
        PASSWORD in t or PASSWORD in repr(e) for t, e in zip(text, events, strict=True)
    )


def test_backoff_windows_grow_to_the_cap_and_bursts_count_once() -> None:
    b = Backoff()
    assert b.failed(0.0) == 1.0
    assert b.failed(0.5) is None  # inside the window: same burst
    windows = [b.failed(b.retry_at) for _ in range(8)]
    assert windows == [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    assert b.succeeded() and not b.active and b.may_ask(0.0)


def test_health_check_clears_backoff_and_5xx_enters_it() -> None:
    up = FakeUpstream()
    up.set(f"{HASH}.narinfo", b"", status=503)
    clock = Clock()
    pool, stub = fake_upstream_pool(clock, {"up.test": up})
    with pytest.raises(UpstreamError, match="503"):
        result_of(fetch(pool, stub, clock))
    assert pool.backing_off(pool.upstreams[0])
    drive(pool.check_all(), clock, stub)
    assert not pool.backing_off(pool.upstreams[0])
    up.set(f"{HASH}.narinfo", b"", status=404)
    with pytest.raises(Exception, match="narinfo"):
        result_of(fetch(pool, stub, clock))
    assert not pool.backing_off(pool.upstreams[0])
