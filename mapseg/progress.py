"""Progress of a run: a one-line bar on stderr and the caller's callback, which may cancel the run.

``Progress`` counts windows (the label pass: megapixels per second); ``SampleProgress`` follows the
sampling stage window by window (windows drawn, valid cells found), where a sparse raster may be read
for a long time before enough valid cells are in. ``tell`` passes a fraction to a callback
(``segment_raster``'s) and raises ``SegmentCancelled`` when it returns False.
"""
from __future__ import annotations

import sys
import time

from .errors import SegmentCancelled


def tell(callback, fraction: float, stage: str) -> None:
    """``callback(fraction, stage)``; False from it cancels the run (``SegmentCancelled``)."""
    if callback(fraction, stage) is False:
        raise SegmentCancelled(f"cancelled during {stage}")


class Progress:
    """A one-line progress bar on stderr (no dependency), redrawn at most every 0.25 s."""

    def __init__(self, total: int, desc: str, enabled: bool = True, stream=None):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.stream = stream or sys.stderr
        self.start = self.last = time.perf_counter()
        self.done = 0
        self.pixels = 0
        self.note = ""

    def update(self, n: int = 1, pixels: int = 0, note: str = "") -> None:
        """``n`` more steps done, ``pixels`` more pixels; ``note`` (e.g. the valid cells found) replaces the rate."""
        self.done += n
        self.pixels += pixels
        self.note = note
        now = time.perf_counter()
        if self.enabled and (now - self.last > 0.25 or self.done >= self.total):
            self._draw(now)

    def _draw(self, now: float) -> None:
        self.last = now
        frac = min(1.0, self.done / max(1, self.total))
        bar = "#" * int(24 * frac)
        rate = self.note or f"{self.pixels / 1e6 / max(now - self.start, 1e-9):5.2f} MP/s"
        eta = (now - self.start) * (1 - frac) / max(frac, 1e-9)
        self.stream.write(f"\r{self.desc} [{bar:<24}] {self.done}/{self.total} {rate} ETA {eta:5.0f}s")
        self.stream.flush()

    def close(self) -> None:
        """The final state, then a new line."""
        if self.enabled:
            if self.done:  # redrawn over the last line (at most every 0.25 s): the counts it ended with
                self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()


class SampleProgress:
    """The sampling stage, window by window: a bar on stderr (windows drawn of the first ``first``, then of
    all ``total`` while ``wanted`` valid cells or pixels are not in yet, and how many are) and the caller's
    ``callback(fraction, "fit")`` (fractions in ``span``), which may cancel the run, after every window.
    The sampler says ``start(first, total)`` before its first window."""

    def __init__(self, desc: str, unit: str, wanted: int, enabled: bool = True, callback=None,
                 span: tuple[float, float] = (0.0, 0.1)):
        self.desc, self.unit, self.wanted, self.enabled = desc, unit, wanted, enabled
        self.callback, self.span = callback, span
        self.bar = None
        self.found = 0

    def start(self, first: int, total: int) -> None:
        if self.bar is None:  # once: a later start (the same windows again) goes on counting
            self.first, self.total = first, total
            self.bar = Progress(first, self.desc, self.enabled)

    def window(self, found: int) -> None:
        """One more window drawn, holding ``found`` valid cells (or pixels)."""
        self.found += found
        if self.bar.done == self.first:  # past the first windows: drawing on, up to all of them
            self.bar.total = self.total
        self.bar.update(1, note=f"windows, {self.found:,} valid {self.unit}")
        if self.callback is not None:
            lo, hi = self.span
            done, mid = self.bar.done, (lo + hi) / 2
            if done <= self.first:
                fraction = lo + (mid - lo) * done / max(1, self.first)
            else:  # on through the rest, as far as the windows drawn or the cells wanted say, whichever is more
                more = max((done - self.first) / max(1, self.total - self.first), self.found / self.wanted)
                fraction = mid + (hi - mid) * min(1.0, more)
            tell(self.callback, fraction, "fit")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
