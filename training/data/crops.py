"""Crops and items shared by the shard and GeoTIFF sources.

A training item is a random crop of exactly the scheduled patch size ``S``:
every per-pixel array (RGB, SLIC, boundary, target, validity) is cut with the
same window, padded when the source is smaller (``data.small_tiles=pad``),
given the same random flip / quarter turn, and the image gets its two views
(``training.augmentations.make_views``).
"""
from __future__ import annotations

import numpy as np
import torch

from ..augmentations import apply_geometric, make_views, sample_geometric

NODATA_TRIES = 10


def choose_window(h: int, w: int, size: int, rng: np.random.Generator) -> tuple:
    """Random (row, col, height, width) of a size x size window; a side shorter than size is taken whole."""
    wh, ww = min(h, size), min(w, size)
    return int(rng.integers(0, h - wh + 1)), int(rng.integers(0, w - ww + 1)), wh, ww


def pad_to(arrays: dict, size: int) -> dict:
    """Mirror-pad every per-pixel array to size x size (labels get -1 in the padding, 'valid' False)."""
    out = {}
    for k, v in arrays.items():
        if not isinstance(v, np.ndarray):  # None, or what is not per pixel (the crop's window)
            out[k] = v
            continue
        h, w = v.shape[-2:]
        ph, pw = size - h, size - w
        if ph == 0 and pw == 0:
            out[k] = v
            continue
        spec = [(0, 0)] * (v.ndim - 2) + [(0, ph), (0, pw)]
        if k == "labels":
            out[k] = np.pad(v, spec, constant_values=-1)
        elif k == "valid":
            out[k] = np.pad(v, spec, constant_values=False)
        else:
            out[k] = np.pad(v, spec, mode="symmetric")
    return out


def finish_item(crop: dict, rng: np.random.Generator, aug, with_labels: bool, with_slic: bool) -> dict:
    """Joint random flip / quarter turn of every per-pixel array, then the two views of the image."""
    hflip, vflip, rot = sample_geometric(rng, aug, square=True)
    geo = lambda a: apply_geometric(torch.from_numpy(np.ascontiguousarray(a)), hflip, vflip, rot).contiguous()
    image = geo(crop["image"]).float().div_(255.0)
    out = make_views(image, rng, aug)
    out["image"] = image
    if crop.get("teacher") is not None:  # cached teacher targets of the crop's stride-4 cells
        out["teacher"] = geo(crop["teacher"])
    if with_slic:
        out["slic"] = geo(crop["slic"].astype(np.int32))
        out["slic_boundary"] = geo(crop["boundary"].astype(np.uint8))
    if with_labels:
        labels = crop["labels"] if crop.get("labels") is not None else np.full(crop["image"].shape[1:], -1, np.int64)
        out["labels"] = geo(labels.astype(np.int64))
    return out


def collate(items: list[dict]) -> dict:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def eligible_for_size(sizes: list[tuple[int, int]], size: int, policy: str, what: str) -> list[int]:
    """Indices of sources (height, width) that can give a size x size crop under ``data.small_tiles``."""
    if policy == "pad":
        return list(range(len(sizes)))
    ok = [i for i, (h, w) in enumerate(sizes) if h >= size and w >= size]
    if policy == "error" and len(ok) < len(sizes):
        small = [sizes[i] for i in range(len(sizes)) if i not in set(ok)]
        raise ValueError(f"{len(small)} {what} are smaller than the patch size {size} (e.g. {small[0][0]}x"
                         f"{small[0][1]}) and data.small_tiles=error; lower data.patch_sizes or set "
                         "data.small_tiles=skip|pad")
    if not ok:
        big = max(sizes, key=lambda s: min(s)) if sizes else (0, 0)
        raise ValueError(f"no {what} is at least {size}x{size} (largest: {big[0]}x{big[1]}), so patch size "
                         f"{size} cannot be served with data.small_tiles=skip; lower data.patch_sizes or set "
                         "data.small_tiles=pad")
    return ok


def least_nodata_crop(draw, tries: int, max_nodata: float, size: int) -> dict:
    """Draw up to ``tries`` crops with ``draw()``: the first with at most ``max_nodata`` nodata, else the
    one with the least; padded to ``size``."""
    best = None
    for _ in range(tries):
        crop = draw()
        bad = 1.0 - float(crop["valid"].mean())
        if best is None or bad < best[0]:
            best = (bad, crop)
        if bad <= max_nodata:
            break
    return pad_to(best[1], size)
