"""Training configuration: dataclasses with the documented defaults.

A config is built from the defaults, then (optionally) a config file, then
``--set section.field=value`` overrides. Every value is type-checked and
coerced against the dataclass annotation; an unknown key or a bad value is a
``ConfigError`` that names the key.

Config files:
  * ``.py``: a module exporting ``get_config()`` (returning a ``Config`` or a
    nested dict) or ``CONFIG`` (same).
  * ``.yaml`` / ``.yml``: a nested mapping merged into the defaults (needs PyYAML).
  * ``.json``: the same, e.g. the ``config.json`` saved by a run.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Tuple

import yaml


class ConfigError(ValueError):
    """A config key or value is invalid; the message names the key."""


@dataclass
class ModelConfig:
    max_k: int = 16              # largest K the soft k-means head accepts
    # Softmax temperature over cosine similarities of unit embeddings. The predecessor documented
    # 0.8, but cosines lie in [-1, 1]: at 0.8 assignments stay near-uniform, and the entropy and
    # pseudo-label terms then distort the embedding (synthetic val mIoU fell 0.58 -> 0.25 in 100
    # steps; with 0.1 it rose to 0.67). See README "Temperature".
    temperature: float = 0.1
    kmeans_iters: int = 10       # Lloyd iterations of the in-batch k-means
    kmeans_sample: int = 4096    # pixels sampled per batch to fit the in-batch centres


@dataclass
class DataConfig:
    source: str = "synthetic"                 # synthetic | shards | geotiff
    patch_size: int = 512                     # reference patch size (batch_size is given at this size)
    patch_sizes: Tuple[int, ...] = (256, 512, 1024)  # scales seen every step (scale-neutral merge)
    require_slic: bool = True                 # shards must carry precomputed SLIC
    num_workers: int = 0                      # DataLoader worker processes (0 = main process)
    prefetch_factor: int = 2
    persistent_workers: bool = False
    pin_memory: bool = False
    cache_mode: str = "none"                  # none | lru
    cache_max_items: int = 0                  # 0 = unbounded within a worker
    processed_root: str = "training/datasets/processed"
    dataset_id: str = ""
    # Shards of several datasets at once: "dataset_id:weight" entries (weight 1 when left out), drawn per image
    # with probability proportional to the weight (then uniformly within the dataset); replaces dataset_id.
    mixture: Tuple[str, ...] = ()
    train_split: str = "train"
    val_split: str = "val"
    metrics_split: str = "metrics_train"
    raster_paths: Tuple[str, ...] = ()
    target_paths: Tuple[str, ...] = ()
    bands: Tuple[int, ...] = (1, 2, 3)        # 1-based band indices read as RGB from rasters
    input_max: float = 0.0                    # geotiff: raw value of full brightness (0: 255 for uint8, from the
                                              # file or a sample for uint16)
    small_tiles: str = "skip"                 # tiles smaller than a patch size: skip | pad | error
    max_nodata_fraction: float = 0.5          # windows with more nodata are redrawn (a few tries)
    synthetic_classes: int = 5                # region types in the synthetic images
    synthetic_cells: int = 24                 # Voronoi cells per 512x512 of synthetic image
    val_samples: int = 8                      # synthetic validation images
    val_size: int = 256                       # synthetic validation image side


@dataclass
class AugConfig:
    hflip: float = 0.5           # probability of a horizontal flip in view 2
    vflip: float = 0.5
    rot90: bool = True           # random multiple of 90 degrees in view 2
    brightness: float = 0.1      # max additive brightness change (each view)
    contrast: float = 0.1        # max relative contrast change (each view)
    saturation: float = 0.1      # max relative saturation change (each view)
    noise_std: float = 0.02      # Gaussian pixel noise (each view)


@dataclass
class LossConfig:
    consistency_weight: float = 1.0   # symmetric KL between warped two-view probabilities
    entropy_weight: float = 0.5       # pixel entropy down
    marginal_weight: float = 0.5      # cluster-usage entropy up (as log K - H(marginal))
    smooth_weight: float = 0.5        # edge-aware TV on assignments
    smooth_edge_alpha: float = 10.0   # weight = exp(-alpha * |image gradient|)
    cluster_weight: float = 1.0       # cross-entropy against in-batch k-means pseudo-labels
    cross_view_labels: bool = True    # pseudo-labels from the other view (swapped prediction)
    ema_momentum: float = 0.99        # per-scale EMA used by the scale-neutral merge


@dataclass
class AutoencoderConfig:
    enabled: bool = True
    # Weight of the EMA-normalised (so ~1 in size) reconstruction loss, relative to the clustering
    # terms. The predecessor documented 0.01: then nothing keeps colour in the features and the
    # clustering terms erode it (synthetic val mIoU wandered 0.51-0.66 over 300 steps); at 1.0 it
    # held 0.73-0.75 (README "Reconstruction weight").
    lambda_recon: float = 1.0
    blur_sigma: float = 2.0           # Gaussian blur (input pixels) before stride-4 pooling
    grad_weight: float = 0.5          # weight of the Sobel gradient-magnitude L1 term
    hidden: int = 64                  # decoder width
    ema_momentum: float = 0.99


@dataclass
class TrainConfig:
    seed: int = 42
    steps: int = 1000
    batch_size: int = 4               # images per step at data.patch_size (scaled by area for other sizes)
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    grad_accum: int = 1
    grad_clip: float = 1.0
    checkpoint_every: int = 100
    eval_every: int = 100             # 0 disables periodic validation
    val_loss_batches: int = 4         # fixed validation batches whose loss terms each evaluation logs (0 = none)
    log_every: int = 10
    image_every: int = 100            # TensorBoard images every N steps (0 = never)
    checkpoint_dir: str = "runs/default"
    device: str = "auto"              # auto | cpu | cuda | mps
    amp: bool = False                 # CPU only: follow this flag (CUDA: always on; MPS: always off)
    deterministic: bool = True        # deterministic torch algorithms where available


@dataclass
class KnobsConfig:
    k_choices: Tuple[int, ...] = (2, 4, 8, 16)  # K drawn per step for the soft k-means head
    eval_k: int = 5                              # K used for validation scores


@dataclass
class TeacherConfig:
    name: str = "none"            # none | fake | dinov2 | efficientnet_lite0
    weights: str = ""             # local path to weights (dinov2: dir or file)
    patch_mode: str = "match"     # match | high | medium | low
    variant: str = "small"        # dinov2 size: small | base | large | giant
    dim: int = 64                 # fake teacher's feature size
    stages: Tuple[int, ...] = ()  # efficientnet_lite0: stage strides to concatenate (empty: from patch_mode)
    # efficientnet_lite0: input scales the teacher also sees the image at (1.0: as given; 0.5: at half size, twice
    # the context per feature), each scale's features normalised, resized to the finest grid and concatenated
    scales: Tuple[float, ...] = (1.0,)
    # Compute the teacher once per shard item (whole tile) and keep it beside the shards, instead of on every
    # crop at every step (training.data.teacher_cache): faster on a CPU; the targets see the whole tile.
    cache: bool = False


@dataclass
class StudentConfig:
    embed_dim: int = 96
    width: int = 96               # channels of the stride-4 blocks (stems use width/2, width)
    depth: int = 3                # VGG-style 3x3 blocks at stride 4
    norm: str = "group"           # group | batch | none
    norm_groups: int = 8
    norm_momentum: float = 0.1    # running-statistics momentum (used at eval/export)


@dataclass
class DistillConfig:
    enabled: bool = False
    proj_dim: int = 128
    # 5 rather than 1: at 1 the clustering terms outweigh the teacher (dubai_dev val mIoU 0.253 vs
    # 0.238 without a teacher, 200 steps); at 5 it reached 0.349 (README "Teachers and SLIC priors").
    feature_weight: float = 5.0
    affinity_weight: float = 5.0
    affinity_pairs: int = 4096
    boundary_weight: float = 0.0
    antimerge_weight: float = 0.0
    within_weight: float = 0.0
    prior_scale: str = "medium"   # superpixel scale of the antimerge / within priors: fine | medium | coarse
    prior_sigma: float = 0.1      # colour-contrast scale of the boundary / antimerge priors
    # Correspondence distillation (losses/correspondence.py, STEGO): weight and shift of the pairs of an image
    # with itself, with its nearest neighbour in the batch (teacher descriptor) and with a random other image.
    corr_self_weight: float = 0.0
    corr_knn_weight: float = 0.0
    corr_random_weight: float = 0.0
    corr_self_shift: float = 0.18
    corr_knn_shift: float = 0.12
    corr_random_shift: float = 0.46
    corr_points: int = 121        # cells sampled per image for the correlation tables


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    knobs: KnobsConfig = field(default_factory=KnobsConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))

# Keys of older configs (run folders' config.json, checkpoints, meta.json provenance) that now name another
# setting. Such a key is accepted only when it agrees with the setting that replaced it (checked by validate).
LEGACY_KEYS = {"model.embed_dim": "student.embed_dim"}  # the embedding width was set twice

_CHOICES = {
    ("data", "source"): ("synthetic", "shards", "geotiff"),
    ("data", "cache_mode"): ("none", "lru"),
    ("data", "small_tiles"): ("skip", "pad", "error"),
    ("train", "device"): ("auto", "cpu", "cuda", "mps"),
    ("teacher", "name"): ("none", "fake", "dinov2", "efficientnet_lite0"),
    ("teacher", "patch_mode"): ("match", "high", "medium", "low"),
    ("teacher", "variant"): ("small", "base", "large", "giant"),
    ("student", "norm"): ("group", "batch", "none"),
    ("distill", "prior_scale"): ("fine", "medium", "coarse"),
}


# --------------------------------------------------------------------------- coercion

def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Coerce ``value`` to annotation ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(key, value, args[0])
    if origin in (tuple, Tuple):
        (elem, *rest) = typing.get_args(tp)
        if isinstance(value, str):
            s = value.strip().strip("()[]")
            value = [v.strip() for v in s.split(",") if v.strip()] if s else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, elem) for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    raise ConfigError(f"config key '{key}': unsupported type {tp!r}")


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _field(cfg: Config, dotted: str) -> tuple[Any, str]:
    """(section object, field name) of a ``section.field`` key."""
    section, name = dotted.split(".")
    return getattr(cfg, section), name


def set_value(cfg: Config, dotted: str, value: Any) -> None:
    """Set ``section.field`` on ``cfg`` with coercion; unknown keys raise."""
    parts = dotted.split(".")
    if len(parts) != 2:
        raise ConfigError(f"config key '{dotted}': expected 'section.field' (sections: {', '.join(SECTIONS)})")
    section, name = parts
    if dotted in LEGACY_KEYS:  # remembered on the config, checked against its replacement by validate()
        sec, current = _field(cfg, LEGACY_KEYS[dotted])
        cfg.__dict__.setdefault("_legacy", {})[dotted] = _coerce(dotted, value, _hints(type(sec))[current])
        return
    if section not in SECTIONS:
        raise ConfigError(f"config key '{dotted}': unknown section '{section}' (sections: {', '.join(SECTIONS)})")
    sec = getattr(cfg, section)
    hints = _hints(type(sec))
    if name not in hints:
        raise ConfigError(
            f"config key '{dotted}': unknown field '{name}' in section '{section}' "
            f"(fields: {', '.join(sorted(hints))})"
        )
    setattr(sec, name, _coerce(dotted, value, hints[name]))


def merge_dict(cfg: Config, data: dict, origin: str = "config") -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping of sections, got {type(data).__name__}")
    for section, values in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{origin}: unknown section '{section}' (sections: {', '.join(SECTIONS)})")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: section '{section}' must be a mapping, got {values!r}")
        for name, value in values.items():
            set_value(cfg, f"{section}.{name}", value)
    return cfg


def validate(cfg: Config) -> Config:
    """Cross-field and range checks. Raises ConfigError naming the key."""
    for (section, name), choices in _CHOICES.items():
        v = getattr(getattr(cfg, section), name)
        if v not in choices:
            raise ConfigError(f"config key '{section}.{name}': {v!r} is not one of {', '.join(choices)}")
    for old, value in getattr(cfg, "_legacy", {}).items():
        section, current = _field(cfg, LEGACY_KEYS[old])
        if value != getattr(section, current):
            raise ConfigError(f"config key '{old}' ({value}) is the same setting as '{LEGACY_KEYS[old]}' "
                              f"({getattr(section, current)}), kept for older configs; set '{LEGACY_KEYS[old]}' alone")
    if not 2 <= cfg.model.max_k <= 16:
        raise ConfigError(f"config key 'model.max_k': {cfg.model.max_k} must be in [2, 16]")
    for k in cfg.knobs.k_choices:
        if not 2 <= k <= cfg.model.max_k:
            raise ConfigError(f"config key 'knobs.k_choices': K={k} must be in [2, model.max_k={cfg.model.max_k}]")
    if not cfg.knobs.k_choices:
        raise ConfigError("config key 'knobs.k_choices': must not be empty")
    if not 2 <= cfg.knobs.eval_k <= cfg.model.max_k:
        raise ConfigError(f"config key 'knobs.eval_k': {cfg.knobs.eval_k} must be in [2, {cfg.model.max_k}]")
    if not cfg.data.patch_sizes:
        raise ConfigError("config key 'data.patch_sizes': must not be empty")
    for s in cfg.data.patch_sizes + (cfg.data.patch_size, cfg.data.val_size):
        if s < 16 or s % 4:
            raise ConfigError(f"config key 'data.patch_sizes': {s} must be a multiple of 4 and >= 16")
    if cfg.model.temperature <= 0:
        raise ConfigError("config key 'model.temperature': must be > 0")
    positive = [("train", "steps"), ("train", "batch_size"), ("train", "grad_accum"),
                ("student", "width"), ("student", "embed_dim"), ("student", "norm_groups")]
    for section, name in positive:
        if getattr(getattr(cfg, section), name) < 1:
            raise ConfigError(f"config key '{section}.{name}': must be >= 1")
    if cfg.student.depth < 0:
        raise ConfigError("config key 'student.depth': must be >= 0")
    if cfg.student.norm == "group":
        for c in (cfg.student.width // 2, cfg.student.width):
            if c % cfg.student.norm_groups:
                raise ConfigError(
                    f"config key 'student.norm_groups': {cfg.student.norm_groups} must divide the "
                    f"stem and block widths ({cfg.student.width // 2}, {cfg.student.width})"
                )
    if cfg.student.width % 2:
        raise ConfigError("config key 'student.width': must be even")
    if not 0 < cfg.loss.ema_momentum < 1 or not 0 < cfg.autoencoder.ema_momentum < 1:
        raise ConfigError("config keys '*.ema_momentum': must be in (0, 1)")
    if cfg.data.input_max < 0:
        raise ConfigError("config key 'data.input_max': must be >= 0 (0: from the file)")
    if not 0.0 <= cfg.data.max_nodata_fraction <= 1.0:
        raise ConfigError("config key 'data.max_nodata_fraction': must be in [0, 1]")
    if len(cfg.data.bands) != 3 or min(cfg.data.bands) < 1:
        raise ConfigError(f"config key 'data.bands': expected three 1-based band indices, got {cfg.data.bands}")
    if cfg.data.target_paths and len(cfg.data.target_paths) != len(cfg.data.raster_paths):
        raise ConfigError("config key 'data.target_paths': needs one target per entry of data.raster_paths")
    d = cfg.distill
    if d.enabled and cfg.teacher.name == "none":
        raise ConfigError("config key 'distill.enabled': needs a teacher (teacher.name / --teacher)")
    if d.proj_dim < 1 or d.affinity_pairs < 1 or cfg.teacher.dim < 1 or d.corr_points < 1:
        raise ConfigError("config keys 'distill.proj_dim', 'distill.affinity_pairs', 'distill.corr_points', "
                          "'teacher.dim': must be >= 1")
    for name in ("feature_weight", "affinity_weight", "boundary_weight", "antimerge_weight", "within_weight",
                 "corr_self_weight", "corr_knn_weight", "corr_random_weight"):
        if getattr(d, name) < 0:
            raise ConfigError(f"config key 'distill.{name}': must be >= 0")
    if cfg.teacher.cache and (not d.enabled or cfg.data.source != "shards"):
        raise ConfigError("config key 'teacher.cache': keeps teacher features beside shards; it needs "
                          "distill.enabled and data.source=shards")
    for kind in ("self", "knn", "random"):
        if not 0.0 <= getattr(d, f"corr_{kind}_shift") <= 1.0:
            raise ConfigError(f"config key 'distill.corr_{kind}_shift': must be in [0, 1]")
    if (d.corr_knn_weight > 0 or d.corr_random_weight > 0) and min(n for _, n in batches_per_scale(cfg)) < 2:
        raise ConfigError("config keys 'distill.corr_knn_weight', 'distill.corr_random_weight': pairs of different "
                          "images need at least 2 images per batch at every patch size (see train.batch_size and "
                          "data.patch_sizes: the largest size gets the fewest)")
    if d.prior_sigma <= 0:
        raise ConfigError("config key 'distill.prior_sigma': must be > 0")
    priors = [n for n in ("boundary_weight", "antimerge_weight", "within_weight") if getattr(d, n) > 0]
    if priors and cfg.data.source != "shards":
        raise ConfigError(f"config key 'distill.{priors[0]}': SLIC priors need superpixels, which only shards "
                          "carry (data.source=shards); set the prior weights to 0 for other sources")
    if cfg.data.source == "geotiff" and not cfg.data.raster_paths:
        raise ConfigError("config key 'data.raster_paths': required when data.source=geotiff")
    if cfg.data.source == "shards" and bool(cfg.data.dataset_id) == bool(cfg.data.mixture):
        raise ConfigError("config key 'data.dataset_id': data.source=shards needs one dataset (data.dataset_id) "
                          "or a mixture (data.mixture), not both")
    shard_datasets(cfg)  # checks data.mixture's entries
    return cfg


def batches_per_scale(cfg: Config) -> list[tuple[int, int]]:
    """(patch size, images) per scale: batch_size at data.patch_size, scaled by area, at least 1."""
    ref = cfg.data.patch_size
    return [(s, max(1, int(round(cfg.train.batch_size * (ref / s) ** 2)))) for s in cfg.data.patch_sizes]


def shard_datasets(cfg: Config) -> list[tuple[str, float]]:
    """(dataset id, weight) of every shard dataset the run draws from: ``data.dataset_id`` alone (weight 1), or
    the entries of ``data.mixture``."""
    if not cfg.data.mixture:
        return [(cfg.data.dataset_id, 1.0)]
    out = []
    for entry in cfg.data.mixture:
        name, _, weight = entry.partition(":")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            w = float("nan")
        if not name or not w > 0 or w == float("inf"):
            raise ConfigError(f"config key 'data.mixture': {entry!r} is not dataset_id[:weight] with a weight > 0")
        out.append((name, w))
    if len({name for name, _ in out}) != len(out):
        raise ConfigError("config key 'data.mixture': a dataset is named twice")
    return out


# --------------------------------------------------------------------------- files

def _load_py(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(f"_mapseg_cfg_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{path}: cannot import as a Python config")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if hasattr(mod, "get_config"):
        return mod.get_config()
    if hasattr(mod, "CONFIG"):
        return mod.CONFIG
    raise ConfigError(f"{path}: a Python config must define get_config() or CONFIG")


def load_file(path: str | Path, cfg: Optional[Config] = None) -> Config:
    """Merge a .py / .yaml / .json config file into ``cfg`` (default: the defaults)."""
    path = Path(path)
    cfg = cfg if cfg is not None else Config()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".py":
        obj = _load_py(path)
        if isinstance(obj, Config):
            return merge_dict(cfg, obj.to_dict(), origin=str(path))
        return merge_dict(cfg, obj, origin=str(path))
    if suffix in (".yaml", ".yml"):
        with path.open() as fh:
            data = yaml.safe_load(fh) or {}
        return merge_dict(cfg, data, origin=str(path))
    if suffix == ".json":
        with path.open() as fh:
            return merge_dict(cfg, json.load(fh), origin=str(path))
    raise ConfigError(f"{path}: unknown config file type '{suffix}' (use .py, .yaml, .yml or .json)")


def parse_overrides(items) -> list[tuple[str, str]]:
    out = []
    for item in items or ():
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.field=value")
        key, value = item.split("=", 1)
        out.append((key.strip(), value.strip()))
    return out


def build_config(config_file: Optional[str] = None, overrides=()) -> Config:
    cfg = Config()
    if config_file:
        cfg = load_file(config_file, cfg)
    for key, value in parse_overrides(overrides):
        set_value(cfg, key, value)
    return validate(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def config_from_dict(data: dict) -> Config:
    return validate(merge_dict(Config(), data))
