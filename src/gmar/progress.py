"""Progress bars on stderr (a widget in a notebook), through ``tqdm.auto``."""

from __future__ import annotations

import sys
import weakref

from tqdm.auto import tqdm

#: the bars drawing now (not closed, still referenced): a bar started inside one of them stays quiet
_DRAWING: weakref.WeakSet[Progress] = weakref.WeakSet()


class Progress:
    """A bar for ``total`` units of work, redrawn at most twice a second.

    Args:
        total: the amount of work.
        label: what is being done.
        enabled: draw nothing when False (e.g. on all but one process). A bar started while another
            one draws (occlusion inside ``gmar evaluate``) draws nothing either.
        done: work already done before this run (a resumed evaluation).
        unit: what is counted, for the line.
    """

    def __init__(self, total: int, label: str, enabled: bool = True, done: int = 0, unit: str = "") -> None:
        self.enabled = enabled and not _DRAWING
        self.total, self.label, self.done, self.unit = total, label, done, unit
        if self.enabled:
            _DRAWING.add(self)
        self._bar = tqdm(
            total=total,
            initial=done,
            desc=label,
            unit=f" {unit}" if unit else "it",
            disable=not self.enabled,
            file=sys.stderr,
            mininterval=0.5,
            dynamic_ncols=True,
        )

    def update(self, done: int | None = None, *, advance: int = 0, note: str = "") -> None:
        """Set the work done (``done``) or add to it (``advance``); redraw if it is time."""
        before = self.done
        self.done = done if done is not None else self.done + advance
        if note:
            self._bar.set_postfix_str(note, refresh=False)
        self._bar.update(self.done - before)

    def message(self, line: str) -> None:
        """Write ``line`` on stderr on a line of its own above the bar (drawn again below it)."""
        if self.enabled:
            self._bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr)

    def close(self) -> None:
        _DRAWING.discard(self)
        self._bar.close()


def message(line: str) -> None:
    """Write ``line`` to stderr on a line of its own, above the progress bar drawing now (if any)."""
    drawing = [bar for bar in _DRAWING if bar.enabled]
    if drawing:
        drawing[0].message(line)
    else:
        print(line, file=sys.stderr)
