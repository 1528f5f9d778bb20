"""Opening a configured backend: the NAR store and the database.

Shared by the daemon (``ncps.service``) and the operator commands
(``ncps migrate``, ``ncps copy``).  Everything here blocks: it runs at
startup, before anything listens, or in a command without a reactor.
"""

from __future__ import annotations

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from ncps.config import Backend, redact_url
from ncps.db import engine as db_engine
from ncps.errors import StartupError
from ncps.storage.base import NarStore
from ncps.storage.local import LocalStore

# Threads (and HTTP connections) for S3 calls: uploads and reads of NARs.
S3_THREADS = 16
# SQLite serialises writers; a few threads cover its readers.
SQLITE_THREADS = 4


def is_sqlite(backend: Backend) -> bool:
    return backend.database_url.split(":", 1)[0].lower() in ("sqlite", "sqlite3")


def db_threads(backend: Backend) -> int:
    """How many db pool threads: one per connection the pool may open."""
    if is_sqlite(backend):
        return min(backend.pool_max_open, SQLITE_THREADS)
    return backend.pool_max_open


def open_store(backend: Backend, flag_prefix: str = "") -> NarStore:
    """The NAR store ``backend`` names, checked and ready (blocks).

    The store holds its own directory under the temp path from here on: the
    caller calls ``release_thd()`` on it once nothing writes temp files any
    more (a killed process needs none: the next start cleans up after it).
    """
    store: NarStore
    if backend.storage_s3 is not None:
        from ncps.storage.s3 import S3Store

        s3 = backend.storage_s3
        store = S3Store(
            bucket=s3.bucket,
            endpoint=s3.endpoint,
            region=s3.region,
            access_key_id=s3.access_key_id,
            secret_access_key=s3.secret_access_key,
            force_path_style=s3.force_path_style,
            temp_dir=backend.temp_path,
            max_pool_connections=S3_THREADS,
        )
    else:
        assert backend.storage_local is not None
        store = LocalStore(backend.storage_local, backend.temp_path)
    try:
        store.prepare_thd()
    except StartupError as e:
        if flag_prefix:
            raise StartupError(str(e).replace("--", f"--{flag_prefix}", 1)) from None
        raise
    return store


def open_database(
    backend: Backend,
    *,
    migrate: bool = True,
    flag: str = "--cache-database-url",
    isolated_migration: bool = False,
) -> tuple[Engine, tuple[str | None, str] | None]:
    """The engine for ``backend``'s database, migrated to the newest schema.

    Returns the engine and, when ``migrate`` is set, (revision before,
    revision after).  Any failure is a :class:`StartupError` naming ``flag``.
    ``isolated_migration``: see :func:`ncps.db.engine.migrate`.
    """
    try:
        engine = db_engine.open_engine(
            backend.database_url,
            max_open=backend.pool_max_open,
            max_idle=backend.pool_max_idle,
        )
    except StartupError as e:
        raise StartupError(str(e).replace("--cache-database-url", flag, 1)) from None
    try:
        revisions = (
            db_engine.migrate(engine, isolated=isolated_migration) if migrate else None
        )
        if not migrate:
            with engine.connect():
                pass
    except (SQLAlchemyError, db_engine.MigrationError) as e:
        engine.dispose()
        reason = db_engine.migration_reason(e)
        raise StartupError(
            f"{flag}: {redact_url(backend.database_url)}: {reason}"
        ) from None
    return engine, revisions
