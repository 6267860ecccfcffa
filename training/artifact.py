"""The artifact writer: a trained student -> the runtime's model folder (the one contract with ``mapseg``).

The folder (format: docs/runtime.md) holds ``model.npz`` (the student's
eval-mode state dict as float32, flat dotted names, norms NOT folded: the
runtime folds them at load time), ``meta.json`` (the layer list the runtime
rebuilds the forward pass from, as the student describes it, input
normalisation, stride, receptive field and halo, temperature, cluster
defaults, provenance, the ground resolution of the training data:
``training.data.resolution``), ``metrics.json`` (``score``, ``step`` and the evaluation
figures) and, with ``onnx=True``, ``model.onnx`` (norms folded). The
training-only reconstruction decoder and distillation head are never part of it.

``export_artifact`` writes into a temporary sibling folder, checks the result
(the numpy forward pass of the written artifact, and model.onnx with
onnxruntime, must match the student's eval-mode torch forward pass) and only
then moves it into place. The trainer calls it when its validation score
improves; ``python -m training.export`` calls it for a checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from mapseg import ARTIFACT_FORMAT_VERSION
from mapseg.artifact import ARTIFACT_KIND, load_artifact, weights_digest
from mapseg.backends import BackendUnavailable, OnnxBackend, build_onnx_model
from mapseg.network import NumpyNetwork, edge_contamination, flops_per_megapixel, receptive_field, required_halo
from mapseg.upsample import Upsample

from .config import Config, merge_dict
from .data.resolution import training_resolution
from .models.student_cnn import StudentEmbeddingNet

L2_EPS = 1e-6  # StudentEmbeddingNet.embed: F.normalize(..., eps=1e-6)
VERIFY_TOLERANCE = 1e-4


class ExportError(RuntimeError):
    pass


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


def build_meta(student: StudentEmbeddingNet, cfg: Config, layers: list[dict], arrays: dict, provenance: dict,
               metrics: dict) -> dict:
    """meta.json: what the runtime needs to rebuild and run ``student`` (trained under ``cfg``), and provenance."""
    data, teacher = cfg.data, cfg.teacher
    top, bottom = edge_contamination(layers)
    prov = {
        "teacher": {k: getattr(teacher, k) for k in ("name", "variant", "weights", "patch_mode")},
        "distill": bool(cfg.distill.enabled),
        "data": {k: getattr(data, k) for k in ("source", "dataset_id", "mixture", "processed_root", "raster_paths",
                                               "patch_sizes", "bands", "synthetic_classes")},
        "steps": int(metrics["step"]),
        "configured_steps": cfg.train.steps,
        "seed": cfg.train.seed,
        "code_version": _code_version(),
        "torch_version": torch.__version__,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": cfg.to_dict(),
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
        "max_k": cfg.model.max_k,
        "stride": student.stride,
        "temperature": cfg.model.temperature,
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
            "k": cfg.knobs.eval_k,
            "k_choices": list(cfg.knobs.k_choices),
            "metric": "cosine",
            "assignment": "argmax of cosine similarity between L2-normalised embeddings and centres",
            "kmeans_iters": cfg.model.kmeans_iters,
        },
        "provenance": prov,
        "resolution": training_resolution(cfg),
        # how the runtime draws cell scores at full resolution (mapseg/upsample.py: chosen on both dev sets)
        "upsample": Upsample("guided").to_json(),
        "arrays": {name: list(a.shape) for name, a in arrays.items()},
        "weights_sha256": weights_digest(arrays),
    }


def _code_version() -> str:
    try:
        return version("map-segmenter")
    except PackageNotFoundError:
        return "unknown (map-segmenter is not installed as a package)"


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


def export_artifact(student: nn.Module, cfg: Config | dict, out_dir: str | os.PathLike, metrics: dict,
                    provenance: dict | None = None, *, onnx: bool = False, verify: bool = True) -> Path:
    """Write the runtime artifact of ``student`` (its eval-mode parameters) to ``out_dir``, atomically.

    ``cfg`` is the run's config (a ``Config``, or a dict of sections merged into the defaults).
    ``metrics`` must hold ``score`` and ``step`` (anything else is copied to
    metrics.json); ``provenance`` entries are added to (and override) the ones
    derived from ``cfg`` (teacher, data, steps, seed, code version).
    ``onnx=True`` also writes model.onnx (needs the ``onnx`` package). The
    student's train/eval mode is left as it was. Returns the folder.
    """
    if not isinstance(student, StudentEmbeddingNet):
        raise ExportError(f"expected a StudentEmbeddingNet, got {type(student).__name__}")
    if not isinstance(cfg, Config):
        cfg = merge_dict(Config(), cfg, origin="the exported run's config")
    for key in ("score", "step"):
        if key not in metrics:
            raise ExportError(f"metrics must contain '{key}'")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    layers = student.layers()
    arrays = student_arrays(student, layers)
    bad = [n for n, a in arrays.items() if not np.isfinite(a).all()]
    if bad:
        raise ExportError(f"the student holds non-finite values in {', '.join(bad)}: not exporting")
    metrics = _jsonable(dict(metrics))
    meta = _jsonable(build_meta(student, cfg, layers, arrays, provenance or {}, metrics))
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        np.savez(tmp / "model.npz", **arrays)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        if onnx:
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


def verify_onnx(student: StudentEmbeddingNet, out_dir: Path, size: int = 64, seed: int = 1) -> float:
    """Max |onnxruntime - torch| embedding difference of the written model.onnx; raises if large or if
    onnxruntime (which the ``onnx`` extra installs with onnx) is missing: an unchecked model.onnx is not shipped."""
    try:
        backend = OnnxBackend(load_artifact(out_dir), threads=1)
    except BackendUnavailable as exc:
        raise ExportError(f"cannot check model.onnx: {exc}") from exc
    return _check_against_student(student, backend.embed, "model.onnx", size, seed)
