"""Temp directories of real processes: kept while they live, cleaned after SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ncps.storage.local import LocalStore
from ncps.tempdir import claim_thd

NAR_KEY = "1" * 52

# A store that claims its temp dir, starts a download's temp file, says where,
# and waits to be killed.
CHILD = """
import sys, time
from pathlib import Path
from ncps.storage.local import LocalStore

store = LocalStore(Path(sys.argv[1]), Path(sys.argv[2]))
store.prepare_thd()
fd, path = store.new_temp_file_thd(sys.argv[3])
with open(fd, "wb", closefd=False) as out:
    out.write(b"x" * 4096)
print(path, flush=True)
time.sleep(120)
"""


@pytest.fixture
def child(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CHILD,
            str(tmp_path / "storage"),
            str(tmp_path / "temp"),
            NAR_KEY,
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line, f"child exited early: {proc.wait(5)}"
        yield proc, Path(line)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_live_process_dir_is_kept_then_cleaned_after_sigkill(
    tmp_path: Path, child: tuple[subprocess.Popen[str], Path]
) -> None:
    proc, part = child
    temp = tmp_path / "temp"
    assert part.parent.parent == temp and part.suffix == ".part"

    # Another instance starting while the first runs leaves its files alone.
    other = LocalStore(tmp_path / "storage", temp)
    other.prepare_thd()
    assert part.read_bytes() == b"x" * 4096
    other.release_thd()

    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(10) == -signal.SIGKILL
    assert part.exists()  # the kill itself removes nothing

    restarted = claim_thd(temp)
    assert not part.exists()
    assert not part.parent.exists()
    assert sorted(p.name for p in temp.iterdir()) == sorted(
        [restarted.path.name, restarted.lock_path.name]
    )
    # The staging dir inside the store was the child's too: cleaned by the
    # next store that starts there.
    staging = tmp_path / "storage" / "store" / "tmp"
    assert len(list(staging.iterdir())) == 2
    store = LocalStore(tmp_path / "storage", temp)
    store.prepare_thd()
    staged = [p for p in staging.iterdir() if p.is_dir()]
    assert staged == [store._staging.path]
    store.release_thd()
    restarted.release_thd()
    assert list(temp.iterdir()) == []
    assert list(staging.iterdir()) == []
