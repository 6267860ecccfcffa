"""Two-view augmentations with an exact sampling grid between the views.

View 2 is view 1 under a random flip / 90-degree rotation (plus independent
photometric changes and noise on both views). The geometric part is returned as
a ``grid`` in ``torch.nn.functional.grid_sample`` convention
(``align_corners=False``): ``grid[i, j] = (x, y)`` is the normalised position in
view 1 of view-2 pixel ``(i, j)``. It is built by applying the very same
geometric operations to an image of view-1 coordinates, so it is exact, and it
stays exact at any resolution obtained by average-pooling (the maps are affine).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def identity_grid(h: int, w: int) -> torch.Tensor:
    """(h, w, 2) grid of pixel-centre coordinates in [-1, 1], (x, y) order."""
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w * 2 - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1)


def apply_geometric(x: torch.Tensor, hflip: bool, vflip: bool, rot: int) -> torch.Tensor:
    """Apply flips then ``rot`` counter-clockwise quarter turns to (..., H, W)."""
    if hflip:
        x = x.flip(-1)
    if vflip:
        x = x.flip(-2)
    if rot % 4:
        x = torch.rot90(x, rot % 4, dims=(-2, -1))
    return x


def sample_geometric(rng: np.random.Generator, aug, square: bool) -> tuple[bool, bool, int]:
    hflip = bool(rng.random() < aug.hflip)
    vflip = bool(rng.random() < aug.vflip)
    rot = int(rng.integers(0, 4)) if (aug.rot90 and square) else 0
    return hflip, vflip, rot


def photometric(img: torch.Tensor, rng: np.random.Generator, aug) -> torch.Tensor:
    """Brightness, contrast, saturation jitter and Gaussian noise on a (3, H, W) image in [0,1]."""
    x = img
    if aug.brightness > 0:
        x = x + float(rng.uniform(-aug.brightness, aug.brightness))
    if aug.contrast > 0:
        m = x.mean()
        x = (x - m) * float(1 + rng.uniform(-aug.contrast, aug.contrast)) + m
    if aug.saturation > 0:
        gray = x.mean(0, keepdim=True)
        x = (x - gray) * float(1 + rng.uniform(-aug.saturation, aug.saturation)) + gray
    if aug.noise_std > 0:
        g = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
        x = x + aug.noise_std * torch.randn(x.shape, generator=g)
    return x.clamp(0.0, 1.0)


def make_views(image: torch.Tensor, rng: np.random.Generator, aug) -> dict:
    """Two views of a (3, H, W) image and the grid mapping view-2 pixels into view 1."""
    _, h, w = image.shape
    hflip, vflip, rot = sample_geometric(rng, aug, square=(h == w))
    view2_geo = apply_geometric(image, hflip, vflip, rot)
    grid = apply_geometric(identity_grid(h, w).permute(2, 0, 1), hflip, vflip, rot).permute(1, 2, 0)
    return {
        "view1": photometric(image, rng, aug),
        "view2": photometric(view2_geo, rng, aug),
        "grid": grid.contiguous(),
        "geo": torch.tensor([hflip, vflip, rot], dtype=torch.int64),
    }


def warp(x: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Resample view-1 maps ``x`` (B, C, h, w) into view-2 layout with ``grid`` (B, H, W, 2).

    The grid is average-pooled to the resolution of ``x`` first (exact for the
    affine maps used here), so the same grid serves input and stride-4 maps.
    """
    gh, gw = grid.shape[1:3]
    h, w = x.shape[-2:]
    if (gh, gw) != (h, w):
        if gh % h or gw % w:
            raise ValueError(f"grid {gh}x{gw} is not an integer multiple of map {h}x{w}")
        grid = F.avg_pool2d(grid.permute(0, 3, 1, 2), (gh // h, gw // w)).permute(0, 2, 3, 1)
    return F.grid_sample(x, grid.to(x.dtype), mode=mode, padding_mode="border", align_corners=False)
