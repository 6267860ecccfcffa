"""Export a trained student to the runtime artifact: ``python -m training.export``.

    python -m training.export --checkpoint runs/default/best.pt --out model/best [--onnx]
    python -m training.export --smoke-out /tmp/runtime_smoke --seed 7 --steps 1 --embed-dim 8 --max-k 4 --patch-size 32

The artifact folder (format: docs/runtime.md) holds ``model.npz`` (the
student's eval-mode state dict as float32, flat dotted names, norms NOT
folded: the runtime folds them at load time), ``meta.json`` (the layer list
the runtime rebuilds the forward pass from, input normalisation, stride,
receptive field and halo, temperature, cluster defaults, provenance),
``metrics.json`` (``score``, ``step`` and the evaluation figures) and, with
``--onnx``, ``model.onnx`` (norms folded). The training-only reconstruction
decoder is never part of it.

``export_artifact`` is the reusable entry point (the trainer calls it when its
validation score improves). It writes into a temporary sibling folder, checks
the result (the numpy forward pass of the written artifact must match the
student's eval-mode torch forward pass) and only then moves it into place.

``--smoke-out`` trains a tiny student for a few steps with the real trainer
(synthetic data, temporary run folder) and exports that student.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from mapseg import ARTIFACT_FORMAT_VERSION
from mapseg.artifact import ARTIFACT_KIND, load_artifact, weights_digest
from mapseg.network import NumpyNetwork, edge_contamination, flops_per_megapixel, receptive_field, required_halo

from .config import Config, config_from_dict, set_value, validate
from .models.student_cnn import RunningGroupNorm, StudentEmbeddingNet, build_student

DEFAULT_OUT = "model/best"
L2_EPS = 1e-6  # StudentEmbeddingNet.embed: F.normalize(..., eps=1e-6)
VERIFY_TOLERANCE = 1e-4


class ExportError(RuntimeError):
    pass


# --------------------------------------------------------------------------- description

def _norm_spec(prefix: str, norm: nn.Module) -> dict | None:
    if isinstance(norm, RunningGroupNorm):
        return {"kind": "group", "groups": norm.num_groups, "eps": norm.eps, "weight": f"{prefix}.weight",
                "bias": f"{prefix}.bias", "running_mean": f"{prefix}.running_mean",
                "running_var": f"{prefix}.running_var"}
    if isinstance(norm, nn.BatchNorm2d):
        if not norm.track_running_stats or not norm.affine:
            raise ExportError(f"{prefix}: BatchNorm2d without running statistics or affine cannot be exported")
        return {"kind": "batch", "eps": norm.eps, "weight": f"{prefix}.weight", "bias": f"{prefix}.bias",
                "running_mean": f"{prefix}.running_mean", "running_var": f"{prefix}.running_var"}
    if isinstance(norm, nn.Identity):
        return None
    raise ExportError(f"{prefix}: unsupported norm module {type(norm).__name__}")


def _conv_spec(name: str, prefix: str, conv: nn.Conv2d, norm_prefix: str | None, norm: nn.Module | None,
               relu: bool) -> dict:
    k = conv.kernel_size
    if k[0] != k[1] or conv.stride[0] != conv.stride[1] or conv.padding[0] != conv.padding[1] \
            or conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
        raise ExportError(f"{prefix}: only square, ungrouped, undilated, zero-padded convolutions can be exported")
    return {"name": name, "op": "conv2d", "kernel": k[0],
            "stride": conv.stride[0], "padding": conv.padding[0], "in_channels": conv.in_channels,
            "out_channels": conv.out_channels, "weight": f"{prefix}.weight",
            "bias": f"{prefix}.bias" if conv.bias is not None else None,
            "norm": _norm_spec(norm_prefix, norm) if norm is not None else None,
            "activation": "relu" if relu else None}


def describe_student(student: StudentEmbeddingNet) -> list[dict]:
    """The layer list of meta.json, with array names as in ``student.state_dict()``."""
    if not isinstance(student, StudentEmbeddingNet):
        raise ExportError(f"expected a StudentEmbeddingNet, got {type(student).__name__}")
    blocks = [("stem1", student.stem1), ("stem2", student.stem2)]
    blocks += [(f"blocks.{i}", b) for i, b in enumerate(student.blocks)]
    layers = []
    for prefix, block in blocks:
        conv, norm, act = block
        if not isinstance(act, nn.ReLU):
            raise ExportError(f"{prefix}: expected ReLU, got {type(act).__name__}")
        layers.append(_conv_spec(prefix, f"{prefix}.0", conv, f"{prefix}.1", norm, True))
    layers.append(_conv_spec("proj", "proj", student.proj, None, None, False))
    return layers


def student_arrays(student: StudentEmbeddingNet, layers: list[dict]) -> dict[str, np.ndarray]:
    """Every array the layers name plus the input normalisation, as float32; refuses unknown state."""
    state = {k: v.detach().cpu() for k, v in student.state_dict().items()}
    names = {"input_mean", "input_std"}
    for layer in layers:
        names.update(n for n in (layer["weight"], layer["bias"]) if n)
        if layer["norm"]:
            names.update(layer["norm"][key] for key in ("weight", "bias", "running_mean", "running_var"))
    ignored = {k for k in state if k.endswith("num_batches_tracked")}
    unknown = sorted(set(state) - names - ignored)
    if unknown:
        raise ExportError(f"the student has state the exporter does not describe: {', '.join(unknown)}")
    return {name: state[name].float().numpy().astype(np.float32, copy=True) for name in sorted(names)}


def build_meta(student: StudentEmbeddingNet, cfg: dict, layers: list[dict], arrays: dict, provenance: dict,
               metrics: dict) -> dict:
    model, knobs, train = cfg.get("model", {}), cfg.get("knobs", {}), cfg.get("train", {})
    data, teacher = cfg.get("data", {}), cfg.get("teacher", {})
    top, bottom = edge_contamination(layers)
    prov = {
        "teacher": {k: teacher.get(k) for k in ("name", "variant", "weights", "patch_mode")},
        "distill": bool(cfg.get("distill", {}).get("enabled", False)),
        "data": {k: data.get(k) for k in ("source", "dataset_id", "processed_root", "raster_paths", "patch_sizes",
                                          "bands", "synthetic_classes")},
        "steps": int(metrics["step"]),
        "configured_steps": train.get("steps"),
        "seed": train.get("seed"),
        "code_version": _code_version(),
        "torch_version": torch.__version__,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": cfg,
    }
    prov.update(provenance or {})
    return {
        "format": ARTIFACT_KIND,
        "format_version": ARTIFACT_FORMAT_VERSION,
        "architecture": {
            "name": type(student).__name__,
            "width": student.width, "depth": student.depth, "norm": student.norm,
            "layers": layers,
            "output": {"op": "l2_normalize", "axis": "channels", "eps": L2_EPS},
            "layout": "weights (Cout, Cin, k, k); zero padding at every conv; ReLU after every norm",
            "receptive_field": receptive_field(layers),
            "edge_contamination_cells": [top, bottom],
            "halo": required_halo(layers),
            "flops_per_megapixel": flops_per_megapixel(layers),
        },
        "norm_folding": ("not folded: model.npz holds the eval-mode parameters as trained (group norms: running "
                         "statistics per group); the runtime folds each norm into the conv before it at load "
                         "time: scale = weight / sqrt(running_var + eps), shift = bias - running_mean * scale. "
                         "model.onnx, when present, holds the folded convolutions."),
        "embed_dim": student.embed_dim,
        "max_k": int(model.get("max_k", 16)),
        "stride": student.stride,
        "temperature": float(model.get("temperature", 0.8)),
        "input": {
            "channels": 3,
            "bands": "RGB",
            "scaling": {"uint8": 255, "uint16": 65535,
                        "rule": "divide by the dtype maximum into [0, 1] (16-bit: or a percentile stretch)"},
            "mean": [float(v) for v in arrays["input_mean"].ravel()],
            "std": [float(v) for v in arrays["input_std"].ravel()],
            "mean_array": "input_mean", "std_array": "input_std",
            "normalisation": "x' = (x - mean) / std per channel, x in [0, 1] (ImageNet statistics)",
            "fill": "nodata pixels and the bottom/right padding to a multiple of the stride take the value "
                    "mean (0 after normalisation)",
        },
        "cluster_defaults": {
            "k": int(knobs.get("eval_k", 5)),
            "k_choices": list(knobs.get("k_choices", ())),
            "metric": "cosine",
            "assignment": "argmax of cosine similarity between L2-normalised embeddings and centres",
            "kmeans_iters": int(model.get("kmeans_iters", 10)),
        },
        "provenance": prov,
        "arrays": {name: list(a.shape) for name, a in arrays.items()},
        "weights_sha256": weights_digest(arrays),
    }


def _code_version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version
        try:
            return version("map-segmenter")
        except PackageNotFoundError:
            return "unknown (map-segmenter is not installed as a package)"
    except ImportError:  # pragma: no cover
        return "unknown"


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# --------------------------------------------------------------------------- export

@torch.no_grad()
def _check_against_student(student: StudentEmbeddingNet, embed, what: str, size: int, seed: int) -> float:
    """Max |embed(image) - student(image)| on a seeded random image; ExportError naming ``what`` if too large."""
    image = np.random.default_rng(seed).random((size, size, 3), dtype=np.float32)
    ours = embed(image)
    was = student.training
    student.eval()
    try:
        dev = next(student.parameters()).device
        ref = student(torch.from_numpy(image).permute(2, 0, 1)[None].to(dev)).float()[0].permute(1, 2, 0).cpu().numpy()
    finally:
        student.train(was)
    diff = float(np.abs(ours - ref).max())
    if not diff <= VERIFY_TOLERANCE:
        raise ExportError(f"export check failed: {what} differs from the student by {diff:.2e}")
    return diff


def verify_artifact(student: StudentEmbeddingNet, out_dir: Path, size: int = 64, seed: int = 0) -> float:
    """Max |numpy - torch| embedding difference of the written artifact on a random image; raises if large."""
    return _check_against_student(student, NumpyNetwork.from_artifact(load_artifact(out_dir)),
                                  "the numpy forward pass", size, seed)


def export_artifact(student: nn.Module, cfg_dict: dict, out_dir: str | os.PathLike, metrics: dict,
                    provenance: dict | None = None, *, onnx: bool = False, verify: bool = True) -> Path:
    """Write the runtime artifact of ``student`` (its eval-mode parameters) to ``out_dir``, atomically.

    ``metrics`` must hold ``score`` and ``step`` (anything else is copied to
    metrics.json); ``provenance`` entries are added to (and override) the ones
    derived from ``cfg_dict`` (teacher, data, steps, seed, code version).
    ``onnx=True`` also writes model.onnx (needs the ``onnx`` package). The
    student's train/eval mode is left as it was. Returns the folder.
    """
    for key in ("score", "step"):
        if key not in metrics:
            raise ExportError(f"metrics must contain '{key}'")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    layers = describe_student(student)
    arrays = student_arrays(student, layers)
    bad = [n for n, a in arrays.items() if not np.isfinite(a).all()]
    if bad:
        raise ExportError(f"the student holds non-finite values in {', '.join(bad)}: not exporting")
    metrics = _jsonable(dict(metrics))
    meta = _jsonable(build_meta(student, cfg_dict, layers, arrays, provenance or {}, metrics))
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        np.savez(tmp / "model.npz", **arrays)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        if onnx:
            from mapseg.backends import build_onnx_model
            (tmp / "model.onnx").write_bytes(build_onnx_model(load_artifact(tmp)))
        if verify:
            verify_artifact(student, tmp)
            if onnx:
                verify_onnx(student, tmp)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _replace_dir(new: Path, dst: Path) -> None:
    """Move ``new`` to ``dst``; an existing ``dst`` is swapped out first and then removed."""
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(dst, old)
        os.rename(new, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(new, dst)


# --------------------------------------------------------------------------- checkpoints

def load_checkpoint_student(path: str | os.PathLike) -> tuple[StudentEmbeddingNet, dict, dict]:
    """(student in eval mode, config dict, checkpoint) from best.pt / student.pt / last.pt."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"checkpoint {path} not found (train first: python -m training.train_distill)")
    # Our own checkpoints; last.pt holds numpy RNG state, which weights_only refuses.
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "student" not in ckpt or "config" not in ckpt:
        raise ExportError(f"{path} is not a training checkpoint (expected keys 'config' and 'student')")
    cfg = config_from_dict(ckpt["config"])
    student = build_student(cfg)
    student.load_state_dict(ckpt["student"])
    student.eval()
    return student, cfg.to_dict(), ckpt


def checkpoint_metrics(student: StudentEmbeddingNet, cfg_dict: dict, ckpt: dict) -> dict:
    """best.pt carries its scores; for other checkpoints, evaluate as the trainer does."""
    if "scores" in ckpt and "score" in ckpt:
        return {"score": ckpt["score"], "step": ckpt["step"], **ckpt["scores"]}
    from .train_distill import Trainer

    cfg = config_from_dict(cfg_dict)
    trainer = Trainer(cfg, show_progress=False)
    trainer.student.load_state_dict(student.state_dict())
    scores = trainer.evaluate()
    if scores is None:  # e.g. data.source=geotiff: no labeled validation split to score on
        return {"score": None, "step": ckpt.get("step"), "evaluated_by": "training.export",
                "note": f"no labeled validation data for data.source={cfg.data.source}"}
    return {"score": scores["miou"], "step": ckpt.get("step"), **scores, "evaluated_by": "training.export"}


# --------------------------------------------------------------------------- smoke

def smoke_config(run_dir: str, seed: int, steps: int, embed_dim: int, max_k: int, patch_size: int,
                 width: int | None = None, depth: int | None = None) -> Config:
    cfg = Config()
    ks = sorted({2, max_k}) if max_k >= 2 else [max_k]
    overrides = {
        "student.embed_dim": embed_dim, "model.embed_dim": embed_dim, "model.max_k": max_k,
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
    from .train_distill import Trainer

    with tempfile.TemporaryDirectory(prefix="mapseg-smoke-") as tmp:
        cfg = smoke_config(str(Path(tmp) / "run"), seed, steps, embed_dim, max_k, patch_size, width, depth)
        trainer = Trainer(cfg, show_progress=False)
        trainer.fit()
        scores = trainer.evaluate()  # the trained student's own figures (deterministic)
        metrics = {"score": scores["miou"], "step": trainer.step, **scores}
        out = export_artifact(trainer.student, cfg.to_dict(), out_dir, metrics,
                              {"smoke": True, "note": f"smoke export: {steps} training step(s) on synthetic data"},
                              onnx=onnx)
    return out, metrics


# --------------------------------------------------------------------------- CLI

def verify_onnx(student: StudentEmbeddingNet, out_dir: Path, size: int = 64, seed: int = 1) -> float:
    """Max |onnxruntime - torch| embedding difference of the written model.onnx; raises if large or if
    onnxruntime (which the ``onnx`` extra installs with onnx) is missing: an unchecked model.onnx is not shipped."""
    from mapseg.backends import BackendUnavailable, OnnxBackend

    try:
        backend = OnnxBackend(load_artifact(out_dir), threads=1)
    except BackendUnavailable as exc:
        raise ExportError(f"cannot check model.onnx: {exc}") from exc
    return _check_against_student(student, backend.embed, "model.onnx", size, seed)


def dev_eval_summary(path: str | os.PathLike) -> dict:
    """The compact dev-set figures recorded in metrics.json / meta.json from a ``python -m training.eval --out``
    report: set, K, and per method accuracy, mIoU and per-class IoU (dataset-level Hungarian matching)."""
    rep = json.loads(Path(path).read_text())
    try:
        return {"evaluation_set": rep["evaluation_set"], "k": rep["k"], "smooth": rep.get("smooth", 0),
                "command": "python -m training.eval", "results": [
                    {"method": r["method"], "accuracy": r["dataset"]["accuracy"], "miou": r["dataset"]["miou"],
                     "per_class_iou": r["dataset"]["per_class_iou"],
                     "overcluster": {k: r["overcluster"][k] for k in ("k", "accuracy", "miou")}
                     if r.get("overcluster") else None} for r in rep["results"]]}
    except (KeyError, TypeError) as exc:
        raise ExportError(f"{path} is not a python -m training.eval --out report ({exc})") from exc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default="runs/default/best.pt",
                   help="training checkpoint: best.pt, student.pt or last.pt")
    p.add_argument("--out", default=DEFAULT_OUT, help="artifact folder to write (replaced atomically)")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx, checked against the student with "
                                                        "onnxruntime (needs the onnx extra)")
    p.add_argument("--dev-eval", metavar="JSON", help="a python -m training.eval --out report of this checkpoint: "
                                                      "its figures go into metrics.json and meta.json")
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
            student, cfg_dict, ckpt = load_checkpoint_student(args.checkpoint)
            metrics = checkpoint_metrics(student, cfg_dict, ckpt)
            prov = {"checkpoint": str(Path(args.checkpoint).resolve())}
            if args.dev_eval:
                metrics["dev_eval"] = prov["dev_eval"] = dev_eval_summary(args.dev_eval)
            out = export_artifact(student, cfg_dict, args.out, metrics, prov, onnx=args.onnx)
    except Exception as exc:  # noqa: BLE001 - the CLI reports every failure plainly
        from mapseg.artifact import ArtifactError
        from .config import ConfigError
        if isinstance(exc, (ExportError, ArtifactError, ConfigError, FileNotFoundError, ImportError)):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise
    print(json.dumps({"artifact": str(out), "score": metrics["score"], "step": metrics["step"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
