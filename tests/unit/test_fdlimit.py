"""The client connection limit derived from the file descriptor limit."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest

from ncps.errors import StartupError
from ncps.fdlimit import (
    MIN_CONNECTIONS,
    Budget,
    allowed_connections,
    client_limit,
)

SQLITE = Budget(max_downloads=32, db_connections=4, sqlite=True, s3_connections=0)
POSTGRES_S3 = Budget(
    max_downloads=32, db_connections=20, sqlite=False, s3_connections=16
)


def test_systemd_default_leaves_room_for_downloads_and_database() -> None:
    # 1024 descriptors: 64 base + 32 downloads x 3 + 4 SQLite connections x 3
    # + idle upstream connections (one upstream, one redirect host) x 16.
    assert SQLITE.headroom() == 64 + 96 + 12 + 32
    assert allowed_connections(1024, SQLITE) == (1024 - 204) // 2
    assert client_limit(1024, SQLITE, 0) == 410


def test_s3_and_a_server_database_take_their_share() -> None:
    assert POSTGRES_S3.headroom() == 64 + 96 + 20 + 16 + 32
    assert client_limit(1024, POSTGRES_S3, 0) == (1024 - 228) // 2


def test_each_upstream_keeps_idle_connections() -> None:
    three = Budget(
        max_downloads=32, db_connections=4, sqlite=True, s3_connections=0, upstreams=3
    )
    assert three.headroom() == SQLITE.headroom() + 2 * 16


def test_more_downloads_leave_fewer_client_connections() -> None:
    more = Budget(max_downloads=128, db_connections=4, sqlite=True, s3_connections=0)
    assert client_limit(1024, more, 0) < client_limit(1024, SQLITE, 0)


def test_an_explicit_limit_within_the_budget_is_kept() -> None:
    assert client_limit(1024, SQLITE, 100) == 100


def test_an_explicit_limit_beyond_the_descriptors_stops_startup() -> None:
    with pytest.raises(StartupError) as info:
        client_limit(1024, SQLITE, 5000)
    message = str(info.value)
    assert message.startswith("--server-max-connections: 5000 needs more")
    assert "at most 410" in message


def test_too_few_descriptors_for_a_useful_proxy_stops_startup() -> None:
    # 256 descriptors: 204 headroom leaves 26 clients; 230 leaves 13.
    assert client_limit(256, SQLITE, 0) == 26
    with pytest.raises(StartupError) as info:
        client_limit(230, SQLITE, 0)
    assert str(info.value).startswith("--server-max-connections: the file descriptor")
    assert "--cache-upstream-max-downloads" in str(info.value)
    assert allowed_connections(230, SQLITE) < MIN_CONNECTIONS


def test_raise_soft_limit_lifts_it_to_the_hard_limit() -> None:
    # In a child process, so this test's own limits stay as they are.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 512:
        pytest.fail(f"this machine's hard descriptor limit is only {hard}")
    code = (
        "import resource\n"
        "from ncps.fdlimit import raise_soft_limit\n"
        "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
        "before, after = raise_soft_limit()\n"
        "now = resource.getrlimit(resource.RLIMIT_NOFILE)[0]\n"
        "print(before, after, now, hard)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout.split()
    before, after, now, child_hard = (int(x) for x in out)
    assert before == 256
    assert after == now
    assert now > 256
    if child_hard != resource.RLIM_INFINITY:
        assert now == child_hard
