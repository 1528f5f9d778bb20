"""File descriptors: raise the soft limit, and size the client connections to it.

Every client connection, upstream download, temp file, database connection
and S3 connection is a descriptor.  At startup ncps raises its soft limit to
the hard one (systemd gives services 1024 soft, 524288 hard), then keeps the
client connections below what is left after everything else it may open:
at the connection limit new clients wait in the listen backlog, so the
process never runs out of descriptors in the middle of a download.
"""

from __future__ import annotations

import resource

import attr

from ncps.errors import StartupError

# Descriptors of the process itself: the listener, the reactor's waker, log
# files, the interpreter's own, a margin for the unexpected.
BASE_DESCRIPTORS = 64
# One upstream download holds its connection, its temp file, and a reader
# of that file for each client tailing it (one counted here).
PER_DOWNLOAD = 3
# SQLite opens a handful of descriptors per connection (database, WAL, shm).
PER_SQLITE_CONNECTION = 3
# Idle keep-alive connections kept per upstream host (ncps.upstream), and
# the hosts beyond the upstreams that redirects lead to (presigned URLs).
IDLE_PER_UPSTREAM = 16
REDIRECT_HOSTS = 1
# A client connection is a socket, plus a NAR file it may be sent.
PER_CLIENT = 2
# Below this many clients ncps is not a useful proxy: stop and say so.
MIN_CONNECTIONS = 16


@attr.frozen
class Budget:
    """What ncps may open besides client connections."""

    max_downloads: int
    db_connections: int
    sqlite: bool
    s3_connections: int
    upstreams: int = 1

    def headroom(self) -> int:
        per_db = PER_SQLITE_CONNECTION if self.sqlite else 1
        return (
            BASE_DESCRIPTORS
            + self.max_downloads * PER_DOWNLOAD
            + self.db_connections * per_db
            + self.s3_connections
            + (self.upstreams + REDIRECT_HOSTS) * IDLE_PER_UPSTREAM
        )


def allowed_connections(soft_limit: int, budget: Budget) -> int:
    """The most client connections ``soft_limit`` descriptors leave room for."""
    return max(0, (soft_limit - budget.headroom()) // PER_CLIENT)


def client_limit(soft_limit: int, budget: Budget, explicit: int) -> int:
    """The client connection limit: ``explicit`` (if > 0) or derived.

    Raises :class:`StartupError` naming ``--server-max-connections`` when the
    descriptors cannot carry it.
    """
    allowed = allowed_connections(soft_limit, budget)
    if explicit > 0:
        if explicit > allowed:
            raise StartupError(
                f"--server-max-connections: {explicit} needs more file descriptors "
                f"than the limit of {soft_limit} leaves room for (at most {allowed} "
                f"with {budget.max_downloads} downloads); raise the limit "
                "(LimitNOFILE=, ulimit -n) or lower the setting"
            )
        return explicit
    if allowed < MIN_CONNECTIONS:
        raise StartupError(
            f"--server-max-connections: the file descriptor limit of {soft_limit} "
            f"leaves room for only {allowed} client connections beside "
            f"{budget.max_downloads} downloads; raise it (LimitNOFILE=, ulimit -n) "
            "or lower --cache-upstream-max-downloads"
        )
    return allowed


def raise_soft_limit() -> tuple[int, int]:
    """Raise the soft descriptor limit to the hard one: (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard
        if hard == resource.RLIM_INFINITY:
            # An unlimited hard limit is refused as a soft value on Linux;
            # take the kernel's per-process ceiling instead.
            target = _nr_open()
        if target > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            except (OSError, ValueError):
                return soft, soft
            return soft, target
    return soft, soft


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 1024 * 1024
