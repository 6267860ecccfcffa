"""Where the training data comes from: the one place that switches on ``data.source``.

* ``synthetic``: structured synthetic tiles (``training.data.synthetic``), the
  default for offline work and CI; held-out synthetic images (region types as
  labels) are its validation set.
* ``shards``: shards built by ``python -m training.datasets.build_shards``
  (``training.data.sharded_tif_dataset``) of one dataset (``data.dataset_id``)
  or a weighted mixture (``data.mixture``); the labeled items of every
  dataset's ``data.val_split`` are the validation sets.
* ``geotiff``: random windows of whole rasters (``training.data.geo_patch_dataset``);
  no validation split (score with ``python -m training.eval``).

Every source's training stream follows the one batch schedule
(``training.data.schedule``). A new source adds a branch to each function
here and nothing anywhere else (and its name to ``config._CHOICES``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
import torch

from ..config import shard_datasets
from .dataset import TwoViewBatches
from .geo_patch_dataset import geotiff_batches
from .schedule import StepSchedule, step_loader
from .sharded_tif_dataset import ShardStepDataset, eval_items, eval_settings, read_tile_image, shard_batches, split_items
from . import teacher_cache as cache
from .synthetic import VALIDATION_SEED_OFFSET, SyntheticDataset, validation_images


class NoValidationData(Exception):
    """The configured data has no labeled validation split; the message says why."""


@dataclass
class ValidationSet:
    items: list[tuple[torch.Tensor, np.ndarray]]   # ((3, H, W) float32 in [0, 1], (H, W) int64 labels, -1 = none)
    n_classes: int
    ignore_leq: Optional[int]                      # labels <= this are not scored (None: all are)


def _synthetic(cfg, seed: int) -> SyntheticDataset:
    return SyntheticDataset(seed, cfg.data.synthetic_classes, cfg.data.synthetic_cells)


def train_batches(cfg, rank: int, world: int, start_step: int, teacher_cache: Optional[str] = None) -> Iterable[dict]:
    """This rank's training batches, in schedule order from ``start_step`` (the same for a resumed run); with
    ``teacher_cache`` (shards only, see ``build_teacher_cache``) each image carries its teacher targets."""
    source = cfg.data.source
    if source == "shards":
        return shard_batches(cfg, rank, world, start_step, teacher_cache)
    if source == "geotiff":
        return geotiff_batches(cfg, rank, world, start_step)
    if source == "synthetic":
        batches = TwoViewBatches(_synthetic(cfg, cfg.train.seed), cfg.aug, cfg.train.seed)
        return step_loader(batches, cfg, rank, start_step)
    raise ValueError(f"unknown data.source {source!r}")


def validation_sets(cfg, log=None) -> dict[str, ValidationSet]:
    """The labeled images periodic validation scores on, by dataset (one entry but for a shard mixture, where
    every dataset with a labeled validation split is scored on its own; ``log`` is told which are not);
    ``NoValidationData`` when none."""
    source = cfg.data.source
    if source == "synthetic":
        items = validation_images(cfg.train.seed, cfg.data.val_samples, cfg.data.val_size,
                                  cfg.data.synthetic_classes, cfg.data.synthetic_cells)
        return {"synthetic": ValidationSet([(torch.from_numpy(it["image"]), it["labels"]) for it in items],
                                           cfg.data.synthetic_classes, None)}
    if source == "shards":
        sets, missing = {}, []
        for dataset_id, _ in shard_datasets(cfg):
            try:
                items = eval_items(cfg, cfg.data.val_split, dataset_id)
            except (ValueError, FileNotFoundError) as exc:
                missing.append(str(exc))
                continue
            n_classes = int(max(int(lab.max()) for _, lab in items)) + 1
            sets[dataset_id] = ValidationSet(items, max(n_classes, 2),
                                             eval_settings(cfg, dataset_id)["iou_ignore_label_leq"])
        if not sets:
            raise NoValidationData("; ".join(missing))
        if missing and log is not None:
            log(f"note: not validated: {'; '.join(missing)}")
        return sets
    if source == "geotiff":
        raise NoValidationData("data.source=geotiff has no validation split")
    raise ValueError(f"unknown data.source {source!r}")


def validation_batches(cfg, n: int, teacher_cache: Optional[str] = None,
                       datasets: Optional[list[str]] = None) -> list[dict]:
    """``n`` fixed two-view batches of the validation data: the schedule's first ``n`` steps at the first patch
    size, drawn from the validation split (synthetic: from the validation seed; shards: of ``datasets``, those
    ``validation_sets`` found, default all)."""
    keys = [StepSchedule.from_config(cfg).key(i, 0, 0) for i in range(n)]
    source = cfg.data.source
    if source == "shards":
        chosen = [(d, w) for d, w in shard_datasets(cfg) if datasets is None or d in datasets]
        ds = ShardStepDataset(cfg, 0, 1, split=cfg.data.val_split, teacher_cache=teacher_cache, datasets=chosen)
    elif source == "synthetic":
        seed = cfg.train.seed + VALIDATION_SEED_OFFSET
        ds = TwoViewBatches(_synthetic(cfg, seed), cfg.aug, seed)
    elif source == "geotiff":
        return []
    else:
        raise ValueError(f"unknown data.source {source!r}")
    return [ds[key] for key in keys]


def build_teacher_cache(cfg, teacher, device, show_progress: bool = True, rank: int = 0, world: int = 1) -> str:
    """Teacher features of every item the run reads (training split, and validation split of the datasets that
    have one), computed once and kept beside the shards (``training.data.teacher_cache``); rank ``rank`` of
    ``world`` computes every ``world``-th missing file. Returns the cache's name for ``train_batches``."""
    if cfg.data.source != "shards":
        raise ValueError(f"teacher.cache keeps features beside shards; data.source={cfg.data.source} has none")
    items = split_items(cfg, cfg.data.train_split) + split_items(cfg, cfg.data.val_split, missing_ok=True)
    return cache.build(items, teacher, device, read_tile_image, show_progress, rank, world)
