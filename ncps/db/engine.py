"""Engines per dialect and schema migrations (Alembic), run synchronously.

``open_engine`` and ``migrate`` block: they run at startup, before anything
listens, or on a db pool thread.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import importlib.util
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import URL, Engine, create_engine, event, inspect, make_url, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import QueuePool

from ncps.errors import StartupError

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

# The newest revision in schema/versions (a test checks it against Alembic's
# view).  Known here, a database already at it is checked without importing
# Alembic: about 11 MB of memory a daemon would keep for nothing.
HEAD_REVISION = "0002"


class MigrationError(Exception):
    """The migrations failed; the message is the first line of the reason."""


def sqlalchemy_url(url: str) -> tuple[URL, Path | None]:
    """Turn an ncps database URL into a SQLAlchemy URL (and the SQLite file).

    ``postgres://``/``postgresql://`` use psycopg2 and ``mysql://`` PyMySQL
    (MariaDB included), whatever driver the URL names.
    """
    scheme, _, rest = url.partition(":")
    scheme = scheme.lower().split("+", 1)[0]
    if scheme in ("sqlite", "sqlite3"):
        path = rest[2:] if rest.startswith("//") else rest
        path = path.split("?", 1)[0]
        file = Path(path).expanduser().absolute()
        return make_url(f"sqlite+pysqlite:///{file}"), file
    if scheme in ("postgres", "postgresql"):
        return make_url("postgresql" + url[url.index(":") :]).set(
            drivername="postgresql+psycopg2"
        ), None
    if scheme == "mysql":
        sa = make_url(url).set(drivername="mysql+pymysql")
        if "charset" not in sa.query:
            sa = sa.update_query_dict({"charset": "utf8mb4"})
        return sa, None
    raise StartupError(f"--cache-database-url: unsupported database {url!r}")


def open_engine(url: str, max_open: int = 4, max_idle: int = 4) -> Engine:
    """Create the engine for ``url``, creating an SQLite file's directory.

    Server databases get a pool of ``max_idle`` kept connections plus up to
    ``max_open - max_idle`` more.  Connections are not pinged before use (a
    round trip per query); a connection found dead invalidates the pool and
    the transaction is retried on a fresh one (``Database.call_thd``), so a
    database that restarted is reconnected to without failing requests.
    """
    sa_url, sqlite_file = sqlalchemy_url(url)
    if sqlite_file is None:
        connect_args: dict[str, Any] = {"connect_timeout": 5}
        if sa_url.get_backend_name() == "mysql":
            connect_args.update(read_timeout=60, write_timeout=60)
        else:
            connect_args["application_name"] = "ncps"
        return create_engine(
            sa_url,
            pool_size=max_idle,
            max_overflow=max(0, max_open - max_idle),
            pool_recycle=1800,
            pool_timeout=30,
            connect_args=connect_args,
            # Fewer gap locks (and deadlocks) on MySQL; PostgreSQL's default.
            isolation_level="READ COMMITTED",
        )
    try:
        sqlite_file.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StartupError(
            f"--cache-database-url: cannot create {sqlite_file.parent}: {e.strerror}"
        ) from None
    engine = create_engine(
        sa_url,
        poolclass=QueuePool,
        pool_size=min(max_open, 4),
        max_overflow=0,
        connect_args={"check_same_thread": False, "timeout": 30},
    )

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    return engine


def schema_dir() -> Path:
    """The migration scripts: package ``ncps_schema`` when installed, else the
    ``schema/`` directory of the source checkout ncps runs from."""
    if importlib.util.find_spec("ncps_schema") is not None:
        return Path(str(importlib.resources.files("ncps_schema")))
    return Path(__file__).resolve().parents[2] / "schema"


def _alembic_config() -> AlembicConfig:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(schema_dir()))
    return cfg


def head_revision() -> str:
    """The newest revision the shipped migrations know (asks Alembic)."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (``None`` for an empty database).

    Reads Alembic's version table itself, without importing Alembic.
    """
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        rows = conn.execute(text("SELECT version_num FROM alembic_version")).all()
    if len(rows) > 1:
        raise MigrationError(f"the database has {len(rows)} schema revisions")
    return str(rows[0][0]) if rows else None


def migrate(engine: Engine, *, isolated: bool = False) -> tuple[str | None, str]:
    """Bring the schema to the newest revision; return (before, after).

    A fresh database is created by the migrations themselves, so every
    database, old or new, goes through the same scripts.  With ``isolated``
    (the daemon, at startup) they run in a forked child process when this
    one has no other thread yet, so Alembic's memory goes with the child.
    Raises :class:`MigrationError` or SQLAlchemy's errors.
    """
    before = current_revision(engine)
    if before == HEAD_REVISION:
        return before, HEAD_REVISION
    if isolated and hasattr(os, "fork") and threading.active_count() == 1:
        _upgrade_in_child(engine)
    else:
        _upgrade(engine)
    after = current_revision(engine)
    if after is None:
        raise MigrationError("the migrations left no schema revision")
    return before, after


def _upgrade(engine: Engine) -> None:
    from alembic import command

    cfg = _alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def _upgrade_in_child(engine: Engine) -> None:
    """:func:`_upgrade` in a forked child; its failure raised here."""
    engine.dispose()  # no connection is shared with the child
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        status = 0
        try:
            os.close(read_end)
            _upgrade(engine)
        except BaseException as e:
            status = 1
            with contextlib.suppress(BaseException):
                os.write(write_end, migration_reason(e).encode()[:4000])
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        reason = pipe.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise MigrationError(reason or f"the migration process ended with {status}")


def migration_reason(e: BaseException) -> str:
    """The first line of what a database or migration failure says."""
    orig = getattr(e, "orig", None) if isinstance(e, SQLAlchemyError) else None
    lines = (str(orig) if orig is not None else str(e)).strip().splitlines()
    return lines[0] if lines else type(e).__name__
