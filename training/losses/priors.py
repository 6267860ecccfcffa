"""SLIC superpixel priors on soft assignments ``p`` (B, K, h, w) at stride 4 (all in [0, 1]).

Inputs come from the shards: ``slic`` (B, 3, S, S) superpixel ids at the
fine / medium / coarse scales, ``slic_boundary`` (B, S, S) the medium-scale
boundary mask, and the clean ``image`` (B, 3, S, S) in [0, 1], all in the
frame of ``p`` (``S = 4 h``). A stride-4 cell belongs to the superpixel under
its centre pixel; it is *pure* when all its 16 pixels share that superpixel.

* ``within``: cells should agree with their superpixel, relative to how much
  the image varies at all: ``(mean_c [1 - cos(p_c, m_A)] + eps) /
  (mean_c [1 - cos(p_c, m_img)] + eps)`` over pure cells, ``m_A`` the mean
  assignment of superpixel A, ``m_img`` that of the image, ``eps`` = 0.01.
  About 0 when the assignments change only between superpixels, 1 when they
  vary as much inside superpixels as across the image, and 1 for a constant
  map. The bare deviation ``1 - cos(p_c, m_A)`` is smallest for a constant
  map: it rewarded the untrained student's near-constant output and rose as
  soon as the clustering terms made the assignments vary (measured on
  dubai_dev: 0.019 untrained, 0.082 trained, while the ratio went 0.32 ->
  0.30); as a share it cannot be lowered by collapsing.
* ``boundary``: assignments should change across strong superpixel
  boundaries. Mean over 4-neighbour cell pairs lying in different superpixels
  of ``w * cos(p_a, p_b)``, ``w`` the strength of the boundary between them:
  the image gradient on the SLIC boundary pixels of the two cells (Sobel on
  the clean image, masked by ``slic_boundary``, max over the cells).
* ``antimerge``: adjacent superpixels of clearly different colour should not
  merge. Mean over adjacent superpixel pairs (A, B) of ``w * cos(m_A, m_B)``,
  ``w`` their mean-colour contrast; pairs sharing a longer border count more.

All three compare assignment vectors by their cosine, not their dot product.
A dot product ``<p_a, p_b>`` is the chance that both cells draw the same
cluster, and it *grows* as the clustering terms sharpen the assignments (two
uniform vectors give 1/K, two equal one-hot vectors 1): with it the priors
rose during training and rewarded diffuse, undecided assignments. The cosine
is 1 for any two equal vectors and 0 for disjoint ones whatever their
sharpness, so the priors only measure *agreement* and fall as the student
learns to respect the superpixels (measured on dubai_dev, see docs/teachers.md).

Strengths map to weights ``w = 1 - exp(-(d / sigma)^2)`` in [0, 1] (``d`` an
RGB distance in [0, 1] units; ``sigma = 0.1`` by default): weak boundaries and
low-contrast neighbours cost (almost) nothing, and every term stays in [0, 1].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..augmentations import warp
from .recon import sobel_magnitude

SCALE_INDEX = {"fine": 0, "medium": 1, "coarse": 2}
TERMS = ("boundary", "antimerge", "within")
WITHIN_EPS = 0.01  # see within_loss: a collapsed (constant) assignment map scores 1, the worst


def contrast_weight(d: torch.Tensor, sigma: float) -> torch.Tensor:
    return 1.0 - torch.exp(-(d / sigma) ** 2)


def cell_ids(ids: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Superpixel id under each cell's centre pixel (B, h, w) long, and whether the cell is pure (bool)."""
    f = ids.float().unsqueeze(1)
    hi = F.max_pool2d(f, stride)
    lo = -F.max_pool2d(-f, stride)
    c = stride // 2
    centre = ids[:, c::stride, c::stride][:, : hi.shape[-2], : hi.shape[-1]].long()
    return centre, (hi == lo).squeeze(1)


def _global_ids(ids: torch.Tensor, m: int | None = None) -> tuple[torch.Tensor, int]:
    """Make ids unique across the batch: id + b * M (M = max id + 1 unless given); returns (ids, B * M)."""
    m = int(ids.max()) + 1 if m is None else m
    offs = torch.arange(ids.shape[0], device=ids.device).view(-1, *([1] * (ids.ndim - 1))) * m
    return ids.long() + offs, ids.shape[0] * m


def segment_means(values: torch.Tensor, ids: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-id means (n, C) of (B, C, h, w) ``values`` grouped by global ``ids`` (B, h, w), and counts (n,)."""
    c = values.shape[1]
    flat = values.permute(0, 2, 3, 1).reshape(-1, c)
    idx = ids.reshape(-1)
    sums = torch.zeros(n, c, device=values.device, dtype=flat.dtype).index_add(0, idx, flat)
    counts = torch.bincount(idx, minlength=n).to(flat.dtype)
    return sums / counts.clamp_min(1).unsqueeze(1), counts


def _check(p: torch.Tensor, ids: torch.Tensor) -> int:
    h, w = p.shape[-2:]
    if ids.shape[-2] % h or ids.shape[-1] % w or ids.shape[-2] // h != ids.shape[-1] // w:
        raise ValueError(f"superpixels {tuple(ids.shape[-2:])} are not an integer multiple of the "
                         f"assignment grid {(h, w)}")
    if ids.shape[0] != p.shape[0]:
        raise ValueError(f"superpixels for {ids.shape[0]} images, assignments for {p.shape[0]}")
    return ids.shape[-2] // h


def _cos(a: torch.Tensor, b: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Cosine of assignment vectors along ``dim`` (probabilities: never both zero, still guarded)."""
    return (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim)).clamp_min(1e-8)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is 1; with an empty mask 0, still attached to ``p``'s graph."""
    return (values * mask).sum() / mask.sum().clamp_min(1e-12) + 0.0 * p.sum()


def within_deviation(p: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per cell (B, h, w): ``1 - cos(p_c, m_A)`` (its superpixel's mean), ``1 - cos(p_c, m_img)`` (its
    image's mean), and the pure-cell mask (float)."""
    stride = _check(p, ids)
    centre, pure = cell_ids(ids, stride)
    gids, n = _global_ids(centre)
    p = p.float()
    means, _ = segment_means(p, gids, n)
    k = p.shape[1]
    inside = 1.0 - _cos(p, means[gids].reshape(*centre.shape, k).permute(0, 3, 1, 2))
    overall = 1.0 - _cos(p, p.mean(dim=(2, 3), keepdim=True).expand_as(p))
    return inside, overall, pure.to(p.dtype)


def within_loss(p: torch.Tensor, ids: torch.Tensor, eps: float = WITHIN_EPS) -> torch.Tensor:
    """``(mean_c [1 - cos(p_c, m_A)] + eps) / (mean_c [1 - cos(p_c, m_img)] + eps)`` over pure cells: the
    share of an image's assignment variation that lies inside superpixels. ``ids`` (B, S, S) one scale."""
    inside, overall, pure = within_deviation(p, ids)
    n = pure.sum()
    if float(n) == 0:
        return 0.0 * p.sum()
    return ((inside * pure).sum() / n + eps) / ((overall * pure).sum() / n + eps)


def _neighbour_pairs(x: torch.Tensor):
    """(right-neighbour pair, lower-neighbour pair) views of a (..., h, w) map."""
    return (x[..., :, :-1], x[..., :, 1:]), (x[..., :-1, :], x[..., 1:, :])


def boundary_edge_strength(boundary: torch.Tensor, image: torch.Tensor, stride: int) -> torch.Tensor:
    """(B, h, w): the strongest image step (RGB, about the step height) on the cell's SLIC boundary pixels."""
    grad = 2.0 * sobel_magnitude(image.float()).mean(1)  # a step of height d gives about d
    on_boundary = grad * (boundary > 0).to(grad.dtype)
    return F.max_pool2d(on_boundary.unsqueeze(1), stride).squeeze(1)


def boundary_loss(p: torch.Tensor, ids: torch.Tensor, boundary: torch.Tensor, image: torch.Tensor,
                  sigma: float = 0.1) -> torch.Tensor:
    """Mean over neighbour cells in different superpixels (``ids`` of the boundary mask's scale) of
    ``cos(p_a, p_b)`` times the boundary's edge-strength weight."""
    stride = _check(p, ids)
    centre, _ = cell_ids(ids, stride)
    strength = contrast_weight(boundary_edge_strength(boundary, image, stride), sigma)
    p = p.float()
    vals, masks = [], []
    for (pa, pb), (ia, ib), (sa, sb) in zip(_neighbour_pairs(p), _neighbour_pairs(centre),
                                            _neighbour_pairs(strength)):
        cross = (ia != ib).to(p.dtype)
        vals.append((_cos(pa, pb) * torch.maximum(sa, sb)).reshape(-1))
        masks.append(cross.reshape(-1))
    return _masked_mean(torch.cat(vals), torch.cat(masks), p)


def antimerge_loss(p: torch.Tensor, ids: torch.Tensor, image: torch.Tensor, sigma: float = 0.1) -> torch.Tensor:
    """Mean over adjacent superpixel pairs of ``cos(m_A, m_B)`` times their mean-colour contrast weight."""
    stride = _check(p, ids)
    centre, _ = cell_ids(ids, stride)
    m = int(ids.max()) + 1  # one offset for cells and pixels, so a global id means the same superpixel
    gcentre, n = _global_ids(centre, m)
    gpix, _ = _global_ids(ids, m)
    p = p.float()
    means, _ = segment_means(p, gcentre, n)
    colours, _ = segment_means(image.float(), gpix, n)
    vals, masks = [], []
    for a, b in _neighbour_pairs(gcentre):
        a, b = a.reshape(-1), b.reshape(-1)
        cross = a != b
        a, b = a[cross], b[cross]
        w = contrast_weight((colours[a] - colours[b]).norm(dim=1), sigma)
        vals.append(_cos(means[a], means[b]) * w)
        masks.append(torch.ones_like(w))
    return _masked_mean(torch.cat(vals), torch.cat(masks), p)


def to_view2(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Move full-resolution view-1 maps (B, C, S, S) into view-2 layout (nearest: exact for ids)."""
    return warp(x.float(), grid, mode="nearest")


def slic_prior_losses(p: torch.Tensor, slic: torch.Tensor, boundary: torch.Tensor, image: torch.Tensor,
                      terms=TERMS, scale: str = "medium", sigma: float = 0.1) -> dict:
    """{'prior_boundary', 'prior_antimerge', 'prior_within'} (those in ``terms``) for one layout.

    ``p`` (B, K, h, w); ``slic`` (B, 3, S, S); ``boundary`` (B, S, S); ``image`` (B, 3, S, S).
    ``scale`` picks the superpixels of the antimerge and within terms; the boundary
    term uses the medium ids, the scale of ``slic_boundary``.
    """
    unknown = set(terms) - set(TERMS)
    if unknown:
        raise ValueError(f"unknown prior terms {sorted(unknown)} (terms: {', '.join(TERMS)})")
    ids = slic[:, SCALE_INDEX[scale]].long()
    out = {}
    if "boundary" in terms:
        out["prior_boundary"] = boundary_loss(p, slic[:, SCALE_INDEX["medium"]].long(), boundary, image, sigma)
    if "antimerge" in terms:
        out["prior_antimerge"] = antimerge_loss(p, ids, image, sigma)
    if "within" in terms:
        out["prior_within"] = within_loss(p, ids)
    return out


def slic_prior_losses_two_views(probs: torch.Tensor, batch: dict, terms=TERMS, scale: str = "medium",
                                sigma: float = 0.1) -> dict:
    """The priors for ``probs`` (2n, K, h, w) of ``cat([view1, view2])``: view 1 with the batch's maps as
    they are, view 2 with them warped by ``batch['grid']``; each term is the mean of the two views."""
    for key in ("slic", "slic_boundary", "image", "grid"):
        if key not in batch:
            raise KeyError(f"SLIC priors need batch[{key!r}]: train on shards built with superpixels "
                           "(data.source=shards, data.require_slic=true) or set the prior weights to 0")
    dev = probs.device
    n = batch["slic"].shape[0]
    slic = batch["slic"].to(dev)
    bnd = batch["slic_boundary"].to(dev)
    image = batch["image"].to(dev).float()
    grid = batch["grid"].to(dev)
    first = slic_prior_losses(probs[:n], slic, bnd, image, terms, scale, sigma)
    maps2 = to_view2(torch.cat([slic.float(), bnd.unsqueeze(1).float(), image], dim=1), grid)
    slic2 = maps2[:, :3].round().long()
    bnd2 = maps2[:, 3]
    image2 = maps2[:, 4:]
    second = slic_prior_losses(probs[n:], slic2, bnd2, image2, terms, scale, sigma)
    return {k: 0.5 * (first[k] + second[k]) for k in first}


__all__ = ["within_loss", "within_deviation", "boundary_loss", "antimerge_loss", "slic_prior_losses", "slic_prior_losses_two_views",
           "cell_ids", "segment_means", "boundary_edge_strength", "to_view2", "TERMS", "SCALE_INDEX"]
