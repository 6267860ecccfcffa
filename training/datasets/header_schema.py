"""Dataset headers (YAML, v0): what a folder of rasters is and how it becomes shards.

``load_header(path)`` parses one header into typed, frozen dataclasses and
validates it. Every problem is reported at once, each naming the file and the
field (``modalities[1].channels``), in a ``HeaderError``. The format is
documented in ``docs/dataset/HEADERS.md``; in short::

    dataset_id: my_tiles            # output folder name
    version: "1"                    # the dataset's own version
    description: ...
    source_root: ../extracted/mine  # relative paths are relative to the header file
    modalities:
      - {name: rgb, role: input, kind: raster, pattern: "{split}/images/*.tif", channels: 3, dtype: uint8}
      - {name: mask, role: target, kind: raster, pattern: "{split}/masks/*.tif", channels: 1}
    pairing: {strategy: by_stem, input_modality: rgb, target_modality: mask,
              on_missing_input: drop_item, on_missing_target: allow, has_target_maps: true}
    splits: {raw: [train, val], seed: 123, labeled_policy: validation_only_with_metrics_subset,
             train_metric_fraction_of_labeled: 0.25, ratios: null, manifest_files: null,
             preserve_raw_split: false}
    sharding: {shard_size: 512, layout_version: 1, copy_mode: copy, force_uncompressed_tiff: true}
    validation_metrics: {iou_ignore_label_leq: 0, iou_average: macro_over_present_labels}
"""
from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import numpy as np
import yaml

from .superpixels import SlicParams

LAYOUT_VERSION = 1
ROLES = ("input", "target")
KINDS = ("raster",)
STRATEGIES = ("by_stem", "regex")
ON_MISSING_INPUT = ("drop_item", "error")
ON_MISSING_TARGET = ("allow", "drop_item", "error")
LABELED_POLICIES = ("validation_only_with_metrics_subset", "ratios")
COPY_MODES = ("copy",)
IOU_AVERAGES = ("macro_over_present_labels", "macro", "micro")
INPUT_DTYPES = ("uint8",)
DEFAULT_LABELED_POLICY = "validation_only_with_metrics_subset"
# Split names become folder names: keep them plain.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")


class HeaderError(ValueError):
    """A header is invalid. ``problems`` is a list of (field, message); the message names the file."""

    def __init__(self, path, problems: list[tuple[str, str]]):
        self.path, self.problems = str(path), problems
        lines = [f"{self.path}: field '{f}': {m}" if f else f"{self.path}: {m}" for f, m in problems]
        super().__init__(lines[0] if len(lines) == 1 else
                         f"{self.path}: {len(lines)} problems in the dataset header:\n  " + "\n  ".join(lines))


# --------------------------------------------------------------------------- typed header

@dataclass(frozen=True)
class ModalitySpec:
    name: str
    role: str                                # input | target
    kind: str = "raster"
    pattern: str = ""                        # glob relative to source_root; may contain {split}
    channels: Optional[int] = None           # input: 3 (after band selection); target: 1
    dtype: Optional[str] = None              # input: uint8; target: any integer type
    nodata: Optional[float] = None           # overrides the file's nodata when set
    georef_required: bool = False            # a tile without CRS/transform is invalid
    label_values: Optional[tuple] = None     # target: allowed class ids (other values make a tile invalid)
    bands: Optional[tuple] = None            # input: 1-based bands read as RGB (e.g. [1, 2, 3] of RGBN)


@dataclass(frozen=True)
class PairingSpec:
    strategy: str = "by_stem"                # by_stem | regex
    stem_regex: Optional[str] = None         # regex: re.search on the path relative to source_root, group 'stem'
    input_modality: str = ""
    target_modality: Optional[str] = None
    on_missing_input: str = "drop_item"      # a target without its input
    on_missing_target: str = "allow"         # an input without its target
    has_target_maps: bool = False


@dataclass(frozen=True)
class SplitSpec:
    raw: tuple = ("all",)                    # values substituted for {split} in the patterns
    seed: int = 123
    labeled_policy: str = DEFAULT_LABELED_POLICY
    train_metric_fraction_of_labeled: float = 0.25
    ratios: Optional[dict] = None            # labeled items: output split -> weight (labeled_policy: ratios)
    manifest_files: Optional[dict] = None    # output split -> file listing item stems (relative to source_root)
    preserve_raw_split: bool = False         # output split = raw split, for every item


@dataclass(frozen=True)
class ShardingSpec:
    shard_size: int = 512
    layout_version: int = LAYOUT_VERSION
    copy_mode: str = "copy"
    force_uncompressed_tiff: bool = True


@dataclass(frozen=True)
class ValidationMetricsSpec:
    iou_ignore_label_leq: int = 0            # target labels <= this are ignored by IoU
    iou_average: str = "macro_over_present_labels"


@dataclass(frozen=True)
class DatasetHeader:
    dataset_id: str
    version: str
    description: str
    source_root: str
    modalities: tuple
    pairing: PairingSpec
    splits: SplitSpec
    sharding: ShardingSpec = field(default_factory=ShardingSpec)
    validation_metrics: ValidationMetricsSpec = field(default_factory=ValidationMetricsSpec)
    slic: SlicParams = field(default_factory=SlicParams)
    path: Optional[str] = None               # the file it was read from (not part of the format)

    @property
    def input(self) -> ModalitySpec:
        return self.modality(self.pairing.input_modality)

    @property
    def target(self) -> Optional[ModalitySpec]:
        return self.modality(self.pairing.target_modality) if self.pairing.target_modality else None

    def modality(self, name: str) -> ModalitySpec:
        for m in self.modalities:
            if m.name == name:
                return m
        raise KeyError(name)

    @property
    def uses_split_placeholder(self) -> bool:
        return "{split}" in self.input.pattern

    def source_root_path(self) -> Path:
        """``source_root``; a relative one is taken relative to the header file's folder."""
        root = Path(self.source_root).expanduser()
        if not root.is_absolute() and self.path:
            root = (Path(self.path).resolve().parent / root).resolve()
        return root

    def to_dict(self) -> dict:
        """The header as plain data in the documented field order (what ``generate_headers`` writes)."""
        mods = []
        for m in self.modalities:
            d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(m).items()}
            mods.append({k: v for k, v in d.items() if v is not None or k in ("nodata",)})
        splits = asdict(self.splits)
        splits["raw"] = list(self.splits.raw)
        slic = self.slic.to_dict()
        return {
            "dataset_id": self.dataset_id, "version": self.version, "description": self.description,
            "source_root": self.source_root, "modalities": mods, "pairing": asdict(self.pairing),
            "splits": splits, "sharding": asdict(self.sharding),
            "validation_metrics": asdict(self.validation_metrics), "slic": slic,
        }

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- parsing

class _Checker:
    """Collects (field, message) problems while reading typed values out of mappings."""

    def __init__(self, path):
        self.path = path
        self.problems: list[tuple[str, str]] = []

    def bad(self, where: str, msg: str) -> None:
        self.problems.append((where, msg))

    def mapping(self, value, where: str, known: tuple) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.bad(where, f"expected a mapping, got {_tname(value)}")
            return {}
        for key in value:
            if key not in known:
                hint = difflib.get_close_matches(str(key), known, n=1)
                self.bad(f"{where}.{key}" if where else str(key),
                         "unknown field" + (f" (did you mean '{hint[0]}'?)" if hint else
                                            f" (known: {', '.join(known)})"))
        return value

    def get(self, d: dict, key: str, where: str, kind: str, default=None, required=False, choices=None):
        full = f"{where}.{key}" if where else key
        if key not in d or d[key] is None:
            if required:
                self.bad(full, "is required")
            return default
        v = d[key]
        ok = {
            "str": isinstance(v, str),
            "int": isinstance(v, int) and not isinstance(v, bool),
            "number": isinstance(v, (int, float)) and not isinstance(v, bool),
            "bool": isinstance(v, bool),
            "list": isinstance(v, list),
            "mapping": isinstance(v, dict),
            "version": isinstance(v, (str, int, float)) and not isinstance(v, bool),
        }[kind]
        if not ok:
            self.bad(full, f"expected {_KIND_WORDS[kind]}, got {_tname(v)} {v!r}")
            return default
        if kind == "str":
            v = v.strip()
            if required and not v:
                self.bad(full, "must not be empty")
                return default
        if choices is not None and v not in choices:
            self.bad(full, f"{v!r} is not one of: {', '.join(choices)}")
            return default
        return v


_KIND_WORDS = {"str": "a string", "int": "an integer", "number": "a number", "bool": "true or false",
               "list": "a list", "mapping": "a mapping", "version": "a string"}


def _tname(v) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def _check_pattern(c: _Checker, pattern: str, where: str) -> None:
    if pattern.startswith("/") or re.match(r"^[A-Za-z]:[\\/]", pattern):
        c.bad(where, f"{pattern!r} must be relative to source_root")
    if ".." in Path(pattern).parts:
        c.bad(where, f"{pattern!r} must not leave source_root ('..')")
    for name in _PLACEHOLDER_RE.findall(pattern):
        if name != "split":
            c.bad(where, f"unknown placeholder {{{name}}} (only {{split}} is supported)")


def _parse_modality(c: _Checker, raw, i: int) -> Optional[ModalitySpec]:
    where = f"modalities[{i}]"
    known = tuple(f.name for f in fields(ModalitySpec))
    if not isinstance(raw, dict):
        c.bad(where, f"expected a mapping, got {_tname(raw)}")
        return None
    d = c.mapping(raw, where, known)
    name = c.get(d, "name", where, "str", required=True)
    if name and not _NAME_RE.match(name):
        c.bad(f"{where}.name", f"{name!r} must be letters, digits, '_', '-', '.'")
    role = c.get(d, "role", where, "str", required=True, choices=ROLES)
    kind = c.get(d, "kind", where, "str", default="raster", choices=KINDS)
    pattern = c.get(d, "pattern", where, "str", required=True) or ""
    if pattern:
        _check_pattern(c, pattern, f"{where}.pattern")
    channels = c.get(d, "channels", where, "int")
    if channels is not None:
        if role == "input" and channels != 3:
            c.bad(f"{where}.channels", f"inputs are 3-channel RGB, got {channels} "
                                       "(use 'bands' to pick RGB out of a multi-band file)")
        if role == "target" and channels != 1:
            c.bad(f"{where}.channels", f"targets are single-band class maps, got {channels}")
    dtype = c.get(d, "dtype", where, "str")
    if dtype is not None:
        try:
            dt = np.dtype(dtype)
        except TypeError:
            c.bad(f"{where}.dtype", f"{dtype!r} is not a data type name (e.g. uint8)")
        else:
            if role == "input" and dt.name not in INPUT_DTYPES:
                c.bad(f"{where}.dtype", f"inputs must be 8-bit RGB ({', '.join(INPUT_DTYPES)}), got {dtype!r}")
            if role == "target" and dt.kind not in "iu":
                c.bad(f"{where}.dtype", f"targets must be an integer type, got {dtype!r}")
            dtype = dt.name
    nodata = c.get(d, "nodata", where, "number")
    georef = c.get(d, "georef_required", where, "bool", default=False)
    labels = c.get(d, "label_values", where, "list")
    if labels is not None:
        if role != "target":
            c.bad(f"{where}.label_values", "only target modalities have label values")
        elif not labels or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
            c.bad(f"{where}.label_values", f"expected a non-empty list of integers, got {labels!r}")
            labels = None
        else:
            labels = tuple(sorted(set(labels)))
    bands = c.get(d, "bands", where, "list")
    if bands is not None:
        if role != "input":
            c.bad(f"{where}.bands", "band selection applies to the input modality only")
        elif (len(bands) != 3 or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in bands)):
            c.bad(f"{where}.bands", f"expected three 1-based band numbers (R, G, B), got {bands!r}")
            bands = None
        else:
            bands = tuple(bands)
    if name is None or role is None:
        return None
    return ModalitySpec(name=name, role=role, kind=kind or "raster", pattern=pattern, channels=channels,
                        dtype=dtype, nodata=None if nodata is None else float(nodata), georef_required=georef,
                        label_values=labels, bands=bands)


def _parse_pairing(c: _Checker, raw, mods: list[ModalitySpec]) -> PairingSpec:
    where = "pairing"
    d = c.mapping(raw, where, tuple(f.name for f in fields(PairingSpec)))
    strategy = c.get(d, "strategy", where, "str", default="by_stem", choices=STRATEGIES)
    regex = c.get(d, "stem_regex", where, "str")
    if strategy == "regex":
        if not regex:
            c.bad("pairing.stem_regex", "is required with strategy: regex")
        else:
            try:
                compiled = re.compile(regex)
            except re.error as exc:
                c.bad("pairing.stem_regex", f"{regex!r} is not a valid regular expression ({exc})")
            else:
                if "stem" not in compiled.groupindex:
                    c.bad("pairing.stem_regex", f"{regex!r} has no named group 'stem', e.g. (?P<stem>[^/]+)_rgb\\.tif$")
    elif regex:
        c.bad("pairing.stem_regex", "is only used with strategy: regex (strategy is by_stem)")
    inputs = [m.name for m in mods if m.role == "input"]
    targets = [m.name for m in mods if m.role == "target"]
    inp = c.get(d, "input_modality", where, "str", default=inputs[0] if len(inputs) == 1 else None)
    if inp is None:
        c.bad("pairing.input_modality", "is required (name of the input modality)")
    elif inp not in inputs:
        c.bad("pairing.input_modality", f"{inp!r} is not an input modality (inputs: {', '.join(inputs) or 'none'})")
    tgt = c.get(d, "target_modality", where, "str", default=targets[0] if len(targets) == 1 else None)
    if tgt is not None and tgt not in targets:
        c.bad("pairing.target_modality", f"{tgt!r} is not a target modality (targets: {', '.join(targets) or 'none'})")
        tgt = None
    if len(targets) > 1 and "target_modality" not in d:
        c.bad("pairing.target_modality", f"several target modalities ({', '.join(targets)}): name the one to pair")
    for t in targets:
        if t != tgt and "target_modality" in d:
            c.bad("pairing.target_modality", f"target modality {t!r} is declared but not paired (v0 pairs one target)")
    has_maps = c.get(d, "has_target_maps", where, "bool")
    if has_maps is None:
        has_maps = tgt is not None
    elif has_maps and tgt is None:
        c.bad("pairing.has_target_maps", "is true but the modalities declare no paired target (role: target)")
    elif not has_maps and tgt is not None:
        c.bad("pairing.has_target_maps", f"is false but the modalities declare target {tgt!r}; "
                                         "set it to true or remove the target modality")
    on_in = c.get(d, "on_missing_input", where, "str", default="drop_item", choices=ON_MISSING_INPUT)
    on_tg = c.get(d, "on_missing_target", where, "str", default="allow", choices=ON_MISSING_TARGET)
    return PairingSpec(strategy=strategy or "by_stem", stem_regex=regex, input_modality=inp or "",
                       target_modality=tgt, on_missing_input=on_in or "drop_item",
                       on_missing_target=on_tg or "allow", has_target_maps=bool(has_maps))


def _split_name_map(c: _Checker, d: dict, key: str, kind: str) -> Optional[dict]:
    v = c.get(d, key, "splits", "mapping")
    if v is None:
        return None
    out = {}
    for name, value in v.items():
        where = f"splits.{key}.{name}"
        if not isinstance(name, str) or not _NAME_RE.match(name):
            c.bad(where, "split names must be letters, digits, '_', '-', '.'")
            continue
        if kind == "number":
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                c.bad(where, f"expected a number, got {_tname(value)} {value!r}")
            elif value < 0:
                c.bad(where, f"must be >= 0, got {value}")
            else:
                out[name] = float(value)
        else:
            if not isinstance(value, str) or not value.strip():
                c.bad(where, f"expected a file path, got {_tname(value)} {value!r}")
            else:
                out[name] = value.strip()
    if not v:
        c.bad(f"splits.{key}", "must not be empty (use null to leave it unset)")
    return out


def _parse_splits(c: _Checker, raw, uses_placeholder: bool) -> SplitSpec:
    where = "splits"
    d = c.mapping(raw, where, tuple(f.name for f in fields(SplitSpec)))
    raw_names = c.get(d, "raw", where, "list")
    if raw_names is None:
        if uses_placeholder:
            c.bad("splits.raw", "is required: the patterns use {split}")
        raw_names = ["all"]
    else:
        bad = [r for r in raw_names if not isinstance(r, str) or not r.strip()]
        if bad or not raw_names:
            c.bad("splits.raw", f"expected a non-empty list of split names, got {raw_names!r}")
            raw_names = ["all"]
        elif len(set(raw_names)) != len(raw_names):
            c.bad("splits.raw", f"has duplicates: {raw_names!r}")
        elif not uses_placeholder and len(raw_names) > 1:
            c.bad("splits.raw", f"lists {len(raw_names)} splits but no pattern contains {{split}}")
    seed = c.get(d, "seed", where, "int", default=123)
    policy = c.get(d, "labeled_policy", where, "str", default=DEFAULT_LABELED_POLICY, choices=LABELED_POLICIES)
    frac = c.get(d, "train_metric_fraction_of_labeled", where, "number", default=0.25)
    if not 0.0 <= frac <= 1.0:
        c.bad("splits.train_metric_fraction_of_labeled", f"must be in [0, 1], got {frac}")
    ratios = _split_name_map(c, d, "ratios", "number")
    if ratios is not None and ratios and sum(ratios.values()) <= 0:
        c.bad("splits.ratios", f"must sum to a positive number, got {ratios!r}")
    manifests = _split_name_map(c, d, "manifest_files", "path")
    preserve = c.get(d, "preserve_raw_split", where, "bool", default=False)
    if policy == "ratios" and not ratios:
        c.bad("splits.ratios", "is required with labeled_policy: ratios")
    if ratios and policy != "ratios":
        c.bad("splits.labeled_policy", f"is {policy!r} but splits.ratios is set; "
                                       "use labeled_policy: ratios to split labeled items by ratios, or remove ratios")
    if preserve and (ratios or manifests):
        c.bad("splits.preserve_raw_split", "is true, which contradicts splits.ratios / splits.manifest_files "
                                           "(the raw split decides everything)")
    if preserve:
        for r in raw_names:
            if isinstance(r, str) and not _NAME_RE.match(r):
                c.bad("splits.raw", f"{r!r} becomes an output folder with preserve_raw_split; use a plain name")
    return SplitSpec(raw=tuple(raw_names), seed=seed, labeled_policy=policy or DEFAULT_LABELED_POLICY,
                     train_metric_fraction_of_labeled=float(frac), ratios=ratios or None,
                     manifest_files=manifests or None, preserve_raw_split=preserve)


def _parse_sharding(c: _Checker, raw) -> ShardingSpec:
    where = "sharding"
    d = c.mapping(raw, where, tuple(f.name for f in fields(ShardingSpec)))
    size = c.get(d, "shard_size", where, "int", default=512)
    if size < 1:
        c.bad("sharding.shard_size", f"must be >= 1, got {size}")
    layout = c.get(d, "layout_version", where, "int", default=LAYOUT_VERSION)
    if layout != LAYOUT_VERSION:
        c.bad("sharding.layout_version", f"{layout} is not supported (this builder writes layout {LAYOUT_VERSION})")
    mode = c.get(d, "copy_mode", where, "str", default="copy", choices=COPY_MODES)
    force = c.get(d, "force_uncompressed_tiff", where, "bool", default=True)
    return ShardingSpec(shard_size=size, layout_version=layout, copy_mode=mode or "copy",
                        force_uncompressed_tiff=force)


def _parse_validation(c: _Checker, raw) -> ValidationMetricsSpec:
    where = "validation_metrics"
    d = c.mapping(raw, where, tuple(f.name for f in fields(ValidationMetricsSpec)))
    leq = c.get(d, "iou_ignore_label_leq", where, "int", default=0)
    avg = c.get(d, "iou_average", where, "str", default="macro_over_present_labels", choices=IOU_AVERAGES)
    return ValidationMetricsSpec(iou_ignore_label_leq=leq, iou_average=avg or "macro_over_present_labels")


def _parse_slic(c: _Checker, raw) -> SlicParams:
    where = "slic"
    names = tuple(f.name for f in fields(SlicParams))
    d = c.mapping(raw, where, names)
    base = SlicParams()
    kinds = {"algorithm": "str", "ruler": "number", "iterations": "int", "min_region_size": "int",
             "max_region_size": "int", "density_ref": "number", "size_at_ref": "int", "factors": "list",
             "min_element_percent": "int", "canny_low": "int", "canny_high": "int"}
    vals = {}
    for name in names:
        v = c.get(d, name, where, kinds[name], default=getattr(base, name))
        vals[name] = v
    if vals["algorithm"] != "slico":
        c.bad("slic.algorithm", f"{vals['algorithm']!r} is not supported (slico)")
    f = vals["factors"]
    if not (isinstance(f, (list, tuple)) and len(f) == 3 and all(isinstance(x, (int, float)) and x > 0 for x in f)):
        c.bad("slic.factors", f"expected three positive numbers (fine, medium, coarse), got {f!r}")
        vals["factors"] = base.factors
    else:
        vals["factors"] = tuple(float(x) for x in f)
    for name in ("iterations", "min_region_size", "max_region_size", "size_at_ref"):
        if vals[name] < 1:
            c.bad(f"slic.{name}", f"must be >= 1, got {vals[name]}")
    if vals["max_region_size"] < vals["min_region_size"]:
        c.bad("slic.max_region_size", "must be >= slic.min_region_size")
    if vals["density_ref"] <= 0:
        c.bad("slic.density_ref", "must be > 0")
    return SlicParams(**{k: (float(v) if k in ("ruler", "density_ref") else v) for k, v in vals.items()})


TOP_LEVEL = ("dataset_id", "version", "description", "source_root", "modalities", "pairing", "splits",
             "sharding", "validation_metrics", "slic")


def parse_header(data: Any, path: str | Path = "<header>") -> DatasetHeader:
    """Validate a header mapping (as loaded from YAML) and return typed objects, or raise HeaderError."""
    c = _Checker(path)
    if not isinstance(data, dict):
        raise HeaderError(path, [("", f"a dataset header must be a mapping at the top level, got {_tname(data)}")])
    c.mapping(data, "", TOP_LEVEL)
    dataset_id = c.get(data, "dataset_id", "", "str", required=True)
    if dataset_id and not _NAME_RE.match(dataset_id):
        c.bad("dataset_id", f"{dataset_id!r} becomes a folder name: use letters, digits, '_', '-', '.'")
    version = c.get(data, "version", "", "version", required=True)
    description = c.get(data, "description", "", "str", required=True)
    source_root = c.get(data, "source_root", "", "str", required=True)
    raw_mods = c.get(data, "modalities", "", "list", required=True) or []
    mods = [m for i, raw in enumerate(raw_mods) if (m := _parse_modality(c, raw, i)) is not None]
    names = [m.name for m in mods]
    for n in sorted({n for n in names if names.count(n) > 1}):
        c.bad("modalities", f"modality name {n!r} is used more than once")
    inputs = [m for m in mods if m.role == "input"]
    if raw_mods and not inputs:
        c.bad("modalities", "no modality has role: input")
    if len(inputs) > 1:
        c.bad("modalities", f"v0 has exactly one input modality, found {len(inputs)}: "
                            f"{', '.join(m.name for m in inputs)}")
    pairing = _parse_pairing(c, data.get("pairing"), mods)
    placeholder = {m.name: "{split}" in m.pattern for m in mods}
    uses = any(placeholder.values())
    paired = [m for m in mods if m.name in (pairing.input_modality, pairing.target_modality)]
    if uses and not all(placeholder[m.name] for m in paired):
        c.bad("modalities", "either every paired pattern contains {split} or none does "
                            f"({', '.join(f'{m.name}: {m.pattern!r}' for m in paired)})")
    splits = _parse_splits(c, data.get("splits"), uses)
    sharding = _parse_sharding(c, data.get("sharding"))
    validation = _parse_validation(c, data.get("validation_metrics"))
    slic = _parse_slic(c, data.get("slic"))
    if c.problems:
        raise HeaderError(path, c.problems)
    return DatasetHeader(dataset_id=dataset_id, version=str(version), description=description,
                         source_root=source_root, modalities=tuple(mods), pairing=pairing, splits=splits,
                         sharding=sharding, validation_metrics=validation, slic=slic, path=str(path))


def load_header(path: str | Path) -> DatasetHeader:
    path = Path(path)
    if not path.is_file():
        raise HeaderError(path, [("", "header file not found")])
    try:
        with path.open(encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        raise HeaderError(path, [("", f"not valid YAML: {exc}")]) from None
    return parse_header(data, path)


def header_files(headers_dir: str | Path) -> list[Path]:
    d = Path(headers_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"headers folder not found: {d}")
    return sorted(p for p in d.iterdir() if p.suffix.lower() in (".yaml", ".yml") and p.is_file())


def load_headers(headers_dir: str | Path, dataset_id: Optional[str] = None) -> list[DatasetHeader]:
    """Every header in a folder (``*.yaml``/``*.yml``), optionally only the one with ``dataset_id``."""
    headers = [load_header(p) for p in header_files(headers_dir)]
    seen: dict[str, str] = {}
    for h in headers:
        if h.dataset_id in seen:
            raise HeaderError(h.path, [("dataset_id", f"{h.dataset_id!r} is also used by {seen[h.dataset_id]}")])
        seen[h.dataset_id] = h.path
    if dataset_id is not None:
        headers = [h for h in headers if h.dataset_id == dataset_id]
        if not headers:
            raise FileNotFoundError(f"no header with dataset_id={dataset_id!r} in {headers_dir} "
                                    f"(found: {', '.join(sorted(seen)) or 'none'})")
    elif not headers:
        raise FileNotFoundError(f"no dataset headers (*.yaml) in {headers_dir}")
    return headers


def dump_header_yaml(header: DatasetHeader, comment: str = "") -> str:
    """YAML text of a header, validated by parsing it back."""
    text = yaml.safe_dump(header.to_dict(), sort_keys=False, default_flow_style=None, width=110)
    parse_header(yaml.safe_load(text), header.path or "<generated>")
    lines = [f"# {line}".rstrip() for line in comment.splitlines()] if comment else []
    return "\n".join(lines + [text.rstrip()]) + "\n"
