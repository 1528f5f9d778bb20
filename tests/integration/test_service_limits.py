"""``ncps serve`` sizes its client connections to its file descriptor limit."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from servers import free_port

from ncps.testing import TEST_UPSTREAM_KEY

REPO = Path(__file__).resolve().parents[2]
KEY = TEST_UPSTREAM_KEY.public_key().to_text()


def limit_descriptors(soft: int, hard: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return apply


def start(
    tmp_path: Path, port: int, soft: int, hard: int, *extra: str
) -> subprocess.Popen[str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "PYTHONPATH": str(REPO),
    }
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "twisted",
            "ncps",
            "--cache-hostname=cache.example.org",
            f"--cache-storage-local={tmp_path / 'storage'}",
            # Nothing listens there: the health check fails, which is fine.
            f"--cache-upstream-url=http://127.0.0.1:{free_port()}",
            f"--cache-upstream-public-key={KEY}",
            f"--server-addr=127.0.0.1:{port}",
            *extra,
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=limit_descriptors(soft, hard),
    )


def wait_for(port: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ncps exited early: {proc.communicate()[0]}")
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{port}/nix-cache-info", timeout=2
            ) as r:
                assert r.status == 200
                return
        except OSError:
            time.sleep(0.1)
    pytest.fail("ncps did not answer within 30 s")


def stop(proc: subprocess.Popen[str]) -> str:
    proc.terminate()
    out, _ = proc.communicate(timeout=30)
    return out


def test_soft_limit_is_raised_and_clients_are_sized_to_it(tmp_path: Path) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.fail(f"this machine's hard descriptor limit is only {hard}")
    port = free_port()
    proc = start(tmp_path, port, 1024, 4096)
    try:
        wait_for(port, proc)
    finally:
        out = stop(proc)
    assert "raised the file descriptor limit from 1024 to 4096" in out
    # 4096 descriptors, minus 64 + 32 x 3 downloads + 4 x 3 SQLite + 2 x 16
    # idle upstream connections, halved.
    assert f"at most {(4096 - 204) // 2} client connections" in out


def test_explicit_limit_beyond_the_descriptors_stops_startup(tmp_path: Path) -> None:
    port = free_port()
    proc = start(tmp_path, port, 1024, 1024, "--server-max-connections=2000")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines[-1].startswith("ncps: --server-max-connections: 2000 needs more")
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", port))


def test_clients_beyond_the_limit_wait_for_a_free_connection(tmp_path: Path) -> None:
    port = free_port()
    proc = start(tmp_path, port, 1024, 1024, "--server-max-connections=16")
    try:
        wait_for(port, proc)
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(16)]
        try:
            # Each held connection is accepted; the 17th waits in the backlog.
            time.sleep(0.5)
            extra = socket.create_connection(("127.0.0.1", port))
            extra.settimeout(1.0)
            extra.sendall(
                b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            with pytest.raises(TimeoutError):
                extra.recv(100)
            held.pop().close()
            extra.settimeout(10.0)
            assert extra.recv(100).startswith(b"HTTP/1.1 200")
            extra.close()
        finally:
            for s in held:
                s.close()
    finally:
        stop(proc)


def test_a_failed_startup_repeats_the_configuration_warnings(tmp_path: Path) -> None:
    # The deprecated name warns; the port in use stops startup.  Both lines
    # must reach the operator, although logging never got going.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = start(
            tmp_path,
            port,
            1024,
            1024,
            f"--cache-data-path={tmp_path / 'old-storage'}",
        )
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 78
    lines = [line for line in out.splitlines() if line.startswith("ncps: ")]
    assert lines[-2].startswith("ncps: warning: --cache-data-path")
    assert "deprecated" in lines[-2]
    assert lines[-1].startswith(
        f"ncps: --server-addr: cannot listen on 127.0.0.1:{port}"
    )
