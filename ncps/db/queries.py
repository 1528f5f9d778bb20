"""The metadata database behind an async facade.

Every ``*_thd`` function runs on the db pool, takes plain values and returns
plain values (frozen attrs records); :class:`Database` wraps each in a
Deferred-returning method for the reactor thread.
"""

from __future__ import annotations

import datetime
import sqlite3
import time
from collections.abc import Callable
from typing import TypeVar

import attrs
from sqlalchemy import Connection, Engine, Row, and_, bindparam, insert, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from twisted.logger import Logger

from ncps.db.notify import notify_thd
from ncps.db.schema import config, nar_files, narinfos
from ncps.errors import DatabaseUnavailable
from ncps.logs import ncps_observer
from ncps.narinfo import NarInfo
from ncps.nixhash import NixHash, parse_hash
from ncps.storage.base import ZSTD_NONE
from ncps.threads import Runner

T = TypeVar("T")

log = Logger(observer=ncps_observer)

# A transaction failing with a transient error is retried this many times in
# all, sleeping 50 ms, 100 ms, 200 ms... (on the db pool thread) in between.
RETRY_ATTEMPTS = 5
RETRY_FIRST_DELAY = 0.05

# SQLSTATEs worth retrying: serialization failure, deadlock, lock not
# available, too many connections, server shutting down or starting.
_PG_TRANSIENT = {"40001", "40P01", "55P03", "53300", "57P01", "57P02", "57P03"}
# MySQL/MariaDB errors worth retrying: lock wait timeout, deadlock, too many
# connections, server shutdown, cannot connect, gone away, lost connection.
_MYSQL_TRANSIENT = {1040, 1053, 1205, 1213, 1927, 2002, 2003, 2006, 2013, 2055, 4031}

# Last-access times are refreshed at most this often, to keep reads read-only.
TOUCH_INTERVAL = datetime.timedelta(minutes=5)


@attrs.frozen
class NarInfoRecord:
    """A stored narinfo: what we serve, and where its NAR comes from."""

    narinfo: NarInfo  # url is our canonical one; signatures are the upstream's
    nar_key: str
    upstream_url: str
    last_accessed_at: datetime.datetime | None = None


@attrs.frozen
class NarFile:
    """A NAR object that is whole, verified and committed to storage."""

    nar_key: str
    # The stored form: the compression, or ZSTD_NONE for a Compression: none
    # NAR kept zstd-compressed (then file_size is the compressed size).
    compression: str
    file_size: int
    nar_hash: NixHash
    nar_size: int


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


def _narinfo_from_row(row: Row[tuple[object, ...]]) -> NarInfoRecord:
    m = row._mapping
    refs = str(m["refs"])
    sigs = str(m["signatures"])
    ni = NarInfo(
        store_path=str(m["store_path"]),
        url=str(m["url"]),
        compression=str(m["compression"]),
        nar_hash=parse_hash(str(m["nar_hash"])),
        nar_size=int(m["nar_size"]),
        file_hash=parse_hash(str(m["file_hash"])) if m["file_hash"] else None,
        file_size=int(m["file_size"]) if m["file_size"] is not None else None,
        references=tuple(refs.split()) if refs else (),
        deriver=m["deriver"],
        system=m["system"],
        signatures=tuple(sigs.split("\n")) if sigs else (),
        ca=m["ca"],
    )
    return NarInfoRecord(
        narinfo=ni,
        nar_key=str(m["nar_key"]),
        upstream_url=str(m["upstream_url"]),
        last_accessed_at=m["last_accessed_at"],
    )


# The hot queries, built once (building a statement costs more than running
# it on SQLite).
_GET_NARINFO = select(narinfos).where(narinfos.c.hash == bindparam("hash_part"))
_FIND_NAR_SOURCE = (
    select(narinfos)
    .where(
        and_(
            narinfos.c.nar_key == bindparam("nar_key"),
            narinfos.c.compression == bindparam("compression"),
        )
    )
    .limit(1)
)
_INSERT_NARINFO = insert(narinfos)
_INSERT_NAR_FILE = insert(nar_files)
_GET_NAR_FILE = select(nar_files).where(
    and_(
        nar_files.c.hash == bindparam("nar_key"),
        nar_files.c.compression == bindparam("compression"),
    )
)
# The stored NAR in either form a Compression: none NAR may take.
_FIND_NONE_NAR_FILE = (
    select(nar_files)
    .where(
        and_(
            nar_files.c.hash == bindparam("nar_key"),
            nar_files.c.compression.in_(["none", ZSTD_NONE]),
        )
    )
    # Both rows may exist (the flag was switched): always the same one.
    .order_by(nar_files.c.compression)
    .limit(1)
)


def get_narinfo_thd(conn: Connection, hash_part: str) -> NarInfoRecord | None:
    row = conn.execute(_GET_NARINFO, {"hash_part": hash_part}).first()
    return _narinfo_from_row(row) if row is not None else None


def narinfo_values(
    record: NarInfoRecord,
    now: datetime.datetime,
    accessed: datetime.datetime | None = None,
) -> dict[str, object]:
    """The ``narinfos`` row stored for ``record``, created at ``now`` and last
    accessed at ``accessed`` (default: ``now``)."""
    ni = record.narinfo
    return {
        "hash": ni.hash_part,
        "store_path": ni.store_path,
        "url": ni.url,
        "compression": ni.compression,
        "file_hash": ni.file_hash.to_nix32() if ni.file_hash else None,
        "file_size": ni.file_size,
        "nar_hash": ni.nar_hash.to_nix32(),
        "nar_size": ni.nar_size,
        "refs": " ".join(ni.references),
        "deriver": ni.deriver,
        "system": ni.system,
        "ca": ni.ca,
        "signatures": "\n".join(ni.signatures),
        "nar_key": record.nar_key,
        "upstream_url": record.upstream_url,
        "created_at": now,
        "last_accessed_at": now if accessed is None else accessed,
    }


def insert_narinfo_thd(conn: Connection, record: NarInfoRecord) -> NarInfoRecord:
    """Insert ``record``; raises ``IntegrityError`` if its hash has a row.

    Returns the row as written.  The error spoils the transaction on
    PostgreSQL: run this in a transaction of its own (see
    :meth:`Database.put_narinfo`) or use :func:`put_narinfo_thd`.
    """
    now = _now()
    conn.execute(_INSERT_NARINFO, narinfo_values(record, now))
    return attrs.evolve(record, last_accessed_at=now)


def put_narinfo_thd(conn: Connection, record: NarInfoRecord) -> NarInfoRecord:
    """Insert ``record`` unless a row for that hash exists; return the stored row."""
    try:
        with conn.begin_nested():
            return insert_narinfo_thd(conn, record)
    except IntegrityError:
        pass  # first writer wins
    stored = get_narinfo_thd(conn, record.narinfo.hash_part)
    assert stored is not None
    return stored


def touch_narinfo_thd(conn: Connection, hash_part: str) -> None:
    now = _now()
    conn.execute(
        update(narinfos)
        .where(
            and_(
                narinfos.c.hash == hash_part,
                narinfos.c.last_accessed_at < now - TOUCH_INTERVAL,
            )
        )
        .values(last_accessed_at=now)
    )


def find_nar_source_thd(
    conn: Connection, nar_key: str, compression: str
) -> NarInfoRecord | None:
    """Any narinfo whose NAR is ``nar_key`` with that compression."""
    row = conn.execute(
        _FIND_NAR_SOURCE, {"nar_key": nar_key, "compression": compression}
    ).first()
    return _narinfo_from_row(row) if row is not None else None


def get_nar_file_thd(
    conn: Connection, nar_key: str, compression: str
) -> NarFile | None:
    """The row of the object stored in exactly this form (see
    :data:`~ncps.storage.base.ZSTD_NONE`)."""
    row = conn.execute(
        _GET_NAR_FILE, {"nar_key": nar_key, "compression": compression}
    ).first()
    return _nar_file_from_row(row)


def find_nar_file_thd(
    conn: Connection, nar_key: str, compression: str
) -> NarFile | None:
    """The row of the stored NAR clients get for ``compression``, in
    whichever form it is stored (a ``none`` NAR may be ZSTD_NONE)."""
    if compression != "none":
        return get_nar_file_thd(conn, nar_key, compression)
    row = conn.execute(_FIND_NONE_NAR_FILE, {"nar_key": nar_key}).first()
    return _nar_file_from_row(row)


def replace_nar_file_thd(conn: Connection, nar: NarFile) -> NarFile:
    """Make the row of ``nar``'s object say what ``nar`` says (the object was
    just replaced); the row as it is now."""
    conn.execute(
        update(nar_files)
        .where(
            and_(
                nar_files.c.hash == nar.nar_key,
                nar_files.c.compression == nar.compression,
            )
        )
        .values(
            file_size=nar.file_size,
            nar_hash=nar.nar_hash.to_nix32(),
            nar_size=nar.nar_size,
        )
    )
    recorded = get_nar_file_thd(conn, nar.nar_key, nar.compression)
    return nar if recorded is None else recorded


def _nar_file_from_row(row: Row[tuple[object, ...]] | None) -> NarFile | None:
    if row is None:
        return None
    m = row._mapping
    return NarFile(
        nar_key=str(m["hash"]),
        compression=str(m["compression"]),
        file_size=int(m["file_size"]),
        nar_hash=parse_hash(str(m["nar_hash"])),
        nar_size=int(m["nar_size"]),
    )


def insert_nar_file_thd(conn: Connection, nar: NarFile) -> NarFile:
    """Record a committed NAR object; raises ``IntegrityError`` if it has a
    row (see :func:`insert_narinfo_thd` for the transaction)."""
    now = _now()
    conn.execute(
        _INSERT_NAR_FILE,
        {
            "hash": nar.nar_key,
            "compression": nar.compression,
            "file_size": nar.file_size,
            "nar_hash": nar.nar_hash.to_nix32(),
            "nar_size": nar.nar_size,
            "created_at": now,
            "last_accessed_at": now,
        },
    )
    return nar


def put_nar_file_thd(conn: Connection, nar: NarFile) -> NarFile:
    """Record a committed NAR object (idempotent: the first row written stays).

    Returns the row as recorded, which is an earlier writer's if there was one.
    """
    try:
        with conn.begin_nested():
            return insert_nar_file_thd(conn, nar)
    except IntegrityError:
        recorded = get_nar_file_thd(conn, nar.nar_key, nar.compression)
        if recorded is not None:
            return recorded
    return nar


def get_config_thd(conn: Connection, key: str) -> str | None:
    value = conn.execute(select(config.c.value).where(config.c.key == key)).scalar()
    return None if value is None else str(value)


def put_config_if_absent_thd(conn: Connection, key: str, value: str) -> str:
    """Store ``value`` unless the key exists; return the value that is stored."""
    try:
        with conn.begin_nested():
            conn.execute(insert(config).values(key=key, value=value, created_at=_now()))
    except IntegrityError:
        pass
    stored = get_config_thd(conn, key)
    assert stored is not None
    return stored


def set_config_thd(conn: Connection, key: str, value: str) -> None:
    if get_config_thd(conn, key) is None:
        conn.execute(insert(config).values(key=key, value=value, created_at=_now()))
    else:
        conn.execute(
            update(config)
            .where(config.c.key == key)
            .values(value=value, updated_at=_now())
        )


def is_transient(error: DBAPIError) -> bool:
    """Whether retrying the transaction may succeed: a lost connection, a
    deadlock, a busy SQLite file, a server restarting."""
    if error.connection_invalidated:
        return True
    orig = error.orig
    if isinstance(orig, sqlite3.OperationalError):
        message = str(orig).lower()
        return "locked" in message or "busy" in message
    pgcode = getattr(orig, "pgcode", None)
    if pgcode is not None:
        return pgcode in _PG_TRANSIENT or str(pgcode).startswith("08")
    module = type(orig).__module__
    if module.startswith("psycopg2"):
        # Connection-level failures (refused, closed, reset) carry no SQLSTATE.
        return isinstance(error, OperationalError | InterfaceError)
    if module.startswith("pymysql"):
        args: tuple[object, ...] = tuple(getattr(orig, "args", ()))
        return len(args) > 0 and args[0] in _MYSQL_TRANSIENT
    return False


class Database:
    """Async access to the metadata database.

    Owns nothing: the engine is disposed and the pool stopped by the service
    tree.  Every method returns a Deferred that fires on the reactor thread.
    """

    def __init__(self, engine: Engine, runner: Runner, origin: str = "") -> None:
        """``origin`` names this instance in change notifications (PostgreSQL
        tells other instances sharing the database; see ``ncps.db.notify``);
        empty: no notifications."""
        self.engine = engine
        self._runner = runner
        self._origin = origin

    def call_thd(self, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn(conn, *args)`` in one transaction (on the calling thread).

        A transient failure rolls the transaction back and runs it again, up
        to :data:`RETRY_ATTEMPTS` times (every ``fn`` is safe to repeat).  A
        database that stays unreachable raises :class:`DatabaseUnavailable`.
        """
        delay = RETRY_FIRST_DELAY
        for attempt in range(1, RETRY_ATTEMPTS + 1):
            try:
                with self.engine.begin() as conn:
                    return fn(conn, *args)
            except DBAPIError as e:
                if isinstance(e, IntegrityError):
                    raise
                transient = is_transient(e)
                if transient and attempt < RETRY_ATTEMPTS:
                    time.sleep(delay)
                    delay *= 2
                    continue
                if transient or isinstance(e, OperationalError | InterfaceError):
                    reason = str(e.orig).strip().splitlines()[0] if e.orig else str(e)
                    raise DatabaseUnavailable(
                        f"database unavailable after {attempt} attempt(s): {reason}"
                    ) from e
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _run(self, fn: Callable[..., T], *args: object):  # type: ignore[no-untyped-def]
        return self._runner.run(self.call_thd, fn, *args)

    def get_narinfo(self, hash_part: str):  # type: ignore[no-untyped-def]
        return self._run(get_narinfo_thd, hash_part)

    def put_narinfo(self, record: NarInfoRecord):  # type: ignore[no-untyped-def]
        """Insert ``record`` unless its hash has a row; the stored row."""
        return self._runner.run(self._put_narinfo_thd, record)

    def _put_narinfo_thd(self, record: NarInfoRecord) -> NarInfoRecord:
        # The insert alone in its transaction, the earlier writer's row read
        # in another only on a conflict: no savepoint and no read back on
        # the common path (a new path on a cold closure).
        try:
            return self.call_thd(self._insert_narinfo_thd, record)
        except IntegrityError:
            pass  # first writer wins
        stored = self.call_thd(self._existing_narinfo_thd, record.narinfo.hash_part)
        assert stored is not None
        return stored

    def _insert_narinfo_thd(
        self, conn: Connection, record: NarInfoRecord
    ) -> NarInfoRecord:
        stored = insert_narinfo_thd(conn, record)
        self._notify_thd(conn, "narinfo", record.narinfo.hash_part)
        return stored

    def _existing_narinfo_thd(
        self, conn: Connection, hash_part: str
    ) -> NarInfoRecord | None:
        self._notify_thd(conn, "narinfo", hash_part)
        return get_narinfo_thd(conn, hash_part)

    def _notify_thd(self, conn: Connection, kind: str, arg: str) -> None:
        if self._origin:
            notify_thd(conn, self._origin, kind, arg)

    def touch_narinfo(self, hash_part: str):  # type: ignore[no-untyped-def]
        return self._run(touch_narinfo_thd, hash_part)

    def find_nar_source(self, nar_key: str, compression: str):  # type: ignore[no-untyped-def]
        return self._run(find_nar_source_thd, nar_key, compression)

    def get_nar_file(self, nar_key: str, compression: str):  # type: ignore[no-untyped-def]
        return self._run(get_nar_file_thd, nar_key, compression)

    def replace_nar_file(self, nar: NarFile):  # type: ignore[no-untyped-def]
        """Rewrite the row of an object that was just replaced; the row."""
        return self._run(self._replace_nar_file_thd, nar)

    def _replace_nar_file_thd(self, conn: Connection, nar: NarFile) -> NarFile:
        recorded = replace_nar_file_thd(conn, nar)
        self._notify_thd(conn, "nar", f"{nar.nar_key}:{nar.compression}")
        return recorded

    def find_nar_file(self, nar_key: str, compression: str):  # type: ignore[no-untyped-def]
        """The stored NAR clients get for ``compression``, in any form."""
        return self._run(find_nar_file_thd, nar_key, compression)

    def put_nar_file(self, nar: NarFile):  # type: ignore[no-untyped-def]
        """Record a committed NAR (the first row written stays); the row as
        recorded."""
        return self._runner.run(self._put_nar_file_thd, nar)

    def _put_nar_file_thd(self, nar: NarFile) -> NarFile:
        # As _put_narinfo_thd: no savepoint on the common path.
        try:
            return self.call_thd(self._insert_nar_file_thd, nar)
        except IntegrityError:
            pass
        recorded: NarFile | None = self.call_thd(self._existing_nar_file_thd, nar)
        return nar if recorded is None else recorded

    def _insert_nar_file_thd(self, conn: Connection, nar: NarFile) -> NarFile:
        recorded = insert_nar_file_thd(conn, nar)
        self._notify_thd(conn, "nar", f"{nar.nar_key}:{nar.compression}")
        return recorded

    def _existing_nar_file_thd(self, conn: Connection, nar: NarFile) -> NarFile | None:
        self._notify_thd(conn, "nar", f"{nar.nar_key}:{nar.compression}")
        return get_nar_file_thd(conn, nar.nar_key, nar.compression)
