"""Restarts keep the signing key and the cache; a crash leaves no partial object."""

from __future__ import annotations

import hashlib
import signal

import pytest
from e2e_harness import StreamingGet, committed_nar_digests, wait_for_committed_nar
from e2e_nix import decode_nar

pytestmark = pytest.mark.e2e


def test_restart_keeps_key_and_cache(
    nix_fixture, upstream_factory, ncps_factory, nix_client_factory
):
    upstream = upstream_factory("none")
    ncps = ncps_factory(upstream)
    key = ncps.pubkey()
    paths = [nix_fixture.path("app"), nix_fixture.path("big")]
    res = nix_client_factory().substitute(paths, ncps.url, [key])
    assert res.rc == 0, str(res)
    for name in ("leaf", "dir", "app", "big"):
        wait_for_committed_nar(ncps, nix_fixture.nar_sha256(name))

    # twist re-raises the signal it stopped on (twisted...app._exitWithSignal), so
    # a clean SIGTERM shutdown ends "killed by SIGTERM"; stop() fails on a hang.
    assert ncps.stop() in (0, -signal.SIGTERM)
    ncps.start()
    assert ncps.pubkey() == key
    upstream.stop()

    client = nix_client_factory()
    res = client.substitute(paths, ncps.url, [key])
    assert res.rc == 0, str(res)
    verified = client.verify([key])
    assert verified.rc == 0, str(verified)
    assert client.nar_sha256(nix_fixture.path("big")) == nix_fixture.nar_sha256("big")


def test_sigkill_mid_download_leaves_no_partial_object(
    nix_fixture, upstream_factory, ncps_factory
):
    size = nix_fixture.manifest["paths"]["big"]["nar_size"]
    upstream = upstream_factory("none", throttle_bps=size // 4)
    ncps = ncps_factory(upstream)
    narinfo = ncps.narinfo(nix_fixture.hash("big"))
    url, compression = (
        "/" + str(narinfo["URL"]),
        str(narinfo.get("Compression", "bzip2")),
    )
    known = nix_fixture.all_nar_sha256()

    reader = StreamingGet(ncps.port, url)
    assert reader.status == 200
    reader.read_at_least(2_000_000)
    ncps.kill()
    reader.close()

    def assert_only_whole_nars() -> None:
        bad = {p: d for p, d in committed_nar_digests(ncps).items() if d not in known}
        assert not bad, f"partial or foreign objects under store/nar: {bad}"

    assert_only_whole_nars()
    ncps.start()
    assert_only_whole_nars()
    resp = ncps.get(url)
    assert resp.status == 200
    assert hashlib.sha256(decode_nar(resp.body, compression)).hexdigest() == (
        nix_fixture.nar_sha256("big")
    )
    wait_for_committed_nar(ncps, nix_fixture.nar_sha256("big"))
    assert_only_whole_nars()
