"""Load and validate an exported artifact folder (``model/best/`` by default).

An artifact is ``model.npz`` (float32 arrays, flat dotted names as in the
student's state dict), ``meta.json`` (format version, the layer list the
forward pass is rebuilt from, input normalisation, cluster defaults,
provenance), ``metrics.json`` (``score``, ``step``, evaluation figures) and
optionally ``model.onnx``. docs/runtime.md documents every field.

Validation is strict, and every failure is an ``ArtifactError`` that says what
is wrong and what to do: unknown format version, missing files or keys,
arrays missing / misshapen / not float32 / non-finite, arrays that meta.json
does not describe, and a ``weights_sha256`` that does not match the arrays.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import ArtifactError
from .network import required_halo
from .upsample import Upsample

ARTIFACT_FORMAT_VERSION = 1  # the meta.json format this runtime reads (and training.export writes)
ARTIFACT_KIND = "mapseg-artifact"
ARTIFACT_FILES = ("meta.json", "metrics.json", "model.npz", "model.onnx")
REQUIRED_META = ("format", "format_version", "architecture", "embed_dim", "max_k", "stride", "temperature",
                 "input", "cluster_defaults", "provenance", "weights_sha256")
NORM_KINDS = ("group", "batch")


def weights_digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over (name, shape, float32 little-endian bytes) of every array, in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name], dtype="<f4")
        h.update(name.encode())
        h.update(repr(tuple(a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Artifact:
    path: Path
    meta: dict
    metrics: dict
    arrays: dict = field(repr=False)
    onnx_path: Optional[Path] = None

    @property
    def layers(self) -> list[dict]:
        return self.meta["architecture"]["layers"]

    @property
    def embed_dim(self) -> int:
        return int(self.meta["embed_dim"])

    @property
    def max_k(self) -> int:
        return int(self.meta["max_k"])

    @property
    def stride(self) -> int:
        return int(self.meta["stride"])

    @property
    def temperature(self) -> float:
        return float(self.meta["temperature"])

    @property
    def halo(self) -> int:
        return int(self.meta["architecture"]["halo"])

    @property
    def input_mean(self) -> np.ndarray:
        return np.asarray(self.meta["input"]["mean"], dtype=np.float32)

    @property
    def input_std(self) -> np.ndarray:
        return np.asarray(self.meta["input"]["std"], dtype=np.float32)

    @property
    def digest(self) -> str:
        return self.meta["weights_sha256"]

    @property
    def resolution(self) -> dict | None:
        """The ground resolution the model was trained at (``meta.json["resolution"]``: ``m_per_px``,
        ``range_m_per_px``, ``how``), or None where meta.json does not say or says neither figure."""
        res = self.meta.get("resolution")
        if not res or (res.get("m_per_px") is None and res.get("range_m_per_px") is None):
            return None
        return res

    @property
    def upsample(self) -> Upsample:
        """How this model's cell scores become pixel labels (``meta.json["upsample"]``; absent: nearest)."""
        return Upsample.from_json(self.meta.get("upsample"))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ArtifactError(f"artifact {path.parent}: {path.name} is missing (re-export with python -m training.export)")
    try:
        text = path.read_text()
    except OSError as exc:
        raise ArtifactError(f"artifact {path.parent}: {path} cannot be read ({exc.strerror or exc})") from exc
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ArtifactError(f"artifact {path.parent}: {path} is not valid JSON ({exc}): the file is truncated or "
                            "corrupt; copy it again or re-export (python -m training.export)") from exc
    if not isinstance(data, dict):
        raise ArtifactError(f"artifact {path.parent}: {path.name} must hold a JSON object")
    return data


def _expected_shapes(layer: dict) -> dict[str, tuple]:
    """Array name -> expected shape for one layer of the architecture description."""
    k, cin, cout = int(layer["kernel"]), int(layer["in_channels"]), int(layer["out_channels"])
    shapes = {layer["weight"]: (cout, cin, k, k)}
    if layer.get("bias"):
        shapes[layer["bias"]] = (cout,)
    norm = layer.get("norm")
    if norm:
        stat = (int(norm["groups"]),) if norm["kind"] == "group" else (cout,)
        shapes[norm["weight"]] = (cout,)
        shapes[norm["bias"]] = (cout,)
        shapes[norm["running_mean"]] = stat
        shapes[norm["running_var"]] = stat
    return shapes


def validate(meta: dict, arrays: dict[str, np.ndarray], where: str = "artifact") -> None:
    """Check meta.json against the arrays; raise ArtifactError naming the first problem."""
    version = meta.get("format_version")
    if meta.get("format") != ARTIFACT_KIND:
        raise ArtifactError(f"{where}: meta.json 'format' is {meta.get('format')!r}, expected {ARTIFACT_KIND!r}")
    if version != ARTIFACT_FORMAT_VERSION:
        raise ArtifactError(f"{where}: unknown artifact format version {version!r}; this mapseg reads version "
                            f"{ARTIFACT_FORMAT_VERSION} (upgrade mapseg, or re-export the model with this version)")
    missing = [key for key in REQUIRED_META if key not in meta]
    if missing:
        raise ArtifactError(f"{where}: meta.json lacks {', '.join(missing)}")
    arch = meta["architecture"]
    layers = arch.get("layers")
    if not isinstance(layers, list) or not layers:
        raise ArtifactError(f"{where}: meta.json architecture.layers must be a non-empty list")
    expected: dict[str, tuple] = {}
    channels = int(meta["input"].get("channels", 3))
    stride = 1
    for i, layer in enumerate(layers):
        name = layer.get("name", f"#{i}")
        for key in ("op", "kernel", "stride", "padding", "in_channels", "out_channels", "weight"):
            if key not in layer:
                raise ArtifactError(f"{where}: layer {name} lacks '{key}'")
        if layer["op"] != "conv2d":
            raise ArtifactError(f"{where}: layer {name}: unsupported op {layer['op']!r} (conv2d only)")
        if layer.get("activation") not in (None, "relu"):
            raise ArtifactError(f"{where}: layer {name}: unsupported activation {layer['activation']!r}")
        norm = layer.get("norm")
        if norm and norm.get("kind") not in NORM_KINDS:
            raise ArtifactError(f"{where}: layer {name}: unsupported norm {norm.get('kind')!r}")
        if int(layer["in_channels"]) != channels:
            raise ArtifactError(f"{where}: layer {name} takes {layer['in_channels']} channels but receives {channels}")
        channels = int(layer["out_channels"])
        stride *= int(layer["stride"])
        expected.update(_expected_shapes(layer))
    if channels != int(meta["embed_dim"]):
        raise ArtifactError(f"{where}: the last layer gives {channels} channels but embed_dim is {meta['embed_dim']}")
    if stride != int(meta["stride"]) or stride != 4:
        raise ArtifactError(f"{where}: the layers' total stride is {stride}; meta.json says {meta['stride']} "
                            "(the runtime needs 4)")
    if not 2 <= int(meta["max_k"]) <= 255:
        raise ArtifactError(f"{where}: max_k={meta['max_k']} must be in [2, 255]")
    if not float(meta["temperature"]) > 0:
        raise ArtifactError(f"{where}: temperature must be > 0")
    inp = meta["input"]
    for key in ("mean", "std"):
        values = inp.get(key)
        if not (isinstance(values, list) and len(values) == 3 and all(np.isfinite(values))):
            raise ArtifactError(f"{where}: input.{key} must be three finite numbers")
    if min(inp["std"]) <= 0:
        raise ArtifactError(f"{where}: input.std must be positive")
    for key in ("mean_array", "std_array"):
        if inp.get(key):
            expected[inp[key]] = (1, 3, 1, 1)
    for name, shape in expected.items():
        if name not in arrays:
            raise ArtifactError(f"{where}: model.npz lacks array '{name}' (expected shape {shape})")
        a = arrays[name]
        if tuple(a.shape) != shape:
            raise ArtifactError(f"{where}: array '{name}' has shape {tuple(a.shape)}, expected {shape}")
        if a.dtype != np.float32:
            raise ArtifactError(f"{where}: array '{name}' is {a.dtype}, expected float32")
        if not np.isfinite(a).all():
            raise ArtifactError(f"{where}: array '{name}' holds non-finite values (NaN or inf): "
                                "the checkpoint is broken; export another one")
    extra = sorted(set(arrays) - set(expected))
    if extra:
        raise ArtifactError(f"{where}: model.npz holds arrays that meta.json does not describe: {', '.join(extra)}")
    for key, arr in (("mean", inp.get("mean_array")), ("std", inp.get("std_array"))):
        if arr and not np.allclose(arrays[arr].ravel(), inp[key], rtol=0, atol=1e-6):
            raise ArtifactError(f"{where}: input.{key} disagrees with array '{arr}'")
    digest = weights_digest(arrays)
    if digest != meta["weights_sha256"]:
        raise ArtifactError(f"{where}: model.npz does not match meta.json (weights_sha256 differs): "
                            "the files come from different exports")
    _check_resolution(meta.get("resolution"), where)
    Upsample.from_json(meta.get("upsample"), where)
    need = required_halo(layers)
    if int(arch.get("halo", -1)) < need:
        raise ArtifactError(f"{where}: architecture.halo={arch.get('halo')} is below the {need} pixels "
                            "the layers need for seamless windows")


def _check_resolution(res, where: str) -> None:
    """``resolution`` (optional; null = unknown): {"m_per_px": > 0 or null, "range_m_per_px": [lo, hi] with
    0 < lo <= hi, or null, "how": text}."""
    if res is None:
        return
    if not isinstance(res, dict):
        raise ArtifactError(f"{where}: meta.json 'resolution' must be an object (m_per_px, range_m_per_px, how) or null")
    m, span, how = res.get("m_per_px"), res.get("range_m_per_px"), res.get("how")
    if m is not None and not (isinstance(m, (int, float)) and not isinstance(m, bool) and np.isfinite(m) and m > 0):
        raise ArtifactError(f"{where}: meta.json resolution.m_per_px must be a positive number or null, not {m!r}")
    if span is not None and not (isinstance(span, list) and len(span) == 2
                                 and all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
                                         for v in span) and 0 < span[0] <= span[1]):
        raise ArtifactError(f"{where}: meta.json resolution.range_m_per_px must be [lo, hi] with 0 < lo <= hi, "
                            f"or null, not {span!r}")
    if how is not None and not isinstance(how, str):
        raise ArtifactError(f"{where}: meta.json resolution.how must be text")


def load_artifact(path: str | Path) -> Artifact:
    """Read and validate an artifact folder; raise ArtifactError with a clear message."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"model folder {path} does not exist: pass --model DIR with an exported artifact "
                            "(python -m training.export), or --model kmeans for colour k-means")
    if not path.is_dir():
        raise ArtifactError(f"model path {path} is not a folder (an artifact is a folder with model.npz and meta.json)")
    meta = _read_json(path / "meta.json")
    if meta.get("format_version") != ARTIFACT_FORMAT_VERSION or meta.get("format") != ARTIFACT_KIND:
        validate(meta, {}, str(path))  # raises the format / version error before touching the arrays
    metrics = _read_json(path / "metrics.json")
    npz = path / "model.npz"
    if not npz.is_file():
        raise ArtifactError(f"artifact {path}: model.npz is missing (re-export with python -m training.export)")
    try:
        with np.load(npz, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except Exception as exc:  # noqa: BLE001 - a truncated zip raises BadZipFile, zlib.error, EOFError, ...
        raise ArtifactError(f"artifact {path}: {npz} cannot be read ({type(exc).__name__}: {exc}): the file is "
                            "truncated or corrupt; copy it again or re-export (python -m training.export)") from exc
    try:
        validate(meta, arrays, str(path))
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ArtifactError):
            raise
        raise ArtifactError(f"artifact {path}: meta.json is malformed ({type(exc).__name__}: {exc}); "
                            "re-export the model (python -m training.export)") from exc
    for key in ("score", "step"):
        if key not in metrics:
            raise ArtifactError(f"artifact {path}: metrics.json lacks '{key}'")
    onnx = path / "model.onnx"
    return Artifact(path=path, meta=meta, metrics=metrics, arrays=arrays, onnx_path=onnx if onnx.is_file() else None)


def resolution_text(res: dict | None) -> str:
    """The training resolution of ``meta.json["resolution"]`` in words (``unknown`` where it does not say)."""
    if not res or (res.get("m_per_px") is None and res.get("range_m_per_px") is None):
        how = (res or {}).get("how")
        return "unknown" + (f" ({how})" if how else " (meta.json does not say)")
    parts = []
    if res.get("m_per_px") is not None:
        parts.append(f"{res['m_per_px']:g} m/px")
    if res.get("range_m_per_px") is not None:
        lo, hi = res["range_m_per_px"]
        parts.append(f"{lo:g}-{hi:g} m/px")
    return " in ".join(parts) + (f" ({res['how']})" if res.get("how") else "")


def describe(artifact: Artifact) -> str:
    """Human-readable summary for ``mapseg info``."""
    m, arch = artifact.meta, artifact.meta["architecture"]
    prov = m.get("provenance", {})
    lines = [
        f"artifact        {artifact.path}",
        f"format          {m['format']} v{m['format_version']}",
        f"architecture    {arch.get('name', '?')}: width {arch.get('width', '?')}, depth {arch.get('depth', '?')}, "
        f"norm {arch.get('norm', '?')}, {len(arch['layers'])} conv layers",
        f"embed_dim       {m['embed_dim']}",
        f"stride          {m['stride']}",
        f"receptive field {arch.get('receptive_field', '?')} px, halo {arch['halo']} px",
        f"max_k           {m['max_k']}   (default K {m['cluster_defaults'].get('k', '?')})",
        f"temperature     {m['temperature']}",
        f"resolution      {resolution_text(m.get('resolution'))}",
        f"upsample        {Upsample.from_json(m.get('upsample')).describe()}",
        f"input           RGB in [0,1] then (x - {m['input']['mean']}) / {m['input']['std']}",
        f"flops / MP      {arch.get('flops_per_megapixel', float('nan')) / 1e9:.1f} GFLOP",
        f"onnx            {'model.onnx' if artifact.onnx_path else 'not exported'}",
        f"weights sha256  {m['weights_sha256']}",
        f"score           {artifact.metrics.get('score')} at step {artifact.metrics.get('step')}",
    ]
    for key in ("teacher", "data", "steps", "seed", "code_version", "exported_at"):
        if key in prov:
            lines.append(f"{key:<15} {json.dumps(prov[key], sort_keys=True) if isinstance(prov[key], dict) else prov[key]}")
    return "\n".join(lines)
