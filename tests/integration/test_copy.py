"""``ncps copy`` end to end: real stores, real databases, through the CLI entry.

Sources are built by hand (LocalStore, the ncps.db.queries functions on a
migrated SQLite file); S3 and PostgreSQL targets are the shared moto and
PostgreSQL servers from tests/conftest.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import attrs
import pytest
import zstandard
from servers import S3Server
from sqlalchemy import Engine, select

from ncps.cli import main
from ncps.db import engine as db_engine
from ncps.db.queries import (
    Database,
    NarFile,
    NarInfoRecord,
    put_config_if_absent_thd,
    put_nar_file_thd,
    put_narinfo_thd,
)
from ncps.db.schema import config, nar_files, narinfos
from ncps.storage.base import (
    ZSTD_NONE,
    nar_file_name,
    nar_object_key,
    served_compression,
)
from ncps.storage.local import LocalStore
from ncps.testing import SyncRunner, make_nar_fixture

SECRET = "cache.test-1:c2VjcmV0LWtleS1ieXRlcw=="

# (stored form, narinfo has FileHash): the bzip2 one's key is the NarHash, so
# it can only be checked by size, as the last one: an uncompressed NAR kept
# zstd-compressed (transparent zstd), whose key is its NAR's hash.
KINDS = [
    ("xz", True),
    ("zstd", True),
    ("none", True),
    ("bzip2", False),
    (ZSTD_NONE, True),
]


@attrs.frozen
class Obj:
    key: str
    compression: str
    data: bytes


def sqlite_url(root: Path) -> str:
    return f"sqlite:{root}/db/ncps.sqlite3"


def open_db(url: str) -> tuple[Engine, Database]:
    engine = db_engine.open_engine(url)
    db_engine.migrate(engine)
    return engine, Database(engine, SyncRunner())  # type: ignore[arg-type]


def make_source(root: Path, secret: str = SECRET, first_seed: int = 0) -> list[Obj]:
    """A local+SQLite cache with one NAR (object, nar_files and narinfo) per KIND."""
    store = LocalStore(root, root / "store" / "tmp")
    store.prepare_thd()
    engine, db = open_db(sqlite_url(root))
    objects = []
    for seed, (form, file_fields) in enumerate(KINDS, first_seed):
        compression = served_compression(form)
        fx = make_nar_fixture(
            name=f"pkg-{seed}",
            seed=seed,
            compression=compression,
            file_fields=file_fields,
        )
        data = fx.file
        if form == ZSTD_NONE:
            data = zstandard.ZstdCompressor().compress(data)
        key = fx.nar_key
        fd, temp = store.new_temp_file_thd(key)
        with open(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        store.commit_thd(temp, key, form)
        ni = fx.narinfo
        db.call_thd(
            put_nar_file_thd,
            NarFile(key, form, len(data), ni.nar_hash, ni.nar_size),
        )
        ours = attrs.evolve(ni, url=f"nar/{nar_file_name(key, compression)}")
        record = NarInfoRecord(
            narinfo=ours, nar_key=key, upstream_url=f"https://up.example/{ni.url}"
        )
        db.call_thd(put_narinfo_thd, record)
        objects.append(Obj(key, form, data))
    db.call_thd(put_config_if_absent_thd, "secret_key", secret)
    engine.dispose()
    return objects


def ncps_copy(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exited:
        main(["copy", *args])
    code = exited.value.code
    assert isinstance(code, int)
    return code


def rows(url: str, table: Any) -> list[dict[str, Any]]:
    """Every row of ``table`` without its id, in a stable order."""
    engine = db_engine.open_engine(url)
    try:
        with engine.connect() as conn:
            result = conn.execute(select(table)).mappings().all()
    finally:
        engine.dispose()
    found = [{k: v for k, v in r.items() if k != "id"} for r in result]
    return sorted(found, key=lambda r: (r.get("hash") or r.get("key"), str(r)))


def local_objects(root: Path) -> dict[str, bytes]:
    nar_root = root / "store" / "nar"
    if not nar_root.exists():
        return {}
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in nar_root.rglob("*")
        if p.is_file()
    }


def leftover_temp_files(*dirs: Path) -> list[Path]:
    return [p for d in dirs if d.exists() for p in d.rglob("*.part")]


def assert_same_cache(source_url: str, target_url: str) -> None:
    for table in (nar_files, narinfos, config):
        assert rows(target_url, table) == rows(source_url, table), table.name


# -- local + SQLite -> local + SQLite --------------------------------------------------


def test_local_to_local_copies_everything_then_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    objects = make_source(src)
    args = ["--from-storage-local", str(src), "--to-storage-local", str(dst)]

    assert ncps_copy([*args, "--no-progress", "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    assert f"NARs:      copied {len(objects)} " in out
    assert f"narinfos:  copied {len(objects)}, skipped 0" in out
    assert "config:    copied 1, skipped 0" in out
    assert "2 NAR(s) checked by size only" in out

    assert local_objects(dst) == local_objects(src)
    for obj in objects:
        path = dst / nar_object_key(obj.key, obj.compression)
        assert path.read_bytes() == obj.data
    assert_same_cache(sqlite_url(src), sqlite_url(dst))
    secret = [r["value"] for r in rows(sqlite_url(dst), config)]
    assert secret == [SECRET]
    assert leftover_temp_files(dst) == []

    assert ncps_copy([*args, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "NARs:      copied 0 (0 B), skipped 5 " in out
    assert "narinfos:  copied 0, skipped 5" in out
    assert "config:    copied 0, skipped 1" in out
    assert_same_cache(sqlite_url(src), sqlite_url(dst))


def test_dry_run_writes_nothing_to_a_fresh_target(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_source(src)
    before = local_objects(src)

    code = ncps_copy(
        ["--dry-run", "--from-storage-local", str(src), "--to-storage-local", str(dst)]
    )

    assert code == 0
    out = capsys.readouterr().out
    assert "NARs:      would copy 5 (" in out
    assert "already in target 0 (0 B)" in out
    assert "narinfos:  would copy 5, already in target 0" in out
    assert "config:    would copy 1 (secret_key), already in target 0" in out
    assert not dst.exists()
    assert local_objects(src) == before


def test_dry_run_counts_what_the_target_has(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_source(src)
    args = ["--from-storage-local", str(src), "--to-storage-local", str(dst)]
    assert ncps_copy([*args, "--no-progress"]) == 0
    capsys.readouterr()
    db_file = dst / "db" / "ncps.sqlite3"
    mtime = db_file.stat().st_mtime_ns

    assert ncps_copy([*args, "--dry-run"]) == 0

    out = capsys.readouterr().out
    assert "NARs:      would copy 0 (0 B), already in target 5 (" in out
    assert "narinfos:  would copy 0, already in target 5" in out
    assert "config:    would copy 0, already in target 1" in out
    assert db_file.stat().st_mtime_ns == mtime


def test_progress_without_a_terminal_is_plain_lines_ending_at_100(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_source(src)

    assert (
        ncps_copy(["--from-storage-local", str(src), "--to-storage-local", str(dst)])
        == 0
    )

    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if "%" in line]
    assert lines, err
    assert lines[-1].startswith("ncps copy: 100%  5/5 NARs  ")


# -- verification failures -------------------------------------------------------------


def test_corrupt_and_missing_objects_are_reported_and_not_copied(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    objects = make_source(src)
    corrupt, missing = objects[0], objects[1]
    corrupt_path = src / nar_object_key(corrupt.key, corrupt.compression)
    corrupt_path.chmod(0o644)
    changed = bytearray(corrupt.data)
    changed[len(changed) // 2] ^= 0xFF
    corrupt_path.write_bytes(bytes(changed))
    missing_path = src / nar_object_key(missing.key, missing.compression)
    missing_path.unlink()
    args = ["--no-progress", "--from-storage-local", str(src)]
    args += ["--to-storage-local", str(dst)]

    assert ncps_copy(args) == 1

    captured = capsys.readouterr()
    corrupt_name = nar_file_name(corrupt.key, corrupt.compression)
    missing_name = nar_file_name(missing.key, missing.compression)
    assert f"failed: {corrupt_name}: sha256 of the source object is" in captured.err
    assert f"failed: {missing_name}: missing from the source storage" in captured.err
    assert "NARs:      copied 3 " in captured.out
    assert "failed 2 " in captured.out
    for bad in (corrupt, missing):
        assert not (dst / nar_object_key(bad.key, bad.compression)).exists()
    copied = {(r["hash"], r["compression"]) for r in rows(sqlite_url(dst), nar_files)}
    assert copied == {(o.key, o.compression) for o in objects[2:]}
    # narinfos are copied whatever happened to the NARs: the daemon fetches a
    # NAR without a nar_files row from its upstream again.
    assert len(rows(sqlite_url(dst), narinfos)) == len(objects)
    assert leftover_temp_files(dst) == []

    # Repaired, the next run copies just what is left.
    corrupt_path.write_bytes(corrupt.data)
    missing_path.write_bytes(missing.data)
    assert ncps_copy(args) == 0
    assert "NARs:      copied 2 " in capsys.readouterr().out
    assert local_objects(dst) == local_objects(src)
    assert_same_cache(sqlite_url(src), sqlite_url(dst))


def test_wrong_size_object_is_not_copied(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    objects = make_source(src)
    # Only a size check protects this one (its key is the NarHash).
    size_only = objects[3]
    path = src / nar_object_key(size_only.key, size_only.compression)
    path.chmod(0o644)
    path.write_bytes(size_only.data + b"x")

    args = ["--no-progress", "--from-storage-local", str(src)]
    assert ncps_copy([*args, "--to-storage-local", str(dst)]) == 1

    err = capsys.readouterr().err
    assert "source object is larger than its" in err
    assert not (dst / nar_object_key(size_only.key, size_only.compression)).exists()


def test_conflicting_secret_key_stops_before_copying_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_source(src)
    engine, db = open_db(sqlite_url(dst))
    db.call_thd(put_config_if_absent_thd, "secret_key", "cache.test-1:other")
    engine.dispose()
    args = ["--from-storage-local", str(src), "--to-storage-local", str(dst)]

    for extra in (["--dry-run"], []):
        assert ncps_copy([*args, *extra]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert "'secret_key' has a different value in the target" in err

    assert local_objects(dst) == {}
    assert rows(sqlite_url(dst), nar_files) == []
    assert rows(sqlite_url(dst), narinfos) == []
    assert [r["value"] for r in rows(sqlite_url(dst), config)] == ["cache.test-1:other"]


# -- flags -----------------------------------------------------------------------------


def test_bad_flags_exit_78_with_one_line_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src"
    make_source(src)
    s3 = ["--to-storage-s3-endpoint", "http://127.0.0.1:1"]
    s3 += ["--to-storage-s3-bucket", "b"]
    src_flag = ["--from-storage-local", str(src)]
    dst_flag = ["--to-storage-local", str(tmp_path / "dst")]
    other_dst = ["--to-storage-local", str(tmp_path)]
    cases = [
        (
            [*src_flag, "--from-storage-s3-bucket", "b", *dst_flag],
            "--from-storage-local: give either local storage or S3 storage, not "
            "both (--from-storage-s3-bucket is set)",
        ),
        (
            src_flag,
            "--to-storage-local: required, or --to-storage-s3-bucket for S3",
        ),
        (
            [*src_flag, "--to-storage-local", str(src)],
            "--to-storage-local: the target is the source itself",
        ),
        (
            [*src_flag, *other_dst, "--to-database-url", sqlite_url(src)],
            "--to-database-url:",
        ),
        (
            [*src_flag, *s3],
            "--to-storage-s3-access-key-id: required with S3 storage",
        ),
        (
            ["--from-storage-local", str(tmp_path / "nope"), *dst_flag],
            "--from-storage-local:",
        ),
        (
            [*src_flag, *other_dst, "--to-database-url", "oracle://x/y"],
            "--to-database-url: unsupported database",
        ),
        (
            ["--jobs", "0", *src_flag, *dst_flag],
            "--jobs:",
        ),
    ]
    for args, expected in cases:
        assert ncps_copy(args) == 78, args
        captured = capsys.readouterr()
        assert captured.err.count("\n") == 1, captured.err
        assert captured.err.startswith(f"ncps copy: {expected}"), captured.err
        assert "CACHE_" not in captured.err
    assert not (tmp_path / "dst").exists()


def test_config_files_for_both_sides_and_flags_win(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_source(src)
    from_file = tmp_path / "from.yaml"
    from_file.write_text(
        "cache:\n  hostname: cache.example.org\n"
        f"  storage:\n    local: {src}\n"
        "  upstream:\n    urls: [https://cache.nixos.org]\n"
    )
    to_file = tmp_path / "to.toml"
    to_file.write_text(f'[cache.storage]\nlocal = "{tmp_path / "elsewhere"}"\n')

    args = ["--no-progress", "--from-config", str(from_file)]
    args += ["--to-config", str(to_file), "--to-storage-local", str(dst)]
    assert ncps_copy(args) == 0

    assert local_objects(dst) == local_objects(src)
    assert not (tmp_path / "elsewhere").exists()

    bad = tmp_path / "bad.yaml"
    bad.write_text("cache: {nonsense: 1}\n")
    assert ncps_copy(["--from-config", str(bad), "--to-storage-local", str(dst)]) == 78
    assert capsys.readouterr().err.startswith("ncps copy: --from-config: unknown key")


# -- local + SQLite -> S3 + PostgreSQL (and back) --------------------------------------


def test_local_sqlite_to_s3_postgresql_and_back(
    tmp_path: Path,
    s3_server: S3Server,
    s3_bucket: str,
    postgres_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    src, back = tmp_path / "src", tmp_path / "back"
    objects = make_source(src)
    s3 = [
        "storage-s3-bucket",
        s3_bucket,
        "storage-s3-endpoint",
        s3_server.endpoint,
        "storage-s3-access-key-id",
        s3_server.access_key_id,
        "storage-s3-secret-access-key",
        s3_server.secret_access_key,
        "storage-s3-region",
        s3_server.region,
        "temp-path",
        str(tmp_path / "temp"),
        "database-url",
        postgres_url,
    ]

    def side(prefix: str) -> list[str]:
        flags = [f"--{prefix}-storage-s3-force-path-style"]
        for name, value in zip(s3[::2], s3[1::2], strict=True):
            flags += [f"--{prefix}-{name}", value]
        return flags

    to_s3 = ["--no-progress", "--from-storage-local", str(src), *side("to")]
    assert ncps_copy(["--dry-run", *to_s3]) == 0
    assert "NARs:      would copy 5 (" in capsys.readouterr().out
    client = s3_server.client()
    assert client.list_objects_v2(Bucket=s3_bucket).get("KeyCount", 0) == 0

    assert ncps_copy(to_s3) == 0
    assert "NARs:      copied 5 " in capsys.readouterr().out
    for obj in objects:
        key = nar_object_key(obj.key, obj.compression)
        body = client.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
        assert body == obj.data
    assert_same_cache(sqlite_url(src), postgres_url)
    assert leftover_temp_files(tmp_path / "temp") == []

    assert ncps_copy(to_s3) == 0
    assert "NARs:      copied 0 (0 B), skipped 5 " in capsys.readouterr().out

    from_s3 = ["--no-progress", *side("from"), "--to-storage-local", str(back)]
    assert ncps_copy(from_s3) == 0
    assert local_objects(back) == local_objects(src)
    assert_same_cache(sqlite_url(src), sqlite_url(back))


def test_same_storage_new_database_checks_objects_without_copying(
    tmp_path: Path, postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src"
    objects = make_source(src)
    (src / nar_object_key(objects[0].key, objects[0].compression)).unlink()
    before = local_objects(src)

    args = ["--no-progress", "--from-storage-local", str(src)]
    args += ["--to-storage-local", str(src), "--to-database-url", postgres_url]
    assert ncps_copy(args) == 1

    captured = capsys.readouterr()
    assert "objects are checked, not copied" in captured.err
    assert "missing from the source storage" in captured.err
    assert "NARs:      copied 4 " in captured.out
    assert local_objects(src) == before
    copied = {(r["hash"], r["compression"]) for r in rows(postgres_url, nar_files)}
    assert copied == {(o.key, o.compression) for o in objects[1:]}


def test_existing_target_rows_are_kept_and_ids_are_the_targets_own(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    objects = make_source(src)
    # The target already has a cache of its own (ids 1, 2...) and, for one of
    # the source's store paths, a narinfo that differs: it is kept.
    other = make_source(tmp_path / "other", first_seed=100)
    engine, _ = open_db(sqlite_url(dst))
    for table in (narinfos, nar_files, config):
        with engine.begin() as conn:
            conn.execute(table.insert(), rows(sqlite_url(tmp_path / "other"), table))
    first = rows(sqlite_url(src), narinfos)[0]
    with engine.begin() as conn:
        kept = {**first, "upstream_url": "https://kept.example/"}
        conn.execute(narinfos.insert(), [kept])
    engine.dispose()
    assert not {o.key for o in other} & {o.key for o in objects}

    args = ["--no-progress", "--from-storage-local", str(src)]
    assert ncps_copy([*args, "--to-storage-local", str(dst)]) == 0

    assert "narinfos:  copied 4, skipped 1" in capsys.readouterr().out
    target = rows(sqlite_url(dst), narinfos)
    assert len(target) == 2 * len(objects)
    assert kept in target
    for row in rows(sqlite_url(src), narinfos)[1:]:
        assert row in target
    assert len(rows(sqlite_url(dst), nar_files)) == 2 * len(objects)


def test_interrupted_run_leaves_no_partial_object_or_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C while a NAR is half copied: its temp file goes, nothing shows."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import ncps.copy.nars
    from ncps.storage.local import LocalNar

    src, dst = tmp_path / "src", tmp_path / "dst"
    make_source(src)
    started, in_shutdown = threading.Event(), threading.Event()
    real_read = LocalNar.read_thd
    calls: dict[int, int] = {}

    def slow_read(self: LocalNar, n: int) -> bytes:
        calls[id(self)] = calls.get(id(self), 0) + 1
        if calls[id(self)] == 1:
            return real_read(self, 100)
        started.set()
        assert in_shutdown.wait(10)
        return real_read(self, n)

    def interrupting_wait(*args: Any, **kwargs: Any) -> Any:
        assert started.wait(10)
        raise KeyboardInterrupt

    class Pool(ThreadPoolExecutor):
        def shutdown(self, *args: Any, **kwargs: Any) -> None:
            in_shutdown.set()  # the run has set its cancel flag by now
            super().shutdown(*args, **kwargs)

    monkeypatch.setattr(LocalNar, "read_thd", slow_read)
    monkeypatch.setattr(ncps.copy.nars, "wait", interrupting_wait)
    monkeypatch.setattr(ncps.copy.nars, "ThreadPoolExecutor", Pool)
    args = ["--jobs", "1", "--from-storage-local", str(src)]
    args += ["--to-storage-local", str(dst)]

    assert ncps_copy(args) == 130

    err = capsys.readouterr().err
    assert "ncps copy: interrupted; run it again to resume" in err
    assert "100%" not in err
    assert local_objects(dst) == {}
    assert leftover_temp_files(dst) == []
    assert rows(sqlite_url(dst), nar_files) == []
    assert rows(sqlite_url(dst), narinfos) == []

    monkeypatch.undo()
    assert ncps_copy(["--no-progress", *args]) == 0
    assert local_objects(dst) == local_objects(src)
    assert_same_cache(sqlite_url(src), sqlite_url(dst))
