"""Malformed request paths get a 4xx from ncps itself and never reach the upstream."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e


def malformed_paths(nix_fixture) -> list[str]:
    leaf = nix_fixture.hash("leaf")
    nar_hash = nix_fixture.nar_url("leaf", "none").removeprefix("nar/").split(".")[0]
    return [
        "/..%2f..%2fetc%2fpasswd.narinfo",
        "/../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd.narinfo",
        f"/{leaf[:31]}.narinfo",  # 31 characters
        f"/{leaf}0.narinfo",  # 33 characters
        f"/e{leaf[1:]}.narinfo",  # 'e' is not in Nix's base-32 alphabet
        f"/{leaf.upper()}.narinfo",
        f"/{leaf}.narinfo.exe",
        f"/{leaf}%00.narinfo",
        "/nar/x.nar.exe",
        f"/nar/{nar_hash}.nar.exe",
        f"/nar/{nar_hash[:-1]}e.nar",
        f"/nar/..%2f{nar_hash}.nar",
        "/" + "a" * 8000 + ".narinfo",
        "/nar/" + "a" * 8000 + ".nar",
    ]


def test_malformed_requests_are_4xx_and_never_reach_upstream(
    nix_fixture, upstream_factory, ncps_factory
):
    upstream = upstream_factory("none")
    ncps = ncps_factory(upstream)

    def forwarded() -> list[str]:
        # A background probe of the upstream is fine; anything else was forwarded.
        paths = upstream.request_paths("GET") + upstream.request_paths("HEAD")
        return [p for p in paths if p != "/nix-cache-info"]

    before = forwarded()
    problems = []
    for path in malformed_paths(nix_fixture):
        for method in ("GET", "HEAD"):
            try:
                status = ncps.get(path, method=method, timeout=10).status
            except OSError as e:
                problems.append(f"{method} {path[:80]}: {e!r}")
                continue
            if not 400 <= status < 500:
                problems.append(f"{method} {path[:80]}: status {status}")
    reached = forwarded()[len(before) :]
    assert not problems, "\n".join(problems)
    assert reached == [], f"malformed requests reached the upstream: {reached}"
    assert ncps.get("/healthz").status == 200

    # Control: a well-formed request does reach the upstream log.
    assert ncps.get(f"/{nix_fixture.hash('leaf')}.narinfo").status == 200
    assert f"/{nix_fixture.hash('leaf')}.narinfo" in forwarded()
