"""Thread pools owned by the service tree.

Blocking work (SQLAlchemy, file writes, fsync, hashing and decompression of NAR
bytes) never runs on the reactor thread and never in the reactor's default pool,
which Twisted keeps for DNS.  Each pool is a named :class:`ThreadPoolService`,
started and stopped with the service tree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ParamSpec, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

P = ParamSpec("P")
T = TypeVar("T")


class ThreadPoolService(Service):
    """A named thread pool that lives exactly as long as its service.

    The pool accepts work as soon as it is built (queued until it starts), so
    objects built before ``startService`` can already hold a reference to it.
    """

    def __init__(self, name: str, max_threads: int, min_threads: int = 0) -> None:
        self.name = name
        self.pool = ThreadPool(min_threads, max_threads, name=f"ncps-{name}")

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        # Joins the worker threads: only called once the listener and every
        # producer that could queue work have stopped (see service.py).
        self.pool.stop()


class Runner:
    """Runs plain functions (named ``*_thd``) on one owned pool.

    ``run`` returns a Deferred that fires on the reactor thread with the
    function's return value or its exception.
    """

    def __init__(self, reactor: IReactorFromThreads, pool: ThreadPool) -> None:
        self._reactor = reactor
        self._pool = pool

    def run(
        self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> Deferred[T]:
        return deferToThreadPool(self._reactor, self._pool, fn, *args, **kwargs)
