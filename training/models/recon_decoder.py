"""Training-only reconstruction decoder: stride-4 features -> stride-4 RGB.

It regularises the student (features must keep enough image content to
reconstruct a blurred, downsampled RGB) and is never exported: the trainer saves
it separately as ``decoder_training_only.pt``.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class TinyReconDecoder(nn.Module):
    def __init__(self, in_channels: int = 96, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 3, 1),
        )

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(feats))
