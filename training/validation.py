"""Validation: how a student is scored during training and by the export command.

* ``evaluate_student``: global k-means (K = knobs.eval_k) fitted once over the
  embeddings of every validation image, every pixel labelled, Hungarian-matched
  to the classes (``training.metrics``). This is ``val/miou``, the score that
  picks ``best.pt``.
* ``Validation.losses``: every loss term, unweighted, averaged over fixed
  validation batches with the student in eval mode (as exported) and
  K = knobs.eval_k. Unlike the training log, where K, crops and augmentations
  change every step, these curves are comparable from one evaluation to the
  next.

What the validation data is comes from ``training.data.sources``.
"""
from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import Config
from .data.sources import NoValidationData, ValidationSet, validation_batches, validation_sets
from .metrics import confusion_matrix, hungarian_scores, scored_classes
from .models.soft_kmeans import kmeans_best_of
from .objective import Objective, step_generator

VAL_LOSS_STREAM = 0x7A1D  # the random stream of the validation losses' k-means and pairs, the same every time


@torch.no_grad()
def embed_image(student: nn.Module, image: torch.Tensor, device) -> torch.Tensor:
    """(D, h, w) eval-mode embedding of one (3, H, W) image, cropped to a multiple of 4."""
    h, w = image.shape[-2:]
    x = image[:, : h - h % 4, : w - w % 4].unsqueeze(0).to(device)
    return student(x)[0].float()


@torch.no_grad()
def evaluate_student(student: nn.Module, items, k: int, n_classes: int, device, seed: int = 0,
                     sample: int = 20000, ignore_leq: int | None = None) -> dict:
    """Fit K centres once over all images' embeddings, label every pixel, score with Hungarian matching."""
    was = student.training
    student.eval()
    embs = [embed_image(student, img, device) for img, _ in items]
    student.train(was)
    gen = torch.Generator().manual_seed(seed)
    flat = torch.cat([e.permute(1, 2, 0).reshape(-1, e.shape[0]) for e in embs])
    if flat.shape[0] > sample:
        flat = flat[torch.randperm(flat.shape[0], generator=gen)[:sample].to(flat.device)]
    centers = kmeans_best_of(flat, k, 20, 3, gen)
    conf = np.zeros((k, n_classes), np.int64)
    for e, (img, labels) in zip(embs, items):
        lab = torch.einsum("dhw,kd->khw", e, centers).argmax(0)
        full = F.interpolate(lab[None, None].float(), scale_factor=4, mode="nearest")[0, 0].long().cpu().numpy()
        h, w = full.shape
        conf += confusion_matrix(full, np.asarray(labels)[:h, :w], k, n_classes, ignore_leq)
    return hungarian_scores(conf[:, scored_classes(n_classes, ignore_leq)])


def score_on(student: nn.Module, sets: dict[str, ValidationSet], cfg: Config, device) -> dict:
    """``evaluate_student`` on each validation set with the run's K and seed. One set: its scores. Several (a
    shard mixture): accuracy and mIoU are the means over the sets (every dataset counts alike, whatever its
    size), each set's own scores under ``per_dataset``."""
    scores = {name: evaluate_student(student, val.items, cfg.knobs.eval_k, val.n_classes, device, cfg.train.seed,
                                     ignore_leq=val.ignore_leq) for name, val in sets.items()}
    if len(scores) == 1:
        return next(iter(scores.values()))
    return {"accuracy": float(np.mean([s["accuracy"] for s in scores.values()])),
            "miou": float(np.mean([s["miou"] for s in scores.values()])), "per_class_iou": {},
            "per_dataset": scores}


class Validation:
    """A run's periodic validation; the set and the fixed batches are loaded once, on first use."""

    def __init__(self, cfg: Config, device, verbose: bool = True):
        self.cfg, self.device, self.verbose = cfg, device, verbose
        self._sets: dict[str, ValidationSet] | None = None
        self._no_set: str | None = None      # why there is no validation set, when there is none
        self._batches: list[dict] | None = None
        self.teacher_cache: str | None = None  # set by the trainer when teacher.cache is on

    def sets(self) -> dict[str, ValidationSet] | None:
        """The labeled validation images by dataset, or None when the data has none (said once on stderr)."""
        if self._sets is None and self._no_set is None:
            try:
                self._sets = validation_sets(self.cfg, log=self._note)
            except NoValidationData as exc:
                self._no_set = str(exc)
                if self.verbose:
                    print(f"note: no periodic validation ({self._no_set}); best.pt is not written", file=sys.stderr)
        return self._sets

    def batches(self) -> list[dict]:
        """``train.val_loss_batches`` fixed two-view batches of the validation data (same crops, views and
        noise at every evaluation), or [] when there is no validation split."""
        if self._batches is None:
            n = self.cfg.train.val_loss_batches
            sets = self.sets()
            self._batches = (validation_batches(self.cfg, n, self.teacher_cache, list(sets))
                             if n > 0 and sets is not None else [])
        return self._batches

    def _note(self, message: str) -> None:
        if self.verbose:
            print(message, file=sys.stderr)

    def scores(self, student: nn.Module) -> dict | None:
        sets = self.sets()
        return None if sets is None else score_on(student, sets, self.cfg, self.device)

    @torch.no_grad()
    def losses(self, module: nn.Module, objective: Objective, autocast) -> dict:
        """``val_loss/<term>`` of the train module (student + training-only heads) under ``objective``; the
        module's train/eval mode is left as it was."""
        batches = self.batches()
        if not batches:
            return {}
        sums = {}
        gen = step_generator(self.cfg.train.seed, VAL_LOSS_STREAM)
        was = module.training
        module.eval()
        try:
            for b in batches:
                views = torch.cat([b["view1"], b["view2"]]).to(self.device)
                with autocast():
                    (emb, recon, proj), = module([views])
                terms, _ = objective.batch_terms(b, views, emb.float(), recon, proj, self.cfg.knobs.eval_k, gen)
                for name, t in terms.items():
                    sums[name] = sums.get(name, 0.0) + float(t)
        finally:
            module.train(was)
        return {f"val_loss/{name}": v / len(batches) for name, v in sums.items()}
