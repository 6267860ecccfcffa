"""The ground resolution a run trained at, for the artifact's ``meta.json["resolution"]``.

    {"m_per_px": 1.0 | null, "range_m_per_px": [lo, hi] | null, "how": "..."}

Read from the georeference of the training data (the training split's shard
index entries, or the ``geotiff`` source's rasters): a pixel's ground size is
the square root of the area of the transform's pixel (``|a e - b d|``) times
the CRS's linear unit in metres, for projected CRSs. A tile without a
georeference or in a geographic CRS has no known size and is counted as such.

``m_per_px`` is the one size when every training tile has it (equal to 0.1 %);
``range_m_per_px`` is the smallest and largest known size (null when none is
known); ``how`` says where the figures come from, per dataset, and which
tiles had no known size. Synthetic data has no ground resolution (both null).
The runtime reads this key (``mapseg.artifact.Artifact.resolution``).
"""
from __future__ import annotations

import math
from typing import Optional

RELATIVE_TOLERANCE = 1e-3


def pixel_size_m(crs, transform) -> Optional[float]:
    """Ground size of one pixel in metres from a CRS (WKT / EPSG string or a rasterio CRS) and an affine
    transform (6 numbers a, b, c, d, e, f or an Affine); None when either is missing or the CRS is not
    projected."""
    if crs is None or transform is None:
        return None
    from rasterio.crs import CRS
    from rasterio.errors import CRSError
    try:
        crs = crs if isinstance(crs, CRS) else CRS.from_user_input(crs)
    except CRSError:
        return None
    if not crs.is_projected:
        return None
    _, factor = crs.linear_units_factor
    a, b, _, d, e, _ = list(transform)[:6]
    area = abs(a * e - b * d)
    if not area > 0 or not math.isfinite(area):
        return None
    return math.sqrt(area) * float(factor)


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def summarise(sizes: dict[str, list[Optional[float]]], source_words: str) -> dict:
    """``sizes``: per dataset (or raster group), the ground size of every training tile (None: unknown)."""
    known = [v for vs in sizes.values() for v in vs if v is not None]
    parts = []
    for name, vs in sizes.items():
        k = [v for v in vs if v is not None]
        n_unknown = len(vs) - len(k)
        if not k:
            parts.append(f"{name} {len(vs)} tile(s) unknown (no projected georeference)")
            continue
        lo, hi = min(k), max(k)
        size = f"{_fmt(lo)} m" if math.isclose(lo, hi, rel_tol=RELATIVE_TOLERANCE) else f"{_fmt(lo)}-{_fmt(hi)} m"
        parts.append(f"{name} {len(k)} tile(s) {size}" + (f", {n_unknown} unknown" if n_unknown else ""))
    n_all = sum(len(vs) for vs in sizes.values())
    how = f"ground pixel size of the {n_all} training tile(s) from their georeference ({source_words}): " + \
          "; ".join(parts)
    if not known:
        return {"m_per_px": None, "range_m_per_px": None, "how": how}
    lo, hi = min(known), max(known)
    same = len(known) == n_all and math.isclose(lo, hi, rel_tol=RELATIVE_TOLERANCE)
    if len(known) < n_all:
        how += "; the range covers the tiles of known size only"
    return {"m_per_px": round(float(lo), 6) if same else None,
            "range_m_per_px": [round(float(lo), 6), round(float(hi), 6)], "how": how}


def training_resolution(cfg) -> dict:
    """``meta.json["resolution"]`` of a run trained under ``cfg`` (see the module docstring)."""
    source = cfg.data.source
    if source == "synthetic":
        return {"m_per_px": None, "range_m_per_px": None,
                "how": "trained on synthetic images, which have no ground resolution"}
    if source == "shards":
        from ..config import shard_datasets
        from .sharded_tif_dataset import list_shards, read_index
        sizes: dict[str, list] = {}
        for dataset_id, _ in shard_datasets(cfg):
            try:
                shards = list_shards(cfg.data.processed_root, dataset_id, cfg.data.train_split)
                entries = [e for shard in shards for e in read_index(shard)]
            except (FileNotFoundError, ValueError) as exc:
                return {"m_per_px": None, "range_m_per_px": None,
                        "how": f"not known: the training shards could not be read at export time ({exc})"}
            sizes[dataset_id] = [pixel_size_m(e.get("crs"), e.get("transform")) for e in entries]
        return summarise(sizes, f"shard index of split {cfg.data.train_split!r} in {cfg.data.processed_root}")
    if source == "geotiff":
        import rasterio
        from rasterio.errors import RasterioIOError
        sizes = {}
        for path in cfg.data.raster_paths:
            try:
                with rasterio.open(path) as src:
                    sizes[path] = [pixel_size_m(src.crs, src.transform) if src.crs else None]
            except RasterioIOError as exc:
                return {"m_per_px": None, "range_m_per_px": None,
                        "how": f"not known: the training raster {path} could not be read at export time ({exc})"}
        return summarise(sizes, "the training rasters")
    raise ValueError(f"unknown data.source {source!r}")
