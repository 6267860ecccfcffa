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
BLOCK_PIXELS = 1 << 17         # pixels per block of the full-resolution pass (its arrays stay in cache)


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

def box_sum(x: np.ndarray, r: int) -> np.ndarray:
    """Sums over (2r + 1) x (2r + 1) boxes of the first two axes; outside the array counts as zero.
    Each output is the same sequence of additions wherever the array was cut (module doc)."""
    h, w = x.shape[:2]
    pad = np.zeros((h + 2 * r,) + x.shape[1:], np.float32)
    pad[r:r + h] = x
    rows = pad[0:h].copy()
    for d in range(1, 2 * r + 1):
        rows += pad[d:d + h]
    pad = np.zeros((h, w + 2 * r) + x.shape[2:], np.float32)
    pad[:, r:r + w] = rows
    out = pad[:, 0:w].copy()
    for d in range(1, 2 * r + 1):
        out += pad[:, d:d + w]
    return out


def cell_sum(x: np.ndarray, s: int) -> np.ndarray:
    """Sums over s x s cells of a (h*s, w*s) array: its s*s pixels added in one order."""
    acc = x[0::s, 0::s].astype(np.float32, copy=True)
    for dy in range(s):
        for dx in range(s):
            if dy or dx:
                acc += x[dy::s, dx::s]
    return acc


def luma(image: np.ndarray) -> np.ndarray:
    """(h, w) float32 luma of an (h, w, 3) float32 image: one fixed sum per pixel."""
    out = image[..., 0] * np.float32(LUMA[0])
    out += image[..., 1] * np.float32(LUMA[1])
    out += image[..., 2] * np.float32(LUMA[2])
    return out


def _box_means(weight: np.ndarray, r: int):
    """A function giving box means of (h, w[, K]) arrays weighted by ``weight`` (h, w), and the box sums of the
    weights. Where no weight falls in a box the mean is 0. Weights of 1 everywhere (no nodata, the common case)
    skip the product, which changes no bit (x * 1 = x)."""
    den = box_sum(weight, r)
    inverse = np.zeros_like(den)
    np.divide(np.float32(1), den, out=inverse, where=den > 0)
    ones = bool((weight == 1).all())

    def mean(values: np.ndarray) -> np.ndarray:
        wide = values.ndim == 3
        num = box_sum(values if ones else values * (weight[..., None] if wide else weight), r)
        num *= inverse[..., None] if wide else inverse
        return num

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


def _bilinear(x: np.ndarray, first: int, cells: int, s: int, axis: int, out: np.ndarray | None = None) -> np.ndarray:
    """Bilinear values along ``axis`` (0 or 1) of the 2-d array ``x`` padded by one cell on that axis, at the
    pixels of cells first .. first + cells - 1: cells * s values per phase-strided slice, one fixed sum each."""
    shape = list(x.shape)
    shape[axis] = cells * s
    if out is None:
        out = np.empty(shape, np.float32)
    for phase, (o0, o1, w0, w1) in enumerate(_phases(s)):
        lo = slice(first + o0, first + o0 + cells)
        hi = slice(first + o1, first + o1 + cells)
        if axis == 0:
            seg, x0, x1 = out[phase::s], x[lo], x[hi]
        else:
            seg, x0, x1 = out[:, phase::s], x[:, lo], x[:, hi]
        np.multiply(x0, w0, out=seg)
        seg += x1 * w1
    return out


# --------------------------------------------------------------------------- labels

def guided_labels(scores: np.ndarray, image: np.ndarray, valid: np.ndarray, s: int, up: Upsample,
                  cells_at: tuple[int, int], out_box: tuple[int, int, int, int]) -> np.ndarray:
    """uint8 labels of the pixel box ``out_box`` (row0, row1, col0, col1: absolute pixels) from ``scores``
    (hc, wc, K) of the cells starting at absolute cell ``cells_at`` = (row, col), ``image`` (hc*s, wc*s, 3)
    and ``valid`` (hc*s, wc*s) of the same pixels. The boxes and the bilinear step stop at the given cells'
    edges: ``out_box`` must lie ``margin_cells`` inside them except where they are the padded raster's edge
    (the pipeline's windows do: their reads are clipped only there)."""
    r, eps = up.radius, np.float32(up.eps)
    hc, wc, k = scores.shape
    grey = luma(image)
    # per cell, over its pixels that hold data: their count, mean luma and mean squared luma (0 where none)
    data = valid.astype(np.float32)
    count = cell_sum(data, s)
    per = np.zeros_like(count)
    np.divide(np.float32(1), count, out=per, where=count > 0)
    seen = grey * data                                          # nodata pixels add nothing
    g1 = cell_sum(seen, s) * per
    g2 = cell_sum(seen * grey, s) * per
    weight = count / np.float32(s * s)                          # a cell's share of pixels that hold data
    mean, den = _box_means(weight, r)
    m_i, m_ii = mean(g1), mean(g2)
    m_p = mean(scores)
    m_ip = mean(g1[..., None] * scores)
    var = np.maximum(m_ii - m_i * m_i, np.float32(0))
    a = m_ip - m_i[..., None] * m_p
    a /= (var + eps)[..., None]
    b = m_p - a * m_i[..., None]
    if up.coef_radius:  # the coefficients averaged over boxes of cells with some valid pixel in theirs
        mean, _ = _box_means((den > 0).astype(np.float32), up.coef_radius)
        a, b = mean(a), mean(b)

    row0, row1, col0, col1 = out_box
    py0, px0 = row0 - cells_at[0] * s, col0 - cells_at[1] * s
    ny, nx = row1 - row0, col1 - col0
    if py0 % s or px0 % s or ny % s or nx % s:
        raise ValueError(f"guided upsampling draws whole cells: {out_box} is not on the {s}-pixel grid")
    g = grey[py0:py0 + ny, px0:px0 + nx]
    # one more cell on every side (copies of the edge cells: past the raster's edge a pixel takes its edge
    # cell's coefficients), centre-major for the per-centre passes below
    pad = ((0, 0), (1, 1), (1, 1))
    a = np.pad(np.ascontiguousarray(a.transpose(2, 0, 1)), pad, mode="edge")
    b = np.pad(np.ascontiguousarray(b.transpose(2, 0, 1)), pad, mode="edge")
    labels = np.zeros((ny, nx), np.uint8)
    rows = max(1, BLOCK_PIXELS // max(nx, 1) // s) * s   # whole cells of rows whose arrays stay in cache
    buffers = [np.empty((rows, nx), np.float32) for _ in range(3)] + [np.empty((rows, nx), bool),
                                                                       np.empty((rows, nx), np.uint8)]
    for y0 in range(0, ny, rows):
        y1 = min(ny, y0 + rows)
        _block_labels(a, b, g[y0:y1], (py0 + y0) // s, px0 // s, s, labels[y0:y1],
                      [buf[:y1 - y0] for buf in buffers])
    return labels


def _block_labels(a: np.ndarray, b: np.ndarray, g: np.ndarray, cy: int, cx: int, s: int, labels: np.ndarray,
                  buffers: list) -> None:
    """Labels of a block of whole cell rows (``g``: its luma; first cell row ``cy``, column ``cx`` of the
    unpadded cells) from the padded, centre-major coefficients: each centre's full-resolution score
    a * luma + b, a running first-best argmax (module doc)."""
    ny, nx = g.shape
    best, q, other, better, step = buffers
    for j in range(a.shape[0]):
        _bilinear(_bilinear(a[j], cy, ny // s, s, 0), cx, nx // s, s, 1, out=q)
        q *= g
        _bilinear(_bilinear(b[j], cy, ny // s, s, 0), cx, nx // s, s, 1, out=other)
        q += other
        if j == 0:
            best, q = q, best
            labels[:] = 0
            continue
        np.greater(q, best, out=better)
        np.maximum(best, q, out=best)
        # labels so far are < j, so "j where better" is a maximum (cheaper than a masked store)
        np.multiply(better.view(np.uint8), j, out=step)
        np.maximum(labels, step, out=labels)
