"""Clustering losses on soft assignments ``p`` (B, K, h, w): all non-negative."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def pixel_entropy(p: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean per-pixel entropy / log K (0 = confident). Pushed down."""
    k = p.shape[1]
    return -(p * (p + eps).log()).sum(1).mean() / math.log(k)


def marginal_entropy_gap(p: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(log K - H(mean assignment)) / log K (0 = all clusters used equally). Pushed down."""
    k = p.shape[1]
    m = p.float().mean(dim=(0, 2, 3))
    return (math.log(k) + (m * (m + eps).log()).sum()) / math.log(k)


def image_gradient_magnitude(img: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal and vertical colour differences of ``img`` pooled to ``size``."""
    small = F.adaptive_avg_pool2d(img.float(), size)
    gx = (small[..., :, 1:] - small[..., :, :-1]).abs().mean(1, keepdim=True)
    gy = (small[..., 1:, :] - small[..., :-1, :]).abs().mean(1, keepdim=True)
    return gx, gy


def edge_aware_tv(p: torch.Tensor, img: torch.Tensor, alpha: float = 10.0) -> torch.Tensor:
    """Total variation of assignments, down-weighted where the image has strong edges."""
    gx, gy = image_gradient_magnitude(img, p.shape[-2:])
    dx = (p[..., :, 1:] - p[..., :, :-1]).abs().sum(1, keepdim=True) / 2
    dy = (p[..., 1:, :] - p[..., :-1, :]).abs().sum(1, keepdim=True) / 2
    return (torch.exp(-alpha * gx) * dx).mean() + (torch.exp(-alpha * gy) * dy).mean()


def pseudo_label_ce(logits: torch.Tensor, target_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy against hard (detached) k-means pseudo-labels.

    With ``target_logits`` (the other view's logits in the same layout) the
    labels come from the other view: each view learns to predict the cluster its
    differently-augmented twin falls in (swapped prediction), which teaches
    invariance rather than mere sharpening.
    """
    source = logits if target_logits is None else target_logits
    return F.cross_entropy(logits.float(), source.detach().argmax(1))
