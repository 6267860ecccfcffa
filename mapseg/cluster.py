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

Label order: k-means is seeded (k-means++ then Lloyd, ``n_init`` restarts,
best objective kept), then centres are sorted by the mean luma
(0.299 R + 0.587 G + 0.114 B, RGB in [0, 1]) of the sampled pixels assigned
to them, darkest first; ties (practically never) by the centre's
coordinates. So label 0 is the darkest cluster, K-1 the brightest, for any
seed that finds the same clusters.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ClusterError
from .fileio import write_text_atomic
from .network import matmul_rows

CENTERS_FORMAT = "mapseg-centers"
CENTERS_VERSION = 1
METRICS = ("cosine", "euclidean")
LUMA = np.array([0.299, 0.587, 0.114])
ASSIGN_ROWS = 8192       # rows per assignment product (see network.matmul_rows)
ELEMENTWISE_MAX_DIM = 4  # colour features: scores by elementwise arithmetic instead of a product
SAMPLE_FEATURES = 30_000  # features the k-means sees at most (embeddings) ...
SAMPLE_COLOURS = 10_000   # ... and for colours (3 dimensions need fewer)
ORDER_RULE = ("ascending mean luma (0.299 R + 0.587 G + 0.114 B, RGB in [0, 1]) of the sampled pixels "
              "assigned to each centre; ties by centre coordinates")


def check_k(k, max_k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ClusterError(f"K must be an integer, got {k!r}")
    if not 2 <= int(k) <= max_k:
        raise ClusterError(f"K={k} is outside the supported range [2, {max_k}]")
    return int(k)


# --------------------------------------------------------------------------- k-means

def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _dot(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """x @ c.T; for a few dimensions elementwise (a tiny BLAS call costs more than it computes)."""
    if x.shape[1] > ELEMENTWISE_MAX_DIM:
        return x @ c.T
    s = x[:, 0:1] * c[:, 0]
    for j in range(1, x.shape[1]):
        s += x[:, j:j + 1] * c[:, j]
    return s


def _scores(x: np.ndarray, c: np.ndarray, metric: str) -> np.ndarray:
    s = _dot(x, c)
    if metric == "euclidean":
        s -= 0.5 * np.einsum("kd,kd->k", c, c)
    return s


def _objective(x: np.ndarray, c: np.ndarray, metric: str) -> float:
    """Higher is better: summed cosine similarity, or minus the inertia."""
    if metric == "cosine":
        return float(_dot(x, c).max(1).sum(dtype=np.float64))
    d2 = (x * x).sum(1)[:, None] - 2 * _dot(x, c) + (c * c).sum(1)[None]
    return -float(np.maximum(d2.min(1), 0).sum(dtype=np.float64))


def _plusplus(x: np.ndarray, k: int, metric: str, rng: np.random.Generator) -> np.ndarray:
    n = x.shape[0]
    centers = [x[rng.integers(n)]]
    d2 = _dist2(x, centers[0], metric)
    for found in range(1, k):
        total = d2.sum()
        if total <= 1e-12 * n:  # every sample sits on a centre already
            raise ClusterError(f"the sampled pixels have only {found} distinct values, fewer than K={k}: "
                               "choose a smaller K")
        idx = rng.choice(n, p=d2 / total)
        centers.append(x[idx])
        d2 = np.minimum(d2, _dist2(x, x[idx], metric))
    return np.stack(centers)


def _dist2(x: np.ndarray, c: np.ndarray, metric: str) -> np.ndarray:
    if metric == "cosine":
        return np.maximum(2 - 2 * _dot(x, c[None])[:, 0], 0)
    diff = x - c
    return np.einsum("nd,nd->n", diff, diff)


def _cluster_sums(x: np.ndarray, assign: np.ndarray, k: int) -> np.ndarray:
    """(k, D) sums of the rows of x per cluster."""
    if x.shape[1] <= ELEMENTWISE_MAX_DIM:
        return np.stack([np.bincount(assign, weights=x[:, j], minlength=k) for j in range(x.shape[1])], axis=1)
    onehot = np.zeros((k, x.shape[0]), x.dtype)
    onehot[assign, np.arange(x.shape[0])] = 1
    return (onehot @ x).astype(np.float64)


def _lloyd(x: np.ndarray, c: np.ndarray, metric: str, iters: int) -> np.ndarray:
    """Lloyd iterations until at most 0.5 % of the samples change cluster (or ``iters``)."""
    k = c.shape[0]
    previous = None
    for _ in range(iters):
        scores = _scores(x, c, metric)
        assign = scores.argmax(1)
        if previous is not None and np.count_nonzero(assign != previous) <= 5e-3 * len(assign):
            break
        previous = assign
        counts = np.bincount(assign, minlength=k)
        sums = _cluster_sums(x, assign, k)
        new = c.copy()
        filled = counts > 0
        new[filled] = sums[filled] / counts[filled, None]
        if (~filled).any():  # an empty cluster takes the sample worst served by its centre
            served = scores.max(1) if metric == "cosine" else scores.max(1) - 0.5 * np.einsum("nd,nd->n", x, x)
            worst = np.argsort(served, kind="stable")
            for j, idx in zip(np.flatnonzero(~filled), worst):
                new[j] = x[idx]
        c = (_normalise(new) if metric == "cosine" else new).astype(x.dtype)
    return c


def kmeans(x: np.ndarray, k: int, metric: str, seed: int = 0, n_init: int = 3, iters: int = 30) -> np.ndarray:
    """Seeded k-means (k-means++ then Lloyd, best of ``n_init``). Returns (k, D) float64.

    Products run in float32 (embeddings are unit vectors, colours in [0, 1]),
    cluster sums and the objective accumulate in float64.
    """
    if metric not in METRICS:
        raise ClusterError(f"unknown metric {metric!r}")
    x = np.asarray(x, np.float64)
    if metric == "cosine":
        x = _normalise(x)
    x = x.astype(np.float32)
    rng = np.random.default_rng(seed)
    best, best_obj = None, -np.inf
    for _ in range(n_init):
        c = _lloyd(x, _plusplus(x, k, metric, rng), metric, iters)
        obj = _objective(x, c, metric)
        if obj > best_obj:
            best, best_obj = c, obj
    return best.astype(np.float64)


def order_by_luma(x: np.ndarray, colours: np.ndarray, centers: np.ndarray, metric: str) -> np.ndarray:
    """Permutation putting centres in ascending mean luma of their members (see module doc)."""
    k = centers.shape[0]
    assign = _scores(np.asarray(x, np.float64), centers, metric).argmax(1)
    luma = np.asarray(colours, np.float64) @ LUMA
    counts = np.bincount(assign, minlength=k)
    mean_luma = np.bincount(assign, weights=luma, minlength=k) / np.maximum(counts, 1)
    keys = [tuple(centers[:, d]) for d in range(centers.shape[1] - 1, -1, -1)]
    return np.lexsort((*[np.asarray(k_) for k_ in keys], mean_luma))


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
        }

    @classmethod
    def from_json(cls, data: dict, where: str = "centers file") -> "Centers":
        """Centres from a centres file's JSON; any field of the wrong type or shape is a ClusterError naming
        ``where`` (``mean_colours``, ``counts`` and ``sample`` may be absent: older files)."""
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
        return cls(centers, metric, features, model, mc, counts, sample)

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


def fit_centers(features: np.ndarray, colours: np.ndarray, k: int, metric: str, feature_kind: str, model: dict,
                seed: int = 0, sample_info: dict | None = None) -> Centers:
    """k-means on sampled features (at most SAMPLE_FEATURES / SAMPLE_COLOURS, drawn with the seed), in label order."""
    most = SAMPLE_COLOURS if features.shape[1] <= ELEMENTWISE_MAX_DIM else SAMPLE_FEATURES
    if features.shape[0] > most:
        pick = np.sort(np.random.default_rng([seed, 0xF17]).choice(features.shape[0], most, replace=False))
        features, colours = features[pick], colours[pick]
    raw = kmeans(features, k, metric, seed)
    order = order_by_luma(features, colours, raw, metric)
    centers = raw[order]
    assign = _scores(np.asarray(features, np.float64) if metric == "euclidean"
                     else _normalise(np.asarray(features, np.float64)), centers, metric).argmax(1)
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
    flat = np.ascontiguousarray(features, dtype=np.float32).reshape(-1, d)
    if d <= ELEMENTWISE_MAX_DIM:
        return _assign_elementwise(flat, a, b).reshape(shape)
    scores = matmul_rows(flat, a, ASSIGN_ROWS)
    if b.any():
        scores += b
    return scores.argmax(1).astype(np.uint8).reshape(shape)


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
