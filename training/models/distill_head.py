"""The distillation head: a learned projection of student embeddings into the teacher's feature space.

Trained with the student (``losses.distill.feature_distill_loss``) and never
exported: the runtime artifact holds the student alone.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class DistillHead(nn.Module):
    """Learned projection of student embeddings (B, D, h, w) into the teacher's space (B, T, h, w)."""

    def __init__(self, embed_dim: int, proj_dim: int, teacher_dim: int):
        super().__init__()
        self.embed_dim, self.proj_dim, self.teacher_dim = embed_dim, proj_dim, teacher_dim
        self.net = nn.Sequential(nn.Conv2d(embed_dim, proj_dim, 1), nn.GELU(), nn.Conv2d(proj_dim, teacher_dim, 1))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.net(emb)
