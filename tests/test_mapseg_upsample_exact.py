"""Guided upsampling (mapseg/upsample.py) gives, bit for bit, what the plain computation gives: row-major float32
arrays, box sums over zero-padded copies, the bilinear step one phase-strided slice at a time, a running first-best
argmax. The module holds its arrays otherwise (phase planes, flat runs) for speed; these tests pin that the float32
operations, their operands and their order are the same: the labels, and also the coefficients a and b and every
pixel's best score (a change in the last bit of a sum rarely shows in the labels of a few windows; numpy only)."""
from __future__ import annotations

import numpy as np
import pytest

from mapseg import upsample
from mapseg.upsample import LUMA, Upsample, guided_labels

F = np.float32
DRAW = upsample._Block.labels_of


def plain_guided(scores, image, valid, s, up, cells_at, out_box):
    """Labels, the coefficients a and b (hc + 2, wc + 2, K: one edge cell copied around) and every pixel's best
    score, computed the plain way in the order the module doc fixes (terms outside the cells are zeros that are
    added like any other term)."""
    r, eps = up.radius, F(up.eps)
    hc, wc, k = scores.shape
    grey = image[..., 0] * F(LUMA[0])
    grey += image[..., 1] * F(LUMA[1])
    grey += image[..., 2] * F(LUMA[2])

    def cell_sum(x):
        acc = x[0::s, 0::s].astype(F, copy=True)
        for dy in range(s):
            for dx in range(s):
                if dy or dx:
                    acc += x[dy::s, dx::s]
        return acc

    def box(x, r):
        h, w = x.shape[:2]
        pad = np.zeros((h + 2 * r,) + x.shape[1:], F)
        pad[r:r + h] = x
        rows = pad[0:h].copy()
        for d in range(1, 2 * r + 1):
            rows += pad[d:d + h]
        pad = np.zeros((h, w + 2 * r) + x.shape[2:], F)
        pad[:, r:r + w] = rows
        out = pad[:, 0:w].copy()
        for d in range(1, 2 * r + 1):
            out += pad[:, d:d + w]
        return out

    def box_means(weight, r):
        den = box(weight, r)
        inverse = np.zeros_like(den)
        np.divide(F(1), den, out=inverse, where=den > 0)

        def mean(values):  # x * 1 = x: the module skips the product where every weight is 1
            wide = values.ndim == 3
            num = box(values * (weight[..., None] if wide else weight), r)
            num *= inverse[..., None] if wide else inverse
            return num

        return mean, den

    data = valid.astype(F)
    count = cell_sum(data)
    per = np.zeros_like(count)
    np.divide(F(1), count, out=per, where=count > 0)
    seen = grey * data
    g1 = cell_sum(seen) * per
    g2 = cell_sum(seen * grey) * per
    mean, den = box_means(count / F(s * s), r)
    m_i, m_ii, m_p = mean(g1), mean(g2), mean(scores)
    m_ip = mean(g1[..., None] * scores)
    var = np.maximum(m_ii - m_i * m_i, F(0))
    a = m_ip - m_i[..., None] * m_p
    a /= (var + eps)[..., None]
    b = m_p - a * m_i[..., None]
    if up.coef_radius:
        mean, _ = box_means((den > 0).astype(F), up.coef_radius)
        a, b = mean(a), mean(b)

    phases = []
    for phase in range(s):
        d = (phase + 0.5) / s - 0.5
        phases.append((0, 1, F(-d), F(1 + d)) if d < 0 else (1, 2, F(1 - d), F(d)))

    def bilinear(x, first, cells, axis):  # x padded by one cell (edge copies) on both axes
        shape = list(x.shape)
        shape[axis] = cells * s
        out = np.empty(shape, F)
        for phase, (o0, o1, w0, w1) in enumerate(phases):
            lo, hi = slice(first + o0, first + o0 + cells), slice(first + o1, first + o1 + cells)
            seg, x0, x1 = (out[phase::s], x[lo], x[hi]) if axis == 0 else (out[:, phase::s], x[:, lo], x[:, hi])
            np.multiply(x0, w0, out=seg)
            seg += x1 * w1
        return out

    row0, row1, col0, col1 = out_box
    py0, px0 = row0 - cells_at[0] * s, col0 - cells_at[1] * s
    ny, nx = row1 - row0, col1 - col0
    g = grey[py0:py0 + ny, px0:px0 + nx]
    pad = ((1, 1), (1, 1))
    labels = np.zeros((ny, nx), np.uint8)
    best = None
    for j in range(k):
        q = bilinear(bilinear(np.pad(a[..., j], pad, mode="edge"), py0 // s, ny // s, 0), px0 // s, nx // s, 1)
        q *= g
        q += bilinear(bilinear(np.pad(b[..., j], pad, mode="edge"), py0 // s, ny // s, 0), px0 // s, nx // s, 1)
        if best is None:
            best = q
            continue
        labels[q > best] = j
        best = np.maximum(best, q)
    return labels, np.pad(a, pad + ((0, 0),), mode="edge"), np.pad(b, pad + ((0, 0),), mode="edge"), best


def module_guided(monkeypatch, scores, image, valid, s, up, cells_at, out_box):
    """``guided_labels`` and, taken from its blocks as it draws them, its coefficients and every pixel's best score
    (as ``plain_guided`` gives them)."""
    blocks = []

    def labels_of(block, coef, g, start):
        drawn = DRAW(block, coef, g, start)
        blocks.append((coef, block.width, g.shape[2], block.best[..., :g.shape[2]].copy()))
        return drawn

    monkeypatch.setattr(upsample._Block, "labels_of", labels_of)
    labels = guided_labels(scores, image, valid, s, up, cells_at, out_box)
    hc, wc, k = scores.shape
    coef, width = blocks[0][:2]
    coef = coef.reshape(k, 2, hc + 2, width)[..., :wc + 2].transpose(1, 2, 3, 0)
    ny, nx = out_box[1] - out_box[0], out_box[3] - out_box[2]
    nc, row, best = nx // s, 0, np.empty((ny, nx), F)
    for _, _, run, planes in blocks:  # phase planes of the block's rows, each row ``width`` long
        rows = (run - nc) // width + 1
        full = np.empty((s, s, rows * width), F)
        full[..., :run] = planes
        best[row * s:(row + rows) * s].reshape(rows, s, nc, s)[...] = (
            full.reshape(s, s, rows, width)[..., :nc].transpose(2, 0, 3, 1))
        row += rows
    return labels, coef[0], coef[1], best


def assert_same(got, want):
    names = ("labels", "a", "b", "best scores")
    for name, x, y in zip(names, got, want):
        if name == "labels":
            np.testing.assert_array_equal(x, y)
            continue
        x, y = np.asarray(x, F), np.asarray(y, F)
        assert x.shape == y.shape, name
        same = (x.view(np.uint32) == y.view(np.uint32)) | (np.isnan(x) & np.isnan(y))
        assert same.all(), f"{name}: {int((~same).sum())} of {same.size} values differ in their bits"


def random_window(rng, s):
    """Cell scores, an image and its valid pixels of a random window; cells along the edges, nodata inside and at
    the edges, near-ties, sometimes values that are not finite."""
    hc, wc, k = int(rng.integers(1, 40)), int(rng.integers(1, 40)), int(rng.integers(2, 17))
    scores = (rng.standard_normal((hc, wc, k)) * 10 ** rng.uniform(-3, 3)).astype(F)
    if rng.random() < 0.3:
        scores = np.round(scores, 1).astype(F)
    image = rng.random((hc * s, wc * s, 3), dtype=F)
    if rng.random() < 0.3:
        image = (np.round(image * 4) / 4).astype(F)
    valid = np.ones((hc * s, wc * s), bool)
    mode = rng.integers(0, 4)
    if mode == 1:
        valid = rng.random(valid.shape) > 0.3
    elif mode == 2:
        y0, x0 = int(rng.integers(0, hc * s)), int(rng.integers(0, wc * s))
        valid[y0:y0 + int(rng.integers(1, 40)), x0:x0 + int(rng.integers(1, 40))] = False
        valid[:, :int(rng.integers(0, 9))] = False
        valid[-int(rng.integers(1, 9)):, :] = False
    elif mode == 3:
        valid[:] = False
    image[~valid] = rng.random((int((~valid).sum()), 3), dtype=F) * 5 - 2
    if rng.random() < 0.05:
        scores.reshape(-1)[rng.integers(0, scores.size, 2)] = rng.choice([np.nan, np.inf, -np.inf])
    return scores, image, valid


@pytest.mark.parametrize("seed", range(60))
def test_guided_labels_are_the_plain_computation_bit_for_bit(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    s = 4 if seed % 5 else int(rng.choice([1, 2, 3, 8]))
    scores, image, valid = random_window(rng, s)
    hc, wc, _ = scores.shape
    up = Upsample("guided", int(rng.choice([1, 2, 3])), float(rng.choice([0.01, 1e-4, 0.5])),
                  int(rng.choice([0, 0, 1, 2])))
    i0, i1 = sorted(int(v) for v in rng.integers(0, hc + 1, 2))
    j0, j1 = sorted(int(v) for v in rng.integers(0, wc + 1, 2))
    i0, i1 = (i0, i1) if i1 > i0 else (0, hc)
    j0, j1 = (j0, j1) if j1 > j0 else (0, wc)
    at = (int(rng.integers(0, 100)), int(rng.integers(0, 100)))
    box = ((at[0] + i0) * s, (at[0] + i1) * s, (at[1] + j0) * s, (at[1] + j1) * s)
    with np.errstate(all="ignore"):
        want = plain_guided(scores, image, valid, s, up, at, box)
        got = module_guided(monkeypatch, scores, image, valid, s, up, at, box)
    assert_same(got, want)


def test_wide_and_tall_windows_are_the_plain_computation(monkeypatch):
    """Windows whose blocks of rows hold several cell rows and one (a long flat run crosses rows), or cut the
    window unevenly."""
    rng = np.random.default_rng(100)
    for hc, wc in ((70, 3), (3, 700), (41, 130), (9, 2100)):
        scores = rng.standard_normal((hc, wc, 5)).astype(F)
        image = rng.random((hc * 4, wc * 4, 3), dtype=F)
        valid = np.ones(image.shape[:2], bool)
        box = (4, hc * 4 - 4, 8, wc * 4) if hc > 2 and wc > 2 else (0, hc * 4, 0, wc * 4)
        up = Upsample("guided")
        assert_same(module_guided(monkeypatch, scores, image, valid, 4, up, (0, 0), box),
                    plain_guided(scores, image, valid, 4, up, (0, 0), box))
