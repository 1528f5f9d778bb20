"""Admission of upstream NAR downloads: a fixed number of slots, clients first.

Every upstream NAR download holds a slot from the moment its request is made
until it holds no descriptor any more.  Tickets wait in two FIFO queues: one
for downloads a client is waiting for, one for prefetches.  A free slot goes
to the oldest client ticket; prefetches only get a slot when no client waits
and fewer than ``prefetch_limit`` prefetches run, so a burst of narinfo
misses can never crowd out the NARs clients ask for.  Waiting prefetches are
bounded too: beyond ``prefetch_queue`` a new prefetch is refused (the NAR is
fetched when a client asks for it).

Everything here runs on the reactor thread and does no I/O.
"""

from __future__ import annotations

import enum

from twisted.internet.defer import CancelledError, Deferred


class State(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    DONE = "done"


class Ticket:
    """One download's claim on a slot.

    ``granted`` fires once the slot is the ticket's; it fails with
    :class:`CancelledError` if the ticket is released while it waits.  The
    holder must call :meth:`release` exactly when the download holds nothing
    any more (calling it again does nothing).
    """

    def __init__(self, slots: DownloadSlots, urgent: bool) -> None:
        self._slots = slots
        self.urgent = urgent
        self.state = State.WAITING
        self.granted: Deferred[None] = Deferred()

    def promote(self) -> None:
        """A client now waits for this download: it goes ahead of prefetches."""
        self._slots._promote(self)

    def release(self) -> None:
        """Give the slot back, or leave the queue."""
        self._slots._release(self)


class DownloadSlots:
    """At most ``limit`` downloads at once; see the module docstring."""

    def __init__(
        self,
        limit: int,
        *,
        prefetch_limit: int | None = None,
        prefetch_queue: int = 256,
    ) -> None:
        if limit < 1:
            raise ValueError("at least one download slot is needed")
        self.limit = limit
        self.prefetch_limit = (
            max(1, limit // 2) if prefetch_limit is None else prefetch_limit
        )
        self.prefetch_queue = prefetch_queue
        # Insertion-ordered sets: FIFO, and O(1) removal of a leaving ticket.
        self._clients: dict[Ticket, None] = {}
        self._prefetches: dict[Ticket, None] = {}
        self.running = 0
        self.running_prefetches = 0
        self.peak = 0  # most downloads that ever ran at once

    @property
    def waiting(self) -> int:
        return len(self._clients) + len(self._prefetches)

    def client(self) -> Ticket:
        """A ticket for a download a client waits for (never refused)."""
        ticket = Ticket(self, urgent=True)
        self._clients[ticket] = None
        self._admit()
        return ticket

    def prefetch(self) -> Ticket | None:
        """A ticket for a prefetch, or None when too many prefetches wait."""
        if len(self._prefetches) >= self.prefetch_queue:
            return None
        ticket = Ticket(self, urgent=False)
        self._prefetches[ticket] = None
        self._admit()
        return ticket

    def _admit(self) -> None:
        while self.running < self.limit:
            if self._clients:
                ticket = next(iter(self._clients))
                del self._clients[ticket]
            elif self._prefetches and self.running_prefetches < self.prefetch_limit:
                ticket = next(iter(self._prefetches))
                del self._prefetches[ticket]
                self.running_prefetches += 1
            else:
                return
            self.running += 1
            self.peak = max(self.peak, self.running)
            ticket.state = State.RUNNING
            ticket.granted.callback(None)

    def _promote(self, ticket: Ticket) -> None:
        if ticket.urgent or ticket.state is State.DONE:
            return
        ticket.urgent = True
        if ticket.state is State.WAITING:
            del self._prefetches[ticket]
            self._clients[ticket] = None
        else:
            self.running_prefetches -= 1
        self._admit()

    def _release(self, ticket: Ticket) -> None:
        state, ticket.state = ticket.state, State.DONE
        if state is State.WAITING:
            queue = self._clients if ticket.urgent else self._prefetches
            del queue[ticket]
            ticket.granted.errback(CancelledError("left the download queue"))
            ticket.granted.addErrback(lambda f: f.trap(CancelledError))
        elif state is State.RUNNING:
            self.running -= 1
            if not ticket.urgent:
                self.running_prefetches -= 1
            self._admit()
