"""Build training shards from dataset headers: ``python -m training.datasets.build_shards``.

For each header: find the input (and target) rasters, pair them by stem or
regex, assign every item a split deterministically from the seed, and write::

    <processed_root>/<dataset_id>/
        summary.json  header.yaml  .build_shards.json
        <split>/shard-00000/index.jsonl  timing.jsonl
        <split>/shard-00000/inputs/<item_id>.tif    uncompressed 3-band uint8 GeoTIFF (CRS + transform kept)
        <split>/shard-00000/targets/<item_id>.tif   single-band class map (labeled items)
        <split>/shard-00000/slic/<item_id>.npz      SLICO superpixels at 3 scales + boundary masks
        previews/<split>/<item_id>.png              with --viz-interval N

Safety: the build happens in ``<processed_root>/.<dataset_id>.building`` and is
moved into place only when complete, so an interrupted build leaves the
previous output untouched; ``--resume`` continues an interrupted build,
skipping the tiles already written. An existing output is replaced only with
``--overwrite``, and only a folder this tool wrote (it holds
``.build_shards.json``) is ever deleted. Invalid tiles (unreadable, not RGB,
wrong dtype, missing georeference when required, too small) are listed with
the reason in ``summary.json`` and skipped (``--on-invalid error`` stops the
build instead).

Determinism: the same header, seed and shard size give byte-identical
``index.jsonl`` files and split assignments for any ``--threads``; wall-clock
timings are kept out of the index (``timing.jsonl``, ``summary.json``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
import zlib
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .header_schema import DatasetHeader, HeaderError, dump_header_yaml, load_header, load_headers
from .superpixels import SuperpixelError, compute_superpixels, preview_panel, require_ximgproc, write_npz

TOOL = "training.datasets.build_shards"
MARKER = ".build_shards.json"
MIN_SIDE = 16
DEFAULT_PROCESSED_ROOT = "training/datasets/processed"


class BuildError(RuntimeError):
    """The build cannot go on; the message says why and what to do."""


@dataclass
class Item:
    key: tuple                      # (raw_split, stem)
    raw_split: str
    stem: str
    input_path: Optional[Path]
    target_path: Optional[Path]
    item_id: str = ""
    split: str = ""
    rule: str = ""                  # which split rule placed it


@dataclass
class Discovery:
    items: list
    missing_input: list = field(default_factory=list)     # targets without an input
    missing_target: list = field(default_factory=list)    # inputs without a target
    unmatched: list = field(default_factory=list)         # files the stem regex did not match
    manifest_unmatched: list = field(default_factory=list)


# --------------------------------------------------------------------------- discovery & pairing

def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _glob(root: Path, pattern: str) -> list[Path]:
    return sorted(p for p in root.glob(pattern) if p.is_file())


def _files_by_key(header: DatasetHeader, modality, root: Path, unmatched: list) -> dict:
    """{(raw_split, stem): path} for one modality over every raw split."""
    regex = re.compile(header.pairing.stem_regex) if header.pairing.strategy == "regex" else None
    out: dict = {}
    raws = header.splits.raw if "{split}" in modality.pattern else header.splits.raw[:1]
    for raw in raws:
        for path in _glob(root, modality.pattern.replace("{split}", raw)):
            rel = _rel(path, root)
            if regex is not None:
                m = regex.search(rel)
                if m is None or not m.group("stem"):
                    unmatched.append({"modality": modality.name, "file": rel})
                    continue
                stem = m.group("stem")
            else:
                stem = path.stem
            key = (raw, stem)
            if key in out:
                raise BuildError(f"{header.path}: modality {modality.name!r}: two files have the stem {stem!r} "
                                 f"in raw split {raw!r}: {_rel(out[key], root)} and {rel}; make stems unique "
                                 "or use pairing.strategy: regex")
            out[key] = path
    return out


def _safe_id(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", stem).strip(".") or "item"


def discover(header: DatasetHeader, root: Path) -> Discovery:
    """Pair inputs and targets and apply ``on_missing_input`` / ``on_missing_target``."""
    if not root.is_dir():
        raise BuildError(f"{header.path}: source_root {root} is not a folder")
    unmatched: list = []
    inputs = _files_by_key(header, header.input, root, unmatched)
    targets = _files_by_key(header, header.target, root, unmatched) if header.target else {}
    if not inputs:
        raise BuildError(f"{header.path}: no input files match {header.input.pattern!r} under {root} "
                         f"(raw splits: {', '.join(header.splits.raw)})")
    disc = Discovery(items=[], unmatched=unmatched)
    p = header.pairing
    for key in sorted(set(inputs) | set(targets)):
        raw, stem = key
        inp, tgt = inputs.get(key), targets.get(key)
        if inp is None:
            rec = {"raw_split": raw, "stem": stem, "target": _rel(tgt, root), "action": p.on_missing_input}
            if p.on_missing_input == "error":
                raise BuildError(f"{header.path}: target {rec['target']} has no input "
                                 f"(pairing.on_missing_input: error)")
            disc.missing_input.append(rec)
            continue
        if header.target is not None and tgt is None:
            rec = {"raw_split": raw, "stem": stem, "input": _rel(inp, root), "action": p.on_missing_target}
            if p.on_missing_target == "error":
                raise BuildError(f"{header.path}: input {rec['input']} has no target "
                                 f"(pairing.on_missing_target: error)")
            disc.missing_target.append(rec)
            if p.on_missing_target == "drop_item":
                continue
        disc.items.append(Item(key=key, raw_split=raw, stem=stem, input_path=inp, target_path=tgt))
    # Item ids are the (file-safe) stems; stems repeated across raw splits get the raw split as a prefix.
    by_id: dict = {}
    for it in disc.items:
        by_id.setdefault(_safe_id(it.stem), []).append(it)
    for sid, group in by_id.items():
        for it in group:
            it.item_id = sid if len(group) == 1 else _safe_id(f"{it.raw_split}__{it.stem}")
    ids = [it.item_id for it in disc.items]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise BuildError(f"{header.path}: item ids collide after making them file-safe: {', '.join(dup[:5])}")
    return disc


# --------------------------------------------------------------------------- splits

def _read_manifest(path: Path) -> list[str]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def _permutation(n: int, seed: int, *tags: int) -> np.ndarray:
    return np.random.default_rng([seed, *tags]).permutation(n)


def _tag(name: str) -> int:
    return zlib.crc32(name.encode())


def assign_splits(disc: Discovery, header: DatasetHeader, seed: int, root: Path) -> dict:
    """Give every item its output split; returns {split: [items in shard order]}.

    Rules, in order: ``preserve_raw_split`` (split = raw split); items listed in
    ``manifest_files``; unlabeled items -> ``train``; labeled items -> a
    ``train_metric_fraction_of_labeled`` share to ``metrics_train`` and the rest
    to ``val`` (or by ``ratios`` with ``labeled_policy: ratios``). Shares are
    exact counts (rounded half up) over a seeded permutation of the items sorted
    by id, so the result depends only on the item ids and the seed.
    """
    s = header.splits
    items = sorted(disc.items, key=lambda it: it.item_id)
    if s.preserve_raw_split:
        for it in items:
            it.split, it.rule = it.raw_split, "preserve_raw_split"
    else:
        # A manifest line names an item by file name or stem ("tokyo_1.tif" or "tokyo_1").
        listed: dict = {}
        entries: list = []
        for split, rel in (s.manifest_files or {}).items():
            mpath = Path(rel) if Path(rel).is_absolute() else root / rel
            if not mpath.is_file():
                raise BuildError(f"{header.path}: splits.manifest_files.{split}: file not found: {mpath}")
            for entry in _read_manifest(mpath):
                name = Path(entry).name
                entries.append(name)
                for cand in {name, Path(name).stem}:
                    listed.setdefault(cand, set()).add(split)
        for it in items:
            splits = listed.get(it.stem)
            if splits:
                if len(splits) > 1:
                    raise BuildError(f"{header.path}: item {it.stem!r} is listed in several manifests: "
                                     f"{', '.join(sorted(splits))}")
                it.split, it.rule = next(iter(splits)), "manifest"
        stems = {it.stem for it in items}
        disc.manifest_unmatched = sorted({e for e in entries if e not in stems and Path(e).stem not in stems})
        rest = [it for it in items if not it.split]
        for it in rest:
            if it.target_path is None:
                it.split, it.rule = "train", "unlabeled"
        labeled = [it for it in rest if it.target_path is not None]
        perm = _permutation(len(labeled), seed, 0x5B117)
        shuffled = [labeled[i] for i in perm]
        if s.labeled_policy == "ratios":
            counts = _largest_remainder(len(shuffled), s.ratios)
            pos = 0
            for name in sorted(s.ratios):
                for it in shuffled[pos:pos + counts[name]]:
                    it.split, it.rule = name, "labeled_ratios"
                pos += counts[name]
        else:
            k = int(math.floor(s.train_metric_fraction_of_labeled * len(shuffled) + 0.5))
            for i, it in enumerate(shuffled):
                it.split, it.rule = ("metrics_train", "labeled_metrics_fraction") if i < k else \
                                    ("val", "labeled_metrics_fraction")
    out: dict = {}
    for it in items:
        out.setdefault(it.split, []).append(it)
    # Shard order: a seeded shuffle per split, so neighbouring tiles spread over shards.
    for split in out:
        group = out[split]
        out[split] = [group[i] for i in _permutation(len(group), seed, 0x5A4D, _tag(split))]
    return dict(sorted(out.items()))


def _largest_remainder(n: int, ratios: dict) -> dict:
    names = sorted(ratios)
    total = sum(ratios.values())
    exact = {k: n * ratios[k] / total for k in names}
    counts = {k: int(math.floor(exact[k])) for k in names}
    left = n - sum(counts.values())
    for k in sorted(names, key=lambda k: (-(exact[k] - counts[k]), k))[:left]:
        counts[k] += 1
    return counts


# --------------------------------------------------------------------------- one tile

@dataclass
class Task:
    item: Item
    split: str
    shard_dir: Path
    preview_path: Optional[Path]


def _georeferenced(src) -> bool:
    return src.crs is not None and not src.transform.is_identity


def _open(path: Path):
    import rasterio
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return rasterio.open(path)


class InvalidTile(Exception):
    pass


def _read_input(header: DatasetHeader, path: Path):
    m = header.input
    try:
        src = _open(path)
    except Exception as exc:  # rasterio raises RasterioIOError; anything else is just as unreadable
        raise InvalidTile(f"unreadable: {exc}") from None
    with src:
        if m.bands:
            if max(m.bands) > src.count:
                raise InvalidTile(f"has {src.count} band(s), header selects bands {list(m.bands)}")
            bands = list(m.bands)
        elif src.count != 3:
            raise InvalidTile(f"not RGB: {src.count} band(s) (select three with modalities[].bands)")
        else:
            bands = [1, 2, 3]
        dtypes = {src.dtypes[b - 1] for b in bands}
        want = m.dtype or "uint8"
        if dtypes != {want}:
            raise InvalidTile(f"wrong dtype: {'/'.join(sorted(dtypes))}, expected {want}")
        if src.height < MIN_SIDE or src.width < MIN_SIDE:
            raise InvalidTile(f"too small: {src.height}x{src.width} (minimum {MIN_SIDE}x{MIN_SIDE})")
        geo = _georeferenced(src)
        if m.georef_required and not geo:
            raise InvalidTile("no georeference (CRS and transform), and georef_required is true")
        try:
            data = src.read(bands)
        except Exception as exc:
            raise InvalidTile(f"unreadable: {exc}") from None
        nodata = m.nodata if m.nodata is not None else src.nodata
        info = {"crs": src.crs.to_string() if src.crs else None, "transform": list(src.transform)[:6],
                "georeferenced": geo, "nodata": None if nodata is None else float(nodata),
                "compress": src.profile.get("compress"), "bands": bands,
                "crs_obj": src.crs, "transform_obj": src.transform}
    return data, info


def _read_target(header: DatasetHeader, path: Path, shape, input_info: dict):
    m = header.target
    try:
        src = _open(path)
    except Exception as exc:
        raise InvalidTile(f"target unreadable: {exc}") from None
    with src:
        if src.count != 1:
            raise InvalidTile(f"target has {src.count} bands (expected one band of class ids)")
        dt = np.dtype(src.dtypes[0])
        if dt.kind not in "iu":
            raise InvalidTile(f"target dtype {dt.name} is not an integer type")
        if m.dtype and dt.name != m.dtype:
            raise InvalidTile(f"target dtype {dt.name}, expected {m.dtype}")
        if (src.height, src.width) != tuple(shape):
            raise InvalidTile(f"target is {src.height}x{src.width}, input is {shape[0]}x{shape[1]}")
        geo = _georeferenced(src)
        if m.georef_required and not geo:
            raise InvalidTile("target has no georeference, and georef_required is true")
        if geo and input_info["georeferenced"] and (
                src.crs != input_info["crs_obj"] or not src.transform.almost_equals(input_info["transform_obj"])):
            raise InvalidTile("target is not aligned with its input (CRS or transform differ)")
        try:
            data = src.read(1)
        except Exception as exc:
            raise InvalidTile(f"target unreadable: {exc}") from None
        nodata = m.nodata if m.nodata is not None else src.nodata
        if m.label_values is not None:
            values = np.unique(data)
            allowed = set(m.label_values) | ({int(nodata)} if nodata is not None else set())
            extra = [int(v) for v in values if int(v) not in allowed]
            if extra:
                raise InvalidTile(f"target has values {extra[:8]} outside label_values")
        info = {"crs": src.crs.to_string() if src.crs else None, "transform": list(src.transform)[:6],
                "georeferenced": geo, "nodata": None if nodata is None else float(nodata),
                "compress": src.profile.get("compress"), "crs_obj": src.crs, "transform_obj": src.transform}
    return data, info


def _write_tif(path: Path, data: np.ndarray, crs, transform, nodata, compress, photometric=None) -> None:
    import rasterio
    bands, h, w = data.shape
    profile = {"driver": "GTiff", "width": w, "height": h, "count": bands, "dtype": data.dtype.name,
               "nodata": nodata}
    if crs is not None:
        profile["crs"] = crs
    if transform is not None:
        profile["transform"] = transform
    if compress:
        profile["compress"] = compress
    if h >= 256 and w >= 256:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    if photometric:
        profile["photometric"] = photometric
    tmp = path.with_name(path.name + ".partial")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(data)
    os.replace(tmp, path)


def process_tile(header: DatasetHeader, root: Path, task: Task, allow_grid: bool) -> dict:
    """Validate, copy and superpixel one item. Returns {'entry', 'timing', 'target_problem'} or {'invalid'}."""
    it = task.item
    t0 = time.perf_counter()
    base = {"item_id": it.item_id, "raw_split": it.raw_split, "input": _rel(it.input_path, root),
            "target": _rel(it.target_path, root) if it.target_path else None}
    try:
        rgb, info = _read_input(header, it.input_path)
    except InvalidTile as exc:
        return _mark_done(task, {"invalid": {**base, "reason": str(exc)}})
    h, w = rgb.shape[1:]
    target, tinfo, target_problem = None, None, None
    if it.target_path is not None:
        try:
            target, tinfo = _read_target(header, it.target_path, (h, w), info)
        except InvalidTile as exc:
            # An unusable target counts as a missing one: on_missing_target decides.
            target_problem = {**base, "reason": str(exc), "action": header.pairing.on_missing_target}
            if header.pairing.on_missing_target == "error":
                raise BuildError(f"{header.path}: {base['target']}: {exc} (pairing.on_missing_target: error)")
            if header.pairing.on_missing_target == "drop_item":
                return _mark_done(task, {"invalid": {**base, "reason": str(exc)}})
    t_read = time.perf_counter() - t0
    crs = info["crs_obj"] if info["georeferenced"] else None
    transform = info["transform_obj"] if info["georeferenced"] else None
    compress_in = None if header.sharding.force_uncompressed_tiff else info["compress"]
    for sub in ("inputs", "slic") + (("targets",) if target is not None else ()):
        (task.shard_dir / sub).mkdir(parents=True, exist_ok=True)
    t1 = time.perf_counter()
    _write_tif(task.shard_dir / "inputs" / f"{it.item_id}.tif", rgb, crs, transform, info["nodata"], compress_in,
               photometric="RGB")
    target_georef = None
    if target is not None:
        if tinfo["georeferenced"]:
            t_crs, t_tr, target_georef = tinfo["crs_obj"], tinfo["transform_obj"], "own"
        elif info["georeferenced"]:
            # Same pixel grid as the input (shapes checked): give the target the input's georeference.
            t_crs, t_tr, target_georef = crs, transform, "from_input"
        else:
            t_crs, t_tr, target_georef = None, None, "none"
        compress_t = None if header.sharding.force_uncompressed_tiff else tinfo["compress"]
        _write_tif(task.shard_dir / "targets" / f"{it.item_id}.tif", target[None], t_crs, t_tr,
                   tinfo["nodata"], compress_t)
    t_write = time.perf_counter() - t1
    rgb_hwc = np.ascontiguousarray(rgb.transpose(1, 2, 0))
    sp = compute_superpixels(rgb_hwc, header.slic, allow_grid=allow_grid)
    tmp = task.shard_dir / "slic" / f"{it.item_id}.npz.partial"
    write_npz(tmp, sp)
    os.replace(tmp, task.shard_dir / "slic" / f"{it.item_id}.npz")
    if task.preview_path is not None:
        _write_preview(task.preview_path, rgb_hwc, sp)
    nodata_fraction = 0.0
    if info["nodata"] is not None:
        nodata_fraction = float(np.mean(np.all(rgb == info["nodata"], axis=0)))
    entry = {
        "dataset_id": header.dataset_id, "item_id": it.item_id, "raw_split": it.raw_split, "split": task.split,
        "input": f"inputs/{it.item_id}.tif", "has_target": target is not None,
        "target": f"targets/{it.item_id}.tif" if target is not None else None,
        "slic": f"slic/{it.item_id}.npz", "slic_meta": sp.meta,
        "height": int(h), "width": int(w), "bands": info["bands"], "crs": info["crs"],
        "transform": info["transform"] if info["georeferenced"] else None,
        "nodata": info["nodata"], "nodata_fraction": round(nodata_fraction, 6),
        "target_nodata": tinfo["nodata"] if target is not None else None,
        "target_georef": target_georef, "split_rule": it.rule,
        "source_input": base["input"], "source_target": base["target"],
    }
    timing = {"item_id": it.item_id, "megapixels": h * w / 1e6, "read_s": round(t_read, 4),
              "write_s": round(t_write, 4), "slic_s": round(sp.seconds, 4),
              "total_s": round(time.perf_counter() - t0, 4)}
    return _mark_done(task, {"entry": entry, "timing": timing, "target_problem": target_problem})


def _mark_done(task: Task, rec: dict) -> dict:
    """Record a finished tile (written or invalid) so that --resume skips it."""
    done = task.shard_dir / ".done"
    done.mkdir(parents=True, exist_ok=True)
    tmp = done / f"{task.item.item_id}.json.partial"
    tmp.write_text(json.dumps(rec, sort_keys=True))
    os.replace(tmp, done / f"{task.item.item_id}.json")
    return rec


def _write_preview(path: Path, rgb_hwc: np.ndarray, sp) -> None:
    import cv2
    panel = preview_panel(rgb_hwc, sp)
    if panel.shape[1] > 3072:  # keep previews light for big tiles
        scale = 3072 / panel.shape[1]
        panel = cv2.resize(panel, (3072, max(1, int(round(panel.shape[0] * scale)))), interpolation=cv2.INTER_AREA)
    ok, png = cv2.imencode(".png", cv2.cvtColor(panel, cv2.COLOR_RGB2BGR))
    if not ok:
        raise BuildError(f"could not encode preview {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_bytes(png.tobytes())
    os.replace(tmp, path)


# --------------------------------------------------------------------------- output folders

def _is_ours(path: Path) -> bool:
    marker = path / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("tool") == TOOL
    except (OSError, ValueError):
        return False


def _remove_ours(path: Path) -> None:
    if not _is_ours(path):
        raise BuildError(f"refusing to delete {path}: it was not written by {TOOL} (no {MARKER})")
    shutil.rmtree(path)


def _recover_swap(final: Path, old: Path) -> None:
    """Finish or undo a swap that was interrupted between its two renames."""
    if old.exists():
        if not _is_ours(old):
            raise BuildError(f"{old} exists and was not written by {TOOL}; move it away")
        if final.exists():
            _remove_ours(old)
        else:
            os.replace(old, final)


def _plan_digest(header: DatasetHeader, seed: int, shard_size: int, allow_grid: bool, plan) -> str:
    import hashlib
    h = hashlib.sha256()
    h.update(json.dumps({"header": header.digest(), "seed": seed, "shard_size": shard_size,
                         "allow_grid": allow_grid}, sort_keys=True).encode())
    for t in plan:
        h.update(json.dumps([t.split, t.shard_dir.name, t.item.item_id, str(t.item.input_path),
                             str(t.item.target_path)]).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- build

def build_dataset(header: DatasetHeader, processed_root: str | Path, *, seed: Optional[int] = None,
                  shard_size: Optional[int] = None, threads: int = 4, overwrite: bool = False,
                  resume: bool = False, viz_interval: int = 0, allow_grid: bool = False,
                  on_invalid: str = "skip", progress: bool = True) -> dict:
    """Build the shards of one dataset; returns the summary (also written to ``summary.json``)."""
    if on_invalid not in ("skip", "error"):
        raise ValueError(f"on_invalid must be skip or error, got {on_invalid!r}")
    if not allow_grid:
        require_ximgproc()  # fail before any work, with the install hint
    t_start = time.perf_counter()
    seed = header.splits.seed if seed is None else int(seed)
    shard_size = header.sharding.shard_size if shard_size is None else int(shard_size)
    if shard_size < 1:
        raise BuildError(f"--shard-size must be >= 1, got {shard_size}")
    threads = max(1, int(threads))
    root = header.source_root_path()
    processed_root = Path(processed_root)
    final = processed_root / header.dataset_id
    building = processed_root / f".{header.dataset_id}.building"
    old = processed_root / f".{header.dataset_id}.replaced"
    _recover_swap(final, old)
    if final.exists() and not _is_ours(final):
        raise BuildError(f"{final} exists and was not written by {TOOL} (no {MARKER}); "
                         "choose another --processed-root or move it away")
    if building.exists() and not _is_ours(building):
        raise BuildError(f"{building} exists and was not written by {TOOL}; move it away")
    if building.exists() and not (resume or overwrite):
        raise BuildError(f"an interrupted build of {header.dataset_id!r} is in {building}; "
                         "pass --resume to continue it or --overwrite to start again")
    if final.exists() and not overwrite and not resume:
        raise BuildError(f"{final} already exists; pass --overwrite to rebuild it "
                         "(the current shards stay in place until the new build is complete)")
    if resume and final.exists() and not building.exists() and not overwrite:
        raise BuildError(f"{final} is complete and there is no interrupted build to resume; "
                         "pass --overwrite to rebuild it")

    disc = discover(header, root)
    assignments = assign_splits(disc, header, seed, root)
    plan: list[Task] = []
    order = 0
    for split, items in assignments.items():
        for i, item in enumerate(items):
            shard_dir = building / split / f"shard-{i // shard_size:05d}"
            preview = None
            if viz_interval and order % viz_interval == 0:
                preview = building / "previews" / split / f"{item.item_id}.png"
            plan.append(Task(item, split, shard_dir, preview))
            order += 1
    digest = _plan_digest(header, seed, shard_size, allow_grid, plan)

    done: dict = {}
    if building.exists():
        state = json.loads((building / MARKER).read_text())
        if resume and state.get("plan_digest") == digest:
            for t in plan:
                f = t.shard_dir / ".done" / f"{t.item.item_id}.json"
                if f.is_file():
                    done[t.item.item_id] = json.loads(f.read_text())
        elif resume:
            raise BuildError(f"cannot resume {building}: the header, seed, shard size or the files found changed "
                             "since it started; rebuild with --overwrite")
        else:  # --overwrite: start again
            _remove_ours(building)
    if not building.exists():
        building.mkdir(parents=True)
        (building / MARKER).write_text(json.dumps({"tool": TOOL, "state": "building", "plan_digest": digest,
                                                   "dataset_id": header.dataset_id}, sort_keys=True) + "\n")

    results = {k: r for k, r in done.items() if "invalid" not in r}
    invalid = [r["invalid"] for r in done.values() if "invalid" in r]
    todo = [t for t in plan if t.item.item_id not in done]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(plan), initial=len(done), desc=f"shards {header.dataset_id}", unit="tile",
                   dynamic_ncols=True, file=sys.stderr)
    cv2_threads = None
    try:
        import cv2
        cv2_threads = cv2.getNumThreads()
        if threads > 1:
            cv2.setNumThreads(1)  # our workers already use the cores
    except ImportError:
        pass
    pool = ThreadPoolExecutor(max_workers=threads)
    try:
        pending = {pool.submit(process_tile, header, root, t, allow_grid): t for t in todo}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                t = pending.pop(fut)
                try:
                    rec = fut.result()
                except SuperpixelError as exc:
                    raise BuildError(str(exc)) from None
                if "invalid" in rec:
                    invalid.append(rec["invalid"])
                    if on_invalid == "error":
                        raise BuildError(f"{header.path}: invalid tile {rec['invalid']['input']}: "
                                         f"{rec['invalid']['reason']} (--on-invalid error; the partial build "
                                         "can be continued with --resume once the tile is fixed or removed)")
                else:
                    results[t.item.item_id] = rec
                if bar is not None:
                    bar.update(1)
    except BaseException:
        # Interrupted (error, Ctrl-C): drop the queued tiles, let running ones finish, keep the partial build.
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    else:
        pool.shutdown(wait=True)
    finally:
        if bar is not None:
            bar.close()
        if cv2_threads is not None:
            import cv2
            cv2.setNumThreads(cv2_threads)

    summary = _finalize(header, building, plan, results, invalid, disc, assignments, seed, shard_size, threads,
                        len(done), allow_grid, t_start)
    # Swap into place: the old output (if any) is moved aside, the new one renamed in, then the old removed.
    if final.exists():
        os.replace(final, old)
    os.replace(building, final)
    if old.exists():
        _remove_ours(old)
    return summary


def _finalize(header, building: Path, plan, results, invalid, disc, assignments, seed, shard_size, threads,
              resumed, allow_grid, t_start) -> dict:
    shards: dict = {}
    for t in plan:
        shards.setdefault(t.shard_dir, []).append(t)
    split_stats: dict = {}
    target_problems, algos = [], {}
    mp = slic_s = 0.0
    for shard_dir, tasks in shards.items():
        split = tasks[0].split
        st = split_stats.setdefault(split, {"items": 0, "labeled": 0, "shards": 0})
        recs = [results[t.item.item_id] for t in tasks if t.item.item_id in results]
        if not recs:
            if shard_dir.exists():
                shutil.rmtree(shard_dir)  # every tile of this shard was invalid; inside our build folder
            continue
        st["shards"] += 1
        st["items"] += len(recs)
        st["labeled"] += sum(r["entry"]["has_target"] for r in recs)
        with (shard_dir / "index.jsonl").open("w", encoding="utf-8") as fh:
            for r in recs:
                fh.write(json.dumps(r["entry"], sort_keys=True) + "\n")
        with (shard_dir / "timing.jsonl").open("w", encoding="utf-8") as fh:
            for r in recs:
                fh.write(json.dumps(r["timing"], sort_keys=True) + "\n")
        shutil.rmtree(shard_dir / ".done", ignore_errors=True)
        for r in recs:
            if r.get("target_problem"):
                target_problems.append(r["target_problem"])
            a = r["entry"]["slic_meta"]["algorithm"]
            algos[a] = algos.get(a, 0) + 1
            mp += r["timing"]["megapixels"]
            slic_s += r["timing"]["slic_s"]
    for stray in building.rglob("*.partial"):  # half-written files of an interrupted earlier run
        stray.unlink()
    wall = time.perf_counter() - t_start
    invalid = sorted(invalid, key=lambda r: r["item_id"])
    rule_counts: dict = {}
    for items in assignments.values():
        for it in items:
            rule_counts[it.rule] = rule_counts.get(it.rule, 0) + 1
    summary = {
        "tool": TOOL, "layout_version": header.sharding.layout_version, "dataset_id": header.dataset_id,
        "header": str(header.path), "header_digest": header.digest(), "source_root": str(header.source_root_path()),
        "seed": seed, "shard_size": shard_size, "threads": threads,
        "splits": dict(sorted(split_stats.items())),
        "split_rules": dict(sorted(rule_counts.items())),
        "items_found": len(plan), "items_written": sum(s["items"] for s in split_stats.values()),
        "invalid": {"count": len(invalid), "policy": "skip", "items": invalid},
        "invalid_targets": {"count": len(target_problems), "items": sorted(target_problems, key=lambda r: r["item_id"])},
        "missing_input": {"action": header.pairing.on_missing_input, **_listing(disc.missing_input)},
        "missing_target": {"action": header.pairing.on_missing_target, **_listing(disc.missing_target)},
        "unmatched_files": _listing(disc.unmatched),
        "manifest_unmatched": _listing(disc.manifest_unmatched),
        "slic": {"algorithms": algos, "grid_fallback_allowed": allow_grid, "seconds": round(slic_s, 3)},
        "timing": {"wall_seconds": round(wall, 3), "megapixels": round(mp, 4), "resumed_items": resumed,
                   "megapixels_per_second": round(mp / wall, 4) if wall > 0 else None},
        "validation_metrics": header.to_dict()["validation_metrics"],
    }
    (building / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    (building / "header.yaml").write_text(dump_header_yaml(header, f"Copy of {header.path} used for this build"))
    (building / MARKER).write_text(json.dumps({"tool": TOOL, "state": "complete", "dataset_id": header.dataset_id,
                                               "layout_version": header.sharding.layout_version},
                                              sort_keys=True) + "\n")
    return summary


def _listing(items: list, limit: int = 1000) -> dict:
    """Count and names; long lists of expected conditions (e.g. unlabeled tiles) keep the first ``limit``."""
    out = {"count": len(items), "items": items[:limit]}
    if len(items) > limit:
        out["items_truncated_to"] = limit
    return out


# --------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.datasets.build_shards",
                                description="Build training shards (GeoTIFF tiles + SLIC superpixels) from dataset "
                                            "headers. See docs/dataset/HEADERS.md.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--header", help="one dataset header (YAML)")
    src.add_argument("--headers-dir", help="build every header (*.yaml) in this folder")
    p.add_argument("--dataset-id", help="with --headers-dir: only the header with this dataset_id")
    p.add_argument("--processed-root", default=DEFAULT_PROCESSED_ROOT, help=f"where <dataset_id>/ is written (default: {DEFAULT_PROCESSED_ROOT})")
    p.add_argument("--seed", type=int, help="split/shard seed (default: the header's splits.seed)")
    p.add_argument("--shard-size", type=int, help="tiles per shard (default: the header's sharding.shard_size)")
    p.add_argument("--threads", type=int, default=4, help="parallel workers (default: 4)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (swapped in when complete)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted build, skipping finished tiles")
    p.add_argument("--viz-interval", type=int, default=0, metavar="N",
                   help="write a preview PNG (RGB | mean-colour superpixels | boundaries) for every Nth tile; 0 = none")
    p.add_argument("--allow-grid-superpixels", action="store_true",
                   help="if OpenCV contrib (cv2.ximgproc) is missing, use square grid cells (recorded in slic_meta)")
    p.add_argument("--on-invalid", choices=["skip", "error"], default="skip",
                   help="invalid tiles (unreadable, not RGB, wrong dtype...): skip and report them (default), or stop")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.dataset_id and not args.headers_dir:
        print("error: --dataset-id goes with --headers-dir", file=sys.stderr)
        return 2
    try:
        headers = [load_header(args.header)] if args.header else load_headers(args.headers_dir, args.dataset_id)
    except (HeaderError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    status = 0
    for header in headers:
        try:
            s = build_dataset(header, args.processed_root, seed=args.seed, shard_size=args.shard_size,
                              threads=args.threads, overwrite=args.overwrite, resume=args.resume,
                              viz_interval=args.viz_interval, allow_grid=args.allow_grid_superpixels,
                              on_invalid=args.on_invalid, progress=not args.no_progress)
        except (BuildError, SuperpixelError, HeaderError, FileNotFoundError) as exc:
            print(f"error: {header.dataset_id}: {exc}", file=sys.stderr)
            status = 2
            continue
        splits = ", ".join(f"{k}={v['items']} ({v['shards']} shards)" for k, v in s["splits"].items())
        print(f"{header.dataset_id}: {s['items_written']}/{s['items_found']} tiles -> {Path(args.processed_root) / header.dataset_id} "
              f"[{splits}]; invalid {s['invalid']['count']}; {s['timing']['megapixels']:.1f} MP in "
              f"{s['timing']['wall_seconds']:.1f} s ({s['timing']['megapixels_per_second']} MP/s)")
        for rec in s["invalid"]["items"]:
            print(f"  invalid: {rec['input']}: {rec['reason']}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
