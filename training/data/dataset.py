"""Two augmented views per sample, deterministic from (seed, key); batches of them by schedule key.

``TwoViewDataset`` wraps any source whose ``source[key]`` returns a dict with an
``image`` (3, H, W) float32 array in [0, 1] and optionally ``labels`` (H, W),
``slic`` (S, H, W) or other per-pixel arrays. It returns the views, the
view-2 -> view-1 sampling grid, and the clean image with its per-pixel extras.
"""
from __future__ import annotations

import numpy as np
import torch

from ..augmentations import make_views
from .schedule import BatchKey


class TwoViewDataset(torch.utils.data.Dataset):
    def __init__(self, source, aug, seed: int = 0):
        self.source, self.aug, self.seed = source, aug, seed

    def __getitem__(self, key) -> dict:
        item = self.source[key]
        image = torch.as_tensor(np.ascontiguousarray(item["image"]), dtype=torch.float32)
        rng = np.random.default_rng([self.seed, 0xA06, *[int(k) for k in key]])
        out = make_views(image, rng, self.aug)
        out["image"] = image
        for name, value in item.items():
            if name != "image":
                out[name] = torch.as_tensor(np.ascontiguousarray(value))
        return out


class TwoViewBatches(torch.utils.data.Dataset):
    """``ds[key]``: the batch of schedule key ``key`` (a ``BatchKey``), one two-view item per slot, each seeded
    by its slot key ``(step, micro, scale, rank, j, size)`` (``BatchKey.slots``)."""

    def __init__(self, source, aug, seed: int = 0):
        self.items = TwoViewDataset(source, aug, seed)

    def __getitem__(self, key: BatchKey) -> dict:
        return torch.utils.data.default_collate([self.items[slot] for slot in key.slots()])
