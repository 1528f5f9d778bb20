"""Copying the NAR objects of ``ncps copy``, on a thread pool the command owns."""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

import attrs

from ncps import nix32
from ncps.copy.progress import Progress
from ncps.copy.sides import (
    Side,
    insert_rows_thd,
    iter_batches,
    keys_with_file_hash_thd,
    missing_in_target,
)
from ncps.db.schema import nar_files
from ncps.errors import StorageError
from ncps.storage.base import nar_file_name

CHUNK = 1024 * 1024


class _Cancelled(Exception):
    """The run is being interrupted: a worker stops streaming."""


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
