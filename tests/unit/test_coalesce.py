"""ncps.coalesce: one run per key, shared outcome, cancellation detaches one caller."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred

from ncps.coalesce import Coalescer
from ncps.testing import result_of


class Work:
    """A piece of work the test finishes by hand; counts how often it started."""

    def __init__(self) -> None:
        self.started = 0
        self.gates: list[Deferred[Any]] = []

    async def __call__(self) -> Any:
        self.started += 1
        gate: Deferred[Any] = Deferred()
        self.gates.append(gate)
        return await gate


def test_one_run_per_key_and_every_caller_gets_the_result() -> None:
    c: Coalescer[str] = Coalescer()
    work = Work()
    first = c.run("k", work)
    second = c.run("k", work)
    assert work.started == 1
    assert "k" in c
    assert not first.called and not second.called
    work.gates[0].callback("value")
    assert result_of(first) == "value"
    assert result_of(second) == "value"
    assert "k" not in c


def test_different_keys_run_separately() -> None:
    c: Coalescer[str] = Coalescer()
    work = Work()
    a = c.run("a", work)
    b = c.run("b", work)
    assert work.started == 2
    work.gates[1].callback("for b")
    assert result_of(b) == "for b"
    assert not a.called


def test_a_new_run_starts_after_the_previous_finished() -> None:
    c: Coalescer[str] = Coalescer()
    work = Work()
    first = c.run("k", work)
    work.gates[0].callback("one")
    assert result_of(first) == "one"
    second = c.run("k", work)
    assert work.started == 2
    work.gates[1].callback("two")
    assert result_of(second) == "two"


def test_callers_share_the_failure() -> None:
    c: Coalescer[str] = Coalescer()
    work = Work()
    first = c.run("k", work)
    second = c.run("k", work)
    work.gates[0].errback(KeyError("boom"))
    for d in (first, second):
        with pytest.raises(KeyError, match="boom"):
            result_of(d)
    assert "k" not in c


def test_cancelling_one_caller_leaves_the_work_and_the_others() -> None:
    c: Coalescer[str] = Coalescer()
    work = Work()
    gone = c.run("k", work)
    staying = c.run("k", work)
    gone.cancel()
    with pytest.raises(CancelledError):
        result_of(gone)
    gate = work.gates[0]
    assert not gate.called, "the shared work was cancelled"
    assert "k" in c
    gate.callback("value")
    assert result_of(staying) == "value"


def test_work_goes_on_when_every_caller_left() -> None:
    c: Coalescer[str] = Coalescer()
    finished: list[str] = []

    async def work() -> str:
        value: str = await gate
        finished.append(value)
        return value

    gate: Deferred[str] = Deferred()
    only = c.run("k", work)
    only.cancel()
    assert not gate.called
    gate.callback("done anyway")
    assert finished == ["done anyway"]
    assert "k" not in c
    with pytest.raises(CancelledError):
        result_of(only)
