"""Soft k-means head: differentiable cluster assignments for any K in [2, max_k].

Centres are fitted on the (detached) embeddings of the batch with spherical
k-means (k-means++ seeding, a few Lloyd steps); assignments are a softmax over
cosine similarities divided by a temperature, differentiable w.r.t. the
embeddings.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

HARD_MAX_K = 16


def check_k(k: int, max_k: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool):
        raise ValueError(f"K must be an integer, got {k!r}")
    if not 2 <= k <= max_k:
        raise ValueError(f"K={k} is outside the supported range [2, {max_k}]")


@torch.no_grad()
def kmeans_fit(x: torch.Tensor, k: int, iters: int = 10, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Spherical k-means on rows of ``x`` (N, D). Returns L2-normalised centres (k, D)."""
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means needs at least K={k} samples, got {n}")
    x = F.normalize(x.float(), dim=1)
    dev = x.device
    first = torch.randint(n, (1,), generator=generator, device="cpu").item()
    centers = [x[first]]
    d2 = (2 - 2 * x @ centers[0]).clamp_min(0)
    for _ in range(1, k):  # k-means++ seeding on squared chordal distance
        total = d2.sum()
        if total <= 0:
            idx = torch.randint(n, (1,), generator=generator, device="cpu").item()
        else:
            probs = (d2 / total).cpu()
            idx = torch.multinomial(probs, 1, generator=generator).item()
        centers.append(x[idx])
        d2 = torch.minimum(d2, (2 - 2 * x @ x[idx]).clamp_min(0))
    c = torch.stack(centers)
    for _ in range(iters):
        assign = (x @ c.T).argmax(1)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        empty = counts == 0
        c = torch.where(empty[:, None], c, F.normalize(sums, dim=1))
    return F.normalize(c, dim=1).to(dev)


@torch.no_grad()
def kmeans_best_of(x: torch.Tensor, k: int, iters: int = 20, n_init: int = 3,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Best of ``n_init`` k-means runs by total cosine similarity (less dependence on the seeding)."""
    xn = F.normalize(x.float(), dim=1)
    best, best_score = None, -float("inf")
    for _ in range(n_init):
        c = kmeans_fit(xn, k, iters, generator)
        score = float((xn @ c.T).max(1).values.sum())
        if score > best_score:
            best, best_score = c, score
    return best


class SoftKMeansHead(nn.Module):
    def __init__(self, max_k: int = 16, temperature: float = 0.8, iters: int = 10, sample: int = 4096):
        super().__init__()
        if not 2 <= max_k <= HARD_MAX_K:
            raise ValueError(f"max_k={max_k} must be in [2, {HARD_MAX_K}]")
        self.max_k, self.temperature, self.iters, self.sample = max_k, temperature, iters, sample

    def fit(self, embeddings: list[torch.Tensor], k: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Fit centres on a pixel sample drawn from one or more (B, D, h, w) embedding maps."""
        check_k(k, self.max_k)
        flat = torch.cat([e.detach().permute(0, 2, 3, 1).reshape(-1, e.shape[1]) for e in embeddings])
        if flat.shape[0] > self.sample:
            idx = torch.randperm(flat.shape[0], generator=generator)[: self.sample].to(flat.device)
            flat = flat[idx]
        return kmeans_fit(flat, k, self.iters, generator)

    def assign(self, emb: torch.Tensor, centers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft assignments (B, K, h, w) and their logits for L2-normalised embeddings."""
        logits = torch.einsum("bdhw,kd->bkhw", emb.float(), centers.float()) / self.temperature
        return logits.softmax(dim=1), logits

    def forward(self, emb: torch.Tensor, k: int, generator: Optional[torch.Generator] = None):
        centers = self.fit([emb], k, generator)
        probs, logits = self.assign(emb, centers)
        return probs, logits, centers
