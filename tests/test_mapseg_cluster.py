"""k-means in mapseg.cluster: the same sample gives the same centres, bit for bit, at any BLAS thread count
(the numpy 1.x / GDAL leg of the same promise is in tests/test_mapseg_agreement.py); the fit on subsets
ends where a fit on the whole sample would."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest

from mapseg import cluster
from mapseg.cluster import (
    GRID_BITS,
    ClusterError,
    _dot,
    _fit,
    _grid_sample,
    _lloyd,
    _nearest,
    _weighted_draw,
    fit_centers,
    kmeans,
)


def _embeddings(n: int = 30_000, d: int = 96, k: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(unit float32 rows around k directions with overlapping spreads, their mean colours)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d))
    x = centres[rng.integers(k, size=n)] + rng.normal(scale=0.9, size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), rng.random((n, 3)).astype(np.float32)


def _rows(c: np.ndarray) -> np.ndarray:
    """Centres in a fixed order (k-means finds them in any)."""
    return c[np.lexsort(c.T[::-1])]


@contextlib.contextmanager
def _blas_at_two_threads():
    """What k-means' hold on the BLAS would be at 2 threads."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        cluster._BLAS["held"] += 1
        try:
            yield
        finally:
            cluster._BLAS["held"] -= 1


def test_centres_are_the_same_bits_at_one_and_two_blas_threads(monkeypatch):
    """float32 products on the BLAS differed in the last bit between 1 and 2 OpenBLAS threads, and
    k-means carried that into the centres (by 6e-8 on this sample, OpenBLAS 0.3.31); on the grid every
    product is exact, so k-means on the BLAS (held at one thread), on it at two threads and off it
    (einsum's loops, as without threadpoolctl) give the same bits."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    x, colours = _embeddings()
    fitted = []
    for threads in (1, 2):
        with threadpoolctl.threadpool_limits(threads, user_api="blas"):
            fitted.append(fit_centers(x, colours, 8, "cosine", "embedding", {}, seed=3))
    monkeypatch.setattr(cluster, "_one_blas_thread", _blas_at_two_threads)
    fitted.append(fit_centers(x, colours, 8, "cosine", "embedding", {}, seed=3))
    monkeypatch.setattr(cluster, "_one_blas_thread", contextlib.nullcontext)
    fitted.append(fit_centers(x, colours, 8, "cosine", "embedding", {}, seed=3))
    for other in fitted[1:]:
        assert np.array_equal(fitted[0].centers, other.centers)
        assert np.array_equal(fitted[0].counts, other.counts)
        assert np.array_equal(fitted[0].mean_colours, other.mean_colours)


def test_grid_products_are_exact():
    """What the centres' invariance rests on: a product of grid rows, on the BLAS or off it, equals the
    integer product."""
    x, _ = _embeddings(3000, 96)
    grid, _ = _grid_sample(x, "cosine")
    c = np.ascontiguousarray(grid[::400])
    scale = 2 ** GRID_BITS
    xi, ci = (grid * scale).astype(np.int64), (c * scale).astype(np.int64)
    assert np.array_equal(grid * scale, xi) and np.abs(np.linalg.norm(grid, axis=1) - 1).max() < 1e-5
    exact = ((ci[:, None, :] * xi[None, :, :]).sum(-1)).astype(np.float64)  # integers: no rounding anywhere
    assert np.array_equal(_dot(grid, c) * scale * scale, exact)              # einsum's loops
    with cluster._one_blas_thread():
        assert np.array_equal(_dot(grid, c) * scale * scale, exact)          # the BLAS


def test_grid_sample_rows_do_not_depend_on_their_order():
    """The fit puts the sample on the grid in a seeded random order: every row comes out the same."""
    x, colours = _embeddings(5000, 96)
    order = np.random.default_rng(0).permutation(5000)
    for sample, metric in ((x, "cosine"), (colours * 255, "euclidean")):
        whole, exponent = _grid_sample(sample, metric)
        shuffled, same_exponent = _grid_sample(sample, metric, order)
        assert exponent == same_exponent and np.array_equal(shuffled, whole[order])


def test_a_fit_on_rows_of_the_sample_is_the_fit_on_their_copy():
    """fit_centers hands k-means the rows it draws (kmeans_rows) instead of a copy of them: the same grid, the
    same exponent (the largest magnitude among those rows only) and the same centres, bit for bit."""
    x, colours = _embeddings(36_000, 96)
    rows = cluster.kmeans_rows(x.shape[0], x.shape[1], 0)
    left_out = np.setdiff1d(np.arange(x.shape[0]), rows)[0]
    x[left_out] *= 8                     # the largest magnitude sits in a row that is not drawn: the exponent
    colours[left_out] *= 8               # is that of the drawn rows
    for sample, metric, k in ((x, "cosine", 8), (colours * 255, "euclidean", 5)):
        order = np.random.default_rng(1).permutation(rows.size)
        for how in (None, order):
            copied, exponent = _grid_sample(sample[rows], metric, how)
            taken, same_exponent = _grid_sample(sample, metric, how, rows)
            assert exponent == same_exponent and copied.tobytes() == taken.tobytes()
            assert _grid_sample(sample, metric)[1] > exponent
            assert copied.flags.f_contiguous and taken.flags.f_contiguous
        a, b = _fit(sample[rows], k, metric, 0), _fit(sample, k, metric, 0, rows=rows)
        assert all(np.asarray(u).tobytes() == np.asarray(v).tobytes() for u, v in zip(a, b))
    whole = fit_centers(x, colours, 8, "cosine", "embedding", {}, 0)
    copied = fit_centers(x[rows], colours[rows], 8, "cosine", "embedding", {}, 0)
    assert whole.centers.tobytes() == copied.centers.tobytes()
    assert np.array_equal(whole.counts, copied.counts) and np.array_equal(whole.mean_colours, copied.mean_colours)


def test_the_fit_on_subsets_is_a_lloyd_fixed_point_of_the_whole_sample():
    """Restarts on 2048-row blocks, Lloyd on 8192 rows and then on all 30,000: the result is what Lloyd on
    the whole sample stops at (its stopping rule: at most 0.5 % of the rows change centre in one more
    iteration), with the exact nearest centre of every row."""
    x, _ = _embeddings()
    grid, _ = _grid_sample(x, "cosine")
    for seed in range(3):
        centers, assign, _ = _fit(x, 8, "cosine", seed)
        with cluster._one_blas_thread():
            nearest = _nearest(grid, centers, "cosine")[0]
            after = _lloyd(grid, centers, "cosine", 1)[1]  # the nearest centres after one more iteration
        assert np.array_equal(assign, nearest)
        assert np.count_nonzero(after != nearest) <= 5e-3 * len(grid)


def test_the_fit_on_subsets_ends_where_the_fit_on_the_whole_sample_does(monkeypatch):
    """Where the whole sample's k-means has one optimum (6 directions, K = 6) the fit on subsets finds the
    same centres, bit for bit, for every seed, scoring fewer than a third as many rows as restarts on the
    whole sample (the point of it: about 0.06 instead of 1.3 CPU-seconds on 30,000 x 96 at K = 8)."""
    x, _ = _embeddings(k=6)
    scored = [0]
    dot = cluster._dot

    def counting_dot(rows, c):
        scored[0] += rows.shape[0] * c.shape[0]
        return dot(rows, c)

    monkeypatch.setattr(cluster, "_dot", counting_dot)
    for seed in range(4):
        scored[0] = 0
        subsets = _fit(x, 6, "cosine", seed)[0]
        on_subsets = scored[0]
        scored[0] = 0
        whole = _fit(x, 6, "cosine", seed, subset=None)[0]
        assert np.array_equal(_rows(subsets), _rows(whole))
        assert on_subsets < scored[0] / 3


def test_values_a_subset_misses_are_found():
    """A colour in 3 of 10,000 pixels is missing from most 2048-row blocks; with K = 3 it is still a centre."""
    rng = np.random.default_rng(2)
    x = np.array([[0.2, 0.3, 0.1], [0.7, 0.7, 0.6]])[rng.integers(2, size=10_000)]
    x[rng.choice(10_000, 3, replace=False)] = [0.1, 0.2, 0.9]
    for seed in range(3):
        c = kmeans(x, 3, "euclidean", seed=seed)
        assert np.abs(c - [0.1, 0.2, 0.9]).sum(1).min() < 1e-6


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
    with pytest.raises(ClusterError, match="distinct values"):  # too few on the subsets and on the whole
        kmeans(np.repeat(np.eye(8)[:2], 5000, axis=0), 3, "cosine")


def test_fits_at_once_in_threads_leave_the_blas_as_it_was():
    """k-means holds the BLAS at one thread while it runs; fits overlapping in the caller's threads share one
    hold, so the last to finish restores the thread count the process had (not another fit's one)."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    import threading

    def blas_threads():
        return [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]

    x = np.random.default_rng(0).standard_normal((12000, 96)).astype(np.float32)
    ref = kmeans(x, 6, "cosine", 0)
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        before = blas_threads()
        got = {}
        threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, kmeans(x, 6, "cosine", 0)))
                   for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert blas_threads() == before
    assert len(got) == 6 and all(np.array_equal(c, ref) for c in got.values())
