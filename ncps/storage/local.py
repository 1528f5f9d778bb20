"""NAR objects on the local filesystem.

Layout (compatible with the Go ncps)::

    <root>/store/nar/<k0>/<k0k1>/<key>.nar[.ext]    committed, verified objects
    <root>/store/tmp/ncps-<hex>/                     staging (one per instance)

Downloads in progress go to this instance's directory under
``--cache-temp-path`` (by default ``<root>/store/tmp``, then the same one as
staging; see :mod:`ncps.tempdir`).  An object appears under ``store/nar`` only
by an atomic rename of a whole, verified, fsynced temp file, so a crash never
leaves a partial object visible.
Every ``*_thd`` method blocks and runs on a pool thread.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ncps import tempdir
from ncps.errors import StartupError
from ncps.storage.base import (
    COMPRESSION_EXTENSIONS,
    EXTENSION_COMPRESSIONS,
    nar_file_name,
    nar_object_key,
    parse_nar_object_key,
)

__all__ = [
    "COMPRESSION_EXTENSIONS",
    "EXTENSION_COMPRESSIONS",
    "LocalStore",
    "nar_file_name",
]


class LocalStore:
    """The NAR store on a local directory tree."""

    kind = "local"
    pool_name = "io"

    def __init__(self, root: Path, temp_dir: Path) -> None:
        self.root = root
        self.nar_root = root / "store" / "nar"
        # The shared directories; this instance works in its own claimed
        # directory inside each (one claim if they are the same directory).
        self._staging = tempdir.TempSpace(
            root / "store" / "tmp", "--cache-storage-local"
        )
        self._temp = self._staging
        if not _same_dir(temp_dir, self._staging.base):
            self._temp = tempdir.TempSpace(temp_dir, "--cache-temp-path")

    @property
    def temp_dir(self) -> Path:
        """This instance's directory for downloads in progress (once prepared)."""
        return self._temp.path

    def prepare_thd(self) -> None:
        """Create the directories, prove them writable, claim our temp dirs.

        Runs at startup; removes what dead instances left in the temp and
        staging directories first.  Raises StartupError naming the flag (and
        then holds no temp dir).
        """
        try:
            self.nar_root.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".probe-", dir=self.nar_root)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise StartupError(
                f"--cache-storage-local: {self.nar_root} is not writable: {e.strerror}"
            ) from None
        try:
            self._staging.claim_thd()
            self._temp.claim_thd()
        except StartupError:
            self.release_thd()
            raise

    def release_thd(self) -> None:
        """Remove our temp and staging directories and unlock them (shutdown)."""
        self._temp.release_thd()
        self._staging.release_thd()

    def nar_path(self, nar_key: str, compression: str) -> Path:
        """Where the committed object lives (whether or not it exists)."""
        return self.root / nar_object_key(nar_key, compression)

    def open_fd(self, nar_key: str, compression: str) -> int | None:
        """A read-only descriptor of the committed object, None if missing.

        Cheap enough for the reactor thread (an open of a local file).
        """
        try:
            return os.open(self.nar_path(nar_key, compression), os.O_RDONLY)
        except FileNotFoundError:
            return None

    def open_thd(self, nar_key: str, compression: str) -> LocalNar | None:
        fd = self.open_fd(nar_key, compression)
        return None if fd is None else LocalNar(fd)

    def delete_thd(self, nar_key: str, compression: str) -> None:
        try:
            os.unlink(self.nar_path(nar_key, compression))
        except FileNotFoundError:
            pass

    def iter_objects_thd(self) -> Iterator[tuple[str, str, int]]:
        for dirpath, _dirs, files in os.walk(self.nar_root):
            for name in sorted(files):
                path = Path(dirpath) / name
                parsed = parse_nar_object_key(str(path.relative_to(self.root)))
                if parsed is None:
                    continue
                try:
                    size = path.stat().st_size
                except FileNotFoundError:
                    continue
                yield parsed[0], parsed[1], size

    def new_temp_file_thd(self, nar_key: str) -> tuple[int, Path]:
        """A fresh, exclusively created temp file: (fd, path)."""
        fd, path = tempfile.mkstemp(
            prefix=f"{nar_key}-", suffix=".part", dir=self._temp.claim_thd()
        )
        return fd, Path(path)

    def size_thd(self, nar_key: str, compression: str) -> int | None:
        """Size of the committed object, or None if it is not there."""
        try:
            return self.nar_path(nar_key, compression).stat().st_size
        except FileNotFoundError:
            return None

    def commit_thd(self, temp_path: Path, nar_key: str, compression: str) -> None:
        """Atomically move a whole, verified, fsynced temp file into place."""
        final = self.nar_path(nar_key, compression)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(temp_path, 0o444)
        try:
            os.replace(temp_path, final)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            # The temp dir is on another file system: copy into our own
            # staging dir first so the final step is still a rename.
            fd, staged = tempfile.mkstemp(
                prefix=f"{nar_key}-", dir=self._staging.claim_thd()
            )
            with os.fdopen(fd, "wb") as out, open(temp_path, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(staged, 0o444)
            os.replace(staged, final)
            os.unlink(temp_path)
        _fsync_dir(final.parent)

    def discard_thd(self, temp_path: Path) -> None:
        """Remove a temp file that will never be committed."""
        try:
            os.unlink(temp_path)
        except FileNotFoundError:
            pass


class LocalNar:
    """A committed local object opened for reading (owns its descriptor)."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd
        self.size = os.fstat(fd).st_size
        self._offset = 0

    def read_thd(self, n: int) -> bytes:
        assert self.fd is not None, "closed"
        data = os.pread(self.fd, n, self._offset)
        self._offset += len(data)
        return data

    def seek_thd(self, offset: int) -> None:
        self._offset = offset

    def close_thd(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _same_dir(a: Path, b: Path) -> bool:
    """Whether two existing or future directories are the same one."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
