"""The servers the benchmark starts: nginx, the ncps daemon, the bare Klein baseline.

Each is a child process bound to 127.0.0.1 on a free port, logging to a file in its own
work dir, stopped by its own PID (SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent


class BenchError(Exception):
    """A part of the benchmark cannot run; the message says why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Child:
    """A server child process; ``url`` is its base URL once ``start`` returned."""

    name = "child"
    ready_path = "/"
    ready_any_status = False  # nginx: any HTTP answer means it is listening

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"{self.name}.log"
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def argv(self) -> list[str]:
        raise NotImplementedError

    def popen_kwargs(self) -> dict:
        return {}

    def start(self, timeout: float = 30.0) -> Child:
        self.port = free_port()
        argv = self.argv()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                **self.popen_kwargs(),
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(
                    f"{self.name} exited (rc {self.proc.returncode}) during startup; "
                    f"log {self.log_path}:\n{log_tail(self.log_path)}"
                )
            try:
                status, _ = http_get(self.url + self.ready_path, timeout=2)
                if status == 200 or self.ready_any_status:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise BenchError(
            f"{self.name} not ready ({self.ready_path} != 200) after {timeout:.0f}s; "
            f"log {self.log_path}:\n{log_tail(self.log_path)}"
        )

    def stop(self, grace: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


NGINX_CONF = """\
daemon off;
master_process on;
worker_processes {workers};
user root;
error_log {dir}/error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/tmp/client_body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    types {{ }}
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ }}
    }}
}}
"""


class Nginx(Child):
    """nginx serving ``root`` statically with sendfile, one worker unless told."""

    name = "nginx"
    ready_any_status = True

    def __init__(self, workdir: Path, root: Path, workers: int = 1) -> None:
        super().__init__(workdir)
        self.root = root
        self.workers = workers

    def argv(self) -> list[str]:
        (self.workdir / "tmp").mkdir(exist_ok=True)
        conf = self.workdir / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                workers=self.workers,
                dir=self.workdir,
                port=self.port,
                root=self.root,
            )
        )
        return [
            "nginx",
            "-p",
            str(self.workdir),
            "-e",
            str(self.workdir / "error.log"),
            "-c",
            str(conf),
        ]


class KleinBaseline(Child):
    """bench/klein_baseline.py: a bare Klein route returning fixed narinfo bytes."""

    name = "klein"

    def __init__(self, workdir: Path, narinfo_path: str, narinfo_file: Path) -> None:
        super().__init__(workdir)
        self.narinfo_file = narinfo_file
        self.ready_path = narinfo_path

    def argv(self) -> list[str]:
        return [
            sys.executable,
            str(BENCH / "klein_baseline.py"),
            str(self.port),
            str(self.narinfo_file),
            str(self.workdir / "klein-app.log"),
        ]


class Ncps(Child):
    """The ncps daemon, per the daemon contract (twist plugin ``ncps``)."""

    name = "ncps"
    ready_path = "/healthz"

    def __init__(
        self,
        workdir: Path,
        upstream_url: str,
        upstream_key: str,
        extra_args: list[str] | None = None,
        command: list[str] | None = None,
        storage_args: list[str] | None = None,
    ) -> None:
        """``storage_args`` replace ``--cache-storage-local=<workdir>/storage``
        (S3 flags, a database URL...); ``{workdir}`` expands in them too."""
        super().__init__(workdir)
        self.command = command or [sys.executable, "-m", "twisted", "ncps"]
        self.storage = workdir / "storage"
        self.storage_args = [
            a.replace("{workdir}", str(workdir))
            for a in storage_args or [f"--cache-storage-local={self.storage}"]
        ]
        self.upstream_url = upstream_url
        self.upstream_key = upstream_key
        self.extra_args = [
            a.replace("{workdir}", str(workdir)) for a in extra_args or []
        ]

    def argv(self) -> list[str]:
        self.storage.mkdir(parents=True, exist_ok=True)
        return [
            *self.command,
            "--cache-hostname=ncps-bench",
            *self.storage_args,
            f"--cache-upstream-url={self.upstream_url}",
            f"--cache-upstream-public-key={self.upstream_key}",
            f"--server-addr=127.0.0.1:{self.port}",
            *self.extra_args,
        ]

    def popen_kwargs(self) -> dict:
        # Hermetic: only the flags configure it (no settings from the caller's
        # environment, no config file from the caller's home).
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("CACHE_", "NCPS_", "SERVER_", "LOG_", "NETRC_"))
        }
        env.update(
            PYTHONPATH=str(REPO),
            HOME=str(self.workdir),
            XDG_CONFIG_HOME=str(self.workdir / "xdg-config"),
        )
        return {"env": env, "cwd": str(REPO)}

    def pubkey(self) -> str:
        status, body = http_get(self.url + "/pubkey")
        if status != 200:
            raise BenchError(f"ncps GET /pubkey -> {status}")
        return body.decode().strip()


def ncps_unavailable_reason() -> str | None:
    """None if the daemon can be started, else why not."""
    if not (REPO / "ncps" / "tap.py").exists():
        return "ncps/tap.py does not exist yet (the daemon is not written)"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, "-m", "twisted", "ncps", "--help"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-15:])
        return f"`python -m twisted ncps --help` failed (rc {proc.returncode}):\n{tail}"
    return None
