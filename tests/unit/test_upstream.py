"""ncps.upstream over fake upstreams served through StubTreq, with a Clock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.web import server
from twisted.web.resource import Resource

from ncps.errors import NotFound, UpstreamError
from ncps.testing import FakeUpstream, drive, fake_upstream_pool, result_of
from ncps.upstream import (
    DEFAULT_PRIORITY,
    NARINFO_MAX_BYTES,
    Upstream,
    UpstreamPool,
    parse_cache_info,
    resolve_nar_url,
)

BASE = "https://up.example/"
HASH = "0" * 32


# -- resolve_nar_url -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "resolved"),
    [
        ("nar/abc.nar.xz", BASE + "nar/abc.nar.xz"),
        ("nar/abc.nar.xz?hash=0123abc", BASE + "nar/abc.nar.xz?hash=0123abc"),
        ("abc.nar", BASE + "abc.nar"),
    ],
)
def test_resolve_nar_url_accepts_relative_urls_below_the_base(
    url: str, resolved: str
) -> None:
    assert resolve_nar_url(BASE, url) == resolved


@pytest.mark.parametrize(
    "url",
    [
        "https://evil.example/nar/abc.nar.xz",
        "http://169.254.169.254/latest/meta-data",
        "//evil.example/nar/abc.nar.xz",
        "file:///etc/passwd",
        "/nar/abc.nar.xz",
        "../abc.nar.xz",
        "nar/../../abc.nar.xz",
        "nar/./abc.nar.xz",
        "nar//abc.nar.xz",
        "nar/%2e%2e/abc.nar.xz",
        "nar/abc%2Fdef.nar.xz",
        "nar\\abc.nar.xz",
        "nar/abc.nar.xz\\",
        "nar/abc def.nar",
        "nar/abc\x00.nar",
        "nar/abcé.nar",
        "",
        "?hash=1",
    ],
)
def test_resolve_nar_url_refuses_urls_that_could_point_anywhere(url: str) -> None:
    with pytest.raises(UpstreamError, match="refusing"):
        resolve_nar_url(BASE, url)


# -- parse_cache_info ------------------------------------------------------------------


def test_parse_cache_info() -> None:
    text = "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n\nnonsense line\n"
    assert parse_cache_info(text) == {
        "StoreDir": "/nix/store",
        "WantMassQuery": "1",
        "Priority": "30",
    }


def test_parse_cache_info_keeps_colons_in_values_and_strips_spaces() -> None:
    assert parse_cache_info("  Key :  a:b  \r\n") == {"Key": "a:b"}


# -- health and priority ---------------------------------------------------------------


def checked_pool(clock: Clock, fakes: dict[str, Resource]) -> UpstreamPool:
    pool, stub = fake_upstream_pool(clock, fakes)
    drive(pool.check_all(), clock, stub)
    return pool


def names(upstreams: list[Upstream]) -> list[str]:
    return [u.host for u in upstreams]


def test_order_before_any_check_is_configuration_order() -> None:
    pool, _ = fake_upstream_pool(
        Clock(), {"a.test": FakeUpstream(), "b.test": FakeUpstream()}
    )
    assert names(pool.ordered()) == ["a.test", "b.test"]
    assert all(u.healthy is None for u in pool.upstreams)


def test_priority_ordering_healthy_first_then_priority_then_config_order() -> None:
    broken = FakeUpstream(priority=1)
    broken.set("nix-cache-info", b"oops", status=500)
    clock = Clock()
    pool = checked_pool(
        clock,
        {
            "broken.test": broken,
            "slow.test": FakeUpstream(priority=50),
            "first-10.test": FakeUpstream(priority=10),
            "second-10.test": FakeUpstream(priority=10),
            "default.test": FakeUpstream(priority=DEFAULT_PRIORITY),
        },
    )
    assert names(pool.ordered()) == [
        "first-10.test",
        "second-10.test",
        "default.test",
        "slow.test",
        "broken.test",
    ]
    by_host = {u.host: u for u in pool.upstreams}
    assert by_host["broken.test"].healthy is False
    assert by_host["slow.test"].healthy is True
    assert by_host["slow.test"].priority == 50


def test_missing_priority_means_default() -> None:
    plain = FakeUpstream()
    plain.set("nix-cache-info", b"StoreDir: /nix/store\n")
    pool = checked_pool(Clock(), {"p.test": plain})
    assert pool.upstreams[0].priority == DEFAULT_PRIORITY
    assert pool.upstreams[0].healthy is True


@pytest.mark.parametrize(
    "info",
    [
        b"StoreDir: /gnu/store\nPriority: 10\n",
        b"StoreDir: /nix/store\nPriority: high\n",
    ],
)
def test_unusable_cache_info_marks_unhealthy(info: bytes) -> None:
    odd = FakeUpstream()
    odd.set("nix-cache-info", info)
    pool = checked_pool(
        Clock(), {"odd.test": odd, "ok.test": FakeUpstream(priority=90)}
    )
    assert pool.upstreams[0].healthy is False
    assert names(pool.ordered()) == ["ok.test", "odd.test"]


def test_an_upstream_recovers_on_the_next_check() -> None:
    flaky = FakeUpstream(priority=5)
    flaky.set("nix-cache-info", b"", status=503)
    clock = Clock()
    pool, stub = fake_upstream_pool(
        clock, {"other.test": FakeUpstream(), "flaky.test": flaky}
    )
    drive(pool.check_all(), clock, stub)
    assert names(pool.ordered()) == ["other.test", "flaky.test"]
    flaky.set("nix-cache-info", b"StoreDir: /nix/store\nPriority: 5\n")
    drive(pool.check_all(), clock, stub)
    assert names(pool.ordered()) == ["flaky.test", "other.test"]


def test_first_check_runs_once() -> None:
    up = FakeUpstream()
    clock = Clock()
    pool, stub = fake_upstream_pool(clock, {"a.test": up})
    drive(pool.first_check(), clock, stub)
    drive(pool.first_check(), clock, stub)
    assert up.uris() == [b"/nix-cache-info"]


# -- fetching --------------------------------------------------------------------------


def fetch(
    pool: UpstreamPool, stub: Any, clock: Clock, hash_part: str = HASH
) -> Deferred[bytes]:
    d = Deferred.fromCoroutine(pool.fetch_narinfo(pool.upstreams[0], hash_part))
    return drive(d, clock, stub)


def test_fetch_narinfo_returns_the_body_and_sends_a_user_agent() -> None:
    up = FakeUpstream()
    up.set(f"{HASH}.narinfo", b"StorePath: whatever\n")
    clock = Clock()
    pool, stub = fake_upstream_pool(clock, {"a.test": up})
    assert result_of(fetch(pool, stub, clock)) == b"StorePath: whatever\n"
    assert up.uris() == [f"/{HASH}.narinfo".encode()]
    assert up.headers[-1][b"user-agent"].startswith(b"ncps")
    assert b"authorization" not in up.headers[-1]


@pytest.mark.parametrize("status", [403, 404, 410])
def test_absent_statuses_are_not_found(status: int) -> None:
    up = FakeUpstream()
    up.set(f"{HASH}.narinfo", b"no", status=status)
    clock = Clock()
    pool, stub = fake_upstream_pool(clock, {"a.test": up})
    with pytest.raises(NotFound):
        result_of(fetch(pool, stub, clock))


@pytest.mark.parametrize("status", [500, 502, 401, 300])
def test_other_statuses_are_upstream_errors(status: int) -> None:
    up = FakeUpstream()
    up.set(
        f"{HASH}.narinfo",
        b"err",
        status=status,
        headers={b"Location": b"http://elsewhere.test/x.narinfo"},
    )
    clock = Clock()
    pool, stub = fake_upstream_pool(clock, {"a.test": up})
    with pytest.raises(UpstreamError, match=str(status)):
        result_of(fetch(pool, stub, clock))


def test_narinfo_bigger_than_the_cap_with_content_length() -> None:
    up = FakeUpstream()
    up.set(f"{HASH}.narinfo", b"x" * (NARINFO_MAX_BYTES + 1))
    clock = Clock()
    pool, stub = fake_upstream_pool(clock, {"a.test": up})
    with pytest.raises(UpstreamError, match="large"):
        result_of(fetch(pool, stub, clock))


def test_narinfo_at_the_cap_is_accepted() -> None:
    up = FakeUpstream()
    up.set(f"{HASH}.narinfo", b"x" * NARINFO_MAX_BYTES)
    clock = Clock()
    pool, stub = fake_upstream_pool(clock, {"a.test": up})
    assert len(result_of(fetch(pool, stub, clock))) == NARINFO_MAX_BYTES


class Chunked(Resource):
    """Writes ``total`` bytes in pieces without a Content-Length (chunked)."""

    isLeaf = True

    def __init__(self, total: int, finish: bool = True) -> None:
        super().__init__()
        self.total = total
        self.finish = finish

    def render_GET(self, request: server.Request) -> int:
        piece = 64 * 1024
        for i in range(0, self.total, piece):
            request.write(b"y" * min(piece, self.total - i))
        if self.finish:
            request.finish()
        return server.NOT_DONE_YET


def test_narinfo_bigger_than_the_cap_without_content_length() -> None:
    clock = Clock()
    pool, stub = fake_upstream_pool(clock, {"a.test": Chunked(2 * NARINFO_MAX_BYTES)})
    with pytest.raises(UpstreamError, match="larger"):
        result_of(fetch(pool, stub, clock))


def test_header_timeout() -> None:
    up = FakeUpstream()
    up.set(f"{HASH}.narinfo", stall=True)
    clock = Clock()
    pool, stub = fake_upstream_pool(clock, {"a.test": up}, header_timeout=3.0)
    d = Deferred.fromCoroutine(pool.fetch_narinfo(pool.upstreams[0], HASH))
    stub.flush()
    clock.advance(2.9)
    stub.flush()
    assert not d.called
    clock.advance(0.2)
    with pytest.raises(UpstreamError, match="timed out"):
        result_of(d)


def test_body_that_stops_midway_times_out() -> None:
    clock = Clock()
    pool, stub = fake_upstream_pool(
        clock, {"a.test": Chunked(1000, finish=False)}, header_timeout=1.0
    )
    d = Deferred.fromCoroutine(pool.fetch_narinfo(pool.upstreams[0], HASH))
    stub.flush()
    clock.advance(0.9)  # headers arrived in time; now the body timer runs
    stub.flush()
    assert not d.called
    clock.advance(4)
    with pytest.raises(UpstreamError, match="timed out"):
        result_of(d)


def test_open_nar_returns_a_streamable_response() -> None:
    up = FakeUpstream()
    up.set("nar/abc.nar.xz", b"nar bytes")
    clock = Clock()
    pool, stub = fake_upstream_pool(clock, {"a.test": up})
    u = pool.upstreams[0]
    response = result_of(
        drive(
            Deferred.fromCoroutine(pool.open_nar(u, u.url + "nar/abc.nar.xz")),
            clock,
            stub,
        )
    )
    assert response.code == 200
    assert result_of(drive(stub.content(response), clock, stub)) == b"nar bytes"


@pytest.mark.parametrize(
    ("status", "error"), [(404, NotFound), (410, NotFound), (500, UpstreamError)]
)
def test_open_nar_errors(status: int, error: type[Exception]) -> None:
    up = FakeUpstream()
    up.set("nar/abc.nar.xz", b"", status=status)
    clock = Clock()
    pool, stub = fake_upstream_pool(clock, {"a.test": up})
    u = pool.upstreams[0]
    d = Deferred.fromCoroutine(pool.open_nar(u, u.url + "nar/abc.nar.xz"))
    with pytest.raises(error):
        result_of(drive(d, clock, stub))


def test_netrc_credentials_go_only_to_their_host(tmp_path: Path) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text("machine private.test login alice password s3cret\n")
    private, public = FakeUpstream(), FakeUpstream()
    for up in (private, public):
        up.set(f"{HASH}.narinfo", b"ok")
    from treq.testing import StubTreq

    from ncps.testing import HostRouter

    clock = Clock()
    stub = StubTreq(HostRouter({"private.test": private, "public.test": public}))
    pool = UpstreamPool(
        clock,
        ["http://private.test", "http://public.test/"],
        dialer_timeout=1,
        header_timeout=1,
        netrc_file=netrc,
        http=stub,
    )
    assert [u.url for u in pool.upstreams] == [
        "http://private.test/",
        "http://public.test/",
    ]
    for u in pool.upstreams:
        drive(Deferred.fromCoroutine(pool.fetch_narinfo(u, HASH)), clock, stub)
    assert private.headers[-1][b"authorization"] == b"Basic YWxpY2U6czNjcmV0"
    assert b"authorization" not in public.headers[-1]
    # A stored URL under no configured upstream gets no credentials.
    assert pool.upstream_for("http://private.test/nar/x.nar").auth is not None
    assert pool.upstream_for("http://moved.test/nar/x.nar").auth is None
