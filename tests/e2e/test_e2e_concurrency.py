"""One upstream download per NAR, shared by all clients, immune to clients leaving."""

from __future__ import annotations

import hashlib

import pytest
from e2e_harness import StreamingGet, wait_for_committed_nar
from e2e_nix import decode_nar

pytestmark = pytest.mark.e2e

CLIENTS = 16


def throttle_for(nix_fixture, seconds: float) -> int:
    """Bytes/s that make the big NAR take about ``seconds`` to come from upstream."""
    return max(1, int(nix_fixture.manifest["paths"]["big"]["nar_size"] / seconds))


def test_concurrent_real_clients_share_one_upstream_download(
    nix_fixture, upstream_factory, ncps_factory, nix_client_factory
):
    upstream = upstream_factory("none", throttle_bps=throttle_for(nix_fixture, 4))
    ncps = ncps_factory(upstream)
    proxy_key = ncps.pubkey()
    big = nix_fixture.path("big")

    clients = [nix_client_factory() for _ in range(CLIENTS)]
    procs = [c.start_substitute([big], ncps.url, [proxy_key]) for c in clients]
    outcomes = []
    for proc in procs:
        try:
            _, stderr = proc.communicate(timeout=180)
        except BaseException:
            for p in procs:
                p.kill()
            raise
        outcomes.append((proc.returncode, stderr))
    failed = [(i, rc, err[-2000:]) for i, (rc, err) in enumerate(outcomes) if rc != 0]
    assert not failed, f"{len(failed)} of {CLIENTS} clients failed: {failed[:3]}"

    assert upstream.count("/" + nix_fixture.nar_url("big", "none")) == 1, (
        upstream.request_paths()
    )
    digests = {c.nar_sha256(big) for c in clients}
    assert digests == {nix_fixture.nar_sha256("big")}
    verified = clients[0].verify([proxy_key])
    assert verified.rc == 0, str(verified)


def _proxy_nar(ncps, nix_fixture, name: str) -> tuple[str, str]:
    narinfo = ncps.narinfo(nix_fixture.hash(name))
    return "/" + str(narinfo["URL"]), str(narinfo.get("Compression", "bzip2"))


def test_disconnecting_reader_does_not_hurt_a_concurrent_reader(
    nix_fixture, upstream_factory, ncps_factory
):
    upstream = upstream_factory("none", throttle_bps=throttle_for(nix_fixture, 3))
    ncps = ncps_factory(upstream)
    url, compression = _proxy_nar(ncps, nix_fixture, "big")
    expected = nix_fixture.nar_sha256("big")

    leaver = StreamingGet(ncps.port, url)
    assert leaver.status == 200
    leaver.read_at_least(1_000_000)
    stayer = StreamingGet(ncps.port, url)
    assert stayer.status == 200
    stayer.read_at_least(1_000_000)
    leaver.abandon()
    body = stayer.read_all()
    stayer.close()
    assert hashlib.sha256(decode_nar(body, compression)).hexdigest() == expected

    wait_for_committed_nar(ncps, expected)
    assert upstream.count("/" + nix_fixture.nar_url("big", "none")) == 1
    upstream.stop()
    again = ncps.get(url)
    assert again.status == 200
    assert hashlib.sha256(decode_nar(again.body, compression)).hexdigest() == expected


def test_download_completes_into_the_cache_after_its_only_reader_leaves(
    nix_fixture, upstream_factory, ncps_factory
):
    upstream = upstream_factory("none", throttle_bps=throttle_for(nix_fixture, 2))
    ncps = ncps_factory(upstream)
    url, compression = _proxy_nar(ncps, nix_fixture, "big")
    expected = nix_fixture.nar_sha256("big")

    leaver = StreamingGet(ncps.port, url)
    assert leaver.status == 200
    leaver.read_at_least(500_000)
    leaver.abandon()

    wait_for_committed_nar(ncps, expected)
    assert upstream.count("/" + nix_fixture.nar_url("big", "none")) == 1
    upstream.stop()
    again = ncps.get(url)
    assert again.status == 200
    assert hashlib.sha256(decode_nar(again.body, compression)).hexdigest() == expected
