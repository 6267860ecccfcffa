"""Reconstruction of a blurred stride-4 RGB from the student's features (training only)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0:
        return img
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=img.dtype, device=img.device)
    k = torch.exp(-(x * x) / (2 * sigma * sigma))
    k = k / k.sum()
    c = img.shape[1]
    img = F.pad(img, (radius, radius, radius, radius), mode="reflect")
    img = F.conv2d(img, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(img, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def sobel_magnitude(img: torch.Tensor) -> torch.Tensor:
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=img.device, dtype=img.dtype) / 8
    c = img.shape[1]
    pad = F.pad(img, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(pad, kx.view(1, 1, 3, 3).expand(c, 1, 3, 3), groups=c)
    gy = F.conv2d(pad, kx.t().contiguous().view(1, 1, 3, 3).expand(c, 1, 3, 3), groups=c)
    return torch.sqrt(gx * gx + gy * gy + 1e-8)


def recon_target(img: torch.Tensor, sigma: float, stride: int = 4) -> torch.Tensor:
    return F.avg_pool2d(gaussian_blur(img.float(), sigma), stride)


def recon_loss(pred: torch.Tensor, img: torch.Tensor, sigma: float = 2.0, grad_weight: float = 0.5) -> torch.Tensor:
    """L1 on the blurred stride-4 RGB + ``grad_weight`` x L1 on its Sobel gradient magnitude."""
    target = recon_target(img, sigma, img.shape[-1] // pred.shape[-1])
    pred = pred.float()
    return F.l1_loss(pred, target) + grad_weight * F.l1_loss(sobel_magnitude(pred), sobel_magnitude(target))
