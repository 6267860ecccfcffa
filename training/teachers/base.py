"""The teacher interface: a frozen network that turns an RGB batch into dense features.

Every teacher takes a (B, 3, H, W) float batch in [0, 1] on the training
device and returns ``TeacherFeatures``: a float32 (B, C, h, w) feature map and
its stride in input pixels (``H / h``). Teachers are frozen (no parameter
requires a gradient), stay in eval mode whatever ``.train()`` is called with,
and run under ``torch.no_grad``. Each one describes itself (``describe()``) so
the run's config and the exported ``meta.json`` record exactly which teacher,
weights and preprocessing were used.

A teacher that cannot load raises ``TeacherLoadError`` with a message that
says how to supply it; nothing is ever substituted silently.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Per teacher.patch_mode: the teacher's output stride relative to the student's stride-4 grid.
PATCH_MODE_FACTORS = {"match": 1, "high": 2, "medium": 4, "low": 8}


class TeacherLoadError(RuntimeError):
    """A teacher cannot be built (missing weights, wrong file, missing library); the message says what to do."""


@dataclass
class TeacherFeatures:
    features: torch.Tensor   # (B, C, h, w) float32, detached
    stride: float            # input pixels per feature cell (H / h)


def check_patch_mode(patch_mode: str) -> int:
    if patch_mode not in PATCH_MODE_FACTORS:
        raise ValueError(f"teacher.patch_mode {patch_mode!r} is not one of {', '.join(PATCH_MODE_FACTORS)}")
    return PATCH_MODE_FACTORS[patch_mode]


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


class Teacher(nn.Module):
    """Base class: frozen, always in eval mode, ``forward`` under ``torch.no_grad``.

    Subclasses set ``name``, ``variant``, ``feature_dim``, ``nominal_stride``,
    ``patch_mode`` and implement ``_features(x) -> (B, C, h, w)`` and
    ``weights_source() -> dict``.
    """

    name = "teacher"
    variant = ""
    feature_dim = 0
    nominal_stride = 4
    patch_mode = "match"
    normalisation: dict = {}

    def freeze(self) -> "Teacher":
        for p in self.parameters():
            p.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> "Teacher":
        # A teacher is never trained: batch-norm statistics and dropout stay in inference mode.
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> TeacherFeatures:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"teacher {self.name}: expected an RGB batch (B, 3, H, W), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"teacher {self.name}: expected float images in [0, 1], got {images.dtype}")
        feats = self._features(images.detach().float()).float()
        return TeacherFeatures(feats, images.shape[-2] / feats.shape[-2])

    def _features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def weights_source(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict:
        """What the run's config and the exported meta.json record about this teacher."""
        return {
            "name": self.name,
            "variant": self.variant,
            "patch_mode": self.patch_mode,
            "feature_dim": int(self.feature_dim),
            "stride": self.nominal_stride,
            "input_normalisation": dict(self.normalisation),
            "weights": self.weights_source(),
        }


__all__ = ["Teacher", "TeacherFeatures", "TeacherLoadError", "PATCH_MODE_FACTORS", "IMAGENET_MEAN",
           "IMAGENET_STD", "check_patch_mode", "sha256_file"]
