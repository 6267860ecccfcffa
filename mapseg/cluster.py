"""Global cluster centres: k-means on a sample, deterministic label order, assignment.

Two feature kinds share the code:

* ``embedding``: the student's L2-normalised embeddings; spherical k-means
  (cosine similarity), a pixel takes the centre of highest cosine similarity.
* ``colour``: RGB scaled to [0, 1] (``--model kmeans``); Euclidean k-means,
  a pixel takes the nearest centre.

Both reduce to ``label = argmax_k (x . A[:, k] + b[k])`` (cosine: A = C^T,
b = 0; Euclidean: A = C^T, b = -|c_k|^2 / 2), computed with the same
operations for every pixel (``assign_labels``) so that a pixel's label does
not depend on the window it was computed in.

Label order: k-means is seeded (k-means++ then Lloyd, ``n_init`` restarts on
subsets of the sample, the best kept and taken on by Lloyd over the whole
sample: ``_fit``), then centres are sorted by the mean luma
(0.299 R + 0.587 G + 0.114 B, RGB in [0, 1]) of the sampled pixels assigned
to them, darkest first; ties (practically never) by the centre's
coordinates. So label 0 is the darkest cluster, K-1 the brightest, for any
seed that finds the same clusters.
"""
from __future__ import annotations

import contextlib
import json
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ClusterError
from .fileio import write_text_atomic
from .legend import Legend
from .network import matmul_rows
from .parallel import blas_threads

CENTERS_FORMAT = "mapseg-centers"
CENTERS_VERSION = 1
METRICS = ("cosine", "euclidean")
LUMA = np.array([0.299, 0.587, 0.114])
ASSIGN_ROWS = 8192       # rows per assignment product (see network.matmul_rows)
ELEMENTWISE_MAX_DIM = 4  # colour features: scores by elementwise arithmetic instead of a product
SAMPLE_FEATURES = 30_000  # features the k-means sees at most (embeddings) ...
SAMPLE_COLOURS = 10_000   # ... and for colours (3 dimensions need fewer)
LLOYD_ITERS = 30          # Lloyd iterations at most
N_INIT = 4                # k-means++ restarts, the best kept
SUBSET_ROWS = 2048        # rows of the sample the k-means++ restarts run on, then Lloyd on ...
SUBSET_GROWTH = 4         # ... 4 times as many (while at most half the sample), and on all of it
NEAREST_ROWS = 8192       # rows per product of an assignment (its scores stay in cache)
GRID_CHUNK = 2048         # rows per step of the grid sample's elementwise passes
ORDER_RULE = ("ascending mean luma (0.299 R + 0.587 G + 0.114 B, RGB in [0, 1]) of the sampled pixels "
              "assigned to each centre; ties by centre coordinates")


def check_k(k, max_k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ClusterError(f"K must be an integer, got {k!r}")
    if not 2 <= int(k) <= max_k:
        raise ClusterError(f"K={k} is outside the supported range [2, {max_k}]")
    return int(k)


# --------------------------------------------------------------------------- k-means
#
# The same sample must give the same centres, bit for bit, for any BLAS, thread
# count and numpy build: a BLAS sums a product's terms in an order that depends on
# its kernel and threads (float32 products here differed in the last bit between 1
# and 2 OpenBLAS threads, and between numpy 2.4 and Debian's 1.24), and k-means
# turns a last-bit difference into another local optimum now and then. So k-means
# works on a grid: the sample is scaled by a power of two into (-1, 1) and rounded
# to multiples of 2**-GRID_BITS, and so is every centre. Products of grid values
# are multiples of 2**-(2 * GRID_BITS); the partial sums of a sample-centre dot
# product stay below 16 (colours, D <= 4) or 1 (unit rows), those of a cluster sum below
# the sample's size, so every one is exact in float64 and any summation order
# (pairwise, SIMD, a BLAS) gives the same bits. Division, square root and
# rounding are correctly rounded IEEE arithmetic; the objective is summed by
# math.fsum (correctly rounded). The grid (6e-8) is about the float32 features'
# own last bit: a coarser one (2**-20) merged near-identical samples into identical
# ones, which then changed cluster all together (samples from two builds or two
# backends settled apart in 45 of 336 fits, against 10 here; see the docs below).
#
# What this cannot remove: features from another build or backend differ in their
# last bits (the network's own products), and on such a sample k-means may still
# settle elsewhere, more often the larger K (docs/runtime.md, "Same labels everywhere").

GRID_BITS = 24          # float32 features barely move: their own last bit at 0.5-1 is 2**-24
NORM_BITS = 20          # a coarser grid for the first, exact norm of a row of up to EXACT_MAX_DIM values
EXACT_MAX_DIM = 2 ** (52 - 2 * NORM_BITS)
EXACT_MAX_ROWS = 2 ** (52 - GRID_BITS)  # rows * 1 below 2**28: a cluster sum stays exact


def _on_grid(x: np.ndarray, bits: int = GRID_BITS) -> np.ndarray:
    """x rounded to the nearest multiple of 2**-bits (ties to even), float64."""
    scale = float(2 ** bits)
    return np.rint(np.asarray(x, np.float64) * scale) / scale


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Grid rows of norm about 1 divided by their norms, back on the grid (the squared norms, below 2,
    are exact sums)."""
    norm = np.sqrt((x * x).sum(1))
    return _on_grid(x / np.maximum(norm, 1e-12)[:, None])


def _grid_sample(x: np.ndarray, metric: str, order: np.ndarray | None = None,
                 rows: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """(the sample as k-means sees it: rows on the grid inside (-1, 1), cosine: unit rows, a column-major
    (N, D) array; the power-of-two exponent that brought it there, by which euclidean centres are scaled back).

    Cosine: a row is divided by the norm of its coarse-grid copy (an exact sum), which makes it
    unit to ~1e-6, then put on the grid and made unit there. Euclidean (colours): the partial
    sums stay exact up to ELEMENTWISE_MAX_DIM dimensions (|x - c|^2 < 16). Every step is per row
    or per element, so it runs GRID_CHUNK rows at a time, in cache (a third of the CPU time of
    whole-sample passes). ``order``: the rows in this order (a permutation). ``rows``: the sample is these rows of
    x (indices; ``order`` then orders them), gathered a chunk at a time: the same grid as that of ``x[rows]``
    without the copy."""
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    if x.ndim != 2:
        top = math.nan
    elif rows is None:  # the largest magnitude, exact in float32 too; a NaN or an infinity anywhere makes it one
        top = max(float(x.max(initial=0.0)), -float(x.min(initial=0.0)))
    else:  # ... of the rows taken: per-row extremes (N values), not a gathered copy of the sample
        top = max(float(x.max(axis=1, initial=0.0)[rows].max(initial=0.0)),
                  -float(x.min(axis=1, initial=0.0)[rows].min(initial=0.0)))
    if not math.isfinite(top):
        raise ClusterError("k-means needs a finite (N, D) sample")
    n = x.shape[0] if rows is None else len(rows)
    most = EXACT_MAX_DIM if metric == "cosine" else ELEMENTWISE_MAX_DIM
    if x.shape[1] > most or n > EXACT_MAX_ROWS:
        raise ClusterError(f"{metric} k-means sums exactly up to {most} dimensions and {EXACT_MAX_ROWS} samples; "
                           f"got {x.shape[1]} and {n}")
    exponent = int(np.frexp(top)[1]) if top > 0 else 0
    take = order if rows is None else rows if order is None else rows[order]  # x's row of every grid row
    grid = np.empty((x.shape[1], n), np.float64).T  # column-major: see _dot
    # buffers for one chunk, made once: a chunk's temporaries were fresh memory every time (about 1.5 MB each, as
    # large as the allocator's threshold for giving memory back), which cost a third of the fit's page faults
    m = min(GRID_CHUNK, n)
    chunk, scratch = np.empty((m, x.shape[1]), np.float64), np.empty((m, x.shape[1]), np.float64)
    gathered = None if take is None else np.empty((m, x.shape[1]), x.dtype)
    for s in range(0, n, GRID_CHUNK):
        e = min(GRID_CHUNK, n - s)
        part = chunk[:e]
        if take is None:
            rows_in = x[s:s + e]
        else:
            rows_in = np.take(x, take[s:s + e], axis=0, out=gathered[:e])
        _grid_rows(rows_in, exponent, metric, part, scratch[:e])
        grid[s:s + e] = part
    return grid, exponent


# the k-means fits running on the BLAS now (held at one thread: ``_one_blas_thread``)
_BLAS = {"held": 0}
_BLAS_LOCK = threading.Lock()


@contextlib.contextmanager
def _one_blas_thread():
    """Numpy's BLAS held at one thread while k-means runs (mapseg.parallel.blas_threads: the process's shared,
    counted hold, which fits and runs started at once share); ``_dot`` and ``_cluster_sums`` use it only then.
    The products are exact on a BLAS as anywhere (see above): one thread is for the cost, as products this small
    gain nothing from more (the fit took 3-4 times the CPU time on 2 OpenBLAS threads, and ten times the wall
    time on a busy 2-core machine), so no BLAS thread is woken to spin. Without threadpoolctl, or where it finds
    no BLAS, they keep off the BLAS (einsum's own loops, 2-3 times as slow; the same bits)."""
    with blas_threads(1) as holding:
        if holding:
            with _BLAS_LOCK:
                _BLAS["held"] += 1
        try:
            yield
        finally:
            if holding:
                with _BLAS_LOCK:
                    _BLAS["held"] -= 1


def _blas_held() -> bool:
    return _BLAS["held"] > 0


def _grid_rows(x: np.ndarray, exponent: int, metric: str, out: np.ndarray, scratch: np.ndarray | None = None) -> None:
    """Rows of the grid sample into ``out`` (float64), as ``_on_grid`` and ``_unit_rows`` would make them but
    in place: (r / m) * 2**b is computed as r / (m * 2**-b) and a square root as 2**b times that of an
    integer sum, the same bits (scaling by a power of two commutes with correct rounding). ``scratch``: an
    array like ``out`` for the coarse copy (default: a new one)."""
    if -1000 < exponent < 1000:  # times 2**-exponent: exact, |x| < 1
        np.multiply(x, 2.0 ** -exponent, out=out, dtype=np.float64)
    else:
        np.ldexp(x.astype(np.float64), -exponent, out=out)
    fine = float(2 ** GRID_BITS)
    if metric == "cosine":
        coarse = np.multiply(out, float(2 ** NORM_BITS), out=scratch)
        np.rint(coarse, out=coarse)                      # integers: their squares' sum (< 2**52) is exact
        norm = np.sqrt(np.einsum("ij,ij->i", coarse, coarse)) * float(2 ** -NORM_BITS)
        out /= (np.maximum(norm, 1e-12) * (1 / fine))[:, None]
        np.rint(out, out=out)                            # the row on the grid, times 2**GRID_BITS
        norm = np.sqrt(np.einsum("ij,ij->i", out, out)) * (1 / fine)   # squares' sum about 2**48: exact
        out /= np.maximum(norm, 1e-12)[:, None]          # made unit on the grid ...
    else:
        out *= fine
    np.rint(out, out=out)                                # ... and back on it
    out *= 1 / fine


def _dot(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """(K, N) c @ x.T, centre-major: a BLAS product while k-means holds it at one thread (``_one_blas_thread``),
    else einsum's own loops, the same bits (every partial sum is exact). x column-major (``_grid_sample``)
    makes x.T a row-major (D, N) operand, on which OpenBLAS runs this product in 0.55 times the time. A few
    dimensions go elementwise."""
    if x.shape[1] > ELEMENTWISE_MAX_DIM:
        return c @ x.T if _blas_held() else np.einsum("kd,nd->kn", c, x)
    s = c[:, 0:1] * x[:, 0]
    for j in range(1, x.shape[1]):
        s += c[:, j:j + 1] * x[:, j]
    return s


def _nearest(x: np.ndarray, c: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(best centre of every row, first on ties; its score: cosine similarity, or x.c - |c|^2 / 2).
    A running maximum over the K centre-major rows: a few passes, where argmax(axis=1) of a narrow
    (N, K) array costs as much as the product; NEAREST_ROWS rows at a time, in cache. The best centre so far
    is below j, so "j where centre j scores higher" is a maximum (a quarter of the time of a masked store
    at 8192 rows), as in ``_assign_elementwise``."""
    if x.shape[0] > NEAREST_ROWS:
        parts = [_nearest(x[i:i + NEAREST_ROWS], c, metric) for i in range(0, x.shape[0], NEAREST_ROWS)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    s = _dot(x, c)
    if metric == "euclidean":
        s -= 0.5 * (c * c).sum(1)[:, None]
    n, kind = s.shape[1], np.uint8 if s.shape[0] <= 256 else np.intp
    best, arg = s[0].copy(), np.zeros(n, kind)
    better, step = np.empty(n, bool), np.empty(n, kind)
    for j in range(1, s.shape[0]):
        np.greater(s[j], best, out=better)
        np.maximum(best, s[j], out=best)
        np.multiply(better, kind(j), out=step)
        np.maximum(arg, step, out=arg)
    return arg.astype(np.intp), best


def _objective(x: np.ndarray, served: np.ndarray, metric: str) -> float:
    """Higher is better, from the rows' best scores (``_nearest``): summed cosine similarity, or minus the
    inertia (math.fsum: correctly rounded)."""
    if metric == "cosine":
        return math.fsum(served)
    return -math.fsum(np.maximum((x * x).sum(1) - 2 * served, 0))  # |x - c|^2 = |x|^2 - 2 (x.c - |c|^2 / 2)


def _plusplus(x: np.ndarray, k: int, metric: str, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding: each further centre drawn with probability proportional to d2."""
    n = x.shape[0]
    centers = [x[rng.integers(n)]]
    d2 = _dist2(x, centers[0], metric)
    for found in range(1, k):
        if d2.max() <= 1e-12:  # every sample sits on a centre already
            raise ClusterError(f"the sampled pixels have only {found} distinct values, fewer than K={k}: "
                               "choose a smaller K")
        idx = _weighted_draw(d2, rng)
        centers.append(x[idx])
        d2 = np.minimum(d2, _dist2(x, x[idx], metric))
    return np.stack(centers)


def _weighted_draw(weights: np.ndarray, rng: np.random.Generator) -> int:
    """Row i with probability weights[i] / sum(weights): the first to arrive in an exponential race
    (arrival E_i / w_i, E_i ~ Exp(1)). A row's arrival depends on its own weight only, so weights a few
    last bits off (features from another build or backend) rarely pick another row; a draw against the
    cumulative sum, where every earlier row's error adds up, picked another in 3 of 100 k-means++
    seedings of NAIP embeddings from numpy 2.4 and 1.24 (K = 12), this one in none. (np.log may
    differ in its last bit between builds: two arrivals that close are a one in ~1e12 event.)"""
    arrival = -np.log(rng.random(weights.shape[0]))
    with np.errstate(divide="ignore"):
        arrival /= weights
    return int(np.argmin(arrival))


def _dist2(x: np.ndarray, c: np.ndarray, metric: str) -> np.ndarray:
    if metric == "cosine":
        return np.maximum(2 - 2 * _dot(x, c[None])[0], 0)  # exact on the grid
    diff = x - c
    return (diff * diff).sum(1)


def _cluster_sums(x: np.ndarray, assign: np.ndarray, k: int) -> np.ndarray:
    """(k, D) float64 sums of the rows of x per cluster (grid rows: exact in any order, so through a BLAS
    product with a (k, N) one-hot matrix)."""
    if x.shape[1] <= ELEMENTWISE_MAX_DIM:
        return np.stack([np.bincount(assign, weights=x[:, j], minlength=k) for j in range(x.shape[1])], axis=1)
    if not _blas_held():
        return np.stack([x[assign == j].sum(0) for j in range(k)])
    onehot = np.zeros((k, x.shape[0]))
    onehot[assign, np.arange(x.shape[0])] = 1.0
    return onehot @ x


def _lloyd(x: np.ndarray, c: np.ndarray, metric: str, iters: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lloyd iterations on the grid until at most 0.5 % of the samples change cluster (or ``iters``).
    Returns (centres, ``_nearest`` of the rows under them: best centre, its score). The cluster sums are
    kept up to date with the rows that moved (exact on the grid: the same bits as summing every cluster
    again), so an iteration near convergence costs little more than its assignment."""
    k = c.shape[0]
    previous = sums = counts = None
    for _ in range(iters):
        assign, served = _nearest(x, c, metric)
        if previous is None:
            counts = np.bincount(assign, minlength=k)
            sums = _cluster_sums(x, assign, k)
        else:
            moved = np.flatnonzero(assign != previous)
            if moved.size <= 5e-3 * len(assign):
                return c, assign, served
            rows, into, out_of = x[moved], assign[moved], previous[moved]
            counts = counts + np.bincount(into, minlength=k) - np.bincount(out_of, minlength=k)
            sums = sums + _cluster_sums(rows, into, k) - _cluster_sums(rows, out_of, k)
        previous = assign
        new = c.copy()
        filled = counts > 0
        new[filled] = sums[filled] / counts[filled, None]
        if (~filled).any():  # an empty cluster takes the sample worst served by its centre
            if metric == "euclidean":
                served = served - 0.5 * (x * x).sum(1)
            worst = np.argsort(served, kind="stable")
            for j, idx in zip(np.flatnonzero(~filled), worst):
                new[j] = x[idx]
        c = _unit_rows(_on_grid(new)) if metric == "cosine" else _on_grid(new)
    return (c, *_nearest(x, c, metric))


def kmeans(x: np.ndarray, k: int, metric: str, seed: int = 0, n_init: int = N_INIT,
           iters: int = LLOYD_ITERS) -> np.ndarray:
    """Seeded k-means on the grid (``_fit``). Returns (k, D) float64, the same bits for the same sample in every
    build and at any thread count (see above)."""
    centers, _, exponent = _fit(x, k, metric, seed, n_init, iters)
    return _unscale(centers, exponent, metric)


def _subsets(n: int, subset: int | None) -> list[int]:
    """Sizes of the nested subsets k-means runs on before the whole sample of n rows: ``subset`` and
    SUBSET_GROWTH times as many, and so on, each at most half the sample (none: the sample is small)."""
    sizes = []
    while subset is not None and subset <= n // 2:
        sizes.append(subset)
        subset *= SUBSET_GROWTH
    return sizes


def _fit(x: np.ndarray, k: int, metric: str, seed: int, n_init: int = N_INIT, iters: int = LLOYD_ITERS,
         subset: int | None = SUBSET_ROWS, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(centres on the grid, the nearest of them to every row of the sample, the grid's exponent: ``_grid_sample``).
    The sample is x, or its rows ``rows`` (indices: the same fit as on ``x[rows]``, without that copy).

    Seeding and Lloyd iterations cost in proportion to the rows they pass over: 3 restarts over all of a
    30,000-row sample passed over it some 65 times (1.2-1.8 CPU-s at K = 8). So the sample is put on the
    grid in a seeded random order, which makes its first m rows a random subset of m rows, and

    * the ``n_init`` restarts (k-means++ seeding, Lloyd to the stopping rule) run each on its own block of
      ``subset`` rows among the first SUBSET_GROWTH * ``subset``; the best by the objective on all of those
      rows (most of them unseen by the restart, so it favours no block) is kept;
    * Lloyd takes it on over those rows, then over SUBSET_GROWTH times as many, and so on while at most half
      the sample, and last over the whole sample; each stage starts near its own convergence (a few
      iterations).

    The result is a Lloyd fixed point of the whole sample within the stopping rule (unless LLOYD_ITERS stops it
    first), as before, for a tenth
    of the CPU time or less; its objective is that of the whole-sample fit within the seed's own spread
    (docs/runtime.md, "The k-means fit"). Samples under 2 * ``subset`` rows, or ``subset`` None, are fitted whole, every
    restart on every row."""
    rng = np.random.default_rng(seed)
    n = np.shape(x)[0] if rows is None else len(rows)
    sizes = _subsets(n, subset)
    order = rng.permutation(n) if sizes else None
    grid, exponent = _grid_sample(x, metric, order, rows)
    centers, assign = _kmeans_on_grid(grid, k, metric, rng, n_init, iters, sizes)
    if order is not None:  # back to the sample's order
        grid_assign, assign = assign, np.empty_like(assign)
        assign[order] = grid_assign
    return centers, assign, exponent


def _kmeans_on_grid(grid: np.ndarray, k: int, metric: str, rng: np.random.Generator, n_init: int = N_INIT,
                    iters: int = LLOYD_ITERS, sizes: list[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """(centres, the nearest centre of every row) of k-means on the grid sample, its rows in a random order:
    restarts on blocks of ``sizes[0]`` rows, Lloyd on its first ``sizes[1]`` rows (or all), ... (``_fit``); no
    ``sizes``: every restart on all of it, the best kept."""
    if metric not in METRICS:
        raise ClusterError(f"unknown metric {metric!r}")
    stages = [grid[:size] for size in sizes[1:]] + [grid]
    block = sizes[0] if sizes else grid.shape[0]
    blocks = stages[0].shape[0] // block  # 1: no subsets
    # colours (a few dimensions) never call the BLAS: no hold, which would slow other threads' products
    hold = _one_blas_thread() if grid.shape[1] > ELEMENTWISE_MAX_DIM else contextlib.nullcontext()
    with hold:
        best, best_obj, best_assign = None, -np.inf, None
        for r in range(n_init):
            rows = stages[0][r % blocks * block:][:block]
            try:
                seeds = _plusplus(rows, k, metric, rng)
            except ClusterError:  # fewer than K distinct rows in this block
                if blocks == 1:
                    raise
                return _kmeans_on_grid(grid, k, metric, rng, n_init, iters)  # all the rows (raises if too few)
            c, assign, served = _lloyd(rows, seeds, metric, iters)
            if blocks > 1:
                assign, served = _nearest(stages[0], c, metric)
            obj = _objective(stages[0], served, metric)
            if obj > best_obj:
                best, best_obj, best_assign = c, obj, assign
        for rows in stages if blocks > 1 else ():
            best, best_assign, _ = _lloyd(rows, best, metric, iters)
        return best, best_assign


def _unscale(centers: np.ndarray, exponent: int, metric: str) -> np.ndarray:
    """Centres fitted on the grid sample, in the sample's own units (cosine: unit rows either way)."""
    return centers if metric == "cosine" else np.ldexp(centers, exponent)


def order_by_luma(assign: np.ndarray, colours: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Permutation putting centres in ascending mean luma of their members (see module doc).

    Elementwise luma and a bincount (a sequential sum): the same order in every build."""
    k = centers.shape[0]
    colours = np.asarray(colours, np.float64)
    luma = LUMA[0] * colours[:, 0] + LUMA[1] * colours[:, 1] + LUMA[2] * colours[:, 2]
    counts = np.bincount(assign, minlength=k)
    mean_luma = np.bincount(assign, weights=luma, minlength=k) / np.maximum(counts, 1)
    keys = [centers[:, d] for d in range(centers.shape[1] - 1, -1, -1)]
    return np.lexsort((*keys, mean_luma))


# --------------------------------------------------------------------------- centres

@dataclass
class Centers:
    """K fitted centres plus what they may be applied to (written as centers.json by ``mapseg fit``)."""
    centers: np.ndarray                 # (K, D) float32, in label order
    metric: str                         # cosine | euclidean
    features: str                       # embedding | colour
    model: dict                         # {"kind": "artifact", "weights_sha256", "embed_dim"} | {"kind": "kmeans"}
    mean_colours: np.ndarray | None = None   # (K, 3) mean RGB in [0, 1] of the sampled members
    counts: np.ndarray | None = None         # sampled members per centre
    sample: dict = field(default_factory=dict)
    legend: dict | None = None               # {"classes": [{"value", "name", "color"}]}: mapseg fit --legend

    @property
    def k(self) -> int:
        return self.centers.shape[0]

    def scorer(self) -> tuple[np.ndarray, np.ndarray]:
        """(A, b) of ``argmax_k x . A[:, k] + b[k]``."""
        a = np.ascontiguousarray(self.centers.T, dtype=np.float32)
        b = np.zeros(self.k, np.float32)
        if self.metric == "euclidean":
            c = self.centers.astype(np.float64)
            b = (-0.5 * np.einsum("kd,kd->k", c, c)).astype(np.float32)
        return a, b

    def to_json(self) -> dict:
        return {
            "format": CENTERS_FORMAT, "version": CENTERS_VERSION, "k": self.k, "metric": self.metric,
            "features": self.features, "model": self.model, "order": ORDER_RULE,
            "centers": [[float(v) for v in row] for row in self.centers],
            "mean_colours": None if self.mean_colours is None else np.round(self.mean_colours, 6).tolist(),
            "counts": None if self.counts is None else [int(v) for v in self.counts],
            "sample": self.sample,
            **({} if self.legend is None else {"legend": self.legend}),
        }

    @classmethod
    def from_json(cls, data: dict, where: str = "centers file") -> "Centers":
        """Centres from a centres file's JSON; any field of the wrong type or shape is a ClusterError naming
        ``where`` (``mean_colours``, ``counts``, ``sample`` and ``legend`` may be absent: older files)."""
        if not isinstance(data, dict):
            raise ClusterError(f"{where}: not a mapseg centres file (a JSON {type(data).__name__}, not an object); "
                               "write one with mapseg fit")
        if data.get("format") != CENTERS_FORMAT:
            raise ClusterError(f"{where}: not a mapseg centres file (format {data.get('format')!r})")
        if data.get("version") != CENTERS_VERSION:
            raise ClusterError(f"{where}: unknown centres file version {data.get('version')!r} "
                               f"(this mapseg reads {CENTERS_VERSION})")

        def array(key: str, dtype, shape: str, ndim: int, rows: int | None = None, cols: int | None = None):
            try:
                value = np.asarray(data[key], dtype)
            except (TypeError, ValueError, OverflowError) as exc:  # strings, ragged lists, numbers too large
                raise ClusterError(f"{where}: {key!r} must be a {shape} list of numbers ({exc})") from exc
            if (value.ndim != ndim or (rows is not None and value.shape[0] != rows)
                    or (cols is not None and value.shape[-1] != cols) or not np.isfinite(value).all()):
                raise ClusterError(f"{where}: {key!r} must be a finite {shape} list of numbers, "
                                   f"not of shape {value.shape}")
            return value

        for key in ("centers", "metric", "features", "model"):
            if key not in data:
                raise ClusterError(f"{where}: malformed (no {key!r})")
        centers = array("centers", np.float32, "(K >= 2, D)", 2)
        k = centers.shape[0]
        if k < 2:
            raise ClusterError(f"{where}: 'centers' must be a finite (K >= 2, D) list of lists")
        metric, features, model, sample = data["metric"], data["features"], data["model"], data.get("sample", {})
        if metric not in METRICS:
            raise ClusterError(f"{where}: unknown metric {metric!r}")
        if features not in ("embedding", "colour"):
            raise ClusterError(f"{where}: unknown features {features!r} (embedding or colour)")
        for key, value in (("model", model), ("sample", sample)):
            if not isinstance(value, dict):
                raise ClusterError(f"{where}: {key!r} must be an object, not {json.dumps(value)[:40]}")
        mc = None if data.get("mean_colours") is None else array("mean_colours", np.float64, f"({k}, 3)", 2, k, 3)
        counts = None if data.get("counts") is None else array("counts", np.int64, f"({k},)", 1, k)
        legend = data.get("legend")
        if legend is not None:  # names and colours of the labels (optional: files without them load)
            try:
                legend = Legend.from_json(legend, f"{where}: legend").check_k(k, f"{where}: legend").to_json()
            except ValueError as exc:
                raise ClusterError(str(exc)) from exc
        return cls(centers, metric, features, model, mc, counts, sample, legend)

    def save(self, path: str | Path) -> None:
        write_text_atomic(path, json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Centers":
        path = Path(path)
        if not path.is_file():
            raise ClusterError(f"centres file {path} not found (write one with: mapseg fit RASTER -k K -o {path})")
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            raise ClusterError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_json(data, str(path))


def kmeans_rows(n: int, dim: int, seed: int = 0) -> np.ndarray | None:
    """The rows (sorted) of an n-row sample of dim-dimensional features that k-means fits on: at most
    SAMPLE_FEATURES (SAMPLE_COLOURS for colours), drawn with the seed; None for all of them. ``fit_centers``
    draws them; ``mapseg.batch`` draws them before gathering, so that only those rows leave the workers."""
    most = SAMPLE_COLOURS if dim <= ELEMENTWISE_MAX_DIM else SAMPLE_FEATURES
    if n <= most:
        return None
    return np.sort(np.random.default_rng([seed, 0xF17]).choice(n, most, replace=False))


def fit_centers(features: np.ndarray, colours: np.ndarray, k: int, metric: str, feature_kind: str, model: dict,
                seed: int = 0, sample_info: dict | None = None) -> Centers:
    """k-means on sampled features (at most SAMPLE_FEATURES / SAMPLE_COLOURS, drawn with the seed), in label order."""
    pick = kmeans_rows(features.shape[0], features.shape[1], seed)
    if pick is not None:  # the features' rows are gathered onto the grid by k-means itself (no copy here)
        colours = colours[pick]
    raw, assign, exponent = _fit(features, k, metric, seed, rows=pick)  # assign: exact, like every score of the fit
    order = order_by_luma(assign, colours, raw)
    centers = _unscale(raw[order], exponent, metric)
    assign = np.argsort(order)[assign]               # members in label order
    counts = np.bincount(assign, minlength=k)
    sums = _cluster_sums(np.asarray(colours, np.float64), assign, k)
    mean_colours = sums / np.maximum(counts, 1)[:, None]
    return Centers(centers.astype(np.float32), metric, feature_kind, model, mean_colours, counts, sample_info or {})


def assign_labels(features: np.ndarray, scorer: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """uint8 labels of (..., D) features: argmax_k of x . A[:, k] + b[k] (first k on ties).

    Both paths compute a pixel's scores the same way wherever it sits, so labels
    do not depend on the window: embeddings through network.matmul_rows (BLAS
    products kept on the general path), colours (D <= 4) through elementwise
    arithmetic on cache-sized chunks.
    """
    a, b = scorer
    shape = features.shape[:-1]
    d = features.shape[-1]
    if d <= ELEMENTWISE_MAX_DIM:
        flat = np.ascontiguousarray(features, dtype=np.float32).reshape(-1, d)
        return _assign_elementwise(flat, a, b).reshape(shape)
    return cell_scores(features, scorer).argmax(-1).astype(np.uint8)


def cell_scores(features: np.ndarray, scorer: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """(..., K) float32 scores x . A[:, k] + b[k] of (..., D) embeddings, the assignment's products
    (network.matmul_rows: a row's scores do not depend on the rows beside it); what ``assign_labels`` takes
    the first best of, and what mapseg.upsample's guided filter draws at full resolution."""
    a, b = scorer
    flat = np.ascontiguousarray(features, dtype=np.float32).reshape(-1, features.shape[-1])
    scores = matmul_rows(flat, a, ASSIGN_ROWS)
    if b.any():
        scores += b
    return scores.reshape(*features.shape[:-1], -1)


ELEMENTWISE_CHUNK = 1 << 16


def _assign_elementwise(flat: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Running argmax over the K centres, one chunk of pixels (planar, in cache) at a time."""
    n, d = flat.shape
    k = a.shape[1]
    labels = np.empty(n, np.uint8)
    m = min(n, ELEMENTWISE_CHUNK)
    planes = np.empty((d, m), np.float32)
    best, score, tmp = (np.empty(m, np.float32) for _ in range(3))
    better, step = np.empty(m, bool), np.empty(m, np.uint8)
    for s0 in range(0, n, m):
        e = min(m, n - s0)
        x, lab = planes[:, :e], labels[s0:s0 + e]
        bst, sc, tp, bt, st = best[:e], score[:e], tmp[:e], better[:e], step[:e]
        np.copyto(x, flat[s0:s0 + e].T)
        for j in range(k):
            out = bst if j == 0 else sc
            np.multiply(x[0], a[0, j], out=out)
            for c in range(1, d):
                np.multiply(x[c], a[c, j], out=tp)
                out += tp
            out += b[j]
            if j == 0:
                lab[:] = 0
            else:
                np.greater(sc, bst, out=bt)
                np.maximum(bst, sc, out=bst)
                # labels so far are < j, so "j where better" is a maximum (cheaper than a masked store)
                np.multiply(bt.view(np.uint8), j, out=st)
                np.maximum(lab, st, out=lab)
    return labels
