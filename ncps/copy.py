"""``ncps copy``: copy a whole cache from one backend to another.

Any pair of backends: local disk or S3 for the NARs, SQLite, PostgreSQL or
MySQL for the metadata.  The order keeps the target consistent at every
moment, so an interrupted run is simply run again:

1. ``config`` rows (the signing key): a key the target holds with another
   value stops the copy before anything is written; absent ones are copied.
2. NAR objects that have a ``nar_files`` row in the source and none in the
   target: streamed into a target temp file, checked (size, and sha256 where
   the key is the file's hash), fsynced and committed; only then is the row
   written.  A bad or missing object is reported, and the copy goes on.
3. ``narinfos`` rows the target lacks (first writer wins, as in the daemon).

Rows keep every column but ``id`` (the target numbers its own rows), so the
timestamps travel with them.  When both sides share the same storage (SQLite
to PostgreSQL in place) objects are not transferred, only checked by size.

This is a command, not the daemon: there is no reactor.  NARs are copied on a
:class:`~concurrent.futures.ThreadPoolExecutor` the command owns; every
``*_thd`` store method and every transaction runs on its threads or on the
main thread.  Environment variables are not read: with two sides they would
be ambiguous.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, TextIO, TypeVar, cast

import attrs
from sqlalchemy import Connection, Engine, Table, insert, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from twisted.python import usage

from ncps import nix32
from ncps.backend import open_database, open_store
from ncps.config import (
    SETTINGS_BY_FLAG,
    Backend,
    _file_value,
    _read_config_file,
    build_backend,
    redact_url,
)
from ncps.db import engine as db_engine
from ncps.db.queries import Database
from ncps.db.schema import config, nar_files, narinfos
from ncps.errors import (
    ConfigError,
    DatabaseUnavailable,
    NcpsError,
    StartupError,
    StorageError,
)
from ncps.nixhash import parse_hash
from ncps.storage.base import NarStore, nar_file_name
from ncps.storage.local import LocalStore
from ncps.threads import Runner

T = TypeVar("T")

SIDES = ("from", "to")
# Per-side flags: --from-<name> / --to-<name> is setting cache-<name>.
SIDE_PARAMETERS = (
    ("storage-local", "DIR", "Local storage directory (or the S3 flags)."),
    ("storage-s3-bucket", "BUCKET", "S3 bucket."),
    ("storage-s3-endpoint", "URL", "S3 endpoint URL with its scheme."),
    ("storage-s3-region", "REGION", "S3 region (default: us-east-1)."),
    ("storage-s3-access-key-id", "KEY", "S3 access key id."),
    ("storage-s3-secret-access-key", "SECRET", "S3 secret access key."),
    (
        "database-url",
        "URL",
        "Database URL (default with local storage: sqlite:<DIR>/db/ncps.sqlite3).",
    ),
    ("temp-path", "DIR", "Directory for temp files (target side)."),
)
# Also taken from a --from-config/--to-config file (no flags of their own).
FILE_ONLY_SETTINGS = (
    "cache-database-pool-max-open-conns",
    "cache-database-pool-max-idle-conns",
)
BACKEND_SETTINGS = (
    *(f"cache-{name}" for name, _, _ in SIDE_PARAMETERS),
    "cache-storage-s3-force-path-style",
    *FILE_ONLY_SETTINGS,
)

BATCH_ROWS = 500
CHUNK = 1024 * 1024
DEFAULT_JOBS = 4
MAX_JOBS = 256
EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_CONFIG = 0, 1, 130, 78


class CopyError(NcpsError):
    """The copy cannot go on (a conflict, a database failing); exit 1.

    The message starts with the flag of the side at fault.
    """


class _Cancelled(Exception):
    """The run is being interrupted: a worker stops streaming."""


def _side_options() -> tuple[list[list[Any]], list[list[Any]]]:
    params: list[list[Any]] = [["jobs", "j", str(DEFAULT_JOBS), "NARs copied at once."]]
    flags: list[list[Any]] = [
        ["dry-run", None, "Only show what would be copied; write nothing."],
        ["no-progress", None, "No progress output on stderr."],
    ]
    for side in SIDES:
        params.append(
            [
                f"{side}-config",
                None,
                None,
                "ncps config file (YAML, TOML or JSON); only its storage, "
                "database and temp keys are used; flags win.",
            ]
        )
        for name, metavar, doc in SIDE_PARAMETERS:
            params.append([f"{side}-{name}", None, None, f"{metavar}: {doc}"])
        flags.append(
            [
                f"{side}-storage-s3-force-path-style",
                None,
                "Address the bucket as <endpoint>/<bucket>.",
            ]
        )
    return params, flags


class CopyOptions(usage.Options):
    synopsis = (
        "[--dry-run] [--no-progress] [--jobs N] "
        "(--from-storage-local DIR | --from-storage-s3-bucket B ...) "
        "[--from-database-url URL] (--to-storage-local DIR | ...) "
        "[--to-database-url URL]"
    )
    optParameters, optFlags = _side_options()

    def backend(self, side: str) -> Backend:
        """One side's :class:`Backend`: its config file, then its flags.

        Raises ConfigError naming this side's flag (``--from-storage-local``).
        """
        try:
            raw: dict[str, Any] = {}
            path = self[f"{side}-config"]
            if path:
                values = _read_config_file(path)
                for flag in BACKEND_SETTINGS:
                    setting = SETTINGS_BY_FLAG[flag]
                    if setting.key in values:
                        raw[flag] = _file_value(setting, values[setting.key])
            for name, _, _ in SIDE_PARAMETERS:
                if self[f"{side}-{name}"] is not None:
                    raw[f"cache-{name}"] = self[f"{side}-{name}"]
            if self[f"{side}-storage-s3-force-path-style"]:
                raw["cache-storage-s3-force-path-style"] = "true"
            return build_backend(raw, flag_prefix=f"{side}-")
        except ConfigError as e:
            raise ConfigError(side_message(str(e), side)) from None

    def jobs(self) -> int:
        text = str(self["jobs"]).strip()
        if not text.isdigit() or not 1 <= int(text) <= MAX_JOBS:
            raise ConfigError(f"--jobs: {text!r} must be a number from 1 to {MAX_JOBS}")
        return int(text)


_FLAG_RE = re.compile(r"--(?:(?:from|to)-)?cache-((?:storage|database|temp)[\w-]*)")
_ENV_HINT_RE = re.compile(r"\s*\(or set [^)]*\)")


def side_message(message: str, side: str) -> str:
    """A backend error message with the flags of ``side`` (``--to-database-url``).

    The backend code names the daemon's flags (``--cache-storage-local``, or
    ``--to-cache-storage-local`` with a prefix) and points at environment
    variables, which copy does not read.
    """
    message = _FLAG_RE.sub(lambda m: f"--{side}-{m.group(1)}", message)
    message = re.sub(r"^--config:", f"--{side}-config:", message)
    return _ENV_HINT_RE.sub("", message)


def _storage_flag(backend: Backend, side: str) -> str:
    if backend.storage_local is not None:
        return f"--{side}-storage-local"
    return f"--{side}-storage-s3-bucket"


def _database_identity(url: str) -> tuple[object, ...]:
    sa_url, sqlite_file = db_engine.sqlalchemy_url(url)
    if sqlite_file is not None:
        return ("sqlite", os.path.realpath(sqlite_file))
    default_port = {"postgresql": 5432, "mysql": 3306}.get(sa_url.get_backend_name())
    return (
        sa_url.get_backend_name(),
        (sa_url.host or "localhost").lower(),
        sa_url.port or default_port,
        sa_url.database,
    )


def _storage_identity(backend: Backend) -> tuple[str, ...]:
    if backend.storage_local is not None:
        return ("local", os.path.realpath(backend.storage_local))
    assert backend.storage_s3 is not None
    s3 = backend.storage_s3
    return ("s3", s3.endpoint.rstrip("/").lower(), s3.bucket)


def check_distinct(source: Backend, target: Backend) -> bool:
    """Refuse a target that is the source; True when only the storage is shared.

    The same database on both sides is refused too: every row would already
    be there, so nothing (not even the objects) would be copied.
    """
    same_db = _database_identity(source.database_url) == _database_identity(
        target.database_url
    )
    same_storage = _storage_identity(source) == _storage_identity(target)
    if same_db and same_storage:
        raise ConfigError(
            f"{_storage_flag(target, 'to')}: the target is the source itself "
            "(same storage and same database)"
        )
    if same_db:
        raise ConfigError(
            f"--to-database-url: {redact_url(target.database_url)} is also the "
            "source's database; give the target a database of its own"
        )
    return same_storage


# -- the two sides ---------------------------------------------------------------------


@attrs.define
class Side:
    """One opened backend.  ``db`` is None for a target without a schema (dry run)."""

    name: str
    backend: Backend
    store: NarStore | None
    db: Database | None
    engine: Engine | None

    def call(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(conn, *args)`` in one transaction, retried on transient errors.

        Raises CopyError naming this side's database flag.
        """
        assert self.db is not None
        try:
            return self.db.call_thd(fn, *args)
        except (DatabaseUnavailable, SQLAlchemyError) as e:
            orig = getattr(e, "orig", None)
            lines = str(orig if orig is not None else e).strip().splitlines()
            reason = lines[0] if lines else type(e).__name__
            raise CopyError(f"--{self.name}-database-url: {reason}") from None

    def close(self) -> None:
        if self.engine is not None:
            self.engine.dispose()


def _database(engine: Engine) -> Database:
    # Only Database.call_thd (transactions with retries) is used: this command
    # has no reactor, so no Runner.
    return Database(engine, runner=cast(Runner, None))


def open_source(backend: Backend) -> Side:
    """Open the source for reading; nothing is created in it.  Blocks.

    Raises ConfigError/StartupError naming a ``--from-`` flag.
    """
    store: NarStore
    if backend.storage_local is not None:
        # No prepare_thd: it creates directories and probes that they are
        # writable, and a source may be a read-only mount.
        if not backend.storage_local.is_dir():
            raise ConfigError(
                f"--from-storage-local: {backend.storage_local} does not exist"
            )
        store = LocalStore(backend.storage_local, backend.temp_path)
    else:
        store = _open_store(backend, "from")
    sqlite_file = db_engine.sqlalchemy_url(backend.database_url)[1]
    if sqlite_file is not None and not sqlite_file.is_file():
        raise ConfigError(f"--from-database-url: {sqlite_file} does not exist")
    engine, _ = open_database(backend, migrate=False, flag="--from-database-url")
    try:
        revision = db_engine.current_revision(engine)
        head = db_engine.head_revision()
    except SQLAlchemyError as e:
        engine.dispose()
        raise StartupError(f"--from-database-url: {str(e).splitlines()[0]}") from None
    if revision != head:
        engine.dispose()
        state = f"at revision {revision}" if revision else "empty (no ncps tables)"
        raise StartupError(
            f"--from-database-url: {redact_url(backend.database_url)} is {state}, "
            f"this ncps expects {head} (run `ncps migrate` on it first)"
        )
    return Side("from", backend, store, _database(engine), engine)


def open_target(backend: Backend, *, dry_run: bool, shared_storage: bool) -> Side:
    """Open the target: storage checked and database migrated.  Blocks.

    In a dry run nothing is written: a local store is not prepared (S3 is
    only checked), the database is not migrated, and a database that does
    not exist yet (or has no schema) gives ``db=None``, read as empty.
    """
    store: NarStore | None = None
    if not dry_run:
        store = _open_store(backend, "to")
    elif backend.storage_s3 is not None and not shared_storage:
        store = _open_store(backend, "to")
    if dry_run:
        sqlite_file = db_engine.sqlalchemy_url(backend.database_url)[1]
        if sqlite_file is not None and not sqlite_file.is_file():
            return Side("to", backend, store, None, None)
        engine, _ = open_database(backend, migrate=False, flag="--to-database-url")
        try:
            revision = db_engine.current_revision(engine)
        except SQLAlchemyError as e:
            engine.dispose()
            raise StartupError(f"--to-database-url: {str(e).splitlines()[0]}") from None
        if revision is None:
            engine.dispose()
            return Side("to", backend, store, None, None)
    else:
        engine, _ = open_database(backend, migrate=True, flag="--to-database-url")
    return Side("to", backend, store, _database(engine), engine)


def _open_store(backend: Backend, side: str) -> NarStore:
    try:
        return open_store(backend, flag_prefix=f"{side}-")
    except StartupError as e:
        raise StartupError(side_message(str(e), side)) from None


# -- queries (run inside Side.call) ----------------------------------------------------


def rows_after_thd(
    conn: Connection, table: Table, after_id: int, limit: int, full: bool
) -> list[dict[str, Any]]:
    """Up to ``limit`` rows with ``id > after_id``, by id; only keys unless ``full``."""
    if full:
        columns = list(table.c)
    elif table is narinfos:
        columns = [table.c.id, table.c.hash]
    else:
        columns = [table.c.id, table.c.hash, table.c.compression, table.c.file_size]
    result = conn.execute(
        select(*columns).where(table.c.id > after_id).order_by(table.c.id).limit(limit)
    )
    return [dict(row) for row in result.mappings()]


def existing_hashes_thd(
    conn: Connection, table: Table, hashes: list[str]
) -> set[tuple[str, str]]:
    """Which of ``hashes`` ``table`` has, as (hash, compression) ("" for narinfos)."""
    if table is narinfos:
        query = select(narinfos.c.hash).where(narinfos.c.hash.in_(hashes))
        return {(str(h), "") for (h,) in conn.execute(query)}
    query = select(nar_files.c.hash, nar_files.c.compression).where(
        nar_files.c.hash.in_(hashes)
    )
    return {(str(h), str(c)) for h, c in conn.execute(query)}


def keys_with_file_hash_thd(
    conn: Connection, nar_keys: list[str]
) -> set[tuple[str, str]]:
    """(nar_key, compression) pairs whose key a narinfo states is the file's sha256."""
    query = select(narinfos.c.nar_key, narinfos.c.compression, narinfos.c.file_hash)
    query = query.where(narinfos.c.nar_key.in_(nar_keys))
    found: set[tuple[str, str]] = set()
    for key, compression, file_hash in conn.execute(query):
        if not file_hash:
            continue
        try:
            parsed = parse_hash(str(file_hash))
        except ValueError:
            continue
        if parsed.algorithm == "sha256" and parsed.nix32_digest() == key:
            found.add((str(key), str(compression)))
    return found


def insert_rows_thd(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> int:
    """Insert ``rows`` (without their ids); rows that exist by now are kept.

    Returns how many were inserted.
    """
    values = [{k: v for k, v in row.items() if k != "id"} for row in rows]
    if not values:
        return 0
    try:
        with conn.begin_nested():
            conn.execute(insert(table), values)
        return len(values)
    except IntegrityError:
        pass  # a daemon wrote some meanwhile: one by one, first writer wins
    inserted = 0
    for value in values:
        try:
            with conn.begin_nested():
                conn.execute(insert(table).values(**value))
            inserted += 1
        except IntegrityError:
            pass
    return inserted


def config_rows_thd(conn: Connection) -> dict[str, dict[str, Any]]:
    return {str(r["key"]): dict(r) for r in conn.execute(select(config)).mappings()}


def copy_config_thd(conn: Connection, rows: list[dict[str, Any]]) -> int:
    """Insert config rows; raises CopyError if the target has another value."""
    inserted = 0
    for row in rows:
        try:
            with conn.begin_nested():
                values = {k: v for k, v in row.items() if k != "id"}
                conn.execute(insert(config).values(**values))
            inserted += 1
        except IntegrityError:
            stored = conn.execute(
                select(config.c.value).where(config.c.key == row["key"])
            ).scalar()
            if stored != row["value"]:
                raise CopyError(_conflict_message(str(row["key"]))) from None
    return inserted


def _conflict_message(key: str) -> str:
    return (
        f"--to-database-url: config key {key!r} has a different value in the "
        "target; nothing was copied (keeping either value would lose the other)"
    )


def iter_batches(
    side: Side, table: Table, full: bool
) -> Iterator[list[dict[str, Any]]]:
    """The source's rows of ``table`` in id order, :data:`BATCH_ROWS` at a time."""
    after = -1
    while True:
        rows = side.call(rows_after_thd, table, after, BATCH_ROWS, full)
        if not rows:
            return
        yield rows
        after = int(rows[-1]["id"])


def missing_in_target(
    target: Side, table: Table, rows: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    if target.db is None:
        return rows
    hashes = sorted({str(r["hash"]) for r in rows})
    have = target.call(existing_hashes_thd, table, hashes)
    return [r for r in rows if (r["hash"], r.get("compression", "")) not in have]


# -- survey (the dry run, and the totals for the progress bar) -------------------------


@attrs.define
class Survey:
    nars_missing: int = 0
    nar_bytes_missing: int = 0
    nars_present: int = 0
    nar_bytes_present: int = 0
    narinfos_missing: int = 0
    narinfos_present: int = 0
    config_missing: list[str] = attrs.Factory(list)
    config_present: int = 0


def survey(source: Side, target: Side) -> Survey:
    """What the target lacks.  Raises CopyError on a config conflict."""
    result = Survey()
    source_config = source.call(config_rows_thd)
    target_config = target.call(config_rows_thd) if target.db is not None else {}
    for key, row in sorted(source_config.items()):
        if key not in target_config:
            result.config_missing.append(key)
        elif target_config[key]["value"] != row["value"]:
            raise CopyError(_conflict_message(key))
        else:
            result.config_present += 1
    for rows in iter_batches(source, nar_files, full=False):
        missing = missing_in_target(target, nar_files, rows)
        result.nars_missing += len(missing)
        result.nar_bytes_missing += sum(int(r["file_size"]) for r in missing)
        result.nars_present += len(rows) - len(missing)
        result.nar_bytes_present += sum(int(r["file_size"]) for r in rows)
    result.nar_bytes_present -= result.nar_bytes_missing
    for rows in iter_batches(source, narinfos, full=False):
        missing = missing_in_target(target, narinfos, rows)
        result.narinfos_missing += len(missing)
        result.narinfos_present += len(rows) - len(missing)
    return result


# -- progress --------------------------------------------------------------------------


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _bytes_pair(done: int, total: int) -> str:
    scale, unit = 1, "B"
    for candidate in ("KiB", "MiB", "GiB", "TiB"):
        if total < scale * 1024:
            break
        scale, unit = scale * 1024, candidate
    if unit == "B":
        return f"{done}/{total} B"
    return f"{done / scale:.1f}/{total / scale:.1f} {unit}"


class Progress:
    """Copy progress on ``stream``, updated from the worker threads.

    On a terminal one line is redrawn in place; otherwise (logs, CI) a plain
    line is written at most every ``interval`` seconds, plus one at the end.
    Without a stream (``--no-progress``) it only counts.
    """

    BAR_WIDTH = 20

    def __init__(
        self,
        stream: TextIO | None,
        *,
        total_nars: int,
        total_bytes: int,
        tty: bool,
        clock: Callable[[], float] = time.monotonic,
        interval: float | None = None,
    ) -> None:
        self._stream = stream
        self._tty = tty
        self._clock = clock
        self._interval = interval if interval is not None else (0.2 if tty else 5.0)
        self._lock = threading.Lock()
        self.total_nars = total_nars
        self.total_bytes = total_bytes
        self.done_nars = 0
        self.done_bytes = 0
        self.streamed = 0
        self._start = clock()
        self._last_draw = self._start
        if tty:
            self._draw(self._start)

    def add_bytes(self, n: int) -> None:
        """``n`` more bytes streamed (any thread)."""
        with self._lock:
            self.streamed += n
            self.done_bytes += n
            self._maybe_draw()

    def nar_done(self, planned: int, streamed: int) -> None:
        """One NAR finished, copied or failed, after ``streamed`` of ``planned``."""
        with self._lock:
            self.done_nars += 1
            self.done_bytes += max(0, planned - streamed)
            self._maybe_draw()

    def close(self, *, complete: bool) -> None:
        """The final line (a run that was stopped does not claim 100%)."""
        with self._lock:
            if complete:
                # The source may have changed since the survey: what was
                # done is, now, all there was.
                self.total_nars, self.total_bytes = self.done_nars, self.done_bytes
            self._draw(self._clock(), final=True, complete=complete)

    def line(self, now: float, complete: bool = False) -> str:
        total_nars = max(self.total_nars, self.done_nars)
        total_bytes = max(self.total_bytes, self.done_bytes)
        if complete:
            fraction = 1.0
        elif total_bytes:
            fraction = self.done_bytes / total_bytes
        else:
            fraction = self.done_nars / total_nars if total_nars else 0.0
        percent = min(100, int(fraction * 100))
        elapsed = now - self._start
        rate = self.streamed / elapsed if elapsed > 0 else 0.0
        text = (
            f"{percent:3d}%  {self.done_nars}/{total_nars} NARs  "
            f"{_bytes_pair(self.done_bytes, total_bytes)}  {human_bytes(rate)}/s"
        )
        if self._tty:
            filled = self.BAR_WIDTH * percent // 100
            return f"[{'#' * filled}{'.' * (self.BAR_WIDTH - filled)}] {text}"
        return f"ncps copy: {text}"

    def _maybe_draw(self) -> None:
        now = self._clock()
        if now - self._last_draw >= self._interval:
            self._draw(now)

    def _draw(self, now: float, final: bool = False, complete: bool = False) -> None:
        self._last_draw = now
        if self._stream is None:
            return
        line = self.line(now, complete)
        if self._tty:
            self._stream.write(f"\r{line}\x1b[K" + ("\n" if final else ""))
        else:
            self._stream.write(line + "\n")
        self._stream.flush()


# -- copying NARs ----------------------------------------------------------------------


@attrs.define
class Tally:
    copied: int = 0
    copied_bytes: int = 0
    skipped: int = 0
    skipped_bytes: int = 0
    failed: int = 0
    failed_bytes: int = 0
    size_only: int = 0
    problems: list[str] = attrs.Factory(list)


@attrs.frozen
class _Outcome:
    size: int
    error: str | None = None
    size_only: bool = False


class NarCopier:
    """Copies one NAR object and then its row; runs on the command's pool."""

    def __init__(
        self,
        source: Side,
        target: Side,
        progress: Progress,
        cancel: threading.Event,
        shared_storage: bool,
    ) -> None:
        self._source = source
        self._target = target
        self._progress = progress
        self._cancel = cancel
        self._shared = shared_storage

    def copy_thd(self, row: dict[str, Any], key_is_hash: bool) -> _Outcome:
        """Copy the object of ``row`` and insert ``row``; return what happened.

        A missing or mismatching object is an outcome with an error (nothing
        of it is left in the target).  Raises CopyError if the target's
        database fails, _Cancelled if the run is interrupted.
        """
        key, compression = str(row["hash"]), str(row["compression"])
        size = int(row["file_size"])
        streamed = 0
        try:
            if self._shared:
                error = self._check_shared_thd(key, compression, size)
            else:
                error, streamed = self._transfer_thd(
                    key, compression, size, key_is_hash
                )
            if error is not None:
                return _Outcome(size, f"{nar_file_name(key, compression)}: {error}")
            self._target.call(insert_rows_thd, nar_files, [row])
            return _Outcome(size, size_only=not key_is_hash)
        finally:
            self._progress.nar_done(size, streamed)

    def _check_shared_thd(self, key: str, compression: str, size: int) -> str | None:
        assert self._target.store is not None
        try:
            actual = self._target.store.size_thd(key, compression)
        except (StorageError, OSError) as e:
            return f"cannot check the object: {e}"
        if actual is None:
            return "missing from the source storage"
        if actual != size:
            return f"object is {actual} bytes, its row says {size}"
        return None

    def _transfer_thd(
        self, key: str, compression: str, size: int, key_is_hash: bool
    ) -> tuple[str | None, int]:
        """(error or None, bytes streamed); the object is committed on success."""
        source_store, target_store = self._source.store, self._target.store
        assert source_store is not None and target_store is not None
        try:
            stored = source_store.open_thd(key, compression)
        except (StorageError, OSError) as e:
            return f"cannot read the source object: {e}", 0
        if stored is None:
            return "missing from the source storage", 0
        streamed = 0
        committed = False
        temp = None
        try:
            fd, temp = target_store.new_temp_file_thd(key)
            digest = hashlib.sha256()
            with open(fd, "wb") as out:
                while chunk := stored.read_thd(CHUNK):
                    if self._cancel.is_set():
                        raise _Cancelled()
                    streamed += len(chunk)
                    if streamed > size:
                        return (
                            f"source object is larger than its {size} bytes",
                            streamed,
                        )
                    digest.update(chunk)
                    out.write(chunk)
                    self._progress.add_bytes(len(chunk))
                out.flush()
                os.fsync(out.fileno())
            if streamed != size:
                return (
                    f"source object is {streamed} bytes, its row says {size}",
                    streamed,
                )
            if key_is_hash and nix32.encode(digest.digest()) != key:
                actual = nix32.encode(digest.digest())
                return f"sha256 of the source object is {actual}", streamed
            target_store.commit_thd(temp, key, compression)
            committed = True
        except (StorageError, OSError) as e:
            return f"copy failed: {e}", streamed
        finally:
            stored.close_thd()
            if temp is not None and not committed:
                target_store.discard_thd(temp)
        return None, streamed


def copy_nars(
    source: Side,
    target: Side,
    *,
    jobs: int,
    progress: Progress,
    shared_storage: bool,
) -> Tally:
    """Copy every NAR the target lacks, ``jobs`` at a time.

    Raises CopyError when a database fails; KeyboardInterrupt stops the
    workers (their temp files are discarded) before it propagates.
    """
    tally = Tally()
    cancel = threading.Event()
    copier = NarCopier(source, target, progress, cancel, shared_storage)
    pending: set[Future[_Outcome]] = set()

    def collect(done: set[Future[_Outcome]]) -> None:
        for future in done:
            outcome = future.result()
            if outcome.error is None:
                tally.copied += 1
                tally.copied_bytes += outcome.size
                tally.size_only += outcome.size_only
            else:
                tally.failed += 1
                tally.failed_bytes += outcome.size
                tally.problems.append(outcome.error)

    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="ncps-copy")
    try:
        for rows in iter_batches(source, nar_files, full=True):
            missing = missing_in_target(target, nar_files, rows)
            tally.skipped += len(rows) - len(missing)
            tally.skipped_bytes += sum(int(r["file_size"]) for r in rows)
            tally.skipped_bytes -= sum(int(r["file_size"]) for r in missing)
            if not missing:
                continue
            hashed = source.call(
                keys_with_file_hash_thd, sorted({str(r["hash"]) for r in missing})
            )
            for row in missing:
                key_is_hash = (
                    row["compression"] == "none"
                    or (row["hash"], row["compression"]) in hashed
                )
                while len(pending) >= 2 * jobs:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    collect(done)
                pending.add(pool.submit(copier.copy_thd, row, key_is_hash))
        done, pending = wait(pending)
        collect(done)
    except BaseException:
        cancel.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return tally


# -- the command -----------------------------------------------------------------------


@attrs.define
class RowTally:
    copied: int = 0
    skipped: int = 0


def copy_narinfos(source: Side, target: Side) -> RowTally:
    tally = RowTally()
    for rows in iter_batches(source, narinfos, full=True):
        missing = missing_in_target(target, narinfos, rows)
        inserted = target.call(insert_rows_thd, narinfos, missing) if missing else 0
        tally.copied += inserted
        tally.skipped += len(rows) - inserted
    return tally


def _write_dry_run(out: TextIO, s: Survey) -> None:
    missing_config = f" ({', '.join(s.config_missing)})" if s.config_missing else ""
    out.write(
        "dry run: nothing was written to the target\n"
        f"NARs:      would copy {s.nars_missing} "
        f"({human_bytes(s.nar_bytes_missing)}), already in target "
        f"{s.nars_present} ({human_bytes(s.nar_bytes_present)})\n"
        f"narinfos:  would copy {s.narinfos_missing}, already in target "
        f"{s.narinfos_present}\n"
        f"config:    would copy {len(s.config_missing)}{missing_config}, already "
        f"in target {s.config_present}\n"
    )


def _write_summary(
    out: TextIO, nars: Tally, infos: RowTally, config_copied: int, config_kept: int
) -> None:
    out.write(
        f"NARs:      copied {nars.copied} ({human_bytes(nars.copied_bytes)}), "
        f"skipped {nars.skipped} ({human_bytes(nars.skipped_bytes)}), "
        f"failed {nars.failed} ({human_bytes(nars.failed_bytes)})\n"
        f"narinfos:  copied {infos.copied}, skipped {infos.skipped}, failed 0\n"
        f"config:    copied {config_copied}, skipped {config_kept}, failed 0\n"
    )
    if nars.size_only:
        out.write(
            f"note: {nars.size_only} NAR(s) checked by size only (their key is "
            "not the sha256 of the file)\n"
        )


def copy_cache(
    source: Side,
    target: Side,
    *,
    jobs: int,
    dry_run: bool,
    show_progress: bool,
    shared_storage: bool,
    out: TextIO,
    err: TextIO,
) -> int:
    """Copy (or, dry, survey) ``source`` into ``target``; return the exit status."""
    plan = survey(source, target)
    if dry_run:
        _write_dry_run(out, plan)
        return EXIT_OK
    if shared_storage:
        err.write(
            "ncps copy: both sides use the same storage: objects are checked, "
            "not copied\n"
        )
    source_config = source.call(config_rows_thd)
    config_rows = [source_config[k] for k in plan.config_missing]
    config_copied = target.call(copy_config_thd, config_rows)
    progress = Progress(
        err if show_progress else None,
        total_nars=plan.nars_missing,
        total_bytes=plan.nar_bytes_missing,
        tty=show_progress and err.isatty(),
    )
    complete = False
    try:
        nars = copy_nars(
            source,
            target,
            jobs=jobs,
            progress=progress,
            shared_storage=shared_storage,
        )
        complete = True
    finally:
        progress.close(complete=complete)
    infos = copy_narinfos(source, target)
    for problem in nars.problems:
        err.write(f"ncps copy: failed: {problem}\n")
    config_kept = len(source_config) - config_copied
    _write_summary(out, nars, infos, config_copied, config_kept)
    return EXIT_FAILED if nars.failed else EXIT_OK


def run(argv: Sequence[str]) -> int:
    """``ncps copy [flags]``; returns the exit status (see the module docstring)."""
    out, err = sys.stdout, sys.stderr
    options = CopyOptions()
    try:
        options.parseOptions(list(argv))
    except usage.UsageError as e:
        err.write(f"ncps copy: {e}\n{options}")
        return 2
    sides: list[Side] = []
    try:
        try:
            jobs = options.jobs()
            source_backend = options.backend("from")
            target_backend = options.backend("to")
            shared = check_distinct(source_backend, target_backend)
            pool_size = jobs + 2
            source_backend, target_backend = (
                attrs.evolve(
                    b,
                    pool_max_open=max(b.pool_max_open, pool_size),
                    pool_max_idle=max(b.pool_max_idle, min(pool_size, 5)),
                )
                for b in (source_backend, target_backend)
            )
            sides.append(open_source(source_backend))
            sides.append(
                open_target(
                    target_backend, dry_run=options["dry-run"], shared_storage=shared
                )
            )
        except (ConfigError, StartupError) as e:
            err.write(f"ncps copy: {e}\n")
            return EXIT_CONFIG
        return copy_cache(
            sides[0],
            sides[1],
            jobs=jobs,
            dry_run=bool(options["dry-run"]),
            show_progress=not options["no-progress"],
            shared_storage=shared,
            out=out,
            err=err,
        )
    except CopyError as e:
        err.write(f"ncps copy: {e}\n")
        return EXIT_FAILED
    except KeyboardInterrupt:
        err.write("ncps copy: interrupted; run it again to resume\n")
        return EXIT_INTERRUPTED
    finally:
        for side in sides:
            side.close()
