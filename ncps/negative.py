"""A short memory of narinfos that no upstream has, so misses stay off them.

Nix asks for the same missing path again and again (every client, every
build); without this each ask costs one request per upstream.  Only a
definitive answer is remembered (every upstream asked said 404, 403 or 410),
for ``ttl`` seconds of the injected clock, and at most ``size`` entries, the
oldest forgotten first.  Runs on the reactor thread.
"""

from __future__ import annotations

from collections import OrderedDict

from twisted.internet.interfaces import IReactorTime

NEGATIVE_ENTRIES = 10_000


class NegativeCache:
    """Keys known missing until a deadline; ``ttl`` of 0 remembers nothing."""

    def __init__(
        self, clock: IReactorTime, ttl: float, size: int = NEGATIVE_ENTRIES
    ) -> None:
        self._clock = clock
        self._ttl = ttl
        self._size = size
        self._until: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._until)

    def __contains__(self, key: str) -> bool:
        until = self._until.get(key)
        if until is None:
            return False
        if self._clock.seconds() >= until:
            del self._until[key]
            return False
        return True

    def add(self, key: str) -> None:
        if self._ttl <= 0:
            return
        self._until.pop(key, None)
        self._until[key] = self._clock.seconds() + self._ttl
        while len(self._until) > self._size:
            self._until.popitem(last=False)

    def discard(self, key: str) -> None:
        self._until.pop(key, None)

    def clear(self) -> None:
        self._until.clear()
