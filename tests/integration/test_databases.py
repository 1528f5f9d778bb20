"""The metadata database on each dialect ncps supports, against real servers.

SQLite, PostgreSQL and MariaDB: every migration up and down, model/migration
drift, the queries (including values beyond MySQL's TEXT limit), concurrent
first-writer-wins inserts, retries of transient failures, and a database
server that restarts under a running engine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from servers import MariaDBServer, PostgresServer
from sqlalchemy import Engine, inspect, text

from ncps.db import engine as db_engine
from ncps.db.engine import current_revision, head_revision, migrate, open_engine
from ncps.db.queries import (
    Database,
    NarFile,
    NarInfoRecord,
    get_narinfo_thd,
    is_transient,
    put_narinfo_thd,
)
from ncps.db.schema import metadata
from ncps.errors import DatabaseUnavailable
from ncps.testing import SyncRunner, make_nar_fixture

DIALECTS = ("sqlite", "postgresql", "mariadb")


@pytest.fixture(params=DIALECTS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        return str(request.getfixturevalue("postgres_url"))
    if request.param == "mariadb":
        return str(request.getfixturevalue("mariadb_url"))
    return f"sqlite:{tmp_path}/ncps.sqlite3"


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    eng = open_engine(database_url, max_open=8, max_idle=2)
    yield eng
    eng.dispose()


@pytest.fixture
def db(engine: Engine) -> Database:
    migrate(engine)
    return Database(engine, SyncRunner())  # type: ignore[arg-type]


def record_for(seed: int = 0, refs: tuple[str, ...] = ()) -> NarInfoRecord:
    fx = make_nar_fixture(seed=seed, references=(), deriver=None)
    ni = attrs.evolve(fx.narinfo, url=f"nar/{fx.nar_key}.nar.xz", references=refs)
    return NarInfoRecord(
        narinfo=ni, nar_key=fx.nar_key, upstream_url="http://up.test/" + fx.narinfo.url
    )


def _alembic(engine: Engine, action: str, revision: str) -> None:
    cfg = db_engine._alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        getattr(command, action)(cfg, revision)


def test_the_dialect_is_the_one_asked_for(engine: Engine, database_url: str) -> None:
    expected = {"sqlite": "sqlite", "postgresql": "postgresql", "mysql": "mysql"}
    scheme = database_url.split(":", 1)[0]
    assert engine.dialect.name == expected[scheme]


def test_each_migration_applies_and_reverts(engine: Engine) -> None:
    """Walk every revision up one at a time, then all the way down and up again."""
    script = ScriptDirectory.from_config(db_engine._alembic_config())
    revisions = [r.revision for r in reversed(list(script.walk_revisions()))]
    assert revisions[0] == "0001" and revisions[-1] == head_revision()
    for revision in revisions:
        _alembic(engine, "upgrade", revision)
        assert current_revision(engine) == revision
        assert {"config", "narinfos", "nar_files"} <= set(
            inspect(engine).get_table_names()
        )
    _alembic(engine, "downgrade", "base")
    assert current_revision(engine) is None
    assert not {"config", "narinfos", "nar_files"} & set(
        inspect(engine).get_table_names()
    )
    assert migrate(engine) == (None, head_revision())


def test_the_known_head_is_alembics() -> None:
    assert db_engine.HEAD_REVISION == head_revision()


ISOLATED = """
import os, sys
from ncps.db.engine import MigrationError, current_revision, migrate, open_engine
engine = open_engine(os.environ["NCPS_TEST_DB"])
try:
    print(migrate(engine, isolated=True))
except MigrationError as e:
    print("MigrationError:", e)
print(current_revision(engine), "alembic" in sys.modules)
"""


def isolated_migrate(database_url: str) -> list[str]:
    env = {**os.environ, "NCPS_TEST_DB": database_url}
    out = subprocess.run(
        [sys.executable, "-c", ISOLATED],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return out.splitlines()


def test_the_daemon_migrates_in_a_child_and_skips_alembic_when_current(
    database_url: str,
) -> None:
    # A fresh database: migrated by a forked child; Alembic never loaded here.
    assert isolated_migrate(database_url) == [
        f"(None, '{head_revision()}')",
        f"{head_revision()} False",
    ]
    # Already current: nothing to do, Alembic not even imported.
    assert isolated_migrate(database_url) == [
        f"('{head_revision()}', '{head_revision()}')",
        f"{head_revision()} False",
    ]


def test_a_migration_failing_in_the_child_is_reported(tmp_path: Path) -> None:
    url = f"sqlite:{tmp_path}/ncps.sqlite3"
    engine = open_engine(url)
    migrate(engine)
    with engine.begin() as conn:  # as if a newer ncps had migrated it
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    lines = isolated_migrate(url)
    assert lines[0].startswith("MigrationError: "), lines
    assert "9999" in lines[0]
    assert lines[1] == "9999 False"


def test_model_and_migrations_do_not_drift(engine: Engine) -> None:
    migrate(engine)
    with engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diffs == []


def test_queries_round_trip_with_long_text(db: Database) -> None:
    # 2,000 references are ~90 KB: more than MySQL's TEXT holds.
    refs = tuple(
        f"{i:032d}".translate(str.maketrans("0123456789", "abcdfghijk"))
        + f"-dependency-{i}"
        for i in range(2000)
    )
    record = record_for(1, refs)
    stored = db.call_thd(put_narinfo_thd, record)
    assert stored.narinfo == record.narinfo
    assert len(" ".join(stored.narinfo.references)) > 65535
    again = db.call_thd(get_narinfo_thd, record.narinfo.hash_part)
    assert again is not None and again.narinfo.references == refs


def test_concurrent_inserts_keep_the_first_writer(db: Database) -> None:
    """Eight threads store different narinfos under one hash: one row wins, and
    every caller gets that row back (deadlocks or busy errors are retried)."""
    base = record_for(2)
    records = [
        attrs.evolve(base, upstream_url=f"http://up{i}.test/x") for i in range(8)
    ]
    results: list[NarInfoRecord] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(records))

    def worker(record: NarInfoRecord) -> None:
        try:
            barrier.wait()
            results.append(db.call_thd(put_narinfo_thd, record))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(r,)) for r in records]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert len({r.upstream_url for r in results}) == 1
    with db.engine.connect() as conn:
        count = conn.execute(text("SELECT COUNT(*) FROM narinfos")).scalar()
    assert count == 1


def test_nar_file_rows_are_idempotent(db: Database) -> None:
    record = record_for(3)
    nar = NarFile(
        nar_key=record.nar_key,
        compression="xz",
        file_size=10,
        nar_hash=record.narinfo.nar_hash,
        nar_size=record.narinfo.nar_size,
    )
    from ncps.db.queries import get_nar_file_thd, put_nar_file_thd

    db.call_thd(put_nar_file_thd, nar)
    db.call_thd(put_nar_file_thd, nar)
    assert db.call_thd(get_nar_file_thd, nar.nar_key, "xz") == nar


def test_a_killed_connection_is_retried_transparently(
    db: Database, database_url: str
) -> None:
    """The server drops our pooled connection: the next transaction still works."""
    if database_url.startswith("sqlite"):
        # No server to drop anything; SQLite's transient error is 'busy'.
        with db.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return
    with db.engine.connect() as conn:
        if db.engine.dialect.name == "postgresql":
            pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
        else:
            pid = conn.execute(text("SELECT CONNECTION_ID()")).scalar()
    # Kill it from a separate connection, outside the pool.
    killer = open_engine(database_url, max_open=1, max_idle=1)
    try:
        with killer.begin() as conn:
            if killer.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
            else:
                conn.execute(text(f"KILL {int(pid)}"))  # type: ignore[call-overload]
    finally:
        killer.dispose()
    record = record_for(4)
    assert db.call_thd(put_narinfo_thd, record).nar_key == record.nar_key


def test_sqlite_busy_is_transient(tmp_path: Path) -> None:
    """A write lock held elsewhere makes SQLite 'locked': classified transient."""
    from sqlalchemy.exc import OperationalError

    eng = open_engine(f"sqlite:{tmp_path}/busy.sqlite3")
    migrate(eng)
    import sqlite3

    holder = sqlite3.connect(tmp_path / "busy.sqlite3")
    holder.execute("BEGIN IMMEDIATE")
    try:
        with eng.connect() as conn:
            conn.exec_driver_sql("PRAGMA busy_timeout=50")
            with pytest.raises(OperationalError) as info:
                conn.exec_driver_sql(
                    "INSERT INTO config (key, value, created_at) "
                    "VALUES ('k', 'v', '2026-01-01')"
                )
        assert is_transient(info.value)
    finally:
        holder.rollback()
        holder.close()
        eng.dispose()


@pytest.mark.parametrize("kind", ["postgresql", "mariadb"])
def test_a_database_restart_is_survived(kind: str) -> None:
    """While the server is down the facade fails fast with DatabaseUnavailable
    (a 503 for clients); once it is back the same engine works again."""
    server: PostgresServer | MariaDBServer = (
        PostgresServer.create() if kind == "postgresql" else MariaDBServer.create()
    )
    try:
        url = server.new_database()
        eng = open_engine(url, max_open=4, max_idle=2)
        migrate(eng)
        db = Database(eng, SyncRunner())  # type: ignore[arg-type]
        db.call_thd(put_narinfo_thd, record_for(5))

        server.stop()
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable):
            db.call_thd(get_narinfo_thd, record_for(5).narinfo.hash_part)
        assert time.monotonic() - started < 15

        server.start()
        got = db.call_thd(get_narinfo_thd, record_for(5).narinfo.hash_part)
        assert got is not None
        db.call_thd(put_narinfo_thd, record_for(6))
        eng.dispose()
    finally:
        server.destroy()


def test_migrate_command_on_each_database(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``ncps migrate`` creates the schema on an empty database, then reports it
    up to date; ``--dry-run`` changes nothing."""
    from ncps.cli import migrate as migrate_command

    flag = f"--cache-database-url={database_url}"
    assert migrate_command([flag, "--dry-run"]) == 0
    assert "needs migrating" in capsys.readouterr().out
    eng = open_engine(database_url, max_open=1, max_idle=1)
    try:
        assert current_revision(eng) is None
        assert migrate_command([flag]) == 0
        assert f"to {head_revision()}" in capsys.readouterr().out
        assert current_revision(eng) == head_revision()
        assert migrate_command([flag, "--dry-run"]) == 0
        assert "up to date" in capsys.readouterr().out
    finally:
        eng.dispose()
