"""Export a trained student to the runtime artifact: ``python -m training.export``.

    python -m training.export --checkpoint runs/default/best.pt --out model/best [--onnx] [--dev-eval a.json b.json]
    python -m training.export --smoke-out /tmp/runtime_smoke --seed 7 --steps 1 --embed-dim 8 --max-k 4 --patch-size 32

The command: it loads a checkpoint (``training.checkpoints``), takes its
scores (best.pt carries them; other checkpoints are scored on the run's
validation data, as the trainer scores them: ``training.validation``) and
writes the artifact with ``training.artifact.export_artifact`` (format:
docs/runtime.md), which checks the written forward pass against the student
before moving it into place.

``--smoke-out`` trains a tiny student for a few steps with the real trainer
(synthetic data, temporary run folder) and exports that student.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from mapseg.artifact import ArtifactError

from .artifact import ExportError, export_artifact
from .checkpoints import CheckpointError, load_checkpoint_student
from .config import Config, ConfigError, set_value, validate
from .data.sources import NoValidationData, validation_sets
from .device_policy import resolve_device
from .models.student_cnn import StudentEmbeddingNet
from .train_distill import Trainer
from .validation import score_on

DEFAULT_OUT = "model/best"


# --------------------------------------------------------------------------- checkpoints

def checkpoint_metrics(student: StudentEmbeddingNet, cfg: Config, ckpt: dict) -> dict:
    """best.pt carries its scores; other checkpoints are scored on the run's validation data as the trainer
    scores them (``validation.score_on``)."""
    if "scores" in ckpt and "score" in ckpt:
        return {"score": ckpt["score"], "step": ckpt["step"], **ckpt["scores"]}
    try:
        sets = validation_sets(cfg)
    except NoValidationData:  # e.g. data.source=geotiff: no labeled validation split to score on
        return {"score": None, "step": ckpt.get("step"), "evaluated_by": "training.export",
                "note": f"no labeled validation data for data.source={cfg.data.source}"}
    device = resolve_device(cfg.train.device, cfg.train.amp).device
    scores = score_on(student.to(device), sets, cfg, device)
    return {"score": scores["miou"], "step": ckpt.get("step"), **scores, "evaluated_by": "training.export"}


# --------------------------------------------------------------------------- smoke

def smoke_config(run_dir: str, seed: int, steps: int, embed_dim: int, max_k: int, patch_size: int,
                 width: int | None = None, depth: int | None = None) -> Config:
    cfg = Config()
    ks = sorted({2, max_k}) if max_k >= 2 else [max_k]
    overrides = {
        "student.embed_dim": embed_dim, "model.max_k": max_k,
        "knobs.k_choices": tuple(ks), "knobs.eval_k": max_k, "data.patch_sizes": (patch_size,),
        "data.patch_size": patch_size, "data.val_size": max(64, patch_size), "data.val_samples": 2,
        "train.steps": steps, "train.seed": seed, "train.checkpoint_dir": run_dir, "train.image_every": 0,
        "train.warmup_steps": 1, "train.device": "cpu", "autoencoder.enabled": True,
    }
    if width is not None:
        overrides["student.width"] = width
    if depth is not None:
        overrides["student.depth"] = depth
    for key, value in overrides.items():
        set_value(cfg, key, value)
    return validate(cfg)


def smoke_export(out_dir: str | os.PathLike, seed: int = 7, steps: int = 1, embed_dim: int = 8, max_k: int = 4,
                 patch_size: int = 32, width: int | None = None, depth: int | None = None,
                 onnx: bool = False) -> tuple[Path, dict]:
    """Train a tiny student with the real trainer (temporary run folder) and export it."""
    with tempfile.TemporaryDirectory(prefix="mapseg-smoke-") as tmp:
        cfg = smoke_config(str(Path(tmp) / "run"), seed, steps, embed_dim, max_k, patch_size, width, depth)
        trainer = Trainer(cfg, show_progress=False)
        trainer.fit()
        scores = trainer.evaluate()  # the trained student's own figures (deterministic)
        metrics = {"score": scores["miou"], "step": trainer.step, **scores}
        out = export_artifact(trainer.student, cfg, out_dir, metrics,
                              {"smoke": True, "note": f"smoke export: {steps} training step(s) on synthetic data"},
                              onnx=onnx)
    return out, metrics


# --------------------------------------------------------------------------- CLI

def dev_eval_summary(path: str | os.PathLike) -> dict:
    """The compact dev-set figures recorded in metrics.json / meta.json from a ``python -m training.eval --out``
    report: set, K, and per method accuracy, mIoU and per-class IoU (dataset-level Hungarian matching)."""
    rep = json.loads(Path(path).read_text())
    try:
        return {"evaluation_set": rep["evaluation_set"], "k": rep["k"], "smooth": rep.get("smooth", 0),
                "command": "python -m training.eval", "results": [
                    {"method": r["method"], "upsample": r.get("upsample"), "accuracy": r["dataset"]["accuracy"],
                     "miou": r["dataset"]["miou"],
                     "per_class_iou": r["dataset"]["per_class_iou"],
                     "overcluster": {k: r["overcluster"][k] for k in ("k", "accuracy", "miou")}
                     if r.get("overcluster") else None} for r in rep["results"]]}
    except (KeyError, TypeError) as exc:
        raise ExportError(f"{path} is not a python -m training.eval --out report ({exc})") from exc


def dev_eval_summaries(paths: list) -> list[dict]:
    """``dev_eval_summary`` of every report, in order; the same evaluation set twice is refused."""
    out = [dev_eval_summary(p) for p in paths]
    seen: dict = {}
    for path, rec in zip(paths, out):
        key = json.dumps([rec["evaluation_set"], rec["k"]], sort_keys=True)
        if key in seen:
            raise ExportError(f"--dev-eval: {path} and {seen[key]} evaluate the same set at the same K")
        seen[key] = path
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default="runs/default/best.pt",
                   help="training checkpoint: best.pt, student.pt or last.pt")
    p.add_argument("--out", default=DEFAULT_OUT, help="artifact folder to write (replaced atomically)")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx, checked against the student with "
                                                        "onnxruntime (needs the onnx extra)")
    p.add_argument("--dev-eval", metavar="JSON", nargs="+",
                   help="python -m training.eval --out reports of this checkpoint, one per dev set: their figures "
                        "go into metrics.json and meta.json (dev_eval: a list, in the order given)")
    p.add_argument("--smoke-out", metavar="DIR", help="train a tiny student (temporary run) and export it to DIR")
    p.add_argument("--seed", type=int, default=7, help="smoke: train.seed")
    p.add_argument("--steps", type=int, default=1, help="smoke: train.steps")
    p.add_argument("--embed-dim", type=int, default=8, help="smoke: student/model embed_dim")
    p.add_argument("--max-k", type=int, default=4, help="smoke: model.max_k")
    p.add_argument("--patch-size", type=int, default=32, help="smoke: data.patch_size(s)")
    p.add_argument("--width", type=int, default=None, help="smoke: student.width (default: the config default)")
    p.add_argument("--depth", type=int, default=None, help="smoke: student.depth (default: the config default)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.smoke_out:
            out, metrics = smoke_export(args.smoke_out, args.seed, args.steps, args.embed_dim, args.max_k,
                                        args.patch_size, args.width, args.depth, args.onnx)
        else:
            student, cfg, ckpt = load_checkpoint_student(args.checkpoint)
            metrics = checkpoint_metrics(student, cfg, ckpt)
            prov = {"checkpoint": str(Path(args.checkpoint).resolve())}
            if args.dev_eval:
                metrics["dev_eval"] = prov["dev_eval"] = dev_eval_summaries(args.dev_eval)
            out = export_artifact(student, cfg, args.out, metrics, prov, onnx=args.onnx)
    except (ExportError, CheckpointError, ArtifactError, ConfigError, FileNotFoundError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"artifact": str(out), "score": metrics["score"], "step": metrics["step"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
