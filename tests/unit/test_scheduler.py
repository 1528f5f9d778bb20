"""ncps.scheduler: download slots, clients before prefetches, bounded queues."""

from __future__ import annotations

import pytest
from twisted.internet.defer import CancelledError

from ncps.scheduler import DownloadSlots, State, Ticket


def granted(ticket: Ticket | None) -> bool:
    assert ticket is not None
    return ticket.granted.called


def test_at_most_limit_run_and_a_release_admits_the_next() -> None:
    slots = DownloadSlots(2)
    a, b, c = slots.client(), slots.client(), slots.client()
    assert [granted(t) for t in (a, b, c)] == [True, True, False]
    assert slots.running == 2 and slots.waiting == 1
    a.release()
    assert granted(c) and slots.running == 2 and slots.waiting == 0
    a.release()  # twice is harmless
    assert slots.running == 2
    b.release()
    c.release()
    assert slots.running == 0 and slots.peak == 2


def test_clients_go_ahead_of_waiting_prefetches() -> None:
    slots = DownloadSlots(2, prefetch_limit=2)
    running = [slots.client(), slots.client()]
    prefetch = slots.prefetch()
    client = slots.client()
    running[0].release()
    assert granted(client) and not granted(prefetch)
    running[1].release()
    assert granted(prefetch)


def test_prefetches_use_at_most_their_share_of_the_slots() -> None:
    slots = DownloadSlots(4)
    assert slots.prefetch_limit == 2
    prefetches = [slots.prefetch() for _ in range(5)]
    assert [granted(t) for t in prefetches] == [True, True, False, False, False]
    client = slots.client()
    assert granted(client)  # the slots prefetches may not use stay for clients
    assert slots.running == 3


def test_waiting_prefetches_are_bounded() -> None:
    slots = DownloadSlots(2, prefetch_queue=3)
    prefetches = [slots.prefetch() for _ in range(4)]  # 1 runs, 3 wait
    assert all(t is not None for t in prefetches)
    assert slots.prefetch() is None
    assert slots.client() is not None  # clients are never refused


def test_a_promoted_prefetch_leaves_the_prefetch_queue_for_the_client_queue() -> None:
    slots = DownloadSlots(1)
    first = slots.client()
    p1, p2 = slots.prefetch(), slots.prefetch()
    assert p1 is not None and p2 is not None
    other = slots.client()
    p2.promote()
    first.release()
    assert granted(other) and not granted(p2)
    other.release()
    assert granted(p2) and not granted(p1)  # ahead of the older prefetch
    assert p2.urgent


def test_promoting_a_running_prefetch_frees_a_prefetch_slot() -> None:
    slots = DownloadSlots(4)
    p1, p2, p3 = slots.prefetch(), slots.prefetch(), slots.prefetch()
    assert granted(p1) and granted(p2) and not granted(p3)
    assert p1 is not None
    p1.promote()
    assert granted(p3)
    assert slots.running == 3 and slots.running_prefetches == 2


def test_releasing_a_waiting_ticket_leaves_the_queue() -> None:
    slots = DownloadSlots(1)
    first = slots.client()
    leaving = slots.client()
    staying = slots.client()
    seen: list[object] = []
    leaving.granted.addErrback(lambda f: seen.append(f.type))  # who awaits it
    leaving.release()
    assert leaving.state is State.DONE
    assert seen == [CancelledError]
    first.release()
    assert granted(staying)
    assert slots.waiting == 0 and slots.running == 1


def test_a_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError):
        DownloadSlots(0)
