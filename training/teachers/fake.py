"""A deterministic random teacher for tests (``teacher.name=fake``), used only when asked for by name.

A small fixed convolutional network whose weights are drawn from a seeded
generator: the same seed gives the same features on every machine. It has no
knowledge of images, so it is never a stand-in for a real teacher; runs that
use it record ``name: fake`` in their config and exported metadata.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import IMAGENET_MEAN, IMAGENET_STD, Teacher, check_patch_mode


class FakeTeacher(Teacher):
    name = "fake"
    variant = "random-conv"
    normalisation = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "resize": "none"}

    def __init__(self, dim: int = 64, patch_mode: str = "match", seed: int = 0):
        super().__init__()
        factor = check_patch_mode(patch_mode)
        self.patch_mode, self.seed = patch_mode, int(seed)
        self.feature_dim = int(dim)
        self.nominal_stride = 4 * factor
        n_down = 2 + factor.bit_length() - 1  # stride 4 * factor = 2 ** n_down
        gen = torch.Generator().manual_seed(self.seed)
        widths = [3] + [min(dim, 16 * 2 ** i) for i in range(n_down)]
        self.convs = nn.ModuleList()
        for cin, cout in zip(widths[:-1], widths[1:]):
            conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (2.0 / (9 * cin)) ** 0.5)
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen) * 0.1)
            self.convs.append(conv)
        self.head = nn.Conv2d(widths[-1], dim, 1)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=gen) / widths[-1] ** 0.5)
            self.head.bias.zero_()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        for conv in self.convs:
            x = F.relu(conv(x))
        return self.head(x)

    def weights_source(self) -> dict:
        return {"kind": "random_init", "seed": self.seed, "note": "fake teacher for tests, asked for by name"}


__all__ = ["FakeTeacher"]
