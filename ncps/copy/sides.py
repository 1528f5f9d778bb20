"""The two sides of ``ncps copy``: opening them, and the queries run on them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

import attrs
from sqlalchemy import Connection, Engine, Table, insert, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from ncps.backend import open_database, open_store
from ncps.config import Backend, redact_url
from ncps.copy.options import side_message
from ncps.db import engine as db_engine
from ncps.db.queries import Database
from ncps.db.schema import config, nar_files, narinfos
from ncps.errors import (
    ConfigError,
    DatabaseUnavailable,
    NcpsError,
    StartupError,
)
from ncps.nixhash import parse_hash
from ncps.storage.base import NarStore
from ncps.storage.local import LocalStore
from ncps.threads import Runner

T = TypeVar("T")

BATCH_ROWS = 500


class CopyError(NcpsError):
    """The copy cannot go on (a conflict, a database failing); exit 1.

    The message starts with the flag of the side at fault.
    """


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
        """Dispose of the engine and give back the store's temp dir (idempotent)."""
        if self.store is not None:
            self.store.release_thd()
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
    try:
        engine = _open_source_database(backend)
    except BaseException:
        store.release_thd()
        raise
    return Side("from", backend, store, _database(engine), engine)


def _open_source_database(backend: Backend) -> Engine:
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
    return engine


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
    try:
        return _open_target_database(backend, store, dry_run=dry_run)
    except BaseException:
        if store is not None:
            store.release_thd()
        raise


def _open_target_database(
    backend: Backend, store: NarStore | None, *, dry_run: bool
) -> Side:
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
