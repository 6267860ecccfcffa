"""Window geometry: which pixels a window reads, which labels it writes, and the plan of windows.

Pixels are those of the stride-padded raster (the raster padded at the bottom and right to a
multiple of the stride). A ``Window`` has a ``core`` (the labels it writes; cores tile the padded
raster on the stride grid) and a ``read`` box (the core plus a halo of context pixels, clipped to
the padded raster). The exact-halo rule (mapseg.segment's module doc): with the halo the network
needs (network.required_halo), a window's core gets the labels of the whole-raster pass, so labels
do not depend on the window size; ``DEFAULT_TILE`` only sets memory and speed.

Sampling windows (``sample_window_order``) are fixed ``SAMPLE_WINDOW``-pixel cores drawn in a seeded
order, independent of the tile, so the fitted centres are too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import SegmentError

DEFAULT_TILE = 1024          # window core side (labels do not depend on it; memory does)
SAMPLE_WINDOW = 256          # core side of a sampling window
SAMPLE_FRACTION = 0.03       # share of the raster's sampling-grid windows drawn ...
MIN_SAMPLE_WINDOWS = 4       # ... but at least this many (or all there are)
MAX_SAMPLE_WINDOWS = 64      # ... and at most this many


@dataclass(frozen=True)
class Box:
    """Rows [row0, row1) x cols [col0, col1), in pixels of the padded raster."""
    row0: int
    row1: int
    col0: int
    col1: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.row1 - self.row0, self.col1 - self.col0

    @property
    def bounds(self) -> tuple[int, int, int, int]:
        """(row0, row1, col0, col1): the arguments of a reader's ``read``."""
        return self.row0, self.row1, self.col0, self.col1

    def within(self, outer: Box, cell: int = 1) -> tuple[slice, slice]:
        """This box as (rows, cols) slices of an array that covers ``outer``, at one element per ``cell``
        pixels (the stride, for an embedding grid); both boxes lie on that grid."""
        return (slice((self.row0 - outer.row0) // cell, (self.row1 - outer.row0) // cell),
                slice((self.col0 - outer.col0) // cell, (self.col1 - outer.col0) // cell))

    def grown(self, margin: int, limit: Box) -> Box:
        """This box plus ``margin`` pixels on every side, clipped to ``limit``."""
        return Box(max(limit.row0, self.row0 - margin), min(limit.row1, self.row1 + margin),
                   max(limit.col0, self.col0 - margin), min(limit.col1, self.col1 + margin))

    def in_raster(self, height: int, width: int) -> Box:
        """The part inside the raster (only the bottom and right edges can lie in the stride padding)."""
        return Box(self.row0, min(self.row1, height), self.col0, min(self.col1, width))


@dataclass(frozen=True)
class Window:
    core: Box    # the labels this window writes
    read: Box    # the core and its halo, clipped to the padded raster: the pixels the network sees

    @classmethod
    def around(cls, core: Box, halo: int, padded: Box) -> Window:
        return cls(core, core.grown(halo, padded))

    @property
    def core_in_read(self) -> tuple[slice, slice]:
        """The core's slices of an array of the read box."""
        return self.core.within(self.read)

    def core_cells(self, stride: int) -> tuple[slice, slice]:
        """The core's slices of the read box's embedding grid (one cell per ``stride`` pixels)."""
        return self.core.within(self.read, stride)


def padded_size(n: int, stride: int) -> int:
    return -(-n // stride) * stride


def _padded(height: int, width: int, stride: int) -> Box:
    return Box(0, padded_size(height, stride), 0, padded_size(width, stride))


def plan_windows(height: int, width: int, tile: int, stride: int, halo: int) -> list[Window]:
    """Row-major windows whose cores tile the stride-padded raster; reads carry ``halo`` (clipped)."""
    if tile < stride or tile % stride:
        raise SegmentError(f"--tile {tile}: must be a positive multiple of {stride}")
    padded = _padded(height, width, stride)
    return [Window.around(Box(r0, min(r0 + tile, padded.row1), c0, min(c0 + tile, padded.col1)), halo, padded)
            for r0 in range(0, padded.row1, tile) for c0 in range(0, padded.col1, tile)]


def sample_window_order(height: int, width: int, stride: int, halo: int, seed: int) -> tuple[list[Window], int]:
    """All sampling windows in a seeded random order, and how many to take first (see module doc)."""
    s = padded_size(SAMPLE_WINDOW, stride)
    padded = _padded(height, width, stride)
    grid = [(r0, c0) for r0 in range(0, padded.row1, s) for c0 in range(0, padded.col1, s)]
    n = max(min(len(grid), MIN_SAMPLE_WINDOWS), min(MAX_SAMPLE_WINDOWS, math.ceil(SAMPLE_FRACTION * len(grid))))
    order = np.random.default_rng([seed, height, width, 0x5A4D]).permutation(len(grid))
    wins = [Window.around(Box(r0, min(r0 + s, padded.row1), c0, min(c0 + s, padded.col1)), halo, padded)
            for r0, c0 in (grid[i] for i in order)]
    return wins, n
