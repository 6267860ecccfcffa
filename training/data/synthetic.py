"""Structured synthetic RGB tiles: the default source for offline work and CI.

Each image is a domain-warped Voronoi partition (irregular, map-like cells with
soft edges). Every cell belongs to one of ``n_classes`` region types; a type has
a fixed appearance across all images of a dataset (mean colour, texture kind,
texture scale/orientation), with small per-cell variation. Some types share a
mean colour and differ only by texture, so colour alone cannot separate them.

Everything is deterministic from ``(seed, key)``. ``labels`` (the region type
of every pixel) is returned with the image so tests and evaluation can measure
whether a model recovers the regions.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

TEXTURES = ("flat", "stripes", "speckle", "blobs", "dots")


@dataclass(frozen=True)
class RegionType:
    color: tuple[float, float, float]
    texture: str
    scale: float        # texture wavelength in pixels
    angle: float        # stripe orientation (radians)
    amplitude: float    # texture contrast


def make_region_types(n_classes: int, seed: int) -> list[RegionType]:
    """Fixed per-dataset appearance of each region type."""
    if n_classes < 2:
        raise ValueError("need at least 2 synthetic classes")
    rng = np.random.default_rng([seed, 0xC0105])
    # Well separated base colours (evenly spaced random hues, varied saturation and value).
    n_colors = n_classes - 1
    hues = (rng.random() + np.arange(n_colors) / n_colors) % 1.0
    colors = [_hsv_to_rgb(h, 0.35 + 0.4 * rng.random(), 0.35 + 0.5 * rng.random()) for h in hues]
    types: list[RegionType] = []
    for i in range(n_classes):
        # Types 0 and 1 share a colour: only texture tells them apart.
        types.append(RegionType(
            color=tuple(float(c) for c in colors[max(0, i - 1)]),
            texture=TEXTURES[i % len(TEXTURES)],
            scale=float(rng.uniform(4.0, 10.0)),
            angle=float(rng.uniform(0, np.pi)),
            amplitude=float(rng.uniform(0.12, 0.22)),
        ))
    return types


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    k = (np.array([5.0, 3.0, 1.0]) + h * 6.0) % 6.0
    return v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Band-limited noise in [-1, 1] with features about ``cell`` pixels wide."""
    gh, gw = max(2, int(np.ceil(h / cell)) + 2), max(2, int(np.ceil(w / cell)) + 2)
    coarse = rng.standard_normal((gh, gw)).astype(np.float32)
    # Bicubic upsampling of a coarse lattice; the margin cell keeps edges from stretching.
    up = cv2.resize(coarse, (int(round(gw / (gw - 2) * w)) , int(round(gh / (gh - 2) * h))),
                    interpolation=cv2.INTER_CUBIC)[:h, :w]
    return up / (np.abs(up).max() + 1e-6)


def _texture(t: RegionType, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    h, w = yy.shape
    if t.texture == "flat":
        return 0.25 * _smooth_noise(rng, h, w, 48.0)
    if t.texture == "stripes":
        phase = rng.uniform(0, 2 * np.pi)
        return np.sin(2 * np.pi * (xx * np.cos(t.angle) + yy * np.sin(t.angle)) / t.scale + phase)
    if t.texture == "speckle":
        return np.clip(rng.standard_normal((h, w)), -2.5, 2.5) / 2.0
    if t.texture == "blobs":
        return _smooth_noise(rng, h, w, t.scale * 1.5)
    # dots: a regular lattice of round spots
    s = t.scale * 1.4
    dy, dx = (yy % s) - s / 2, (xx % s) - s / 2
    return np.where(dy * dy + dx * dx < (s * 0.3) ** 2, 1.0, -0.4)


def make_synthetic_image(size: int | tuple[int, int], rng: np.random.Generator, types: list[RegionType],
                         cells_per_512: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """One image (3, H, W) float32 in [0, 1] and its region-type labels (H, W) int64."""
    h, w = (size, size) if isinstance(size, int) else size
    n_cells = max(2, int(round(cells_per_512 * h * w / 512 ** 2)))
    # Voronoi at half resolution on domain-warped coordinates: irregular, natural-looking borders.
    lh, lw = (h + 1) // 2, (w + 1) // 2
    yy, xx = np.mgrid[0:lh, 0:lw].astype(np.float32)
    warp = 0.08 * max(lh, lw)
    wy = yy + warp * _smooth_noise(rng, lh, lw, 40.0)
    wx = xx + warp * _smooth_noise(rng, lh, lw, 40.0)
    seeds = rng.random((n_cells, 2)) * np.array([lh, lw])
    cell_type = rng.integers(0, len(types), n_cells)
    cell_type[: min(len(types), n_cells)] = rng.permutation(len(types))[: min(len(types), n_cells)]
    _, cells = cKDTree(seeds).query(np.stack([wy.ravel(), wx.ravel()], 1))
    cells = cells.reshape(lh, lw)
    cells = np.repeat(np.repeat(cells, 2, 0), 2, 1)[:h, :w]

    labels = cell_type[cells].astype(np.int64)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # One texture field per region type (fresh phase per image), one colour per cell.
    tex = np.stack([types[t].amplitude * _texture(types[t], rng, yy, xx) for t in range(len(types))])
    cell_colors = np.clip(np.array([types[t].color for t in cell_type]) + rng.normal(0, 0.025, (n_cells, 3)), 0, 1)
    img = cell_colors[cells].transpose(2, 0, 1) + np.take_along_axis(tex, labels[None], 0)
    img = img.astype(np.float32)
    # Soft edges and a little sensor blur, then a little global lighting variation.
    img = ndimage.gaussian_filter(img, sigma=(0, 0.8, 0.8))
    img *= 1.0 + 0.08 * _smooth_noise(rng, h, w, 256.0)[None]
    return np.clip(img, 0.0, 1.0).astype(np.float32), labels


class SyntheticDataset:
    """Map-style synthetic source. ``ds[key]`` for any hashable tuple of ints.

    The key is either ``(index, size)`` or ``(..., size)``: the last element is
    the square patch size, the others seed the image.
    """

    def __init__(self, seed: int = 0, n_classes: int = 5, cells_per_512: int = 24):
        self.seed, self.n_classes, self.cells_per_512 = seed, n_classes, cells_per_512
        self.types = make_region_types(n_classes, seed)

    def __getitem__(self, key) -> dict:
        *ids, size = key
        rng = np.random.default_rng([self.seed, 0x5EED, *[int(i) for i in ids], int(size)])
        image, labels = make_synthetic_image(int(size), rng, self.types, self.cells_per_512)
        return {"image": image, "labels": labels}


VALIDATION_SEED_OFFSET = 1     # a run's synthetic validation images come from train.seed + 1: never trained on
VALIDATION_KEY = 0xE7A1


def validation_images(train_seed: int, samples: int, size: int, n_classes: int = 5,
                      cells_per_512: int = 24) -> list[dict]:
    """The labeled images a synthetic training run with ``train.seed = train_seed`` validates on (the same for
    the trainer and ``python -m training.eval --synthetic``)."""
    src = SyntheticDataset(train_seed + VALIDATION_SEED_OFFSET, n_classes, cells_per_512)
    return [src[(VALIDATION_KEY, i, size)] for i in range(samples)]
