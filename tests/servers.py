"""Real PostgreSQL, MariaDB and S3 (moto) servers on 127.0.0.1, for tests/benchmarks.

Each server lives in its own directory (by default a fresh ``/tmp/ncps-servers-*``,
mode 0755 so the ``postgres`` user can reach it when we run as root) and listens on a
free port of 127.0.0.1::

    pg = PostgresServer.create()
    url = pg.new_database()     # postgresql://postgres@127.0.0.1:PORT/ncps_...
    pg.stop(); pg.start()       # same port, same data
    pg.destroy()                # stop and delete everything

Every created server is also destroyed at interpreter exit (``atexit``), so an aborted
run leaves no processes behind. A missing binary raises :class:`ServerError` with a
hint on what to install; nothing is skipped.

Command line (for benchmarks and manual runs)::

    python tests/servers.py start pg mariadb s3

prints ``export`` lines for the servers, then waits for Ctrl-C (or SIGTERM) and stops
them.
"""

from __future__ import annotations

import atexit
import glob
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol, Self

HOST = "127.0.0.1"
START_TIMEOUT = 60.0
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ServerError(RuntimeError):
    """A server could not be installed, initialised, started or stopped."""


class _Server(Protocol):
    def destroy(self) -> None: ...


_live: dict[int, _Server] = {}


def _register(server: _Server) -> None:
    _live[id(server)] = server


def _unregister(server: _Server) -> None:
    _live.pop(id(server), None)


@atexit.register
def destroy_all() -> None:
    """Destroy every server created in this process and not destroyed yet."""
    for server in list(_live.values()):
        try:
            server.destroy()
        except Exception as e:  # keep cleaning up the others
            print(f"servers: cleanup of {server!r} failed: {e}", file=sys.stderr)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def unique_name(prefix: str = "ncps_") -> str:
    """``prefix`` + 12 random hex digits: a database or bucket name."""
    return prefix + uuid.uuid4().hex[:12]


def is_root() -> bool:
    return os.geteuid() == 0


def _which(name: str) -> str | None:
    """``shutil.which`` that also looks in the sbin directories."""
    path = os.environ.get("PATH", "") + os.pathsep + SBIN_PATH
    return shutil.which(name, path=path)


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def _make_dir(base_dir: Path | None, prefix: str) -> tuple[Path, bool]:
    """A fresh 0755 directory; returns (dir, whether destroy() may delete its parent).

    Without ``base_dir`` we create our own ``/tmp/ncps-servers-*`` (pytest's tmp_path
    is 0700 under root, which the postgres user cannot traverse).
    """
    if base_dir is None:
        parent = Path(tempfile.mkdtemp(prefix="ncps-servers-", dir="/tmp"))
        parent.chmod(0o755)
    else:
        base_dir.mkdir(parents=True, exist_ok=True)
        parent = base_dir
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    path.chmod(0o755)
    return path, base_dir is None


def _wait_until(
    check: Callable[[], bool],
    what: str,
    log: Path,
    proc: subprocess.Popen[bytes] | None = None,
    timeout: float = START_TIMEOUT,
) -> None:
    """Poll ``check`` until it returns true; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            raise ServerError(
                f"{what} exited with status {proc.returncode} while starting; "
                f"log {log}:\n{_tail(log)}"
            )
        if time.monotonic() > deadline:
            raise ServerError(
                f"{what} not ready after {timeout:.0f}s; log {log}:\n{_tail(log)}"
            )
        time.sleep(0.05)


def _run(
    cmd: Sequence[str], log: Path, what: str, timeout: float = START_TIMEOUT
) -> None:
    """Run ``cmd`` with its output appended to ``log``; ServerError when it fails."""
    with log.open("ab") as out:
        try:
            result = subprocess.run(
                list(cmd),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                start_new_session=True,  # keep Ctrl-C for us, not the servers
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise ServerError(f"{what} timed out; log {log}:\n{_tail(log)}") from None
    if result.returncode != 0:
        raise ServerError(
            f"{what} failed with status {result.returncode}; log {log}:\n{_tail(log)}"
        )


def _spawn(cmd: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
    """Start a long-running server with its output going to ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _terminate(proc: subprocess.Popen[bytes] | None, timeout: float = 30.0) -> None:
    """SIGTERM ``proc`` and wait for it; SIGKILL if it does not exit in time."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


# --------------------------------------------------------------------------------------
# Lifecycle shared by the servers


class _ManagedServer:
    """A server in its own directory on a free port of 127.0.0.1.

    Subclasses name their directory prefix and log file and provide
    :meth:`_check_installed`, :meth:`_prepare` (one-time set-up), :meth:`start` and
    :meth:`stop`; :meth:`_shutdown` is what :meth:`destroy` does before deleting.
    """

    _dir_prefix: ClassVar[str]
    _log_name: ClassVar[str]

    def __init__(self, directory: Path, port: int, owns_parent: bool) -> None:
        self.host = HOST
        self.port = port
        self.directory = directory
        self.log_path = directory / self._log_name
        self._owns_parent = owns_parent
        self._destroyed = False

    @classmethod
    def create(cls, base_dir: Path | None = None) -> Self:
        """Set up a server under ``base_dir`` (or a fresh /tmp dir) and start it."""
        cls._check_installed()  # fail before creating anything
        directory, owns_parent = _make_dir(base_dir, cls._dir_prefix)
        server = cls(directory, free_port(), owns_parent)
        _register(server)
        try:
            server._prepare()
            server.start()
        except BaseException:
            server.destroy()
            raise
        return server

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.host}:{self.port} {self.directory}>"

    @classmethod
    def _check_installed(cls) -> None:
        """Raise :class:`ServerError` when what the server needs is missing."""
        raise NotImplementedError

    def _prepare(self) -> None:
        """One-time set-up of a new directory before the first :meth:`start`."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def _shutdown(self) -> None:
        self.stop()

    def destroy(self) -> None:
        """Stop the server and delete its directory."""
        if self._destroyed:
            return
        self._destroyed = True
        try:
            self._shutdown()
        finally:
            _unregister(self)
            shutil.rmtree(
                self.directory.parent if self._owns_parent else self.directory,
                ignore_errors=True,
            )


class _DatabaseServer(_ManagedServer):
    """A SQL server whose URLs are ``<_url_prefix>HOST:PORT/<database>``."""

    _url_prefix: ClassVar[str]
    _admin_database: ClassVar[str]

    @property
    def admin_url(self) -> str:
        return self.url(self._admin_database)

    def url(self, database: str) -> str:
        return f"{self._url_prefix}{self.host}:{self.port}/{database}"


class _ProcessServer(_ManagedServer):
    """A server that runs as our child process until :meth:`stop` terminates it."""

    _proc: subprocess.Popen[bytes] | None = None

    def _spawn_until(
        self, cmd: Sequence[str], out: Path, ready: Callable[[], bool], what: str
    ) -> None:
        """Start ``cmd`` unless it runs; return once ``ready()``, else kill it."""
        if self._proc is not None and self._proc.poll() is None:
            return
        self._proc = _spawn(cmd, out)
        try:
            _wait_until(ready, what, self.log_path, self._proc)
        except BaseException:
            _terminate(self._proc)
            raise


# --------------------------------------------------------------------------------------
# PostgreSQL


def postgres_bindir() -> Path:
    """The directory of initdb/pg_ctl: newest /usr/lib/postgresql/*/bin, else PATH."""
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")

    def version(path: str) -> tuple[int, ...]:
        parts = Path(path).parent.parent.name.split(".")
        return tuple(int(p) for p in parts if p.isdigit())

    if found:
        return Path(max(found, key=version)).parent
    initdb = _which("initdb")
    if initdb and _which("pg_ctl"):
        return Path(initdb).parent
    raise ServerError(
        "PostgreSQL is not installed: no /usr/lib/postgresql/*/bin/initdb and no "
        "initdb on PATH (Debian: apt-get install postgresql)"
    )


class PostgresServer(_DatabaseServer):
    """A throwaway PostgreSQL cluster: superuser ``postgres``, trust auth, TCP only."""

    _dir_prefix = "pg-"
    _log_name = "server.log"
    _url_prefix = "postgresql://postgres@"
    _admin_database = "postgres"

    def __init__(self, directory: Path, port: int, owns_parent: bool) -> None:
        super().__init__(directory, port, owns_parent)
        self.data_dir = directory / "data"
        self.socket_dir = directory / "sock"
        self.bindir = postgres_bindir()
        self._running = False

    @classmethod
    def _check_installed(cls) -> None:
        postgres_bindir()

    def _as_owner(self, cmd: list[str]) -> list[str]:
        """initdb and pg_ctl refuse to run as root: run them as ``postgres`` then."""
        if is_root():
            return ["runuser", "-u", "postgres", "--", *cmd]
        return cmd

    def _prepare(self) -> None:  # initdb
        self.socket_dir.mkdir()
        if is_root():
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                raise ServerError(
                    "running as root but there is no 'postgres' user to run "
                    "PostgreSQL as (apt-get install postgresql creates it)"
                ) from None
            for path in (self.directory, self.socket_dir):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        cmd = [
            str(self.bindir / "initdb"),
            "-D", str(self.data_dir),
            "-U", "postgres",
            "--auth=trust",
            "-E", "UTF8",
            "--locale=C.UTF-8",
        ]  # fmt: skip
        _run(self._as_owner(cmd), self.directory / "initdb.log", "initdb")

    def start(self) -> None:
        """Start the cluster (again) on the same port; returns once it accepts."""
        if self._running:
            return
        options = f"-c listen_addresses={self.host} -p {self.port} -k {self.socket_dir}"
        cmd = [
            str(self.bindir / "pg_ctl"),
            "-D", str(self.data_dir),
            "-l", str(self.log_path),
            "-w", "-t", str(int(START_TIMEOUT)),
            "-o", options,
            "start",
        ]  # fmt: skip
        _run(self._as_owner(cmd), self.directory / "pg_ctl.log", "pg_ctl start")
        self._running = True

    def stop(self) -> None:
        """Fast shutdown; the data stays for :meth:`start`."""
        if not self._running:
            return
        self._pg_ctl_stop("fast")
        self._running = False

    def _pg_ctl_stop(self, mode: str) -> None:
        cmd = [str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w"]
        _run(
            self._as_owner([*cmd, "stop"]), self.directory / "pg_ctl.log", "pg_ctl stop"
        )

    def _shutdown(self) -> None:
        """For destroy(): immediate mode if a fast stop fails."""
        try:
            if (self.data_dir / "postmaster.pid").exists():
                try:
                    self._pg_ctl_stop("fast")
                except ServerError:
                    self._pg_ctl_stop("immediate")
        finally:
            self._running = False

    def connect(self, database: str = "postgres") -> Any:
        """A psycopg2 connection (the caller closes it)."""
        import psycopg2

        return psycopg2.connect(
            dbname=database, user="postgres", host=self.host, port=self.port,
            connect_timeout=10,
        )  # fmt: skip

    def new_database(self) -> str:
        """Create an empty database ``ncps_<random>``; returns its URL."""
        name = unique_name()
        conn = self.connect()
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.url(name)


# --------------------------------------------------------------------------------------
# MariaDB


def mariadb_binaries() -> tuple[str, str]:
    """(mariadb-install-db, mariadbd), or ServerError naming the package."""
    install_db = _which("mariadb-install-db")
    server = _which("mariadbd")
    if install_db is None or server is None:
        raise ServerError(
            "MariaDB is not installed: mariadb-install-db or mariadbd not found "
            "(Debian: DEBIAN_FRONTEND=noninteractive apt-get install mariadb-server)"
        )
    return install_db, server


class MariaDBServer(_DatabaseServer, _ProcessServer):
    """A throwaway MariaDB server: ``root`` without a password, TCP on 127.0.0.1."""

    _dir_prefix = "mariadb-"
    _log_name = "error.log"
    _url_prefix = "mysql://root@"
    _admin_database = "mysql"

    def __init__(self, directory: Path, port: int, owns_parent: bool) -> None:
        super().__init__(directory, port, owns_parent)
        self.data_dir = directory / "data"
        self._install_db, self._mariadbd = mariadb_binaries()

    @classmethod
    def _check_installed(cls) -> None:
        mariadb_binaries()

    def _user_args(self) -> list[str]:
        return ["--user=root"] if is_root() else []

    def _prepare(self) -> None:  # mariadb-install-db
        cmd = [
            self._install_db,
            "--no-defaults",
            f"--datadir={self.data_dir}",
            *self._user_args(),
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
        ]
        _run(cmd, self.directory / "install-db.log", "mariadb-install-db")

    def start(self) -> None:
        """Start the server (again) on the same port; returns once root can connect."""
        cmd = [
            self._mariadbd,
            "--no-defaults",
            f"--datadir={self.data_dir}",
            *self._user_args(),
            f"--bind-address={self.host}",
            f"--port={self.port}",
            f"--socket={self.directory / 'mysqld.sock'}",
            f"--pid-file={self.directory / 'mariadb.pid'}",
            f"--log-error={self.log_path}",
            "--skip-name-resolve",
        ]
        self._spawn_until(
            cmd, self.directory / "mariadbd.out", self._accepts, "mariadbd"
        )

    def _accepts(self) -> bool:
        try:
            self.connect().close()
        except Exception:
            return False
        return True

    def stop(self) -> None:
        """Shut down (SIGTERM); the data stays for :meth:`start`."""
        _terminate(self._proc, timeout=60.0)

    def connect(self, database: str | None = None) -> Any:
        """A pymysql connection as root (the caller closes it)."""
        import pymysql

        return pymysql.connect(
            host=self.host, port=self.port, user="root", password="",
            database=database, connect_timeout=5,
        )  # fmt: skip

    def new_database(self) -> str:
        """Create an empty utf8mb4/utf8mb4_bin database ``ncps_<random>``; its URL."""
        name = unique_name()
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(
                    f"CREATE DATABASE `{name}` "
                    "CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
                )
        finally:
            conn.close()
        return self.url(name)


# --------------------------------------------------------------------------------------
# S3 (moto)


class S3Server(_ProcessServer):
    """moto's S3 in server mode. It keeps everything in memory: a restart
    (:meth:`stop` then :meth:`start`) loses every bucket and object."""

    region = "us-east-1"
    access_key_id = "testing"
    secret_access_key = "testing"
    _dir_prefix = "s3-"
    _log_name = "moto.log"

    def __init__(self, directory: Path, port: int, owns_parent: bool) -> None:
        super().__init__(directory, port, owns_parent)
        self.endpoint = f"http://{HOST}:{port}"

    @classmethod
    def _check_installed(cls) -> None:
        if not (_has_module("moto") and _has_module("flask")):
            raise ServerError(
                f"moto's server mode is not installed in {sys.executable}: "
                "pip install 'moto[server]'"
            )

    def __repr__(self) -> str:
        return f"<S3Server {self.endpoint} {self.directory}>"

    def env(self) -> dict[str, str]:
        """Environment variables for a boto3 user (a subprocess) of this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def start(self) -> None:
        """Start moto (again) on the same port - empty: moto loses data on restart."""
        cmd = [
            sys.executable,
            "-m",
            "moto.server",
            "-H",
            self.host,
            "-p",
            str(self.port),
        ]
        self._spawn_until(cmd, self.log_path, self._answers, "moto server")

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=5):
                return True
        except (OSError, urllib.error.URLError):
            return False

    def stop(self) -> None:
        """Stop moto. Its buckets and objects are gone."""
        _terminate(self._proc)

    def client(self) -> Any:
        """A boto3 S3 client for this server."""
        import boto3

        os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
        )

    def new_bucket(self) -> str:
        """Create an empty bucket ``ncps-<random>``; returns its name."""
        name = unique_name("ncps-")
        self.client().create_bucket(Bucket=name)
        return name


# --------------------------------------------------------------------------------------
# Command line


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(0)


def main(argv: Sequence[str]) -> int:
    """``start [pg] [mariadb] [s3]``: print export lines, wait for Ctrl-C, stop all."""
    kinds = list(argv[1:]) or ["pg", "mariadb", "s3"]
    if not argv or argv[0] != "start" or not set(kinds) <= {"pg", "mariadb", "s3"}:
        print(
            "usage: python tests/servers.py start [pg] [mariadb] [s3]", file=sys.stderr
        )
        return 2
    signal.signal(signal.SIGTERM, _raise_exit)
    # a background job of a non-interactive shell starts with SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if "pg" in kinds:
            pg = PostgresServer.create()
            print(f"export NCPS_TEST_POSTGRES_URL={pg.new_database()}")
            print(f"export NCPS_TEST_POSTGRES_ADMIN_URL={pg.admin_url}")
        if "mariadb" in kinds:
            db = MariaDBServer.create()
            print(f"export NCPS_TEST_MARIADB_URL={db.new_database()}")
            print(f"export NCPS_TEST_MARIADB_ADMIN_URL={db.admin_url}")
        if "s3" in kinds:
            s3 = S3Server.create()
            print(f"export NCPS_TEST_S3_ENDPOINT={s3.endpoint}")
            print(f"export NCPS_TEST_S3_BUCKET={s3.new_bucket()}")
            for key, value in s3.env().items():
                print(f"export {key}={value}")
        sys.stdout.flush()
        print("# servers running; Ctrl-C stops them", file=sys.stderr)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        destroy_all()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
