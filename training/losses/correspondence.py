"""Correspondence distillation (STEGO, Hamilton et al. 2022): the student's feature correlations follow the
teacher's, with a shift that pushes dissimilar pairs apart.

For two images a and b of a batch, ``n_points`` random cells of each give a
(P x P) table of teacher correlations ``F`` (cosines of the teacher's
features, centred per row as STEGO's "pointwise" option) and of student
correlations ``S`` (cosines of the student's unit embeddings). The loss

    L(a, b) = -mean( max(S, 0) * (F - shift) )

raises the student's correlation where the teacher's exceeds ``shift`` and
lowers it to 0 where the teacher's falls below. Three kinds of pairs, each
with its own shift and weight:

* self: an image with itself (within-image structure);
* nearest neighbour: with the batch image whose global teacher descriptor
  (mean of its unit features) is closest (what the same kind of scene shares);
* random: with another image chosen at random (mostly negatives: the largest
  shift).

Unlike ``distill.affinity_distill_loss``, which regresses cosines of pairs
within one image, this only asks for the sign of each pair relative to the
shift and links pixels across images. The centred teacher correlations lie in
[-2, 2], so ``L + (2 - shift)`` is returned, which lies in [0, 4] (the
scale-neutral merge needs positive totals); the constant changes no gradient.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def sample_cells(b: int, h: int, w: int, n_points: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(b, n_points) flat indices of random cells of each image (drawn on the CPU)."""
    return torch.randint(h * w, (b, n_points), generator=generator)


def _points(maps: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(B, P, C) unit vectors of ``maps`` (B, C, h, w) at flat cell indices ``idx`` (B, P)."""
    b, c = maps.shape[:2]
    flat = maps.float().reshape(b, c, -1)
    picked = torch.gather(flat, 2, idx.to(maps.device)[:, None, :].expand(b, c, idx.shape[1]))
    return F.normalize(picked.transpose(1, 2), dim=2, eps=1e-6)


def correspondence_term(s_a: torch.Tensor, s_b: torch.Tensor, t_a: torch.Tensor, t_b: torch.Tensor,
                        shift: float) -> torch.Tensor:
    """``L + (2 - shift)`` (see module doc) of point sets: student (B, P, D), teacher (B, P, C), unit vectors."""
    fd = torch.einsum("bpc,bqc->bpq", t_a, t_b)
    fd = fd - fd.mean(dim=2, keepdim=True)
    sd = torch.einsum("bpd,bqd->bpq", s_a, s_b)
    return -(sd.clamp(min=0) * (fd - shift)).mean() + (2.0 - shift)


def nearest_neighbours(teacher: torch.Tensor, group: int) -> torch.Tensor:
    """For each image of ``teacher`` (B, C, h, w), the index of the closest other image by global descriptor
    (mean of its unit features); images with the same index modulo ``group`` (two views of one image) are not
    each other's neighbours."""
    desc = F.normalize(F.normalize(teacher.float(), dim=1).mean(dim=(2, 3)), dim=1)
    sim = desc @ desc.T
    b = sim.shape[0]
    ids = torch.arange(b, device=sim.device) % group
    sim = sim.masked_fill(ids[:, None] == ids[None, :], -2.0)
    return sim.argmax(dim=1)


def random_partners(b: int, group: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A random other image for each of ``b`` (never one with the same index modulo ``group``)."""
    n = min(group, b)
    if n < 2:
        raise ValueError("random correspondence pairs need at least two images in a batch")
    offset = torch.randint(1, n, (b,), generator=generator)
    return (torch.arange(b) % n + offset) % n + (torch.arange(b) // n) * n


def correspondence_losses(emb: torch.Tensor, teacher: torch.Tensor, group: int, n_points: int, shifts: dict,
                          generator: Optional[torch.Generator] = None) -> dict:
    """{'corr_self', 'corr_knn', 'corr_random'} for the kinds in ``shifts`` (kind -> shift), of student ``emb``
    (B, D, h, w) and ``teacher`` targets on the same grid (B, C, h, w); ``group`` images per view (the batch is
    cat(view1, view2) of ``group`` images, so image i and i + group are one image)."""
    if teacher.shape[-2:] != emb.shape[-2:] or teacher.shape[0] != emb.shape[0]:
        raise ValueError(f"student {tuple(emb.shape)} and teacher {tuple(teacher.shape)} must share batch and grid")
    b, _, h, w = emb.shape
    idx = sample_cells(b, h, w, n_points, generator)
    s, t = _points(emb, idx), _points(teacher.detach(), idx)
    out = {}
    if "self" in shifts:
        out["corr_self"] = correspondence_term(s, s, t, t, shifts["self"])
    if ("knn" in shifts or "random" in shifts) and group < 2:
        raise ValueError("pairs of different images need at least 2 images per view in the batch")
    if "knn" in shifts:
        j = nearest_neighbours(teacher.detach(), group).cpu()
        out["corr_knn"] = correspondence_term(s, s[j], t, t[j], shifts["knn"])
    if "random" in shifts:
        j = random_partners(b, group, generator)
        out["corr_random"] = correspondence_term(s, s[j], t, t[j], shifts["random"])
    return out
