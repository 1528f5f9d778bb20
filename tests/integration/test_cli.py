"""``python -m twisted ncps`` refuses a bad configuration before anything listens."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ncps.testing import TEST_UPSTREAM_KEY

REPO = Path(__file__).resolve().parents[2]
KEY = TEST_UPSTREAM_KEY.public_key().to_text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def run_ncps(args: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "PYTHONPATH": str(REPO),
    }
    return subprocess.run(
        [sys.executable, "-m", "twisted", "ncps", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("bad", "flag"),
    [
        (
            ["--cache-upstream-dialer-timeout", "soon"],
            "--cache-upstream-dialer-timeout",
        ),
        (["--cache-upstream-url", "ftp://cache.example.org"], "--cache-upstream-url"),
        (["--cache-hostname", "http://cache.example.org"], "--cache-hostname"),
        # Valid as configuration; fails while the service is being built.
        (
            ["--cache-database-url", "sqlite:/proc/no-such-dir/ncps.sqlite3"],
            "--cache-database-url",
        ),
    ],
)
def test_bad_configuration_exits_with_one_line_and_never_listens(
    tmp_path: Path, bad: list[str], flag: str
) -> None:
    port = free_port()
    args = {
        "--cache-hostname": "cache.example.org",
        "--cache-storage-local": str(tmp_path / "storage"),
        "--cache-upstream-url": "https://cache.nixos.org",
        "--cache-upstream-public-key": KEY,
        "--server-addr": f"127.0.0.1:{port}",
    }
    args[bad[0]] = bad[1]
    argv = [item for pair in args.items() for item in pair]
    result = run_ncps(argv, tmp_path)

    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert flag in lines[0]
    assert lines[0].startswith(f"ncps: {flag}: ")
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", port))
