"""ncps.db: migrations, model/migration drift, and the queries on real SQLite."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, Engine, Integer, MetaData, inspect, update

from ncps.db.engine import current_revision, head_revision, migrate, open_engine
from ncps.db.queries import (
    TOUCH_INTERVAL,
    Database,
    NarFile,
    NarInfoRecord,
    find_nar_source_thd,
    get_config_thd,
    get_nar_file_thd,
    get_narinfo_thd,
    put_config_if_absent_thd,
    set_config_thd,
)
from ncps.db.schema import metadata, narinfos
from ncps.testing import SyncRunner, make_nar_fixture, result_of, sha256


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    eng = open_engine(f"sqlite:{tmp_path}/deep/dir/ncps.sqlite3")
    yield eng
    eng.dispose()


@pytest.fixture
def db(engine: Engine) -> Database:
    migrate(engine)
    return Database(engine, SyncRunner())  # type: ignore[arg-type]


def test_open_engine_creates_the_directory(tmp_path: Path, engine: Engine) -> None:
    with engine.connect():
        pass
    assert (tmp_path / "deep" / "dir" / "ncps.sqlite3").is_file()


def test_migrations_from_empty_reach_head(engine: Engine) -> None:
    assert current_revision(engine) is None
    before, after = migrate(engine)
    assert before is None
    assert after == head_revision()
    assert current_revision(engine) == head_revision()
    assert set(inspect(engine).get_table_names()) >= {"config", "narinfos", "nar_files"}


def test_migrating_twice_is_a_no_op(engine: Engine) -> None:
    migrate(engine)
    assert migrate(engine) == (head_revision(), head_revision())


def _diff(engine: Engine, target: MetaData) -> list[object]:
    with engine.connect() as conn:
        diffs: list[object] = compare_metadata(MigrationContext.configure(conn), target)
    return diffs


def test_model_and_migrations_do_not_drift(engine: Engine) -> None:
    migrate(engine)
    assert _diff(engine, metadata) == []


def test_drift_check_would_see_a_change(engine: Engine) -> None:
    """The comparison above is not vacuous: a model change shows up."""
    migrate(engine)
    changed = MetaData(naming_convention=metadata.naming_convention)
    for table in metadata.tables.values():
        copy = table.to_metadata(changed)
        if table.name == "nar_files":
            copy.append_column(Column("extra", Integer, nullable=True))
    diffs = _diff(engine, changed)
    assert any("extra" in repr(d) for d in diffs), diffs


def record_for(seed: int = 0, **changes: object) -> NarInfoRecord:
    fx = make_nar_fixture(seed=seed, references=(), deriver=None)
    ni = attrs.evolve(fx.narinfo, url=f"nar/{fx.nar_key}.nar.xz")
    record = NarInfoRecord(
        narinfo=ni, nar_key=fx.nar_key, upstream_url="http://up.test/" + fx.narinfo.url
    )
    return attrs.evolve(record, **changes)


def test_narinfo_round_trip(db: Database) -> None:
    base = record_for()
    ni = attrs.evolve(
        base.narinfo,
        references=(
            "0123456789abcdfghijklmnpqrsvwxyz-dep-1",
            base.narinfo.store_path.removeprefix("/nix/store/"),
        ),
        deriver="0123456789abcdfghijklmnpqrsvwxyz-hello.drv",
        system="x86_64-linux",
        ca="fixed:r:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s",
        signatures=(*base.narinfo.signatures, "other-1:" + "A" * 86 + "=="),
    )
    record = attrs.evolve(base, narinfo=ni)
    stored = result_of(db.put_narinfo(record))
    assert stored.narinfo == ni
    assert stored.nar_key == record.nar_key
    assert stored.upstream_url == record.upstream_url
    assert stored.last_accessed_at is not None
    again = result_of(db.get_narinfo(ni.hash_part))
    assert again == stored


def test_narinfo_without_optional_fields_round_trips(db: Database) -> None:
    record = record_for(seed=3)
    ni = attrs.evolve(record.narinfo, file_hash=None, file_size=None)
    stored = result_of(db.put_narinfo(attrs.evolve(record, narinfo=ni)))
    assert stored.narinfo == ni


def test_get_narinfo_of_unknown_hash(db: Database) -> None:
    assert result_of(db.get_narinfo("1" * 32)) is None


def test_put_narinfo_first_writer_wins(db: Database) -> None:
    first = record_for()
    second = attrs.evolve(
        first, upstream_url="http://other.test/nar/elsewhere.nar.xz", nar_key="1" * 52
    )
    stored_first = result_of(db.put_narinfo(first))
    stored_second = result_of(db.put_narinfo(second))
    assert stored_second.upstream_url == first.upstream_url
    assert stored_second.nar_key == first.nar_key
    assert stored_second == stored_first
    assert db.call_thd(get_narinfo_thd, first.narinfo.hash_part) == stored_first


def test_find_nar_source(db: Database) -> None:
    record = result_of(db.put_narinfo(record_for()))
    found = result_of(db.find_nar_source(record.nar_key, "xz"))
    assert found is not None and found.narinfo.hash_part == record.narinfo.hash_part
    assert result_of(db.find_nar_source(record.nar_key, "zstd")) is None
    assert result_of(db.find_nar_source("1" * 52, "xz")) is None


def nar_file(**changes: object) -> NarFile:
    nf = NarFile(
        nar_key="1" * 52,
        compression="xz",
        file_size=1234,
        nar_hash=sha256(b"nar"),
        nar_size=5678,
    )
    return attrs.evolve(nf, **changes)


def test_put_nar_file_is_idempotent(db: Database) -> None:
    assert result_of(db.get_nar_file("1" * 52, "xz")) is None
    assert result_of(db.put_nar_file(nar_file())) == nar_file()
    # The first row stays, and a later writer is told what it records.
    assert result_of(db.put_nar_file(nar_file(file_size=99))) == nar_file()
    assert result_of(db.get_nar_file("1" * 52, "xz")) == nar_file()
    assert db.call_thd(get_nar_file_thd, "1" * 52, "zstd") is None


def test_same_key_in_two_compressions_are_two_objects(db: Database) -> None:
    result_of(db.put_nar_file(nar_file()))
    result_of(db.put_nar_file(nar_file(compression="zstd", file_size=1)))
    assert result_of(db.get_nar_file("1" * 52, "zstd")).file_size == 1
    assert result_of(db.get_nar_file("1" * 52, "xz")).file_size == 1234


def test_touch_refreshes_only_stale_access_times(db: Database) -> None:
    record = result_of(db.put_narinfo(record_for()))
    hash_part = record.narinfo.hash_part
    fresh = record.last_accessed_at
    result_of(db.touch_narinfo(hash_part))
    assert db.call_thd(get_narinfo_thd, hash_part).last_accessed_at == fresh

    stale = fresh - TOUCH_INTERVAL - datetime.timedelta(minutes=1)
    db.call_thd(
        lambda conn: conn.execute(
            update(narinfos)
            .where(narinfos.c.hash == hash_part)
            .values(last_accessed_at=stale)
        )
    )
    result_of(db.touch_narinfo(hash_part))
    assert db.call_thd(get_narinfo_thd, hash_part).last_accessed_at > stale


def test_config_values(db: Database) -> None:
    assert db.call_thd(get_config_thd, "k") is None
    assert db.call_thd(put_config_if_absent_thd, "k", "first") == "first"
    assert db.call_thd(put_config_if_absent_thd, "k", "second") == "first"
    db.call_thd(set_config_thd, "k", "third")
    assert db.call_thd(get_config_thd, "k") == "third"
    db.call_thd(set_config_thd, "new", "v")
    assert db.call_thd(get_config_thd, "new") == "v"


def test_find_source_ignores_other_rows(db: Database) -> None:
    a = result_of(db.put_narinfo(record_for(seed=1)))
    b = result_of(db.put_narinfo(record_for(seed=2)))
    assert a.nar_key != b.nar_key
    assert db.call_thd(find_nar_source_thd, b.nar_key, "xz").narinfo == b.narinfo
