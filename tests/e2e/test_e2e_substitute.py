"""A real Nix client substitutes through ncps, trusting only the proxy's key."""

from __future__ import annotations

import pytest
from e2e_harness import PROXY_HOSTNAME, wait_for_committed_nar, wait_until

pytestmark = pytest.mark.e2e


def test_service_endpoints(nix_fixture, upstream_factory, ncps_factory):
    ncps = ncps_factory(upstream_factory("none"))
    assert ncps.get("/healthz").status == 200
    info = ncps.get("/nix-cache-info")
    assert info.status == 200
    assert info.text.splitlines() == [
        "StoreDir: /nix/store",
        "WantMassQuery: 1",
        "Priority: 10",
    ]
    key = ncps.pubkey()
    name, _, b64 = key.partition(":")
    assert name == PROXY_HOSTNAME and len(b64) == 44 and not key.endswith("\n"), key
    assert key != nix_fixture.upstream_pubkey
    missing = ncps.get("/" + "0" * 32 + ".narinfo")
    assert missing.status == 404, missing


@pytest.mark.parametrize("cache", ["none", "zstd", "xz"])
def test_client_trusting_only_the_proxy_key_substitutes(
    cache, nix_fixture, upstream_factory, ncps_factory, nix_client_factory
):
    upstream = upstream_factory(cache)
    ncps = ncps_factory(upstream)
    proxy_key = ncps.pubkey()
    # xz of the incompressible big path is too slow to build; that cache is small.
    names = ["leaf", "app"] if cache == "xz" else ["leaf", "app", "big"]

    client = nix_client_factory()
    res = client.substitute([nix_fixture.path(n) for n in names], ncps.url, [proxy_key])
    assert res.rc == 0, str(res)
    for name in [*names, "dir"]:
        assert client.nar_sha256(nix_fixture.path(name)) == nix_fixture.nar_sha256(
            name
        ), name
    verified = client.verify([proxy_key])
    assert verified.rc == 0, str(verified)
    unrelated = client.verify([nix_fixture.unrelated_pubkey])
    assert unrelated.rc & 2, (
        f"an unrelated key must not verify these paths\n{unrelated}"
    )

    narinfo = ncps.narinfo(nix_fixture.hash("leaf"))
    assert any(sig.startswith(f"{PROXY_HOSTNAME}:") for sig in narinfo["Sig"]), narinfo

    # A client that trusts some other key gets nothing input-addressed from the proxy.
    other = nix_client_factory()
    res = other.substitute(
        [nix_fixture.path("leaf")], ncps.url, [nix_fixture.unrelated_pubkey]
    )
    assert res.rc != 0, str(res)
    assert nix_fixture.path("leaf") not in other.valid_paths()

    # What was served was cached where the contract says.
    stored = {
        name: wait_for_committed_nar(ncps, nix_fixture.nar_sha256(name))
        for name in names
    }
    wait_until(
        lambda: (
            {nix_fixture.hash(n) for n in names}
            <= {row["hash"] for row in ncps.db_rows("narinfos")}
        ),
        10,
        "narinfos rows for the substituted paths",
    )
    wait_until(
        lambda: len(ncps.db_rows("nar_files")) >= len(names), 10, "nar_files rows"
    )
    for key in stored.values():
        store, nar, h0, h0h1, filename = key.split("/")
        assert (store, nar) == ("store", "nar"), key
        assert filename.startswith(h0h1) and h0h1.startswith(h0) and len(h0) == 1, key
        assert ".nar" in filename, key


def test_second_client_is_served_from_cache_with_upstream_stopped(
    nix_fixture, upstream_factory, ncps_factory, nix_client_factory
):
    upstream = upstream_factory("zstd")
    ncps = ncps_factory(upstream)
    proxy_key = ncps.pubkey()
    paths = [nix_fixture.path("app"), nix_fixture.path("big")]

    first = nix_client_factory()
    res = first.substitute(paths, ncps.url, [proxy_key])
    assert res.rc == 0, str(res)
    for name in ("leaf", "dir", "app", "big"):
        wait_for_committed_nar(ncps, nix_fixture.nar_sha256(name))
    upstream.stop()

    second = nix_client_factory()
    res = second.substitute(paths, ncps.url, [proxy_key])
    assert res.rc == 0, str(res)
    for name in ("leaf", "dir", "app", "big"):
        assert second.nar_sha256(nix_fixture.path(name)) == nix_fixture.nar_sha256(
            name
        ), name
    verified = second.verify([proxy_key])
    assert verified.rc == 0, str(verified)
