"""Teacher -> student distillation: feature cosine and pairwise-affinity matching (all non-negative).

Layout: the trainer embeds ``cat([view1, view2])`` of ``n`` images, giving
student embeddings ``emb`` (2n, D, h, w) on the stride-4 grid. The teacher
sees each clean image once (``batch['image']``, view-1 geometry);
``teacher_targets`` resizes its features to the student grid and warps a copy
into view-2 layout with the batch's exact view grid, so target ``i`` lines up
pixel for pixel with ``emb[i]``.

* Feature distillation: ``1 - cos(head(emb), target)`` averaged over cells,
  where ``models.distill_head.DistillHead`` is a learned 1x1-conv projection of the student
  embedding into the teacher's feature space (training only, never exported).
* Affinity distillation: the same sampled pixel pairs (i, j) of the same image
  on both sides; the student's cosine ``<e_i, e_j>`` (of its unit embeddings,
  the space the clustering head works in) is matched to the teacher's cosine
  of per-image mean-centred features, by squared error. Centring removes the
  component every teacher pixel shares (ReLU features are all positive, so raw
  cosines crowd near 1), keeping the contrast between pairs. Half of the
  pairs are local (within ``local_radius`` cells), half anywhere in the image.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..augmentations import warp
from ..models.distill_head import DistillHead


def resize_to(feats: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a (B, C, h, w) map: area-average when shrinking by whole factors, bilinear otherwise."""
    h, w = feats.shape[-2:]
    if (h, w) == tuple(size):
        return feats
    if h >= size[0] and w >= size[1] and h % size[0] == 0 and w % size[1] == 0:
        return F.adaptive_avg_pool2d(feats, size)
    return F.interpolate(feats, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def teacher_targets(teacher, batch: dict, size: tuple[int, int], device) -> torch.Tensor:
    """Teacher features (2n, C, h, w) in the layout of ``cat([view1, view2])``, on the student grid ``size``.

    The teacher runs once on the clean images (``batch['image']``, or ``view1``
    when absent), unless the batch carries cached targets (``batch['teacher']``,
    ``training.data.teacher_cache``); the view-2 half is the view-1 half warped
    with ``batch['grid']``.
    """
    if "teacher" in batch:
        feats = batch["teacher"].to(device).float()
    else:
        images = batch["image"] if "image" in batch else batch["view1"]
        feats = teacher(images.to(device)).features
    feats = resize_to(feats, size)
    grid = batch["grid"].to(device)
    return torch.cat([feats, warp(feats, grid)])


def feature_distill_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Mean over cells of ``1 - cos(pred, target)`` (in [0, 2]); ``target`` is resized to ``pred``'s grid."""
    target = resize_to(target.detach().float(), pred.shape[-2:])
    if pred.shape[:2] != target.shape[:2]:
        raise ValueError(f"prediction {tuple(pred.shape)} and teacher features {tuple(target.shape)} differ in "
                         "batch or channels (DistillHead's teacher_dim must equal the teacher's feature_dim)")
    cos = F.cosine_similarity(pred.float(), target, dim=1, eps=eps)
    return (1.0 - cos).mean()


def sample_pairs(b: int, h: int, w: int, n_pairs: int, generator: Optional[torch.Generator] = None,
                 local_fraction: float = 0.5, local_radius: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image index, flat index i, flat index j) of ``n_pairs`` pixel pairs, both pixels in the same image.

    ``local_fraction`` of the pairs have j within ``local_radius`` cells of i (clamped to the image);
    the others are uniform. Drawn on the CPU from ``generator``.
    """
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be >= 1, got {n_pairs}")
    bi = torch.randint(b, (n_pairs,), generator=generator)
    y1 = torch.randint(h, (n_pairs,), generator=generator)
    x1 = torch.randint(w, (n_pairs,), generator=generator)
    y2 = torch.randint(h, (n_pairs,), generator=generator)
    x2 = torch.randint(w, (n_pairs,), generator=generator)
    n_local = int(round(n_pairs * local_fraction))
    if n_local and local_radius > 0:
        r = int(local_radius)
        dy = torch.randint(-r, r + 1, (n_local,), generator=generator)
        dx = torch.randint(-r, r + 1, (n_local,), generator=generator)
        y2[:n_local] = (y1[:n_local] + dy).clamp(0, h - 1)
        x2[:n_local] = (x1[:n_local] + dx).clamp(0, w - 1)
    return bi, y1 * w + x1, y2 * w + x2


def pair_cosines(feats: torch.Tensor, pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                 center: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """Cosine similarity of each pair's two feature vectors; ``center`` subtracts each image's mean first."""
    b, c, h, w = feats.shape
    flat = feats.float().reshape(b, c, h * w)
    if center:
        flat = flat - flat.mean(dim=2, keepdim=True)
    flat = F.normalize(flat, dim=1, eps=eps)
    bi, i, j = (t.to(feats.device) for t in pairs)
    return (flat[bi, :, i] * flat[bi, :, j]).sum(1)


def affinity_distill_loss(student: torch.Tensor, teacher: torch.Tensor, n_pairs: int = 4096,
                          generator: Optional[torch.Generator] = None, pairs=None, center_teacher: bool = True,
                          local_fraction: float = 0.5, local_radius: int = 4) -> torch.Tensor:
    """Mean squared difference of student and teacher pairwise cosines over the same pixel pairs (in [0, 4]).

    ``student`` (B, D, h, w); ``teacher`` (B, C, h', w'), resized to the student grid. Pairs are drawn
    with ``sample_pairs`` unless given.
    """
    teacher = resize_to(teacher.detach().float(), student.shape[-2:])
    if teacher.shape[0] != student.shape[0]:
        raise ValueError(f"student batch {student.shape[0]} != teacher batch {teacher.shape[0]}")
    b, _, h, w = student.shape
    if pairs is None:
        pairs = sample_pairs(b, h, w, n_pairs, generator, local_fraction, local_radius)
    s = pair_cosines(student, pairs)
    t = pair_cosines(teacher, pairs, center=center_teacher)
    return (s - t).pow(2).mean()


def distill_losses(emb: torch.Tensor, targets: torch.Tensor, head: Optional[DistillHead], n_pairs: int = 4096,
                   generator: Optional[torch.Generator] = None, feature: bool = True,
                   affinity: bool = True) -> dict:
    """{'distill_feature', 'distill_affinity'} (only those asked for) for student ``emb`` (2n, D, h, w) and
    ``targets`` from ``teacher_targets``."""
    out = {}
    if feature:
        if head is None:
            raise ValueError("feature distillation needs a DistillHead")
        out["distill_feature"] = feature_distill_loss(head(emb), targets)
    if affinity:
        out["distill_affinity"] = affinity_distill_loss(emb, targets, n_pairs, generator)
    return out


__all__ = ["resize_to", "teacher_targets", "feature_distill_loss", "sample_pairs", "pair_cosines",
           "affinity_distill_loss", "distill_losses"]
