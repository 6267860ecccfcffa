"""Two-view consistency: symmetric KL between view-2 probabilities and warped view-1 ones."""
from __future__ import annotations

import torch

from ..augmentations import warp


def symmetric_kl(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Mean over pixels of KL(p||q) + KL(q||p) for (B, K, h, w) distributions."""
    p, q = p.float().clamp_min(eps), q.float().clamp_min(eps)
    return ((p - q) * (p.log() - q.log())).sum(1).mean()


def two_view_consistency(p1: torch.Tensor, p2: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``p1`` in view-1 layout, ``p2`` in view-2 layout, ``grid`` maps view-2 pixels into view 1."""
    return symmetric_kl(warp(p1, grid), p2)
