"""One tile of a shard build: read and check the input (and target), write the shard's GeoTIFFs and the
SLIC superpixels, and record the item.

Invalid tiles (unreadable, not RGB, wrong dtype, missing georeference when
required, too small) raise ``InvalidTile`` with the reason; the build lists
them in ``summary.json``.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .discovery import BuildError, Item, relative_path
from .header_schema import DatasetHeader
from .superpixels import compute_superpixels, preview_panel, write_npz

MIN_SIDE = 16


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
    base = {"item_id": it.item_id, "raw_split": it.raw_split, "input": relative_path(it.input_path, root),
            "target": relative_path(it.target_path, root) if it.target_path else None}
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
