"""Per-instance temp directories and the startup cleanup (ncps.tempdir).

A dead instance is simulated by a directory and lock file that no open file
holds a lock on.  A live one is a claim made in this process: flock locks
belong to the open file description, so the cleanup's own open() of the lock
file conflicts with it as another process's would (the SIGKILL case, with a
real process, is in tests/integration/test_tempdir_kill.py).
"""

from __future__ import annotations

import errno
import fcntl
import gc
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.logger import formatEvent

from ncps import tempdir
from ncps.errors import StartupError
from ncps.storage.local import LocalStore
from ncps.tempdir import TempSpace, claim_thd, remove_leftovers_thd
from ncps.testing import captured_log

NAR_KEY = "1" * 52
HEX_KEY = "a" * 64
DEAD = "ncps-00112233445566ff"


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    with captured_log() as seen:
        yield seen


def messages(events: list[dict[str, Any]]) -> list[str]:
    return [formatEvent(e) for e in events if e.get("log_namespace") == "ncps.tempdir"]


def make_dead(base: Path, name: str = DEAD, files: int = 2, size: int = 10) -> Path:
    """What a killed instance leaves: its directory with temp files, its lock file."""
    directory = base / name
    (directory / "sub").mkdir(parents=True)
    for i in range(files):
        (directory / f"{NAR_KEY}-abcdefg{i}.part").write_bytes(b"x" * size)
    (base / f"{name}.lock").write_bytes(b"")
    return directory


def test_claim_creates_locked_private_dir(tmp_path: Path) -> None:
    claim = claim_thd(tmp_path)
    assert claim.path.parent == tmp_path and claim.path.is_dir()
    assert claim.lock_path == tmp_path / f"{claim.path.name}.lock"
    assert tempdir._INSTANCE_DIR.match(claim.path.name)
    assert claim.path.stat().st_mode & 0o777 == 0o700
    fd = os.open(claim.lock_path, os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    claim.release_thd()


def test_dead_instance_is_removed(tmp_path: Path, events: list[dict[str, Any]]) -> None:
    dead = make_dead(tmp_path, files=3, size=1000)
    claim = claim_thd(tmp_path)
    assert not dead.exists()
    assert not (tmp_path / f"{DEAD}.lock").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [claim.path.name, claim.lock_path.name]
    )
    assert messages(events) == [
        f"removed 3 leftover temp file(s) (3000 bytes) from {tmp_path}"
    ]
    claim.release_thd()


def test_nothing_to_remove_logs_nothing(
    tmp_path: Path, events: list[dict[str, Any]]
) -> None:
    claim_thd(tmp_path).release_thd()
    assert messages(events) == []


def test_live_instance_is_kept(tmp_path: Path) -> None:
    live = claim_thd(tmp_path)
    (live.path / f"{NAR_KEY}-abcdefgh.part").write_bytes(b"in progress")
    other = claim_thd(tmp_path)
    assert other.path != live.path
    assert (live.path / f"{NAR_KEY}-abcdefgh.part").read_bytes() == b"in progress"
    assert live.lock_path.exists()
    removed = remove_leftovers_thd(tmp_path)
    assert (removed.files, removed.size) == (0, 0)
    assert live.path.is_dir() and other.path.is_dir()
    other.release_thd()
    live.release_thd()


def test_dropped_claim_is_cleaned_by_the_next_one(tmp_path: Path) -> None:
    # No release (a crash): once the claim is gone its descriptor is closed,
    # the lock with it, and the next claim removes the directory.
    claim = claim_thd(tmp_path)
    path = claim.path
    (path / "x.part").write_bytes(b"x")
    del claim
    gc.collect()
    assert path.exists()
    claim_thd(tmp_path).release_thd()
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_dir_without_lock_file_is_removed(tmp_path: Path) -> None:
    orphan = tmp_path / DEAD
    orphan.mkdir()
    (orphan / "f").write_bytes(b"abc")
    removed = remove_leftovers_thd(tmp_path)
    assert (removed.files, removed.size) == (1, 3)
    assert not orphan.exists()


def test_lock_file_without_dir_is_removed(tmp_path: Path) -> None:
    (tmp_path / f"{DEAD}.lock").write_bytes(b"")
    remove_leftovers_thd(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_old_layout_part_files_are_removed(tmp_path: Path) -> None:
    (tmp_path / f"{NAR_KEY}-ab_d1234.part").write_bytes(b"12345")
    (tmp_path / f"{HEX_KEY}-zzzzzzzz.part").write_bytes(b"1")
    removed = remove_leftovers_thd(tmp_path)
    assert (removed.files, removed.size) == (2, 6)
    assert list(tmp_path.iterdir()) == []


UNRELATED_FILES = [
    "download.part",  # someone else's partial download
    f"{NAR_KEY}-abcdefgh.part.keep",
    f"{NAR_KEY}-abcdefg.part",  # 7 random characters: not mkstemp's
    f"{NAR_KEY[:-1]}-abcdefgh.part",  # not a NAR key
    "ncps-0011223344556677.lock.bak",
    "ncps-00112233445566.lock",  # not our 16 hex digits
    "ncps-notes",
    "ncps",
    ".probe-abc",
]


def test_unrelated_entries_are_kept(tmp_path: Path) -> None:
    for name in UNRELATED_FILES:
        (tmp_path / name).write_bytes(b"mine")
    (tmp_path / "ncps-001122334455667g").mkdir()  # not hex
    (tmp_path / "ncps-0011223344556677.d").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / f"{NAR_KEY}-abcdefgh.part").write_bytes(b"nested")
    # A directory called like an old temp file is not a temp file.
    (tmp_path / f"{NAR_KEY}-abcdefgh.part").mkdir()
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    removed = remove_leftovers_thd(tmp_path)
    assert (removed.files, removed.size) == (0, 0)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_symlinks_are_not_followed(
    tmp_path: Path, events: list[dict[str, Any]]
) -> None:
    base = tmp_path / "temp"
    base.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_bytes(b"keep me")
    # A symlink named like an instance dir, without a lock file.
    (base / "ncps-aaaaaaaaaaaaaaaa").symlink_to(outside)
    # A dead instance's dir holding a symlink to the outside.
    dead = make_dead(base)
    (dead / "link").symlink_to(outside)
    (dead / "file-link").symlink_to(outside / "precious")
    # A symlink named like a lock file (to a lock file that nobody holds).
    (tmp_path / "lockish").write_bytes(b"")
    (base / "ncps-bbbbbbbbbbbbbbbb.lock").symlink_to(tmp_path / "lockish")
    (base / "ncps-bbbbbbbbbbbbbbbb").mkdir()
    (base / "ncps-cccccccccccccccc.lock").symlink_to(tmp_path / "nowhere")
    (base / "ncps-cccccccccccccccc").mkdir()
    # An old-layout name that is a symlink to a file outside.
    (base / f"{NAR_KEY}-abcdefgh.part").symlink_to(outside / "precious")

    removed = remove_leftovers_thd(base)

    assert messages(events) == []  # skipped, not tried and failed
    # Two temp files and the file symlink itself (its size: its target path).
    assert (removed.files, removed.size) == (3, 20 + len(str(outside / "precious")))
    assert (outside / "precious").read_bytes() == b"keep me"
    assert not dead.exists()
    assert (base / "ncps-aaaaaaaaaaaaaaaa").is_symlink()
    assert (base / "ncps-bbbbbbbbbbbbbbbb.lock").is_symlink()
    assert (base / "ncps-bbbbbbbbbbbbbbbb").is_dir()
    assert (base / "ncps-cccccccccccccccc.lock").is_symlink()
    assert (base / "ncps-cccccccccccccccc").is_dir()
    assert (tmp_path / "lockish").exists()
    assert (base / f"{NAR_KEY}-abcdefgh.part").is_symlink()


def test_failure_to_remove_is_a_warning(
    tmp_path: Path, events: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = make_dead(tmp_path)

    def refuse(path: Any, **kwargs: Any) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(shutil, "rmtree", refuse)
    claim = claim_thd(tmp_path)  # does not raise
    assert dead.exists()
    warnings = [m for m in messages(events) if m.startswith("cannot remove")]
    assert warnings == [
        f"cannot remove leftover temp entry {tmp_path}/{DEAD}: Permission denied"
    ]
    monkeypatch.undo()
    claim.release_thd()


def test_release_removes_dir_and_lock(tmp_path: Path) -> None:
    claim = claim_thd(tmp_path)
    (claim.path / "left.part").write_bytes(b"x")
    claim.release_thd()
    assert list(tmp_path.iterdir()) == []
    assert not claim.held
    claim.release_thd()  # idempotent


def test_concurrent_claims_and_cleanups_never_take_a_live_dir(tmp_path: Path) -> None:
    claims: list[tempdir.TempClaim] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(25):
                claims.append(claim_thd(tmp_path))
                remove_leftovers_thd(tmp_path)
        except BaseException as e:
            errors.append(e)

    for i in range(10):
        make_dead(tmp_path, f"ncps-{i:016x}")
    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(claims) == 200
    for claim in claims:
        assert claim.path.is_dir()
        assert os.path.samestat(
            os.stat(claim.lock_path), os.fstat(claim._lock_fd or -1)
        )
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {c.path.name for c in claims} | {c.lock_path.name for c in claims}
    for claim in claims:
        claim.release_thd()
    assert list(tmp_path.iterdir()) == []


def test_prepare_names_the_flag(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(StartupError, match=r"^--cache-temp-path: .* is not writable"):
        tempdir.prepare_thd(blocker / "temp", "--cache-temp-path")


def test_temp_space_claims_once(tmp_path: Path) -> None:
    space = TempSpace(tmp_path / "t", "--cache-temp-path")
    with pytest.raises(RuntimeError):
        _ = space.path
    first = space.claim_thd()
    assert space.claim_thd() == first == space.path
    space.release_thd()
    assert not first.exists() and not space.claimed
    second = space.claim_thd()
    assert second != first
    space.release_thd()


# -- the local store -----------------------------------------------------------


def test_local_store_temp_files_live_in_its_claimed_dir(tmp_path: Path) -> None:
    temp = tmp_path / "temp"
    temp.mkdir()
    dead = make_dead(temp)
    (temp / f"{NAR_KEY}-abcdefgh.part").write_bytes(b"old")
    store = LocalStore(tmp_path / "storage", temp)
    store.prepare_thd()
    assert not dead.exists()
    assert not (temp / f"{NAR_KEY}-abcdefgh.part").exists()
    assert store.temp_dir.parent == temp
    fd, path = store.new_temp_file_thd(NAR_KEY)
    os.close(fd)
    assert path.parent == store.temp_dir
    assert path.name.startswith(f"{NAR_KEY}-") and path.suffix == ".part"
    # Staging (inside the store) is claimed apart from a separate temp dir.
    staging = tmp_path / "storage" / "store" / "tmp"
    assert len([p for p in staging.iterdir() if p.is_dir()]) == 1
    store.release_thd()
    assert list(temp.iterdir()) == []
    assert list(staging.iterdir()) == []


def test_local_store_default_temp_is_one_claim(tmp_path: Path) -> None:
    root = tmp_path / "storage"
    staging = root / "store" / "tmp"
    staging.mkdir(parents=True)
    dead = make_dead(staging)
    store = LocalStore(root, staging)
    store.prepare_thd()
    assert not dead.exists()
    assert len(list(staging.iterdir())) == 2  # one dir, one lock file
    store.release_thd()
    assert list(staging.iterdir()) == []


def test_local_store_cross_filesystem_commit_stages_in_claimed_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(tmp_path / "storage", tmp_path / "temp")
    store.prepare_thd()
    fd, temp = store.new_temp_file_thd(NAR_KEY)
    with open(fd, "wb") as out:
        out.write(b"nar bytes")
    staged_in: list[Path] = []
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        if Path(src) == temp:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        staged_in.append(Path(src).parent)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    store.commit_thd(temp, NAR_KEY, "xz")
    monkeypatch.undo()
    assert store.nar_path(NAR_KEY, "xz").read_bytes() == b"nar bytes"
    assert not temp.exists()
    staging = tmp_path / "storage" / "store" / "tmp"
    assert len(staged_in) == 1 and staged_in[0].parent == staging
    assert staged_in[0].name.startswith("ncps-")
    store.release_thd()


def test_local_store_prepare_failure_holds_nothing(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    store = LocalStore(tmp_path / "storage", blocker / "temp")
    with pytest.raises(StartupError, match=r"^--cache-temp-path: "):
        store.prepare_thd()
    assert list((tmp_path / "storage" / "store" / "tmp").iterdir()) == []
