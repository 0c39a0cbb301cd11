"""A one-line progress bar on stderr, redrawn at most twice a second (no dependency)."""

from __future__ import annotations

import math
import sys
import time
import weakref

#: the bars drawing now (not closed, still referenced): a bar started inside one of them stays quiet
_DRAWING: weakref.WeakSet[Progress] = weakref.WeakSet()


class Progress:
    """``[####....] done/total unit, N s left note`` on one line of stderr.

    Args:
        total: the amount of work.
        label: what is being done.
        enabled: draw nothing when False (e.g. on all but one process). A bar started while another
            one draws (occlusion inside ``gmar evaluate``) draws nothing either.
        done: work already done before this run (a resumed evaluation).
        unit: what is counted, for the line.
    """

    def __init__(self, total: int, label: str, enabled: bool = True, done: int = 0, unit: str = "") -> None:
        enabled = enabled and not _DRAWING
        self.total, self.label, self.enabled, self.done, self.unit = total, label, enabled, done, unit
        if enabled:
            _DRAWING.add(self)
        self.first = done
        self._width = 0
        self.start = self.last = time.perf_counter()
        self._draw("")

    def update(self, done: int | None = None, *, advance: int = 0, note: str = "") -> None:
        """Set the work done (``done``) or add to it (``advance``); redraw if it is time."""
        self.done = done if done is not None else self.done + advance
        now = time.perf_counter()
        if now - self.last >= 0.5 or self.done >= self.total:
            self.last = now
            self._draw(note)

    def message(self, line: str) -> None:
        """Write ``line`` on a line of its own above the bar, and draw the bar again."""
        if self.enabled:
            sys.stderr.write("\r" + " " * self._width + "\r")
        sys.stderr.write(line + "\n")
        self._draw("")

    def close(self) -> None:
        _DRAWING.discard(self)
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()

    def _draw(self, note: str) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        rate = (self.done - self.first) / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else math.nan
        filled = int(30 * self.done / max(self.total, 1))
        unit = f" {self.unit}" if self.unit else ""
        timing = f", {elapsed:.0f}s elapsed" + (f", {left:.0f}s left" if math.isfinite(left) else "")
        text = f"{self.label}: [{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total}{unit}{timing} {note}  "
        self._width = len(text)
        sys.stderr.write("\r" + text)
        sys.stderr.flush()


def message(line: str) -> None:
    """Write ``line`` to stderr on a line of its own, above the progress bar drawing now (if any)."""
    drawing = [bar for bar in _DRAWING if bar.enabled]
    if drawing:
        drawing[0].message(line)
    else:
        print(line, file=sys.stderr)
