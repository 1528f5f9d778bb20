"""How long to leave a failing upstream alone: pure bookkeeping, no clock.

The caller passes the time (``IReactorTime.seconds()``) to every method, so
this is tested with plain numbers.  A failure opens a window of
``first`` seconds; each failure once a window is over (the probe's, usually)
doubles it, up to ``cap``.  When a window is over, exactly one request may
probe; any success closes the backoff.
"""

from __future__ import annotations

import attrs

BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0


@attrs.define
class Backoff:
    """The failure state of one upstream.

    ``failures`` counts consecutive failures (0: not backing off);
    ``retry_at`` is when the current window ends; ``probing`` is set while the
    one request testing the end of a window is under way.
    """

    failures: int = 0
    retry_at: float = 0.0
    probing: bool = False
    first: float = BACKOFF_FIRST
    cap: float = BACKOFF_MAX

    @property
    def active(self) -> bool:
        """Whether the upstream has failed since it last answered."""
        return self.failures > 0

    @property
    def down(self) -> bool:
        """Whether it has failed for so long that its window reached ``cap``
        (about two minutes of failures with the defaults): no longer a blip."""
        return self.failures > 0 and self.first * 2.0 ** (self.failures - 1) >= self.cap

    def may_ask(self, now: float) -> bool:
        """Whether a request may go now (counting one that would be the probe)."""
        return self.failures == 0 or (now >= self.retry_at and not self.probing)

    def claim(self, now: float) -> bool | None:
        """Ask to send a request: None if it must not go, else whether it is the
        probe (then the caller must report its outcome or :meth:`unclaim`)."""
        if self.failures == 0:
            return False
        if not self.may_ask(now):
            return None
        self.probing = True
        return True

    def unclaim(self) -> None:
        """The probe ended without an outcome (cancelled): let another go."""
        self.probing = False

    def failed(self, now: float, probe: bool = False) -> float | None:
        """Record a failure; the new window's length if it opened or grew.

        A failure inside an open window (a request that started before it
        opened) changes nothing: a burst of concurrent failures counts once.
        """
        if probe:
            self.probing = False
        if self.failures and now < self.retry_at:
            return None
        self.failures += 1
        window = min(self.first * 2.0 ** min(self.failures - 1, 30), self.cap)
        self.retry_at = now + window
        return window

    def succeeded(self) -> bool:
        """Record an answer; True if that ended a backoff."""
        was = self.failures > 0
        self.failures = 0
        self.retry_at = 0.0
        self.probing = False
        return was
