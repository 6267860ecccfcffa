"""Run folders and checkpoints: what a training run writes, atomically, and how it resumes.

A run folder (``train.checkpoint_dir``) holds ``config.json`` (the resolved
config), ``last.pt`` (the full training state: every trainable part, optimiser,
scaler, loss normalisers, best score and the RNG states), ``student.pt``
(student weights only), ``decoder_training_only.pt`` (never deployed),
``best.pt`` (the student at the best validation score, with its scores),
``teacher.json``, ``log.jsonl``, ``tb/`` and ``model/best`` (the runtime
artifact of the best student). Every ``.pt`` is written under a temporary name
and renamed, so a run killed at any moment leaves the previous checkpoint whole.

``--resume`` continues from ``last.pt`` only under the same config (settings in
``RESUME_MAY_CHANGE`` do not change what is learned and may differ); a resumed
run then continues exactly as the uninterrupted one would (same batches: see
``training.data.schedule``; same RNG states).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .config import Config, ConfigError, config_from_dict, merge_dict
from .models.student_cnn import StudentEmbeddingNet, build_student

CHECKPOINT_VERSION = 1
# What a run writes in its folder; --overwrite removes these and nothing else.
RUN_OUTPUTS = ("last.pt", "student.pt", "best.pt", "decoder_training_only.pt", "config.json", "teacher.json",
               "log.jsonl", "tb", "model")
# Settings that do not change what is learned, so a resumed run may change them.
RESUME_MAY_CHANGE = {"train.steps", "train.checkpoint_every", "train.eval_every", "train.log_every",
                     "train.val_loss_batches",
                     "train.image_every", "train.device", "data.num_workers", "data.prefetch_factor",
                     "data.persistent_workers", "data.pin_memory"}


class CheckpointError(ValueError):
    """A checkpoint is missing or is not one of ours; the message names the file and what to do."""


def atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def state_digest(module: nn.Module) -> str:
    """sha256 of a module's state dict (names and values): equal on every DDP rank when the ranks agree."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def prepare_run_folder(out: Path, overwrite: bool) -> None:
    """Create the run folder; ``overwrite`` removes an earlier run's outputs there (``RUN_OUTPUTS``, nothing else)."""
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for name in RUN_OUTPUTS:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()


def refuse_earlier_run(out: Path) -> None:
    """A fresh run never continues or mixes with an earlier one in the same folder (its log, config, events)."""
    found = [name for name in RUN_OUTPUTS if (out / name).exists()]
    if "last.pt" in found:
        raise FileExistsError(f"{out} already holds a run (last.pt); use --resume to continue it, "
                              "--overwrite to start afresh, or another --checkpoint_dir")
    if found:
        raise FileExistsError(f"{out} holds an earlier run that stopped before its first checkpoint "
                              f"({', '.join(found)}), so there is nothing to resume; use --overwrite to start "
                              "afresh, or another --checkpoint_dir")


def rewind_log(out: Path, step: int) -> None:
    """Cut ``out``/log.jsonl back to what the run had logged when its checkpoint at ``step`` was written: the
    records of later steps (logged by an invocation that then died) and the end records of interrupted
    invocations go, so a resumed run's log reads as the uninterrupted run's would."""
    path = out / "log.jsonl"
    if not path.is_file():
        return
    keep = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # torn by a kill while it was written: after the checkpoint, so it goes
                break
            raise ValueError(f"{path}: line {i + 1} is not a JSON record; the log is damaged") from None
        if record.get("step", 0) <= step and record.get("event") != "end":
            keep.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


def write_checkpoint(out: Path, state: dict, student: nn.Module, decoder: nn.Module | None) -> None:
    """last.pt (``state``: the full training state), student.pt and, with a decoder, decoder_training_only.pt."""
    atomic_torch_save(state, out / "last.pt")
    atomic_torch_save({"step": state["step"], "config": state["config"], "student": student.state_dict()},
                      out / "student.pt")
    if decoder is not None:
        atomic_torch_save({"step": state["step"], "decoder": decoder.state_dict()}, out / "decoder_training_only.pt")


def write_best(out: Path, step: int, cfg: Config, student: nn.Module, scores: dict) -> None:
    atomic_torch_save({"step": step, "config": cfg.to_dict(), "student": student.state_dict(),
                       "score": scores["miou"], "scores": scores}, out / "best.pt")


def read_resume_state(out: Path, cfg: Config, device) -> dict:
    """The training state in ``out``/last.pt, after checking it may continue under ``cfg``."""
    path = out / "last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    state = torch.load(path, map_location=device, weights_only=False)
    if state.get("version") != CHECKPOINT_VERSION:
        raise RuntimeError(f"checkpoint version {state.get('version')} is not supported "
                           f"(this trainer writes version {CHECKPOINT_VERSION})")
    saved, now = merge_dict(Config(), state["config"], origin=str(path)).to_dict(), cfg.to_dict()
    diff = [f"{s}.{k}" for s in saved for k in saved[s]
            if saved[s][k] != now[s][k] and f"{s}.{k}" not in RESUME_MAY_CHANGE]
    if diff:
        raise ConfigError(f"--resume: the config differs from the checkpoint's in {', '.join(diff)}; "
                          "resume with the same config (see config.json in the run folder)")
    return state


def load_checkpoint_student(path: str | os.PathLike) -> tuple[StudentEmbeddingNet, Config, dict]:
    """(student in eval mode, its run's config, checkpoint) from best.pt / student.pt / last.pt."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found (train first: python -m training.train_distill)")
    # Our own checkpoints; last.pt holds numpy RNG state, which weights_only refuses.
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "student" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path} is not a training checkpoint (expected keys 'config' and 'student')")
    cfg = config_from_dict(ckpt["config"])
    student = build_student(cfg)
    student.load_state_dict(ckpt["student"])
    student.eval()
    return student, cfg, ckpt
