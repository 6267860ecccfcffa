"""The trainer: ``python -m training.train_distill`` (``python -m training.train`` forwards here).

One step = ``train.grad_accum`` micro-steps; each micro-step draws one batch per
patch size in ``data.patch_sizes`` (``train.batch_size`` images at
``data.patch_size``, scaled by area for the other sizes), makes two views of
every image, embeds both views of every scale in a single forward pass, and
merges the per-scale losses with the scale-neutral geometric mean.

Outputs under ``--checkpoint_dir``: ``config.json`` (the resolved config),
``last.pt`` (full checkpoint, written atomically every
``train.checkpoint_every`` steps and at the end), ``student.pt`` (student
weights only), ``decoder_training_only.pt`` (never deployed), ``best.pt``
(student at the best validation score), ``log.jsonl`` and ``tb/``.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .config import Config, ConfigError, load_file, parse_overrides, save_config, set_value, validate
from .augmentations import warp
from .data.dataset import StepBatchSampler, TwoViewDataset
from .data.synthetic import SyntheticDataset
from .device_policy import resolve_device
from .losses import (EMANormalizer, edge_aware_tv, marginal_entropy_gap, pixel_entropy, pseudo_label_ce,
                     recon_loss, scale_neutral_merge, two_view_consistency)
from .metrics import confusion_matrix, hungarian_scores, scored_classes
from .losses.distill import DistillHead, affinity_distill_loss, feature_distill_loss, teacher_targets
from .losses.priors import slic_prior_losses_two_views
from .models import SoftKMeansHead, TinyReconDecoder, build_student, kmeans_fit
from .teachers import TeacherLoadError, build_teacher
from .models.soft_kmeans import kmeans_best_of

CHECKPOINT_VERSION = 1
# What a run writes in its folder; --overwrite removes these and nothing else.
RUN_OUTPUTS = ("last.pt", "student.pt", "best.pt", "decoder_training_only.pt", "config.json", "teacher.json",
               "log.jsonl", "tb", "model")
# Settings that do not change what is learned, so a resumed run may change them.
RESUME_MAY_CHANGE = {"train.steps", "train.checkpoint_every", "train.eval_every", "train.log_every",
                     "train.val_loss_batches",
                     "train.image_every", "train.device", "data.num_workers", "data.prefetch_factor",
                     "data.persistent_workers", "data.pin_memory"}


# --------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.train_distill", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="config file (.py with get_config()/CONFIG, .yaml, .json)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config value (repeatable); applied last")
    p.add_argument("--synthetic", action="store_true", help="train on the built-in synthetic source")
    p.add_argument("--data-source", choices=["synthetic", "shards", "geotiff"], help="data.source")
    p.add_argument("--processed-root", "--processed_root", dest="processed_root", help="data.processed_root (shards)")
    p.add_argument("--dataset-id", "--dataset_id", dest="dataset_id", help="data.dataset_id (shards)")
    p.add_argument("--raster-paths", "--raster_paths", dest="raster_paths", nargs="+", help="data.raster_paths (geotiff)")
    p.add_argument("--target-paths", "--target_paths", dest="target_paths", nargs="+",
                   help="data.target_paths (geotiff, aligned with --raster-paths; metrics only)")
    p.add_argument("--bands", help="data.bands: 1-based band indices read as RGB, e.g. 1,2,3")
    p.add_argument("--steps", type=int, help="train.steps")
    p.add_argument("--seed", type=int, help="train.seed")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], help="train.device")
    p.add_argument("--amp", action="store_true", default=None, help="mixed precision on CPU (bfloat16)")
    p.add_argument("--checkpoint_dir", "--checkpoint-dir", dest="checkpoint_dir", help="train.checkpoint_dir")
    p.add_argument("--grad-accum", "--grad_accum", dest="grad_accum", type=int, help="train.grad_accum")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, help="train.batch_size")
    p.add_argument("--patch-sizes", "--patch_sizes", dest="patch_sizes", help="data.patch_sizes, e.g. 256,512")
    p.add_argument("--lr", type=float, help="train.lr")
    p.add_argument("--teacher", choices=["fake", "dinov2", "efficientnet_lite0"],
                   help="teacher.name; also turns distillation on (distill.enabled)")
    p.add_argument("--teacher-weights", "--teacher_weights", dest="teacher_weights",
                   help="teacher.weights: local weights (dinov2: HF folder, checkpoint file)")
    p.add_argument("--use-teacher", "--use_teacher", dest="use_teacher", action="store_true", default=None,
                   help="distill.enabled (needs --teacher or teacher.name)")
    p.add_argument("--proj-dim", "--proj_dim", dest="proj_dim", type=int, help="distill.proj_dim")
    p.add_argument("--teacher-patch-mode", "--teacher_patch_mode", dest="teacher_patch_mode",
                   choices=["match", "high", "medium", "low"], help="teacher.patch_mode (see docs/teachers.md)")
    p.add_argument("--lambda-boundary", dest="lambda_boundary", type=float, help="distill.boundary_weight")
    p.add_argument("--lambda-antimerge", dest="lambda_antimerge", type=float, help="distill.antimerge_weight")
    p.add_argument("--lambda-within", dest="lambda_within", type=float, help="distill.within_weight")
    p.add_argument("--resume", action="store_true", help="continue from <checkpoint_dir>/last.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a folder holding an earlier run (removes only the trainer's own outputs)")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop (with a checkpoint) after N steps of this invocation, as if interrupted; "
                        "--resume continues")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


_FLAG_TO_KEY = {
    "data_source": "data.source", "steps": "train.steps", "seed": "train.seed", "device": "train.device",
    "amp": "train.amp", "checkpoint_dir": "train.checkpoint_dir", "grad_accum": "train.grad_accum",
    "batch_size": "train.batch_size", "patch_sizes": "data.patch_sizes", "lr": "train.lr",
    "processed_root": "data.processed_root", "dataset_id": "data.dataset_id", "raster_paths": "data.raster_paths",
    "target_paths": "data.target_paths", "bands": "data.bands",
    "teacher": "teacher.name", "teacher_weights": "teacher.weights", "use_teacher": "distill.enabled",
    "proj_dim": "distill.proj_dim", "teacher_patch_mode": "teacher.patch_mode",
    "lambda_boundary": "distill.boundary_weight", "lambda_antimerge": "distill.antimerge_weight",
    "lambda_within": "distill.within_weight",
}


def config_from_args(args: argparse.Namespace) -> Config:
    """defaults < --config file < explicit flags < --set overrides."""
    flags = []
    if args.synthetic:
        flags.append(("data.source", "synthetic"))
    if args.teacher:
        flags.append(("distill.enabled", True))
    for attr, key in _FLAG_TO_KEY.items():
        value = getattr(args, attr, None)
        if value is not None:
            flags.append((key, value))
    # Validate once, at the end: a config file may rely on flags to complete it (e.g. --raster-paths).
    cfg = load_file(args.config) if args.config else Config()
    for key, value in flags:
        set_value(cfg, key, value)
    for key, value in parse_overrides(args.set):
        set_value(cfg, key, value)
    return validate(cfg)


# --------------------------------------------------------------------------- helpers

def batches_per_scale(cfg: Config) -> list[tuple[int, int]]:
    """(patch size, images) per scale: batch_size at data.patch_size, scaled by area, at least 1."""
    ref = cfg.data.patch_size
    return [(s, max(1, int(round(cfg.train.batch_size * (ref / s) ** 2)))) for s in cfg.data.patch_sizes]


def lr_at(cfg: Config, step: int) -> float:
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def step_generator(seed: int, *ids: int) -> torch.Generator:
    ss = np.random.SeedSequence([seed, *ids])
    return torch.Generator().manual_seed(int(ss.generate_state(1, dtype=np.uint64)[0] >> 1))


def k_for_step(cfg: Config, step: int) -> int:
    rng = np.random.default_rng([cfg.train.seed, 0x4B, step])
    return int(rng.choice(cfg.knobs.k_choices))


def atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def weights_digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212],
                    [0, 128, 128], [220, 190, 255], [170, 110, 40], [255, 250, 200], [128, 0, 0],
                    [170, 255, 195]], dtype=np.uint8)


class TrainModule(nn.Module):
    """Student + training-only parts (decoder, distillation head): one forward pass over a list of image
    batches (one per scale), so DistributedDataParallel sees exactly one forward per backward."""

    def __init__(self, student: nn.Module, decoder: nn.Module | None, distill_head: nn.Module | None = None):
        super().__init__()
        self.student, self.decoder, self.distill_head = student, decoder, distill_head

    def forward(self, batches: list[torch.Tensor]):
        outs = []
        for x in batches:
            # channels_last: ~20 % faster convolutions on CPU (oneDNN) and GPU; same numbers.
            emb, feats = self.student(x.contiguous(memory_format=torch.channels_last), return_features=True)
            recon = self.decoder(feats) if self.decoder is not None else None
            proj = self.distill_head(emb) if self.distill_head is not None else None
            outs.append((emb, recon, proj))
        return outs


# --------------------------------------------------------------------------- trainer

class Trainer:
    def __init__(self, cfg: Config, show_progress: bool = True):
        self.cfg = cfg
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.policy = resolve_device(cfg.train.device, cfg.train.amp, self.local_rank)
        if self.distributed and not dist.is_initialized():
            dist.init_process_group("nccl" if self.policy.device.type == "cuda" else "gloo")
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        self.is_main = self.rank == 0
        self.show_progress = show_progress and self.is_main
        self.out = Path(cfg.train.checkpoint_dir)

        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
        np.random.seed(cfg.train.seed % 2**32)
        dev = self.policy.device
        self.student = build_student(cfg).to(dev, memory_format=torch.channels_last)
        self.decoder = (TinyReconDecoder(cfg.student.width, cfg.autoencoder.hidden).to(dev)
                        if cfg.autoencoder.enabled else None)
        self.teacher, self.distill_head = None, None
        if cfg.distill.enabled:
            self.teacher = build_teacher(cfg.teacher, dev)
            self.distill_head = DistillHead(cfg.student.embed_dim, cfg.distill.proj_dim,
                                            self.teacher.feature_dim).to(dev)
        self.module = TrainModule(self.student, self.decoder, self.distill_head)
        if self.distributed:
            ids = [self.local_rank] if dev.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(self.module, device_ids=ids)
        else:
            self.ddp = self.module
        self.head = SoftKMeansHead(cfg.model.max_k, cfg.model.temperature, cfg.model.kmeans_iters,
                                   cfg.model.kmeans_sample)
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=cfg.train.lr,
                                           weight_decay=cfg.train.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.policy.use_scaler)
        self.loss_ema = EMANormalizer(cfg.loss.ema_momentum)
        self.recon_ema = EMANormalizer(cfg.autoencoder.ema_momentum)
        self.step = 0
        self.best_score = -math.inf
        self.writer = None
        self._val = None      # (items, n_classes, ignore_leq) once loaded
        self._no_val = None   # why there is no validation set, when there is none
        self._val_batches = None  # fixed batches for validation_losses, once built

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {
            "version": CHECKPOINT_VERSION,
            "step": self.step,
            "config": self.cfg.to_dict(),
            "student": self.student.state_dict(),
            "decoder": self.decoder.state_dict() if self.decoder is not None else None,
            "distill_head": self.distill_head.state_dict() if self.distill_head is not None else None,
            "teacher": self.teacher.describe() if self.teacher is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "loss_ema": self.loss_ema.state_dict(),
            "recon_ema": self.recon_ema.state_dict(),
            "best_score": self.best_score,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != CHECKPOINT_VERSION:
            raise RuntimeError(f"checkpoint version {state.get('version')} is not supported "
                               f"(this trainer writes version {CHECKPOINT_VERSION})")
        self.student.load_state_dict(state["student"])
        if self.decoder is not None and state["decoder"] is not None:
            self.decoder.load_state_dict(state["decoder"])
        if self.distill_head is not None and state.get("distill_head") is not None:
            self.distill_head.load_state_dict(state["distill_head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.loss_ema.load_state_dict(state["loss_ema"])
        self.recon_ema.load_state_dict(state["recon_ema"])
        self.best_score = state["best_score"]
        self.step = state["step"]
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])

    def sync_buffers(self) -> None:
        """Average floating buffers (norm running statistics) over ranks: each rank saw other samples.

        DDP broadcasts rank 0's buffers at every forward pass, so without this the
        statistics saved would be rank 0's alone and the ranks' copies would differ.
        """
        if not self.distributed:
            return
        for buf in self.module.buffers():
            if buf.is_floating_point():
                dist.all_reduce(buf, op=dist.ReduceOp.SUM)
                buf.div_(self.world)

    def save_checkpoint(self) -> None:
        self.sync_buffers()
        if not self.is_main:
            return
        atomic_torch_save(self.state_dict(), self.out / "last.pt")
        atomic_torch_save({"step": self.step, "config": self.cfg.to_dict(), "student": self.student.state_dict()},
                          self.out / "student.pt")
        if self.decoder is not None:
            atomic_torch_save({"step": self.step, "decoder": self.decoder.state_dict()},
                              self.out / "decoder_training_only.pt")

    def resume(self) -> None:
        path = self.out / "last.pt"
        if not path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {path}")
        state = torch.load(path, map_location=self.policy.device, weights_only=False)
        saved, now = Config().to_dict(), self.cfg.to_dict()
        saved.update(state["config"])
        diff = [f"{s}.{k}" for s in saved for k in saved[s]
                if saved[s][k] != now[s][k] and f"{s}.{k}" not in RESUME_MAY_CHANGE]
        if diff:
            raise ConfigError(f"--resume: the config differs from the checkpoint's in {', '.join(diff)}; "
                              "resume with the same config (see config.json in the run folder)")
        self.load_state_dict(state)

    # ----------------------------------------------------------------- losses
    def compute_losses(self, batches: list[dict], k: int, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        cfg, dev = self.cfg, self.policy.device
        inputs = [torch.cat([b["view1"], b["view2"]]).to(dev, non_blocking=True) for b in batches]
        with self.policy.autocast():
            outs = self.ddp(inputs)
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
        cfg, dev = self.cfg, self.policy.device
        n = b["view1"].shape[0]
        centers = self.head.fit([emb], k, gen)
        probs, logits = self.head.assign(emb, centers)
        p1, p2 = probs[:n], probs[n:]
        grid = b["grid"].to(dev)
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
            targets = teacher_targets(self.teacher, batch, tuple(emb.shape[-2:]), self.policy.device)
            if d.feature_weight > 0:
                terms["distill_feature"] = feature_distill_loss(proj.float(), targets)
            if d.affinity_weight > 0:
                terms["distill_affinity"] = affinity_distill_loss(emb, targets, d.affinity_pairs, gen)
            weights.update(distill_feature=d.feature_weight, distill_affinity=d.affinity_weight)
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

    # ----------------------------------------------------------------- eval
    def validation_set(self):
        """(items, n_classes, ignore_leq) to score on, or None when the data has no labeled validation split.

        synthetic: held-out synthetic images (region types are the labels); shards: the labeled items of
        ``data.val_split`` with the dataset's IoU ignore threshold; geotiff: none (targets there feed no
        periodic validation; use python -m training.eval).
        """
        if self._val is None and self._no_val is None:
            cfg = self.cfg
            if cfg.data.source == "synthetic":
                src = SyntheticDataset(cfg.train.seed + 1, cfg.data.synthetic_classes, cfg.data.synthetic_cells)
                items = [src[(0xE7A1, i, cfg.data.val_size)] for i in range(cfg.data.val_samples)]
                self._val = ([(torch.from_numpy(it["image"]), it["labels"]) for it in items],
                             cfg.data.synthetic_classes, None)
            elif cfg.data.source == "shards":
                from .data.sharded_tif_dataset import eval_items, eval_settings
                try:
                    items = eval_items(cfg, cfg.data.val_split)
                except (ValueError, FileNotFoundError) as exc:
                    self._no_val = str(exc)
                else:
                    n_classes = int(max(int(lab.max()) for _, lab in items)) + 1
                    self._val = (items, max(n_classes, 2), eval_settings(cfg)["iou_ignore_label_leq"])
            else:
                self._no_val = "data.source=geotiff has no validation split"
            if self._no_val is not None and self.is_main:
                print(f"note: no periodic validation ({self._no_val}); best.pt is not written", file=sys.stderr)
        return self._val

    def validation_batches(self) -> list[dict]:
        """``train.val_loss_batches`` fixed two-view batches of the validation data (same crops, views and
        noise at every evaluation), or [] when there is no validation split."""
        if self._val_batches is None:
            self._val_batches = self._build_validation_batches()
        return self._val_batches

    def _build_validation_batches(self) -> list[dict]:
        cfg, n = self.cfg, self.cfg.train.val_loss_batches
        if n <= 0 or self.validation_set() is None:
            return []
        if cfg.data.source == "shards":
            from .data.sharded_tif_dataset import ShardStepDataset
            ds = ShardStepDataset(cfg, 0, 1, split=cfg.data.val_split)
            return [ds[(i, 0, 0)] for i in range(n)]
        size, per = batches_per_scale(cfg)[0]  # synthetic (geotiff has no validation split)
        ds = TwoViewDataset(SyntheticDataset(cfg.train.seed + 1, cfg.data.synthetic_classes, cfg.data.synthetic_cells),
                            cfg.aug, cfg.train.seed + 1)
        return [torch.utils.data.default_collate([ds[(i, 0, 0, 0, j, size)] for j in range(per)]) for i in range(n)]

    @torch.no_grad()
    def validation_losses(self) -> dict:
        """Every loss term, unweighted, averaged over the fixed validation batches, with the student in eval
        mode (as exported) and K = knobs.eval_k: unlike the training log, where K, crops and augmentations
        change every step, these curves are comparable from one evaluation to the next."""
        batches = self.validation_batches()
        if not batches:
            return {}
        dev, sums = self.policy.device, {}
        gen = step_generator(self.cfg.train.seed, 0x7A1D)
        was = self.module.training
        self.module.eval()
        try:
            for b in batches:
                views = torch.cat([b["view1"], b["view2"]]).to(dev)
                with self.policy.autocast():
                    (emb, recon, proj), = self.module([views])
                terms, _ = self.batch_terms(b, views, emb.float(), recon, proj, self.cfg.knobs.eval_k, gen)
                for name, t in terms.items():
                    sums[name] = sums.get(name, 0.0) + float(t)
        finally:
            self.module.train(was)
        return {f"val_loss/{name}": v / len(batches) for name, v in sums.items()}

    @torch.no_grad()
    def evaluate(self) -> dict | None:
        """Global k-means (K = knobs.eval_k) over the validation set's embeddings, Hungarian-matched."""
        val = self.validation_set()
        if val is None:
            return None
        items, n_classes, ignore_leq = val
        return evaluate_student(self.student, items, self.cfg.knobs.eval_k, n_classes, self.policy.device,
                                self.cfg.train.seed, ignore_leq=ignore_leq)

    # ----------------------------------------------------------------- loop
    def _loader(self, start: int, steps: int):
        """Batches in (step, micro-step, scale) order from ``start``; the same for a resumed run."""
        cfg = self.cfg
        if cfg.data.source == "shards":
            from .data.sharded_tif_dataset import shard_batches
            return shard_batches(cfg, self.rank, self.world, start)
        if cfg.data.source == "geotiff":
            from .data.geo_patch_dataset import geotiff_batches
            return geotiff_batches(cfg, self.rank, self.world, start)
        ds = TwoViewDataset(SyntheticDataset(cfg.train.seed, cfg.data.synthetic_classes, cfg.data.synthetic_cells),
                            cfg.aug, cfg.train.seed)
        sampler = StepBatchSampler(start, steps, batches_per_scale(cfg), cfg.train.grad_accum, self.rank)
        kw = {}
        if cfg.data.num_workers > 0:
            kw = {"prefetch_factor": cfg.data.prefetch_factor, "persistent_workers": cfg.data.persistent_workers}
        return torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                                           pin_memory=cfg.data.pin_memory, **kw)

    def _log(self, record: dict) -> None:
        if not self.is_main:
            return
        with (self.out / "log.jsonl").open("a") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(key, value, record["step"])

    def _log_images(self, batches: list[dict], k: int, gen: torch.Generator) -> None:
        if self.writer is None:
            return
        was = self.student.training
        self.student.eval()
        with torch.no_grad():
            img = batches[0]["view1"][:1].to(self.policy.device)
            emb = self.student(img)
            centers = kmeans_fit(emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1]), k, 10, gen)
            lab = torch.einsum("bdhw,kd->bkhw", emb, centers).argmax(1)[0].cpu().numpy()
        self.student.train(was)
        self.writer.add_image("input", img[0].cpu(), self.step)
        self.writer.add_image("clusters", torch.from_numpy(PALETTE[lab % len(PALETTE)]).permute(2, 0, 1), self.step)

    def fit(self, resume: bool = False, stop_after: int | None = None, overwrite: bool = False) -> dict:
        cfg = self.cfg
        if overwrite and resume:
            raise ConfigError("--overwrite and --resume contradict each other")
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if overwrite:
                remove_run_outputs(self.out)
        if self.distributed:
            dist.barrier()
        if resume:
            self.resume()
        elif (self.out / "last.pt").exists():
            raise FileExistsError(f"{self.out} already holds a run (last.pt); use --resume to continue it, "
                                  "--overwrite to start afresh, or another --checkpoint_dir")
        if self.is_main:
            save_config(cfg, self.out / "config.json")
            if self.teacher is not None:
                (self.out / "teacher.json").write_text(json.dumps(self.teacher.describe(), indent=2, default=str) + "\n")
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.out / "tb"))
            if not resume:
                self._record_eval()
        end = cfg.train.steps if stop_after is None else min(cfg.train.steps, self.step + stop_after)
        loader = iter(self._loader(self.step, end))
        n_scales = len(cfg.data.patch_sizes)
        bar = None
        if self.show_progress:
            from tqdm import tqdm
            bar = tqdm(total=cfg.train.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        self.module.train()
        t_last, px_since, img_since = time.perf_counter(), 0, 0
        last_logs: dict = {}
        while self.step < end:
            step = self.step
            k = k_for_step(cfg, step)
            lr = lr_at(cfg, step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.zero_grad(set_to_none=True)
            logs_acc: dict = {}
            for micro in range(cfg.train.grad_accum):
                batches = [next(loader) for _ in range(n_scales)]
                gen = step_generator(cfg.train.seed, step, micro, self.rank)
                sync = micro == cfg.train.grad_accum - 1 or not self.distributed
                ctx = self.ddp.no_sync() if not sync else contextlib.nullcontext()
                with ctx:
                    loss, logs = self.compute_losses(batches, k, gen)
                    self.scaler.scale(loss / cfg.train.grad_accum).backward()
                for key, v in logs.items():
                    logs_acc[key] = logs_acc.get(key, 0.0) + v / cfg.train.grad_accum
                for b in batches:
                    n, _, h, w = b["view1"].shape
                    px_since += 2 * n * h * w
                    img_since += 2 * n
            self.scaler.unscale_(self.optimizer)
            gnorm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), cfg.train.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.step += 1
            last_logs = logs_acc
            if self.is_main and (self.step % cfg.train.log_every == 0 or self.step == end):
                dt = max(time.perf_counter() - t_last, 1e-9)
                record = {"step": self.step, "lr": lr, "k": k, "grad_norm": float(gnorm),
                          "throughput/images_per_s": img_since / dt * self.world,
                          "throughput/megapixels_per_s": px_since / dt / 1e6 * self.world, **logs_acc}
                self._log(record)
                t_last, px_since, img_since = time.perf_counter(), 0, 0
            if self.is_main and cfg.train.image_every and self.step % cfg.train.image_every == 0:
                self._log_images(batches, k, step_generator(cfg.train.seed, step, 0xFF))
            if cfg.train.eval_every and self.step % cfg.train.eval_every == 0:
                self.sync_buffers()
                if self.is_main:
                    self._record_eval()
            if self.step % cfg.train.checkpoint_every == 0 or self.step == end:
                self.save_checkpoint()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{logs_acc['loss/merged']:.3f}", k=k)
        if bar is not None:
            bar.close()
        summary = {"step": self.step, "finished": self.step >= cfg.train.steps, **last_logs}
        self.sync_buffers()
        if self.step >= cfg.train.steps and cfg.train.eval_every and self.step % cfg.train.eval_every:
            if self.is_main:
                summary.update(self._record_eval())
        digest = weights_digest(self.student)
        if self.distributed:
            digests = [None] * self.world
            dist.all_gather_object(digests, digest)
            summary["rank_weight_digests"] = digests
        else:
            summary["rank_weight_digests"] = [digest]
        if self.is_main:
            self._log({"event": "end", **summary})
            self.writer.close()
        if self.distributed:
            dist.barrier()  # no rank tears the group down while another still uses it
        return summary

    def _record_eval(self) -> dict:
        scores = self.evaluate()
        if scores is None:
            return {}
        record = {"step": self.step, "val/accuracy": scores["accuracy"], "val/miou": scores["miou"],
                  **self.validation_losses()}
        self._log(record)
        if scores["miou"] > self.best_score:
            self.best_score = scores["miou"]
            atomic_torch_save({"step": self.step, "config": self.cfg.to_dict(), "student": self.student.state_dict(),
                               "score": scores["miou"], "scores": scores}, self.out / "best.pt")
            # The deployable artifact of the best student so far (the runtime's model folder, never the decoder).
            from .export import export_artifact
            metrics = {"score": scores["miou"], "step": self.step, "val_accuracy": scores["accuracy"],
                       "val_miou": scores["miou"], "val_per_class_iou": scores["per_class_iou"],
                       "eval_k": self.cfg.knobs.eval_k, "data_source": self.cfg.data.source}
            provenance = {"teacher": self.teacher.describe() if self.teacher is not None else None}
            export_artifact(self.student, self.cfg.to_dict(), self.out / "model" / "best", metrics, provenance)
        return record


def remove_run_outputs(folder: Path) -> None:
    import shutil
    for name in RUN_OUTPUTS:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        parser.error(str(exc))
    trainer = None
    try:
        trainer = Trainer(cfg, show_progress=not args.no_progress)
        summary = trainer.fit(resume=args.resume, stop_after=args.stop_after, overwrite=args.overwrite)
    except (ConfigError, FileExistsError, FileNotFoundError, TeacherLoadError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if trainer.is_main:
        print(json.dumps({k: v for k, v in summary.items() if not k.startswith("loss/") or k == "loss/merged"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
