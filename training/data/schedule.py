"""The one batch schedule: which batch the trainer takes at every (step, micro-step, patch size).

Every source follows it (torchgeo's split: a sampler yields index objects, a
dataset only resolves them). ``StepSchedule`` yields a ``BatchKey`` for each
batch of the trainer's loop, in the order the loop consumes them: for every
step from ``start_step``, for every gradient-accumulation micro-step, one
batch per entry of ``data.patch_sizes``. A dataset's ``ds[key]`` builds that
batch as a pure function of the seed and the key, so

* a run resumed at ``start_step`` sees exactly the batches of the
  uninterrupted run, whatever ``data.num_workers`` is (DataLoader workers only
  build batches);
* DDP ranks draw different samples (the rank is part of every key).

Sources that draw items from a finite list (shards, rasters) walk it in epochs
with ``EpochDraws``: the k-th draw of a rank's stream at one scale is position
``k % n`` of epoch ``k // n``'s seeded permutation, and batch ``key`` takes
draws ``key.first_draw .. key.first_draw + key.n - 1``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import numpy as np
import torch

from ..config import batches_per_scale


class BatchKey(NamedTuple):
    """One batch of the schedule."""
    step: int
    micro: int          # gradient-accumulation micro-step
    scale: int          # index into data.patch_sizes
    size: int           # patch side in pixels
    n: int              # images in the batch
    rank: int           # DDP rank
    first_draw: int     # position of slot 0 in this rank's stream of draws at this scale

    def slots(self) -> list[tuple[int, ...]]:
        """Per-image keys ``(step, micro, scale, rank, j, size)``: unique across steps, micro-steps, scales,
        ranks and batch slots (the synthetic source seeds each image with one)."""
        return [(self.step, self.micro, self.scale, self.rank, j, self.size) for j in range(self.n)]

    def item_rng(self, seed: int, kind: int, j: int) -> np.random.Generator:
        """The random stream of slot ``j`` (crop position, flips, views); ``kind`` tells sources apart."""
        return np.random.default_rng([seed, kind, self.rank, self.step, self.micro, self.scale, j])


class StepSchedule(torch.utils.data.Sampler):
    """``BatchKey`` of every batch of the trainer's loop from ``start_step`` to ``steps`` (see module doc)."""

    def __init__(self, sizes_and_batches: list[tuple[int, int]], grad_accum: int, rank: int = 0,
                 start_step: int = 0, steps: int = 0):
        self.sizes_and_batches, self.grad_accum, self.rank = list(sizes_and_batches), int(grad_accum), int(rank)
        self.start_step, self.steps = int(start_step), int(steps)

    @classmethod
    def from_config(cls, cfg, rank: int = 0, start_step: int = 0) -> "StepSchedule":
        return cls(batches_per_scale(cfg), cfg.train.grad_accum, rank, start_step, cfg.train.steps)

    def key(self, step: int, micro: int, scale: int) -> BatchKey:
        size, n = self.sizes_and_batches[scale]
        return BatchKey(step, micro, scale, size, n, self.rank, (step * self.grad_accum + micro) * n)

    def __iter__(self):
        for step in range(self.start_step, self.steps):
            for micro in range(self.grad_accum):
                for scale in range(len(self.sizes_and_batches)):
                    yield self.key(step, micro, scale)

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step) * self.grad_accum * len(self.sizes_and_batches)


class EpochDraws:
    """The k-th draw of a stream over n items: epoch k // n, position k % n of that epoch's permutation."""

    def __init__(self, n: int, seed: int, *tags: int):
        self.n, self.seed, self.tags = n, seed, tags
        self._perms: OrderedDict = OrderedDict()

    def __getitem__(self, k: int) -> int:
        epoch, pos = divmod(int(k), self.n)
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, 0xE90C, *self.tags, epoch]).permutation(self.n)
            self._perms[epoch] = perm
            if len(self._perms) > 4:
                self._perms.popitem(last=False)
        return int(perm[pos])


def step_loader(dataset, cfg, rank: int, start_step: int) -> torch.utils.data.DataLoader:
    """DataLoader over ``dataset[BatchKey]`` in schedule order from ``start_step``, with the data.* knobs."""
    kw = {}
    if cfg.data.num_workers > 0:
        kw = {"prefetch_factor": cfg.data.prefetch_factor, "persistent_workers": cfg.data.persistent_workers}
    return torch.utils.data.DataLoader(dataset, sampler=StepSchedule.from_config(cfg, rank, start_step),
                                       batch_size=None, num_workers=cfg.data.num_workers,
                                       pin_memory=cfg.data.pin_memory, **kw)
