"""Per-key de-duplication of work in flight on this process.

Every caller gets a Deferred of its own.  Cancelling it (Klein does when a
client goes away) detaches only that caller; the shared work runs to its end,
so the cache is still filled.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

T = TypeVar("T")


class Coalescer(Generic[T]):
    """Runs at most one ``work(key)`` per key at a time; callers share it."""

    def __init__(self) -> None:
        self._waiters: dict[Hashable, list[Deferred[T]]] = {}

    def __contains__(self, key: Hashable) -> bool:
        return key in self._waiters

    def run(
        self, key: Hashable, work: Callable[[], Coroutine[Any, Any, T]]
    ) -> Deferred[T]:
        waiters = self._waiters.get(key)
        mine: Deferred[T] = Deferred(lambda d: self._detach(key, d))
        if waiters is not None:
            waiters.append(mine)
            return mine
        self._waiters[key] = [mine]
        Deferred.fromCoroutine(work()).addBoth(self._settle, key)
        return mine

    def _detach(self, key: Hashable, d: Deferred[T]) -> None:
        waiters = self._waiters.get(key)
        if waiters is not None and d in waiters:
            waiters.remove(d)

    def _settle(self, result: T | Failure, key: Hashable) -> None:
        for d in self._waiters.pop(key, []):
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)
