"""Private temp directories under a temp directory that instances may share.

Every running ncps claims ``<base>/ncps-<hex>/`` for its temp files and holds
an exclusive ``flock`` on ``<base>/ncps-<hex>.lock`` for as long as it runs.
The kernel drops the lock when the process dies, however it dies (SIGKILL
included), so a lock that can be taken marks a directory whose owner is gone.

Before claiming, :func:`claim_thd` removes what dead instances left behind:
the directories of unlocked lock files, ``ncps-<hex>/`` directories without a
lock file, and the ``<nar_key>-XXXXXXXX.part`` files older versions wrote
straight into ``<base>``.  Nothing else is touched, since ``<base>`` may be
``/tmp``, and neither is a live instance's directory.

Everything here blocks (runs at startup, at shutdown, or on a pool thread).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import shutil
import sys
import threading
import weakref
from pathlib import Path

import attrs
from twisted.logger import Logger

from ncps.errors import StartupError
from ncps.logs import ncps_observer

log = Logger(observer=ncps_observer)

_INSTANCE_DIR = re.compile(r"^ncps-[0-9a-f]{16}$")
_INSTANCE_LOCK = re.compile(r"^(ncps-[0-9a-f]{16})\.lock$")
# What tempfile.mkstemp(prefix=f"{nar_key}-", suffix=".part") made in older
# versions: a NAR key (nix32 or hex sha256) and 8 random characters.
_OLD_PART = re.compile(r"^(?:[0-9a-df-np-sv-z]{52}|[0-9a-f]{64})-[a-z0-9_]{8}\.part$")
# Tries at a fresh name before giving up (a clash needs 64 random bits to
# repeat, or a concurrent cleaner to unlink our lock before we hold it).
_CLAIM_ATTEMPTS = 8


@attrs.define
class Removed:
    """What one cleanup removed: regular files (and symlinks) and their bytes."""

    files: int = 0
    size: int = 0


class TempClaim:
    """This instance's private directory :attr:`path` under a shared base.

    Holds the lock that keeps other instances' cleanups away from it until
    :meth:`release_thd` (or until the process ends).  Dropping the object
    closes the lock's descriptor too, leaving the directory to the next
    cleanup.
    """

    def __init__(self, base: Path, name: str, lock_fd: int) -> None:
        self.base = base
        self.path = base / name
        self.lock_path = base / f"{name}.lock"
        self._lock_fd: int | None = lock_fd
        self._close = weakref.finalize(self, os.close, lock_fd)

    @property
    def held(self) -> bool:
        return self._lock_fd is not None

    def release_thd(self) -> None:
        """Remove the directory with whatever is left in it, then unlock.

        Idempotent.  A failure to remove is logged: the next startup's
        cleanup retries it.
        """
        if self._lock_fd is None:
            return
        try:
            _remove_tree(self.path)
            _unlink(self.lock_path)
        except OSError as e:
            log.warn(
                "could not remove temp directory {path}: {reason}",
                path=str(self.path),
                reason=e.strerror or str(e),
            )
        finally:
            self._lock_fd = None
            self._close()


class TempSpace:
    """A shared temp directory and this instance's claim in it, made once.

    Thread-safe: the claim is made by :meth:`claim_thd` at startup, or by
    the first temp file if a store was never prepared (tests, tools).
    """

    def __init__(self, base: Path, flag: str) -> None:
        self.base = base
        self.flag = flag
        self._claim: TempClaim | None = None
        self._mutex = threading.Lock()

    @property
    def claimed(self) -> bool:
        return self._claim is not None

    @property
    def path(self) -> Path:
        """This instance's directory; RuntimeError before :meth:`claim_thd`."""
        claim = self._claim
        if claim is None:
            raise RuntimeError(f"no temp directory claimed in {self.base} yet")
        return claim.path

    def claim_thd(self) -> Path:
        """This instance's directory, claimed now if not yet.

        Raises StartupError naming the flag.
        """
        with self._mutex:
            if self._claim is None:
                self._claim = prepare_thd(self.base, self.flag)
            return self._claim.path

    def release_thd(self) -> None:
        """Remove this instance's directory and unlock (idempotent).

        A later :meth:`claim_thd` claims a fresh one.
        """
        with self._mutex:
            claim, self._claim = self._claim, None
        if claim is not None:
            claim.release_thd()


def prepare_thd(base: Path, flag: str) -> TempClaim:
    """Create ``base`` if it is missing and claim a directory in it (startup).

    Raises StartupError naming ``flag`` if that fails.
    """
    try:
        base.mkdir(parents=True, exist_ok=True)
        return claim_thd(base)
    except OSError as e:
        raise StartupError(
            f"{flag}: {base} is not writable: {e.strerror or e}"
        ) from None


def claim_thd(base: Path) -> TempClaim:
    """Clean up after dead instances in ``base``, then claim a directory there.

    ``base`` must exist.  Logs one line if leftovers were removed.  Raises
    OSError if the lock file or the directory cannot be created.
    """
    removed = remove_leftovers_thd(base)
    if removed.files:
        log.info(
            "removed {files} leftover temp file(s) ({size} bytes) from {base}",
            files=removed.files,
            size=removed.size,
            base=str(base),
        )
    for _ in range(_CLAIM_ATTEMPTS):
        name = f"ncps-{secrets.token_hex(8)}"
        lock_path = base / f"{name}.lock"
        fd = os.open(
            lock_path,
            os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            # Readable, so that other users' instances can test the lock.
            0o644,
        )
        if not _lock(fd) or not _still_linked(fd, lock_path):
            # A concurrent cleanup took our fresh lock file for a dead
            # one's (it was not locked yet): it unlinks it; pick another name.
            os.close(fd)
            continue
        try:
            os.mkdir(base / name, 0o700)
        except OSError:
            _unlink(lock_path)
            os.close(fd)
            raise
        return TempClaim(base, name, fd)
    raise OSError(errno.EAGAIN, "no temp directory name could be claimed", str(base))


def remove_leftovers_thd(base: Path) -> Removed:
    """Remove what dead instances left in ``base``; returns what was removed.

    Errors on single entries (permissions, entries vanishing under a
    concurrent cleanup) are logged or ignored; this never raises for them.
    """
    removed = Removed()
    try:
        entries = list(os.scandir(base))
    except OSError as e:
        log.warn(
            "cannot list temp directory {base}: {reason}",
            base=str(base),
            reason=e.strerror or str(e),
        )
        return removed
    for entry in entries:
        try:
            lock = _INSTANCE_LOCK.match(entry.name)
            if lock is not None:
                # Not a regular file (a symlink...): not one of ours.
                if entry.is_file(follow_symlinks=False):
                    _remove_if_dead(base, lock.group(1), removed)
            elif _INSTANCE_DIR.match(entry.name):
                # A live instance creates its lock file before its directory
                # and keeps it: a directory without one has no owner.  (Look
                # now, not in the listing: scandir is no snapshot.)
                lock_path = base / f"{entry.name}.lock"
                if entry.is_dir(follow_symlinks=False) and not os.path.lexists(
                    lock_path
                ):
                    _count_and_remove_tree(Path(entry.path), removed)
            elif _OLD_PART.match(entry.name) and entry.is_file(follow_symlinks=False):
                size = entry.stat(follow_symlinks=False).st_size
                os.unlink(entry.path)
                removed.files += 1
                removed.size += size
        except FileNotFoundError:
            continue  # another instance's cleanup got there first
        except OSError as e:
            log.warn(
                "cannot remove leftover temp entry {path}: {reason}",
                path=e.filename or entry.path,
                reason=e.strerror or str(e),
            )
    return removed


def _remove_if_dead(base: Path, name: str, removed: Removed) -> None:
    """Remove ``name``'s directory and lock file if no live process holds it."""
    lock_path = base / f"{name}.lock"
    # O_NOFOLLOW: should a symlink replace the lock file after the listing,
    # fail (ELOOP, logged) rather than lock or remove what it points to.
    fd = os.open(lock_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not _lock(fd):
            return  # its owner is alive
        if not _still_linked(fd, lock_path):
            return  # another cleanup removed it meanwhile
        directory = base / name
        if directory.is_dir() and not directory.is_symlink():
            _count_and_remove_tree(directory, removed)
        _unlink(lock_path)
    finally:
        os.close(fd)


def _lock(fd: int) -> bool:
    """Take the exclusive flock on ``fd`` without waiting; False if held."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _still_linked(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        linked = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (linked.st_dev, linked.st_ino) == (opened.st_dev, opened.st_ino)


def _count_and_remove_tree(directory: Path, removed: Removed) -> None:
    """Remove ``directory`` (never following symlinks), counting its files."""
    for dirpath, _dirs, files in os.walk(directory):
        for name in files:
            try:
                size = os.lstat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                continue
            removed.files += 1
            removed.size += size
    _remove_tree(directory)


def _remove_tree(directory: Path) -> None:
    """``shutil.rmtree`` that tolerates entries removed concurrently.

    rmtree never follows symlinks inside the tree (it unlinks them) and on
    Linux works on directory descriptors, so a swapped-in symlink cannot
    redirect it.
    """

    def onexc(_fn: object, _path: str, exc: BaseException) -> None:
        if not isinstance(exc, FileNotFoundError):
            raise exc

    if sys.version_info >= (3, 12):
        shutil.rmtree(directory, onexc=onexc)
    else:

        def onerror(
            fn: object, path: str, info: tuple[object, BaseException, object]
        ) -> None:
            onexc(fn, path, info[1])

        shutil.rmtree(directory, onerror=onerror)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
