"""The training objective: every loss term of a batch, their weights, and the scale-neutral merge.

One micro-step embeds both views of every scale's batch; per scale the
objective fits in-batch soft k-means centres (K drawn per step), assigns both
views and sums the weighted terms:

* clustering (``losses.clustering``): pixel entropy down, cluster-usage entropy
  up, edge-aware smoothness, and cross-entropy against the other view's
  pseudo-labels;
* two-view consistency (``losses.consistency``);
* reconstruction (``losses.recon``), EMA-normalised per scale;
* teacher distillation, feature and affinity (``losses.distill``), and
  correspondences within and across images (``losses.correspondence``);
* SLIC priors (``losses.priors``).

The per-scale totals are merged with the scale-neutral geometric mean
(``losses.merge``). A new loss term is a function in its family's module under
``losses/``, a weight in ``config.py`` and one entry in ``batch_terms`` here.
"""
from __future__ import annotations

import numpy as np
import torch

from .augmentations import warp
from .config import Config
from .losses import (EMANormalizer, edge_aware_tv, marginal_entropy_gap, pixel_entropy, pseudo_label_ce, recon_loss,
                     scale_neutral_merge, two_view_consistency)
from .losses.correspondence import correspondence_losses
from .losses.distill import affinity_distill_loss, feature_distill_loss, teacher_targets
from .losses.priors import slic_prior_losses_two_views
from .models import SoftKMeansHead


def step_generator(seed: int, *ids: int) -> torch.Generator:
    """The CPU generator of one step's random draws (k-means seeding, pixel pairs), from (seed, ids)."""
    ss = np.random.SeedSequence([seed, *ids])
    return torch.Generator().manual_seed(int(ss.generate_state(1, dtype=np.uint64)[0] >> 1))


def k_for_step(cfg: Config, step: int) -> int:
    """K of the in-batch clustering at ``step``: drawn from knobs.k_choices, a pure function of seed and step."""
    rng = np.random.default_rng([cfg.train.seed, 0x4B, step])
    return int(rng.choice(cfg.knobs.k_choices))


class Objective:
    """The loss of a micro-step. Holds the clustering head, the teacher (or None) and the EMA normalisers
    (part of the training state: ``state_dict`` / ``load_state_dict``)."""

    def __init__(self, cfg: Config, teacher, device):
        self.cfg, self.teacher, self.device = cfg, teacher, device
        self.head = SoftKMeansHead(cfg.model.max_k, cfg.model.temperature, cfg.model.kmeans_iters,
                                   cfg.model.kmeans_sample)
        self.loss_ema = EMANormalizer(cfg.loss.ema_momentum)
        self.recon_ema = EMANormalizer(cfg.autoencoder.ema_momentum)

    def state_dict(self) -> dict:
        return {"loss_ema": self.loss_ema.state_dict(), "recon_ema": self.recon_ema.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.loss_ema.load_state_dict(state["loss_ema"])
        self.recon_ema.load_state_dict(state["recon_ema"])

    def __call__(self, batches: list[dict], inputs: list[torch.Tensor], outs: list[tuple], k: int,
                 gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        """Merged loss and the log of every term, for ``batches`` (one per scale), the network's ``inputs``
        (cat(view1, view2) per scale, on the device) and its ``outs`` ((embeddings, reconstruction,
        distillation projection) per scale)."""
        cfg = self.cfg
        per_scale, logs = {}, {}
        for b, views, (emb, recon, proj) in zip(batches, inputs, outs):
            size = b["view1"].shape[-1]
            terms, weights = self.batch_terms(b, views, emb.float(), recon, proj, k, gen)
            total = sum(weights[name] * t for name, t in terms.items() if weights.get(name, 0) > 0)
            if recon is not None:
                total = total + cfg.autoencoder.lambda_recon * self.recon_ema.normalize(f"recon/{size}", terms["recon"])
            per_scale[str(size)] = total
            for name, t in terms.items():
                logs[f"loss/{name}/{size}"] = float(t.detach())
            logs[f"loss/total/{size}"] = float(total.detach())
        merged = scale_neutral_merge(per_scale, self.loss_ema)
        logs["loss/merged"] = float(merged.detach())
        return merged, logs

    def batch_terms(self, b: dict, views: torch.Tensor, emb: torch.Tensor, recon, proj, k: int,
                    gen: torch.Generator) -> tuple[dict, dict]:
        """Every loss term of one batch (``views`` = cat(view1, view2)) and the weights of the weighted ones
        (the reconstruction term, EMA-normalised by the caller, has none)."""
        cfg = self.cfg
        n = b["view1"].shape[0]
        centers = self.head.fit([emb], k, gen)
        probs, logits = self.head.assign(emb, centers)
        p1, p2 = probs[:n], probs[n:]
        grid = b["grid"].to(self.device)
        terms = {
            "consistency": two_view_consistency(p1, p2, grid),
            "entropy": pixel_entropy(probs),
            "marginal": marginal_entropy_gap(probs),
            "smooth": edge_aware_tv(probs, views, cfg.loss.smooth_edge_alpha),
            "cluster": self._cluster_term(logits[:n], logits[n:], grid),
        }
        weights = {"consistency": cfg.loss.consistency_weight, "entropy": cfg.loss.entropy_weight,
                   "marginal": cfg.loss.marginal_weight, "smooth": cfg.loss.smooth_weight,
                   "cluster": cfg.loss.cluster_weight}
        terms.update(self._distill_terms(b, emb, proj, probs, gen, weights))
        if recon is not None:
            terms["recon"] = recon_loss(recon, views, cfg.autoencoder.blur_sigma, cfg.autoencoder.grad_weight)
        return terms, weights

    def _distill_terms(self, batch: dict, emb: torch.Tensor, proj, probs: torch.Tensor, gen: torch.Generator,
                       weights: dict) -> dict:
        """Teacher distillation (feature, affinity) and SLIC priors; fills ``weights`` for the terms returned."""
        d, terms = self.cfg.distill, {}
        if self.teacher is not None:
            # The teacher sees the clean image once; the view-2 half of the targets is warped by the view grid.
            targets = teacher_targets(self.teacher, batch, tuple(emb.shape[-2:]), self.device)
            if d.feature_weight > 0:
                terms["distill_feature"] = feature_distill_loss(proj.float(), targets)
            if d.affinity_weight > 0:
                terms["distill_affinity"] = affinity_distill_loss(emb, targets, d.affinity_pairs, gen)
            weights.update(distill_feature=d.feature_weight, distill_affinity=d.affinity_weight)
            kinds = {k: getattr(d, f"corr_{k}_shift") for k in ("self", "knn", "random")
                     if getattr(d, f"corr_{k}_weight") > 0}
            if kinds:
                terms.update(correspondence_losses(emb, targets, batch["view1"].shape[0], d.corr_points, kinds, gen))
                weights.update({f"corr_{k}": getattr(d, f"corr_{k}_weight") for k in kinds})
        priors = [t for t in ("boundary", "antimerge", "within") if getattr(d, f"{t}_weight") > 0]
        if priors:
            terms.update(slic_prior_losses_two_views(probs, batch, priors, d.prior_scale, d.prior_sigma))
            weights.update({f"prior_{t}": getattr(d, f"{t}_weight") for t in priors})
        return terms

    def _cluster_term(self, logits1: torch.Tensor, logits2: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """Swapped pseudo-labels between the views, both in view-2 layout."""
        if not self.cfg.loss.cross_view_labels:
            return 0.5 * (pseudo_label_ce(logits1) + pseudo_label_ce(logits2))
        warped1 = warp(logits1, grid)
        return 0.5 * (pseudo_label_ce(logits2, warped1) + pseudo_label_ce(warped1, logits2))
