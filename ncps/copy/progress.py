"""Progress output of ``ncps copy``: a redrawn bar on a terminal, plain lines else."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TextIO


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _bytes_pair(done: int, total: int) -> str:
    scale, unit = 1, "B"
    for candidate in ("KiB", "MiB", "GiB", "TiB"):
        if total < scale * 1024:
            break
        scale, unit = scale * 1024, candidate
    if unit == "B":
        return f"{done}/{total} B"
    return f"{done / scale:.1f}/{total / scale:.1f} {unit}"


class Progress:
    """Copy progress on ``stream``, updated from the worker threads.

    On a terminal one line is redrawn in place; otherwise (logs, CI) a plain
    line is written at most every ``interval`` seconds, plus one at the end.
    Without a stream (``--no-progress``) it only counts.
    """

    BAR_WIDTH = 20

    def __init__(
        self,
        stream: TextIO | None,
        *,
        total_nars: int,
        total_bytes: int,
        tty: bool,
        clock: Callable[[], float] = time.monotonic,
        interval: float | None = None,
    ) -> None:
        self._stream = stream
        self._tty = tty
        self._clock = clock
        self._interval = interval if interval is not None else (0.2 if tty else 5.0)
        self._lock = threading.Lock()
        self.total_nars = total_nars
        self.total_bytes = total_bytes
        self.done_nars = 0
        self.done_bytes = 0
        self.streamed = 0
        self._start = clock()
        self._last_draw = self._start
        if tty:
            self._draw(self._start)

    def add_bytes(self, n: int) -> None:
        """``n`` more bytes streamed (any thread)."""
        with self._lock:
            self.streamed += n
            self.done_bytes += n
            self._maybe_draw()

    def nar_done(self, planned: int, streamed: int) -> None:
        """One NAR finished, copied or failed, after ``streamed`` of ``planned``."""
        with self._lock:
            self.done_nars += 1
            self.done_bytes += max(0, planned - streamed)
            self._maybe_draw()

    def close(self, *, complete: bool) -> None:
        """The final line (a run that was stopped does not claim 100%)."""
        with self._lock:
            if complete:
                # The source may have changed since the survey: what was
                # done is, now, all there was.
                self.total_nars, self.total_bytes = self.done_nars, self.done_bytes
            self._draw(self._clock(), final=True, complete=complete)

    def line(self, now: float, complete: bool = False) -> str:
        total_nars = max(self.total_nars, self.done_nars)
        total_bytes = max(self.total_bytes, self.done_bytes)
        if complete:
            fraction = 1.0
        elif total_bytes:
            fraction = self.done_bytes / total_bytes
        else:
            fraction = self.done_nars / total_nars if total_nars else 0.0
        percent = min(100, int(fraction * 100))
        elapsed = now - self._start
        rate = self.streamed / elapsed if elapsed > 0 else 0.0
        text = (
            f"{percent:3d}%  {self.done_nars}/{total_nars} NARs  "
            f"{_bytes_pair(self.done_bytes, total_bytes)}  {human_bytes(rate)}/s"
        )
        if self._tty:
            filled = self.BAR_WIDTH * percent // 100
            return f"[{'#' * filled}{'.' * (self.BAR_WIDTH - filled)}] {text}"
        return f"ncps copy: {text}"

    def _maybe_draw(self) -> None:
        now = self._clock()
        if now - self._last_draw >= self._interval:
            self._draw(now)

    def _draw(self, now: float, final: bool = False, complete: bool = False) -> None:
        self._last_draw = now
        if self._stream is None:
            return
        line = self.line(now, complete)
        if self._tty:
            self._stream.write(f"\r{line}\x1b[K" + ("\n" if final else ""))
        else:
            self._stream.write(line + "\n")
        self._stream.flush()
