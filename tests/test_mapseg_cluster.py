"""k-means in mapseg.cluster: the same sample gives the same centres, bit for bit, at any BLAS thread count
(the numpy 1.x / GDAL leg of the same promise is in tests/test_mapseg_agreement.py)."""
from __future__ import annotations

import numpy as np
import pytest

from mapseg.cluster import GRID_BITS, ClusterError, _dot, _grid_sample, _weighted_draw, fit_centers, kmeans


def _embeddings(n: int = 30_000, d: int = 96, k: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(unit float32 rows around k directions with overlapping spreads, their mean colours)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d))
    x = centres[rng.integers(k, size=n)] + rng.normal(scale=0.9, size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), rng.random((n, 3)).astype(np.float32)


def test_centres_are_the_same_bits_at_one_and_two_blas_threads():
    """float32 products on the BLAS differed in the last bit between 1 and 2 OpenBLAS threads, and
    k-means carried that into the centres (by 6e-8 on this sample, OpenBLAS 0.3.31); on the grid every
    product is exact."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    x, colours = _embeddings()
    fitted = []
    for threads in (1, 2):
        with threadpoolctl.threadpool_limits(threads, user_api="blas"):
            fitted.append(fit_centers(x, colours, 8, "cosine", "embedding", {}, seed=3))
    assert np.array_equal(fitted[0].centers, fitted[1].centers)
    assert np.array_equal(fitted[0].counts, fitted[1].counts)
    assert np.array_equal(fitted[0].mean_colours, fitted[1].mean_colours)


def test_grid_products_are_exact():
    """What the centres' invariance rests on: a BLAS product of grid rows equals the integer product."""
    x, _ = _embeddings(3000, 96)
    grid, _ = _grid_sample(x, "cosine")
    c = grid[::400]
    scale = 2 ** GRID_BITS
    xi, ci = (grid * scale).astype(np.int64), (c * scale).astype(np.int64)
    assert np.array_equal(grid * scale, xi) and np.abs(np.linalg.norm(grid, axis=1) - 1).max() < 1e-5
    exact = (ci[:, None, :] * xi[None, :, :]).sum(-1)          # integers: no rounding anywhere
    assert np.array_equal(_dot(grid, c) * scale * scale, exact.astype(np.float64))


def test_weighted_draw_follows_the_weights():
    rng = np.random.default_rng(0)
    w = np.array([0.0, 1.0, 3.0, 0.0, 6.0])
    draws = np.bincount([_weighted_draw(w, rng) for _ in range(4000)], minlength=5) / 4000
    assert draws[0] == draws[3] == 0
    assert np.allclose(draws[[1, 2, 4]], [0.1, 0.3, 0.6], atol=0.03)


def test_euclidean_centres_come_back_in_the_samples_units():
    """Colours are scaled by a power of two onto the grid and the centres scaled back."""
    rng = np.random.default_rng(1)
    truth = np.array([[0.1, 0.2, 0.3], [0.8, 0.7, 0.2], [0.4, 0.9, 0.9]])
    x = truth[rng.integers(3, size=6000)] + rng.normal(scale=0.01, size=(6000, 3))
    for units in (1.0, 255.0):
        c = kmeans(x * units, 3, "euclidean", seed=0)
        assert np.abs(np.sort(c, axis=0) - np.sort(truth * units, axis=0)).max() < 0.01 * units


def test_bad_samples_are_refused():
    with pytest.raises(ClusterError, match="finite"):
        kmeans(np.full((10, 3), np.nan), 2, "euclidean")
    with pytest.raises(ClusterError, match="distinct values"):
        kmeans(np.ones((50, 8)), 3, "cosine")
