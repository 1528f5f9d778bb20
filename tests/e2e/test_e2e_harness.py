"""The harness checks itself, without ncps: a real Nix client against upstream.py.

If these fail, the fixture or the upstream server is broken, not the proxy.
"""

from __future__ import annotations

import time

import pytest
from e2e_harness import StreamingGet, http_request
from e2e_nix import decode_nar

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("cache", ["none", "zstd", "xz"])
def test_real_client_substitutes_directly_from_signed_cache(
    cache, nix_fixture, upstream_factory, nix_client_factory
):
    upstream = upstream_factory(cache)
    names = ["app"] if cache == "xz" else ["app", "big"]
    client = nix_client_factory()
    res = client.substitute(
        [nix_fixture.path(n) for n in names],
        upstream.url,
        [nix_fixture.upstream_pubkey],
    )
    assert res.rc == 0, str(res)
    for name in [*names, "leaf", "dir"]:
        assert client.nar_sha256(nix_fixture.path(name)) == nix_fixture.nar_sha256(name)
    assert client.verify([nix_fixture.upstream_pubkey]).rc == 0
    # Input-addressed paths carry only the upstream signature: another key rejects them.
    assert client.verify([nix_fixture.unrelated_pubkey]).rc & 2


@pytest.mark.parametrize("cache", ["unsigned", "wrongkey", "corrupt"])
def test_real_client_rejects_negative_caches(
    cache, nix_fixture, upstream_factory, nix_client_factory
):
    upstream = upstream_factory(cache)
    client = nix_client_factory()
    res = client.substitute(
        [nix_fixture.path("leaf")], upstream.url, [nix_fixture.upstream_pubkey]
    )
    assert res.rc != 0, str(res)
    assert nix_fixture.path("leaf") not in client.valid_paths()
    if cache == "corrupt":
        assert "hash mismatch" in res.stderr, str(res)
    else:
        assert "is not signed by any of the keys" in res.stderr, str(res)


def test_upstream_server_serves_logs_throttles_and_restarts(
    nix_fixture, upstream_factory
):
    upstream = upstream_factory("corrupt")
    leaf = nix_fixture.hash("leaf")
    assert http_request(upstream.port, "/nix-cache-info").text.endswith(
        "WantMassQuery: 1\nPriority: 40\n"
    )
    head = http_request(upstream.port, f"/{leaf}.narinfo", method="HEAD")
    assert head.status == 200 and head.body == b""
    assert (
        http_request(upstream.port, "/00000000000000000000000000000000.narinfo").status
        == 404
    )
    assert http_request(upstream.port, "/..%2f..%2fetc%2fpasswd").status == 404
    assert http_request(upstream.port, "/../../etc/passwd").status == 404
    assert upstream.count(f"/{leaf}.narinfo", method="HEAD") == 1
    assert upstream.count("/00000000000000000000000000000000.narinfo") == 1

    url = "/" + nix_fixture.nar_url("leaf", "corrupt")
    bad = http_request(upstream.port, url).body
    port = upstream.port
    upstream.restart(cache_dir=nix_fixture.cache("none"), throttle_bps=2_000_000)
    assert upstream.port == port
    good = http_request(upstream.port, url).body
    assert bad != good and len(bad) == len(good)
    assert decode_nar(good, "none") and upstream.count(url) == 2

    big_url = "/" + nix_fixture.nar_url("big", "none")
    started = time.monotonic()
    stream = StreamingGet(upstream.port, big_url)
    stream.read_at_least(1_000_000)
    # 2 MB/s: the first megabyte cannot arrive much faster than half a second.
    assert time.monotonic() - started > 0.4
    stream.abandon()
    done = [r for r in upstream.records("done") if r["path"] == big_url]
    deadline = time.monotonic() + 10
    while not done and time.monotonic() < deadline:
        time.sleep(0.05)
        done = [r for r in upstream.records("done") if r["path"] == big_url]
    assert done and done[0]["aborted"], done
