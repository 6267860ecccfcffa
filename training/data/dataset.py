"""Two augmented views per sample, deterministic from (seed, key).

``TwoViewDataset`` wraps any source whose ``source[key]`` returns a dict with an
``image`` (3, H, W) float32 array in [0, 1] and optionally ``labels`` (H, W),
``slic`` (S, H, W) or other per-pixel arrays. It returns the views, the
view-2 -> view-1 sampling grid, and the clean image with its per-pixel extras.
"""
from __future__ import annotations

import numpy as np
import torch

from ..augmentations import make_views


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


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields, for every training step from ``start_step``, one batch of keys per patch size.

    A key is ``(step, micro, scale_index, rank, j, size)``: unique across steps,
    gradient-accumulation micro-steps, scales, DDP ranks and batch slots, so
    every rank sees different samples and a resumed run sees exactly the
    samples an uninterrupted one would.
    """

    def __init__(self, start_step: int, steps: int, sizes_and_batches: list[tuple[int, int]],
                 grad_accum: int = 1, rank: int = 0):
        self.start_step, self.steps = start_step, steps
        self.sizes_and_batches, self.grad_accum, self.rank = sizes_and_batches, grad_accum, rank

    def __iter__(self):
        for step in range(self.start_step, self.steps):
            for micro in range(self.grad_accum):
                for si, (size, n) in enumerate(self.sizes_and_batches):
                    yield [(step, micro, si, self.rank, j, size) for j in range(n)]

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step) * self.grad_accum * len(self.sizes_and_batches)
