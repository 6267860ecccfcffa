"""Full-resolution labels from the network's stride-4 cell scores: how a pixel gets its label.

The network gives one embedding per cell of 4 x 4 pixels, and every cell a score per centre
(``x . A[:, k] + b[k]``, ``mapseg.cluster.cell_scores``). Two ways to draw them at full resolution (``METHODS``):

* ``nearest``: every pixel takes its cell's label. Every edge is a 4-pixel staircase.
* ``guided``: a fast guided filter (He & Sun, "Fast Guided Filter", 2015, arXiv:1505.00996) of the
  K score maps with the image's luma as the guide. From per-cell means of the luma and of its square
  (over the pixels that hold data), over boxes of (2r + 1) x (2r + 1) cells, each score map is fitted
  as a linear function of the luma,
  ``score ~ a * luma + b`` (a ridge fit, ``eps`` on the luma's variance); the coefficients (box-averaged
  once more where ``coef_radius`` > 0) are drawn bilinearly to full resolution and applied to each
  pixel's own luma; the label is the first best score. Edges follow the image's brightness edges
  inside the cells, and cells that disagree with their surroundings but not with the image are
  smoothed over. Measured with the default model (``python -m training.eval``, K = 5, centres fitted
  once, seed 0; r = 2 cells, no second average, eps 0.01): dubai_dev 0.392 -> 0.409 mIoU and
  0.570 -> 0.585 accuracy, geonrw_dev (5 groups) 0.245 -> 0.258 and 0.499 -> 0.522. A majority filter
  of the same reach gained about half as much; a colour (RGB) guide no more than luma; radius 3
  a little more on both sets but merges more thin structures (docs/runtime.md, "Upsampling").

Which one a model uses is part of the model (``meta.json["upsample"]``, written by the exporter; an
artifact without it draws ``nearest``), recorded in every run's report, and ``--upsample`` overrides it.

Labels stay identical for any window size: every sum here is a fixed sequence of additions per
output value (box sums add the 2r + 1 shifted arrays in one order; a cell's mean adds its 16 pixels
in one order), nothing depends on where the window starts, and a window computes scores on
``margin_cells`` more cells around its core (the pipeline adds them to the halo). The edges of the
(stride-padded) raster are the only edges the filter sees: boxes there average the cells that exist.
Nodata pixels do not count: a cell weighs in by the share of its pixels that are valid, so labels
beside nodata come from the valid cells around them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ArtifactError, SegmentError

METHODS = ("nearest", "guided")
LUMA = (0.299, 0.587, 0.114)   # the guide: Rec. 601 luma of the scaled RGB in [0, 1]
GUIDED_RADIUS = 2              # box radius in cells of the fit (5 x 5 cells = 20 x 20 pixels at stride 4)
COEF_RADIUS = 0                # box radius in cells of the coefficients' average (0: none; bilinear only)
GUIDED_EPS = 0.01              # ridge on the luma's variance (luma in [0, 1])
BLOCK_PIXELS = 1 << 16         # pixels per block of rows of the luma pass (its arrays stay in cache)
BLOCK_RUN = 4096               # values per phase plane in a block of the label pass: its arrays stay in cache,
                               # and runs much shorter (under ~2000) ran at half the speed or worse


@dataclass(frozen=True)
class Upsample:
    """How cell scores become full-resolution labels (module doc). ``radius`` (cells) and ``eps``: guided only."""
    method: str = "nearest"
    radius: int = GUIDED_RADIUS
    eps: float = GUIDED_EPS
    coef_radius: int = COEF_RADIUS

    def __post_init__(self):
        if self.method not in METHODS:
            raise SegmentError(f"upsample method {self.method!r}: choose from {', '.join(METHODS)}")
        if isinstance(self.radius, bool) or not isinstance(self.radius, int) or not 1 <= self.radius <= 8:
            raise SegmentError(f"guided upsampling radius {self.radius!r}: must be an integer from 1 to 8 cells")
        if isinstance(self.coef_radius, bool) or not isinstance(self.coef_radius, int) or not 0 <= self.coef_radius <= 8:
            raise SegmentError(f"guided upsampling coefficient radius {self.coef_radius!r}: must be an integer from "
                               "0 to 8 cells")
        if isinstance(self.eps, bool) or not (isinstance(self.eps, (int, float)) and 0 < float(self.eps) < 10):
            raise SegmentError(f"guided upsampling eps {self.eps!r}: must be a number in (0, 10)")

    @property
    def margin_cells(self) -> int:
        """Cells of scores needed around the cells a window draws: the box filters, then one cell for the
        bilinear step (0 for nearest)."""
        return 0 if self.method == "nearest" else self.radius + self.coef_radius + 1

    def to_json(self) -> dict:
        if self.method == "nearest":
            return {"method": "nearest"}
        return {"method": self.method, "radius_cells": self.radius, "coef_radius_cells": self.coef_radius,
                "eps": float(self.eps), "guide": "luma"}

    def describe(self) -> str:
        if self.method == "nearest":
            return "nearest (every pixel takes its cell's label)"
        coef = f", coefficients averaged over {self.coef_radius} cells" if self.coef_radius else ""
        return (f"guided (fast guided filter of the scores, luma guide, radius {self.radius} cells{coef}, "
                f"eps {float(self.eps):g})")

    @classmethod
    def from_json(cls, data, where: str = "meta.json") -> Upsample:
        """``meta.json["upsample"]`` (None: nearest); refuses what it does not know (ArtifactError)."""
        if data is None:
            return cls("nearest")
        if not isinstance(data, dict) or data.get("method") not in METHODS:
            raise ArtifactError(f"{where}: 'upsample' must be an object with method one of {', '.join(METHODS)}, "
                                f"not {data!r}")
        known = {"method"} if data["method"] == "nearest" else {"method", "radius_cells", "coef_radius_cells",
                                                                  "eps", "guide"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ArtifactError(f"{where}: upsample {data['method']} has no setting {', '.join(unknown)} "
                                f"(known: {', '.join(sorted(known))})")
        if data["method"] == "nearest":
            return cls("nearest")
        if data.get("guide", "luma") != "luma":
            raise ArtifactError(f"{where}: upsample guide {data.get('guide')!r}: only 'luma' is known")
        try:
            return cls("guided", data.get("radius_cells", GUIDED_RADIUS), data.get("eps", GUIDED_EPS),
                       data.get("coef_radius_cells", COEF_RADIUS))
        except SegmentError as exc:
            raise ArtifactError(f"{where}: {exc}") from exc


NEAREST = Upsample("nearest")


def resolve(asked: str | Upsample | None, model_default: Upsample) -> Upsample:
    """The run's upsampling: ``asked`` (``--upsample``: a method name; an ``Upsample`` already resolved, as
    ``mapseg batch`` sends its workers; or None for the model's own). ``guided`` asked of a model that does not
    name it takes the default radius and eps."""
    if isinstance(asked, Upsample):
        return asked
    if asked is None:
        return model_default
    if asked not in METHODS:
        raise SegmentError(f"--upsample {asked}: choose from {', '.join(METHODS)}")
    if asked == model_default.method:
        return model_default
    return Upsample(asked)


# --------------------------------------------------------------------------- exact building blocks
#
# Maps are held flat, with rows ``width`` long (``_layout``): the K score maps and the other cell maps with zeros
# around their values, the pixels as phase planes (``x[py, px, i, j]`` is the pixel (i * s + py, j * s + px) of
# cell (i, j)). A shift by whole rows or columns is then a shift of one flat run, so every step (a box sum, the
# bilinear step, a score) is one pass over long contiguous runs, never a strided one; the runs cross from a row
# to the next through values that are zeros where they are read or are never read back. The layout changes no
# value: each output is the same float32 operations on the same operands, in the same order, as when the arrays
# were held compact and row-major (terms outside the array are zeros added, as before).


def _layout(wc: int, up: Upsample) -> tuple[int, int]:
    """(pad, width): cell maps for the box sums are (hc + 2 pad, width), their values at rows pad .., columns
    0 .. wc - 1 and zeros elsewhere (at least 2 pad zeros between a row's values and the next's); the padded
    coefficients and the phase planes of pixels have rows ``width`` long too (wc + 2 columns used)."""
    pad = max(up.radius, up.coef_radius)
    return pad, wc + 2 * pad + 2


def _phase_planes(x: np.ndarray, s: int) -> np.ndarray:
    """The (h*s, w*s, ...) array ``x`` as a view (s, s, h, w, ...): its pixels by phase (no copy)."""
    h, w = x.shape[0] // s, x.shape[1] // s
    return x.reshape((h, s, w, s) + x.shape[2:]).transpose((1, 3, 0, 2) + tuple(range(4, x.ndim + 2)))


def _box_sum(x: np.ndarray, r: int, pad: int, out: np.ndarray, work: np.ndarray) -> np.ndarray:
    """Sums over (2r + 1) x (2r + 1) boxes of cells (r <= pad; outside the values counts as zero) of the map held
    in ``x`` (``_layout``), into ``out`` (hc, width): the box of cell (i, j) at out[i, j] (other columns: not
    sums of any box). Along the rows first, then along the columns; each sum adds the terms from the first row
    (column) to the last, in that order, whatever the window (module doc). ``work``: like ``x``."""
    if not (x.flags.c_contiguous and out.flags.c_contiguous and work.flags.c_contiguous):
        raise ValueError("box sums run over contiguous arrays")
    hc, width = out.shape
    n, base = hc * width, pad * width
    xf, yf, of = x.reshape(-1), work.reshape(-1), out.reshape(-1)
    y = yf[base:base + n]
    np.copyto(y, xf[base - r * width:base - r * width + n])
    for d in range(1, 2 * r + 1):
        y += xf[base + (d - r) * width:base + (d - r) * width + n]
    yf[base - r:base] = 0                                       # the zeros before the first value, after the last
    yf[base + n:base + n + r] = 0
    np.copyto(of, yf[base - r:base - r + n])
    for d in range(1, 2 * r + 1):
        of += yf[base - r + d:base - r + d + n]
    return out


def cell_sum(x: np.ndarray) -> np.ndarray:
    """Sums over the cells of phase planes (s, s, h, w): a cell's s*s pixels added row by row."""
    s = x.shape[0]
    out = np.array(x[0, 0], np.float32)
    for dy in range(s):
        for dx in range(s):
            if dy or dx:
                out += x[dy, dx]
    return out


def _luma_planes(image: np.ndarray, s: int, width: int) -> np.ndarray:
    """The luma (Rec. 601 weights ``LUMA``, one fixed sum per pixel: R, then G, then B) as phase planes
    (s, s, hc, width), the spare columns 0; drawn in blocks of rows that stay in cache (each channel's
    product in one contiguous pass, then their sum)."""
    h, w = image.shape[:2]
    hc, wc = h // s, w // s
    out = np.empty((s, s, hc, width), np.float32)
    out[..., wc:] = 0
    weights = np.tile(np.array(LUMA, np.float32), w)           # the three channels' weights along a row
    rows = max(1, BLOCK_PIXELS // (s * w))                      # cell rows per block
    products = np.empty((min(rows, hc) * s, w * 3), np.float32)
    grey = np.empty((min(rows, hc) * s, w), np.float32)
    for i0 in range(0, hc, rows):
        i1 = min(hc, i0 + rows)
        n = (i1 - i0) * s
        p, g = products[:n], grey[:n]
        np.multiply(image[i0 * s:i1 * s].reshape(n, w * 3), weights, out=p)
        p = p.reshape(n, w, 3)
        np.add(p[..., 0], p[..., 1], out=g)
        g += p[..., 2]
        out[:, :, i0:i1, :wc] = _phase_planes(g, s)
    return out


def _box_means(weight: np.ndarray, r: int, pad: int, hc: int, ones: bool, work: np.ndarray):
    """A function giving box means (into ``out``, (hc, width)) of maps held like ``weight`` (``_layout``), weighted
    by ``weight``, and the box sums of the weights. Where no weight falls in a box the mean is 0. Weights of 1
    on every value (``ones``: no nodata, the common case) skip the product, which changes no bit (x * 1 = x)."""
    den = _box_sum(weight, r, pad, np.empty((hc, weight.shape[1]), np.float32), work)
    inverse = np.zeros_like(den)
    np.divide(np.float32(1), den, out=inverse, where=den > 0)

    def mean(values: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        if out is None:
            out = np.empty_like(den)
        _box_sum(values if ones else values * weight, r, pad, out, work)
        out *= inverse
        return out

    return mean, den


def _phases(s: int) -> list[tuple[int, int, np.float32, np.float32]]:
    """Per pixel phase (position in its cell along an axis): the bilinear step's two cells, as offsets into an
    array padded by one cell (cell c at c + 1), and their weights. Pixel centres sit at (p + 0.5) / s - 0.5 in
    cell units; for s = 4 the weights are multiples of 1/8 (exact in float32)."""
    out = []
    for phase in range(s):
        d = (phase + 0.5) / s - 0.5
        out.append((0, 1, np.float32(-d), np.float32(1 + d)) if d < 0 else
                   (1, 2, np.float32(1 - d), np.float32(d)))
    return out


def _weight_table(s: int) -> tuple[np.ndarray, list[tuple[slice, int, int, slice, slice]]]:
    """The bilinear step's weights (``_phases``) once each, and per run of phases that share their two cells:
    (phases, offset 0, offset 1, their weights 0 and weights 1 as slices of the table). A value times a weight
    is then computed once and read by every phase that needs it (the same product, so the same bits). Where the
    weights do not fall into slices (an odd stride), every (phase, side) gets its own entry."""
    phases = _phases(s)
    runs: list = []
    for phase, (o0, o1, _, _) in enumerate(phases):
        if runs and runs[-1][1:] == [o0, o1]:
            runs[-1][0].append(phase)
        else:
            runs.append([[phase], o0, o1])

    def as_slice(index: list[int]) -> slice | None:
        if len(index) == 1:
            return slice(index[0], index[0] + 1)
        step = index[1] - index[0]
        if step == 0 or any(b - a != step for a, b in zip(index, index[1:])):
            return None
        stop = index[-1] + step
        return slice(index[0], None if stop < 0 else stop, step)

    table: list = []
    for p in phases:
        for w in p[2:]:
            if not any(w == t for t in table):
                table.append(w)
    out = []
    for run, o0, o1 in runs:
        sides = [as_slice([next(i for i, t in enumerate(table) if t == phases[p][2 + side]) for p in run])
                 for side in (0, 1)]
        if None in sides:
            break
        out.append((slice(run[0], run[-1] + 1), o0, o1, sides[0], sides[1]))
    else:
        return np.array(table, np.float32), out
    # no sharing: each run's weights 0, then its weights 1
    table, out = [], []
    for run, o0, o1 in runs:
        n = len(table)
        table += [phases[p][2] for p in run] + [phases[p][3] for p in run]
        out.append((slice(run[0], run[-1] + 1), o0, o1, slice(n, n + len(run)), slice(n + len(run), n + 2 * len(run))))
    return np.array(table, np.float32), out


# --------------------------------------------------------------------------- labels

def guided_labels(scores: np.ndarray, image: np.ndarray, valid: np.ndarray, s: int, up: Upsample,
                  cells_at: tuple[int, int], out_box: tuple[int, int, int, int]) -> np.ndarray:
    """uint8 labels of the pixel box ``out_box`` (row0, row1, col0, col1: absolute pixels) from ``scores``
    (hc, wc, K) of the cells starting at absolute cell ``cells_at`` = (row, col), ``image`` (hc*s, wc*s, 3)
    and ``valid`` (hc*s, wc*s) of the same pixels. The boxes and the bilinear step stop at the given cells'
    edges: ``out_box`` must lie ``margin_cells`` inside them except where they are the padded raster's edge
    (the pipeline's windows do: their reads are clipped only there). The arithmetic is float32's: scores and
    image of another type are taken as float32, ``valid`` as bool (what the pipeline passes)."""
    scores, image = np.asarray(scores, np.float32), np.asarray(image, np.float32)
    valid = np.asarray(valid, bool)
    r, eps = up.radius, np.float32(up.eps)
    hc, wc, k = scores.shape
    row0, row1, col0, col1 = out_box
    py0, px0 = row0 - cells_at[0] * s, col0 - cells_at[1] * s
    ny, nx = row1 - row0, col1 - col0
    if py0 % s or px0 % s or ny % s or nx % s:
        raise ValueError(f"guided upsampling draws whole cells: {out_box} is not on the {s}-pixel grid")
    pad, width = _layout(wc, up)
    grey = _luma_planes(image, s, width)                        # (s, s, hc, width)
    core = slice(pad, pad + hc)                                 # the rows of the values in a cell map

    def cell_map() -> np.ndarray:
        return np.zeros((hc + 2 * pad, width), np.float32)

    # per cell, over its pixels that hold data: their count, mean luma and mean squared luma (0 where none)
    ones = bool(valid.all())
    if ones:  # the common case: the sums of ones and products by one below change no bit when skipped
        count = np.zeros((hc, width), np.float32)
        count[:, :wc] = s * s
        seen = grey
    else:
        data = np.zeros(grey.shape, np.float32)
        data[..., :wc] = _phase_planes(valid, s)
        count = cell_sum(data)
        seen = grey * data                                      # nodata pixels add nothing
    per = np.zeros_like(count)
    np.divide(np.float32(1), count, out=per, where=count > 0)
    g1, g2, weight = cell_map(), cell_map(), cell_map()
    np.multiply(cell_sum(seen), per, out=g1[core])
    np.multiply(cell_sum(seen * grey), per, out=g2[core])
    del seen
    np.divide(count, np.float32(s * s), out=weight[core])      # a cell's share of pixels that hold data
    work = np.empty_like(weight)
    mean, den = _box_means(weight, r, pad, hc, ones, work)
    m_i, m_ii = mean(g1), mean(g2)
    var = np.maximum(m_ii - m_i * m_i, np.float32(0))
    var += eps
    if up.coef_radius:  # the coefficients averaged over boxes of cells with some valid pixel in theirs
        somewhere = den[:, :wc] > 0
        some = cell_map()
        some[core, :wc] = somewhere
        coef_mean, _ = _box_means(some, up.coef_radius, pad, hc, bool(somewhere.all()), work)
    # each centre's coefficients a and b (one centre at a time: its maps stay in cache), with one more cell on
    # every side (copies of the edge cells: past the raster's edge a pixel takes its edge cell's coefficients)
    centres = np.zeros((k, hc + 2 * pad, width), np.float32)
    centres[:, core, :wc] = scores.transpose(2, 0, 1)
    coef = np.empty((k, 2, hc + 2, width), np.float32)
    inner = slice(width + 1, width + 1 + hc * width)            # cell (i, j) at padded (i + 1, j + 1), flat
    product, m_p, m_ip, part = cell_map(), np.empty_like(den), np.empty_like(den), np.empty_like(den)
    for j in range(k):
        mean(centres[j], out=m_p)
        mean(np.multiply(g1, centres[j], out=product), out=m_ip)
        a_j, b_j = (coef[j, c].reshape(-1)[inner].reshape(hc, width) for c in (0, 1))
        np.multiply(m_i, m_p, out=part)
        np.subtract(m_ip, part, out=a_j)
        a_j /= var
        np.multiply(a_j, m_i, out=part)
        np.subtract(m_p, part, out=b_j)
        if up.coef_radius:
            for c in (a_j, b_j):
                product[core, :wc] = c[:, :wc]
                coef_mean(product, out=part)
                c[...] = part
            product[...] = 0
        c = coef[j]
        c[:, 1:-1, 0], c[:, 1:-1, wc + 1] = c[:, 1:-1, 1], c[:, 1:-1, wc]
        c[:, 0], c[:, -1] = c[:, 1], c[:, -2]
    del centres
    coef = coef.reshape(k, 2, -1)                               # each centre's padded rows flat

    cy, cx, nr, nc = py0 // s, px0 // s, ny // s, nx // s
    grey = grey.reshape(s, s, hc * width)
    labels = np.empty((ny, nx), np.uint8)
    rows = max(1, -(-BLOCK_RUN // width))                       # cell rows per block (BLOCK_RUN)
    block = _Block(s, min(rows, nr) * width, width)
    for i0 in range(0, nr, rows):
        i1 = min(nr, i0 + rows)
        start, run = (cy + i0) * width + cx, (i1 - i0 - 1) * width + nc  # the block's cells in a flat plane
        drawn = block.labels_of(coef, grey[:, :, start:start + run], start)
        _phase_planes(labels[i0 * s:i1 * s], s)[...] = drawn[:, :, :(i1 - i0) * width].reshape(
            s, s, i1 - i0, width)[..., :nc]
    return labels


class _Block:
    """The full-resolution work of a block of pixels held as flat phase planes (s, s, run): its arrays, allocated
    once, and the views that one centre's steps read and write (the same for every centre)."""

    def __init__(self, s: int, size: int, width: int):
        self.s, self.width = s, width
        self.weights, self.runs = _weight_table(s)
        n = len(self.weights)
        self.pair = np.empty((2, s, s, size), np.float32)       # a centre's a and b at the block's pixels
        self.products = np.empty((2, s, n, size + 2), np.float32)
        self.rows = np.empty((2, s, size + 2), np.float32)
        self.cell_products = np.empty((2, n, size + 2 * width + 2), np.float32)
        self.best = np.empty((s, s, size), np.float32)
        self.better, self.step = np.empty((s, s, size), bool), np.empty((s, s, size), np.uint8)
        self.labels = np.zeros((s, s, size), np.uint8)
        self._views: dict = {}

    def views(self, run: int) -> tuple:
        """The steps' views for ``run`` values per phase plane (``labels_of``)."""
        if run not in self._views:
            width, span = self.width, run + 2 * self.width + 2
            cells, rows = self.cell_products[:, :, :span], self.rows[:, :, :run + 2]
            products, pair = self.products[..., :run + 2], self.pair[..., :run]
            # the padded rows of the cells above (offset 0), the cells themselves (1), below (2) are o * width on
            # (a padded cell is one row and one column on: cell (i, j) + offsets (o, 0) sits at (i + o) * width + j)
            along_rows = [(cells[:, w0, o0 * width:o0 * width + run + 2], cells[:, w1, o1 * width:o1 * width + run + 2],
                           rows[:, phases]) for phases, o0, o1, w0, w1 in self.runs]
            along_cols = [(products[:, :, w0, o0:o0 + run], products[:, :, w1, o1:o1 + run], pair[:, :, phases])
                          for phases, o0, o1, w0, w1 in self.runs]
            self._views[run] = (span, cells, along_rows, rows[:, :, None], products, along_cols, pair[0], pair[1],
                                self.best[..., :run], self.better[..., :run], self.better[..., :run].view(np.uint8),
                                self.step[..., :run], self.labels[..., :run])
        return self._views[run]

    def labels_of(self, coef: np.ndarray, g: np.ndarray, start: int) -> np.ndarray:
        """Labels (s, s, run) of the block's pixels (``g``: their luma as flat phase planes; ``start``: the first
        cell, row * width + column) from the padded, centre-major coefficients (K, 2: a and b, their rows flat):
        each centre's full-resolution score a * luma + b, a running first-best argmax (module doc). a and b are
        drawn bilinearly, along the rows first (per row phase: w0 * one cell + w1 * the next, ``_phases``), then
        along the columns the same way: one fixed sum per value, each product taken once (``_weight_table``)."""
        (span, cells, along_rows, rows, products, along_cols, a, b, best, better, better_u8, step,
         labels) = self.views(g.shape[2])
        weights = self.weights[:, None]
        for j in range(coef.shape[0]):
            np.multiply(coef[j, :, None, start:start + span], weights, out=cells)
            for x0, x1, out in along_rows:
                np.add(x0, x1, out=out)
            np.multiply(rows, weights, out=products)
            for x0, x1, out in along_cols:
                np.add(x0, x1, out=out)
            if j == 0:
                np.multiply(a, g, out=best)
                best += b
                labels[...] = 0
                continue
            a *= g
            a += b
            np.greater(a, best, out=better)
            np.maximum(best, a, out=best)
            # labels so far are < j, so "j where better" is a maximum (cheaper than a masked store)
            np.multiply(better_u8, j, out=step)
            np.maximum(labels, step, out=labels)
        return self.labels
