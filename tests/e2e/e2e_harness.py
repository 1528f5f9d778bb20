"""Process-level helpers for the e2e suite: upstream server, ncps daemon, HTTP.

Nothing here starts anything by itself; ``conftest.py`` wires these into fixtures that
also clean up. Every wait is a poll with a deadline; no sleep is synchronisation.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from e2e_nix import compression_of_file, decode_nar, parse_narinfo

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
UPSTREAM_SCRIPT = HERE / "upstream.py"
PROXY_HOSTNAME = "ncps-e2e"


def wait_until(
    predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05
) -> object:
    """Poll ``predicate`` until it returns something truthy, or fail at ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def remove_tree(path: Path) -> None:
    """``rm -rf`` that also works without root on Nix's read-only store directories."""
    if not path.exists():
        return
    for dirpath, _, _ in os.walk(path):  # does not follow symlinks
        os.chmod(dirpath, 0o755)
    shutil.rmtree(path)


def tail(path: Path, lines: int = 80) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"<{path} does not exist>"
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------- HTTP


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


def http_request(
    port: int, path: str, method: str = "GET", timeout: float = 30
) -> Response:
    """One request on a fresh connection; ``path`` is sent verbatim."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        conn.endheaders()
        resp = conn.getresponse()
        body = resp.read()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body)
    finally:
        conn.close()


class StreamingGet:
    """A GET whose body the test reads piecewise, and may abandon halfway."""

    def __init__(self, port: int, path: str, timeout: float = 30) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        self.conn.putrequest("GET", path, skip_accept_encoding=True)
        self.conn.endheaders()
        self.response = self.conn.getresponse()
        self.received = bytearray()

    @property
    def status(self) -> int:
        return self.response.status

    def read_at_least(self, n: int) -> None:
        while len(self.received) < n:
            chunk = self.response.read1(65536)
            if not chunk:
                raise AssertionError(
                    f"body ended after {len(self.received)} bytes, wanted {n}"
                )
            self.received += chunk

    def read_all(self) -> bytes:
        """Read to the end; raises if the server aborts the connection early."""
        self.received += self.response.read()
        return bytes(self.received)

    def abandon(self) -> None:
        """Disconnect abruptly (RST), as a client killed mid-download would."""
        sock = self.conn.sock
        if sock is not None:
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        self.conn.close()

    def close(self) -> None:
        self.conn.close()


# --------------------------------------------------------------------------- upstream


class UpstreamServer:
    """``upstream.py`` in a subprocess; its request log is shared across restarts."""

    def __init__(
        self,
        workdir: Path,
        cache_dir: Path,
        throttle_bps: int = 0,
        extra_args: Sequence[str] = (),
    ) -> None:
        """``extra_args``: more ``upstream.py`` flags (``--delay``...)."""
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.cache_dir = cache_dir
        self.throttle_bps = throttle_bps
        self.extra_args = list(extra_args)
        self.port = 0
        self.log_path = workdir / "requests.jsonl"
        self.stderr_path = workdir / "upstream.stderr"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10) -> UpstreamServer:
        assert self.proc is None, "already running"
        port_file = self.workdir / "port"
        port_file.unlink(missing_ok=True)
        cmd = [
            sys.executable, str(UPSTREAM_SCRIPT), "--dir", str(self.cache_dir),
            "--port", str(self.port), "--port-file", str(port_file),
            "--log", str(self.log_path), "--throttle-bps", str(self.throttle_bps),
            *self.extra_args,
        ]  # fmt: skip
        with self.stderr_path.open("ab") as err:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err
            )

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"upstream exited with {self.proc.returncode}:\n"
                    + tail(self.stderr_path)
                )
            return port_file.exists()

        wait_until(ready, timeout, "the upstream server to listen")
        self.port = int(port_file.read_text())
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def restart(
        self, cache_dir: Path | None = None, throttle_bps: int | None = None
    ) -> None:
        """Stop, then serve ``cache_dir`` (default: the same one) on the same port."""
        self.stop()
        if cache_dir is not None:
            self.cache_dir = cache_dir
        if throttle_bps is not None:
            self.throttle_bps = throttle_bps
        self.start()

    def records(self, event: str = "request") -> list[dict]:
        if not self.log_path.exists():
            return []
        out = []
        for line in self.log_path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                if record["event"] == event:
                    out.append(record)
        return out

    def request_paths(self, method: str = "GET") -> list[str]:
        return [r["path"] for r in self.records() if r["method"] == method]

    def count(self, path: str, method: str = "GET") -> int:
        """How many ``method`` requests for ``path`` (``/``-prefixed) arrived so far."""
        return self.request_paths(method).count(path)

    def max_nar_inflight(self) -> int:
        """The most ``/nar/`` requests this server was serving at one time."""
        return max((r.get("nar_inflight", 0) for r in self.records()), default=0)

    def nar_requests_settled(self) -> bool:
        """Every ``/nar/`` request that arrived has been answered (or aborted)."""
        started = [r for r in self.records() if r["path"].startswith("/nar/")]
        done = [r for r in self.records("done") if r["path"].startswith("/nar/")]
        return len(started) == len(done)


# --------------------------------------------------------------------------- ncps


def cli_command() -> list[str]:
    """How to run the ``ncps`` command itself (``ncps serve ...``, ``ncps migrate``).

    ``NCPS_E2E_CLI`` (a shell-style command line) replaces the default, which runs
    ``ncps.cli:main`` from this checkout, as the installed ``ncps`` script does.
    """
    override = os.environ.get("NCPS_E2E_CLI", "").strip()
    if override:
        return shlex.split(override)
    return [
        sys.executable, "-c",
        "import sys; from ncps.cli import main; sys.argv[0] = 'ncps'; main()",
    ]  # fmt: skip


_URL_PASSWORD = re.compile(r"(://[^/:@\s]+):[^@\s/]+@")


def redact_passwords(text: str) -> str:
    """``scheme://user:secret@host`` -> ``scheme://user:***@host``."""
    return _URL_PASSWORD.sub(r"\1:***@", text)


def part_files(directory: Path) -> list[Path]:
    """Every ``*.part`` file anywhere below ``directory`` (none if it is missing)."""
    if not directory.exists():
        return []
    return sorted(directory.rglob("*.part"))


def daemon_command() -> list[str]:
    """How to start the daemon: ``python -m twisted ncps`` from the repo root.

    ``NCPS_E2E_DAEMON`` (a shell-style command line) replaces that prefix, e.g. to run
    the suite against an installed build; the flags appended after it stay the same.
    """
    override = os.environ.get("NCPS_E2E_DAEMON", "").strip()
    return (
        shlex.split(override) if override else [sys.executable, "-m", "twisted", "ncps"]
    )


class Backend:
    """Where a daemon keeps its NARs and metadata: flags, and a look inside.

    ``storage`` is a local directory (also the SQLite file's home) or, with
    ``s3`` set, an S3 bucket; ``database_url`` None means the default SQLite
    file under ``storage``.
    """

    def __init__(
        self,
        name: str,
        storage: Path,
        database_url: str | None = None,
        s3: Any = None,
        bucket: str | None = None,
    ) -> None:
        self.name = name
        self.storage = storage
        self.database_url = database_url
        self.s3 = s3  # tests/servers.py S3Server
        self.bucket = bucket

    def flags(self) -> list[str]:
        if self.s3 is not None:
            flags = [
                f"--cache-storage-s3-bucket={self.bucket}",
                f"--cache-storage-s3-endpoint={self.s3.endpoint}",
                f"--cache-storage-s3-region={self.s3.region}",
                f"--cache-storage-s3-access-key-id={self.s3.access_key_id}",
                f"--cache-storage-s3-secret-access-key={self.s3.secret_access_key}",
                "--cache-storage-s3-force-path-style=true",
                f"--cache-temp-path={self.storage / 'tmp'}",
            ]
        else:
            flags = [f"--cache-storage-local={self.storage}"]
        if self.database_url is not None:
            flags.append(f"--cache-database-url={self.database_url}")
        return flags

    def sqlalchemy_url(self) -> str:
        from ncps.db.engine import sqlalchemy_url

        url = self.database_url or f"sqlite:{self.storage}/db/ncps.sqlite3"
        return sqlalchemy_url(url)[0].render_as_string(hide_password=False)

    def db_rows(self, table: str) -> list[dict]:
        """All rows of ``table`` (an empty list before the schema exists)."""
        import sqlalchemy

        if self.database_url is None:
            db_file = self.storage / "db" / "ncps.sqlite3"
            assert db_file.exists(), f"no database at {db_file}"
        engine = sqlalchemy.create_engine(
            self.sqlalchemy_url(), poolclass=sqlalchemy.pool.NullPool
        )
        try:
            with engine.connect() as conn:
                rows = conn.execute(sqlalchemy.text(f"SELECT * FROM {table}"))
                return [dict(r._mapping) for r in rows]
        finally:
            engine.dispose()

    def object_keys(self) -> list[str]:
        """Keys (``store/nar/...``) of the committed NAR objects."""
        if self.s3 is not None:
            client = self.s3.client()
            pages = client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix="store/nar/"
            )
            return sorted(o["Key"] for page in pages for o in page.get("Contents", []))
        root = self.storage / "store" / "nar"
        if not root.exists():
            return []
        return sorted(
            str(p.relative_to(self.storage)) for p in root.rglob("*") if p.is_file()
        )

    def read_object(self, key: str) -> bytes:
        if self.s3 is not None:
            body = self.s3.client().get_object(Bucket=self.bucket, Key=key)["Body"]
            return bytes(body.read())
        return (self.storage / key).read_bytes()


class Ncps:
    """The ncps daemon (``python -m twisted ncps``) in a subprocess."""

    def __init__(
        self,
        workdir: Path,
        backend: Backend,
        upstream_urls: Sequence[str],
        upstream_keys: Sequence[str],
        extra_args: Sequence[str] = (),
        argv: Callable[[int], Sequence[str]] | None = None,
        nofile_limit: int | None = None,
    ) -> None:
        """``argv(port)``, when given, is the whole command line (the flags above are
        then unused): to start ncps exactly as a user types it. ``nofile_limit`` sets
        both the soft and the hard RLIMIT_NOFILE of the daemon, like ``ulimit -n``
        would under a service manager (ncps may raise its soft limit to the hard one).
        """
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.backend = backend
        self.storage = backend.storage
        self.upstream_urls = list(upstream_urls)
        self.upstream_keys = list(upstream_keys)
        self.extra_args = list(extra_args)
        self.argv = argv
        self.nofile_limit = nofile_limit
        self.port = 0
        self.log_path = workdir / "ncps.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        if self.argv is not None:
            return list(self.argv(self.port))
        cmd = [
            *daemon_command(),
            f"--cache-hostname={PROXY_HOSTNAME}",
            *self.backend.flags(),
            f"--server-addr=127.0.0.1:{self.port}",
            "--cache-upstream-response-header-timeout=3s",
            "--cache-upstream-dialer-timeout=3s",
            "--log-level=debug",
        ]  # fmt: skip
        cmd += [f"--cache-upstream-url={u}" for u in self.upstream_urls]
        cmd += [f"--cache-upstream-public-key={k}" for k in self.upstream_keys]
        return cmd + self.extra_args

    def start(self, timeout: float = 30) -> Ncps:
        """Start, wait for ``/healthz`` to be 200. Keeps the port across restarts."""
        assert self.proc is None, "already running"
        if not self.port:
            self.port = free_port()
        self.starts += 1
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1")
        # The banner is ours, not ncps's: it must not put a password in the log
        # that the tests search for leaked passwords.
        banner = redact_passwords(f"{self.command()}")
        limit = self.nofile_limit

        def set_limits() -> None:
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        with self.log_path.open("ab") as log:
            log.write(f"\n===== e2e: start #{self.starts}: {banner}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command(), cwd=REPO_ROOT, env=env,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=set_limits if limit is not None else None,
            )  # fmt: skip

        def healthy() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"ncps exited with {self.proc.returncode} during startup "
                    f"(log: {self.log_path}, its tail is attached to the report)"
                )
            try:
                return http_request(self.port, "/healthz", timeout=2).status == 200
            except OSError:
                return False

        try:
            wait_until(
                healthy, timeout, f"ncps /healthz on port {self.port}", interval=0.1
            )
        except AssertionError:
            self.kill()
            raise
        return self

    def stop(self, timeout: float = 20) -> int | None:
        """SIGTERM and wait; returns the exit status (SIGKILLs and fails on a hang)."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
                raise AssertionError(
                    f"ncps did not exit within {timeout}s of SIGTERM "
                    f"(log: {self.log_path})"
                ) from None
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)

    def restart(self) -> Ncps:
        self.stop()
        return self.start()

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not running"
        return self.proc.pid

    def open_fds(self) -> int:
        """How many descriptors the daemon has open now (0 once it is gone)."""
        try:
            return len(os.listdir(f"/proc/{self.pid}/fd"))
        except (FileNotFoundError, ProcessLookupError):
            return 0

    def nofile_limits(self) -> tuple[int, int]:
        """The daemon's (soft, hard) RLIMIT_NOFILE, as the kernel reports them now."""
        for line in Path(f"/proc/{self.pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
        raise AssertionError(f"no open-files limit in /proc/{self.pid}/limits")

    def peak_rss_kib(self) -> int:
        """The daemon's peak resident set size so far (``VmHWM``), in KiB."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError(f"no VmHWM in /proc/{self.pid}/status")

    # ---- HTTP
    def get(self, path: str, method: str = "GET", timeout: float = 30) -> Response:
        return http_request(self.port, path, method=method, timeout=timeout)

    def pubkey(self) -> str:
        resp = self.get("/pubkey")
        assert resp.status == 200, f"/pubkey: {resp.status} {resp.text!r}"
        return resp.text

    def narinfo(self, hash_part: str) -> dict[str, object]:
        resp = self.get(f"/{hash_part}.narinfo")
        assert resp.status == 200, f"narinfo {hash_part}: {resp.status} {resp.text!r}"
        return parse_narinfo(resp.text)

    # ---- what landed in storage and in the database
    def db_rows(self, table: str) -> list[dict]:
        return self.backend.db_rows(table)

    def nar_files(self) -> list[str]:
        """Keys (``store/nar/<h0>/<h0h1>/<file>``) of the committed NAR objects."""
        return self.backend.object_keys()

    def log_tail(self, lines: int = 80) -> str:
        return tail(self.log_path, lines)


# --------------------------------------------------------------------------- assertions


def committed_nar_digests(daemon: Ncps) -> dict[str, str]:
    """SHA-256 (hex) of the NAR inside every committed object, decompressed by its name.

    An object that does not even decompress maps to ``"undecodable: <error>"``.
    """
    digests = {}
    for key in daemon.nar_files():
        try:
            body = daemon.backend.read_object(key)
            nar = decode_nar(body, compression_of_file(PurePosixPath(key)))
        except Exception as e:  # a truncated xz/zstd stream, or gone meanwhile
            digests[key] = f"undecodable: {e!r}"
        else:
            digests[key] = hashlib.sha256(nar).hexdigest()
    return digests


class HttpRelay:
    """Relays TCP from clients to ``127.0.0.1:target_port``, one thread per
    direction and connection; subclasses watch what passes by overriding
    :meth:`relay_requests` and :meth:`relay_responses` (both get the
    connection's ``state``, from :meth:`new_state`)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.listener.close()

    def new_state(self) -> Any:
        return None

    def relay_requests(
        self, src: socket.socket, dst: socket.socket, state: Any
    ) -> None:
        _pump(src, dst)

    def relay_responses(
        self, src: socket.socket, dst: socket.socket, state: Any
    ) -> None:
        _pump(src, dst)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port), 5)
            state = self.new_state()
            threading.Thread(
                target=self.relay_requests, args=(client, server, state), daemon=True
            ).start()
            threading.Thread(
                target=self.relay_responses, args=(server, client, state), daemon=True
            ).start()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def wait_for_committed_nar(daemon: Ncps, nar_sha256: str, timeout: float = 30) -> str:
    """Poll until an object holding the NAR with this digest is committed; its key."""

    def find() -> str | None:
        for key, digest in committed_nar_digests(daemon).items():
            if digest == nar_sha256:
                return key
        return None

    found = wait_until(
        find, timeout, f"NAR {nar_sha256[:12]} in {daemon.backend.name}", 0.2
    )
    assert isinstance(found, str)
    return found


# --------------------------------------------------------------------------- faults


class FaultyProxy:
    """A TCP relay to ``127.0.0.1:target_port`` that a test can break on purpose.

    ``down()`` cuts every relayed connection (RST) and refuses new ones until
    ``up()``; the server behind it keeps its data, unlike a restarted moto.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._up = True
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                up = self._up
            if not up:
                _reset(client)
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port), 5)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._open += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def down(self) -> None:
        with self._lock:
            self._up = False
            conns, self._open = self._open, []
        for s in conns:
            _reset(s)

    def up(self) -> None:
        with self._lock:
            self._up = True

    def close(self) -> None:
        self._closed = True
        self.down()
        self.listener.close()


def _reset(sock: socket.socket) -> None:
    """Close at once, as a crashed peer would (also waking a relay thread
    blocked in recv on it, which a bare close() would not)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
