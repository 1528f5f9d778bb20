"""Untrustworthy upstreams: bad signatures are 404, bad NAR bytes never land."""

from __future__ import annotations

import http.client

import pytest
from e2e_harness import StreamingGet

pytestmark = pytest.mark.e2e


def assert_nothing_stored(ncps) -> None:
    assert ncps.db_rows("narinfos") == []
    assert ncps.db_rows("nar_files") == []
    assert ncps.nar_files() == []


@pytest.mark.parametrize("cache", ["wrongkey", "unsigned"])
def test_unverifiable_upstream_narinfo_is_404_and_nothing_is_stored(
    cache, nix_fixture, upstream_factory, ncps_factory, nix_client_factory
):
    upstream = upstream_factory(cache)
    ncps = ncps_factory(upstream)
    proxy_key = ncps.pubkey()

    for name in ("leaf", "app"):
        resp = ncps.get(f"/{nix_fixture.hash(name)}.narinfo")
        assert resp.status == 404, (name, resp)
        # The proxy did ask upstream: the 404 is its verdict, not a routing accident.
        assert upstream.count(f"/{nix_fixture.hash(name)}.narinfo") >= 1

    client = nix_client_factory()
    # Even trusting the upstream key too: the proxy must not pass the narinfo through.
    res = client.substitute(
        [nix_fixture.path("app")], ncps.url, [proxy_key, nix_fixture.upstream_pubkey]
    )
    assert res.rc != 0, str(res)
    assert client.valid_paths() == set()
    assert_nothing_stored(ncps)


def test_corrupt_upstream_nar_is_never_committed_and_a_fixed_upstream_recovers(
    nix_fixture, upstream_factory, ncps_factory, nix_client_factory
):
    upstream = upstream_factory("corrupt")
    ncps = ncps_factory(upstream)
    proxy_key = ncps.pubkey()
    leaf = nix_fixture.path("leaf")
    upstream_nar = "/" + nix_fixture.manifest["corrupt_nar_url"]

    client = nix_client_factory()
    res = client.substitute([leaf], ncps.url, [proxy_key])
    assert res.rc != 0, str(res)
    assert leaf not in client.valid_paths()
    assert upstream.count(upstream_nar) >= 1, upstream.request_paths()
    assert ncps.db_rows("nar_files") == []
    assert ncps.nar_files() == []

    # A raw reader must not get a complete, successful response either.
    narinfo = ncps.narinfo(nix_fixture.hash("leaf"))
    stream = StreamingGet(ncps.port, "/" + str(narinfo["URL"]))
    try:
        if stream.status == 200:
            with pytest.raises((http.client.HTTPException, ConnectionError)):
                stream.read_all()
    finally:
        stream.close()
    assert ncps.db_rows("nar_files") == []
    assert ncps.nar_files() == []

    upstream.restart(cache_dir=nix_fixture.cache("none"))
    retry = nix_client_factory()
    res = retry.substitute([leaf], ncps.url, [proxy_key])
    assert res.rc == 0, str(res)
    assert retry.nar_sha256(leaf) == nix_fixture.nar_sha256("leaf")
    verified = retry.verify([proxy_key])
    assert verified.rc == 0, str(verified)
