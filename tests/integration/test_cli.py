"""The command line as processes: ``python -m twisted ncps`` refuses a bad
configuration before anything listens; the installed ``ncps`` command takes
global flags before ``serve``, prints its version and migrates (never down)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from servers import free_port

from ncps.testing import TEST_UPSTREAM_KEY

REPO = Path(__file__).resolve().parents[2]
KEY = TEST_UPSTREAM_KEY.public_key().to_text()


def ncps_env(home: Path) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "PYTHONPATH": str(REPO),
    }


def run_ncps(args: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "twisted", "ncps", *args],
        cwd=REPO,
        env=ncps_env(home),
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


# -- the installed ``ncps`` command --------------------------------------------------

NCPS = Path(sys.executable).parent / "ncps"


def run_command(args: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(NCPS), *args],
        cwd=home,
        env=ncps_env(home),
        capture_output=True,
        text=True,
        timeout=60,
    )


def write_config(tmp_path: Path, port: int) -> Path:
    """A config file for a local cache on ``port``; its upstream never answers
    (nothing listens on port 9), which /nix-cache-info does not need."""
    path = tmp_path / "ncps.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "cache": {
                    "hostname": "cache.example.org",
                    "storage": {"local": str(tmp_path / "storage")},
                    "upstream": {
                        "urls": ["http://127.0.0.1:9"],
                        "public-keys": [KEY],
                    },
                },
                "server": {"addr": f"127.0.0.1:{port}"},
            }
        )
    )
    return path


def get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.read().decode()


def serve_until_answering(
    args: list[str], home: Path, port: int, timeout: float = 30.0
) -> tuple[int, str, str]:
    """Run ``ncps <args>``, GET /nix-cache-info once it listens, then SIGTERM it.

    Returns (the status of the GET, the body, everything the daemon printed).
    """
    log = home / "ncps.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(NCPS), *args],
            cwd=home,
            env=ncps_env(home),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                status, body = get(f"http://127.0.0.1:{port}/nix-cache-info")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"never answered:\n{log.read_text()}"
                    ) from None
                time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    # twist ends a SIGTERM'd process by that signal once it has shut down.
    assert proc.returncode in (0, -signal.SIGTERM), log.read_text()
    return status, body, log.read_text()


@pytest.mark.parametrize("flag", ["--version", "-v"])
def test_version_of_the_installed_command(tmp_path: Path, flag: str) -> None:
    result = run_command([flag], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"ncps version {metadata.version('ncps')}\n"


def test_global_flags_before_serve_start_the_daemon(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, port)
    status, body, output = serve_until_answering(
        [f"--config={config}", "--log-level=debug", "--log-format", "json", "serve"],
        tmp_path,
        port,
    )
    assert status == 200
    assert "StoreDir: /nix/store" in body
    lines = [json.loads(line) for line in output.splitlines()]
    assert any("will listen on" in line["message"] for line in lines), output
    # The unreachable upstream is reported at its own level.
    unhealthy = [line for line in lines if "is unhealthy" in line["message"]]
    assert unhealthy and {line["level"] for line in unhealthy} == {"warn"}, output


def test_log_level_after_the_command_wins(tmp_path: Path) -> None:
    """``--log-level=error`` before ``s`` hides the startup line; the same
    flag after the command too, set to info, shows it again."""
    port = free_port()
    config = write_config(tmp_path, port)
    before = ["--log-level=error", "--config", str(config), "s"]
    *_, quiet = serve_until_answering(before, tmp_path, port)
    assert "will listen on" not in quiet
    *_, loud = serve_until_answering([*before, "--log-level=info"], tmp_path, port)
    assert "will listen on" in loud


def test_migrate_up_then_down_on_sqlite(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    db_file = storage / "db" / "ncps.sqlite3"
    down = run_command(
        ["migrate", "down", f"--cache-storage-local={storage}"], tmp_path
    )
    assert down.returncode == 2
    assert down.stderr.count("\n") == 1 and "only go forward" in down.stderr
    assert not db_file.exists()

    up = run_command(["migrate", "up", "--cache-storage-local", str(storage)], tmp_path)
    assert up.returncode == 0, up.stderr
    assert up.stdout.startswith("database migrated from empty to ")
    assert db_file.is_file()

    config = write_config(tmp_path, free_port())
    again = run_command([f"--config={config}", "migrate", "up", "--dry-run"], tmp_path)
    assert again.returncode == 0, again.stderr
    assert "up to date" in again.stdout
