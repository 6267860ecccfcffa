"""Training data as random windows of whole GeoTIFFs (``data.source=geotiff``).

``data.raster_paths`` are read with rasterio windows, never whole: each item
is one ``S x S`` window (``S`` = the scheduled patch size) of a raster drawn
with probability proportional to its area. Inputs are 8- or 16-bit: a 16-bit
raster is scaled by the value of full brightness the file gives (``NBITS``,
``STATISTICS_MAXIMUM``) or a sampled range, as ``mapseg`` does
(``mapseg.scaling.input_range``), or by ``data.input_max``; the choice is
printed for every such raster. ``data.bands``
(1-based) picks the three bands read as RGB, e.g. ``1,2,3`` of an RGBN NAIP
file. Nodata comes from the raster's masks (nodata value, alpha or internal
mask): a window with more than ``data.max_nodata_fraction`` nodata pixels is
redrawn (up to 10 tries, then the emptiest of them is used). Optional
``data.target_paths`` (one per raster, same pixel grid) give ``labels``
(int64, -1 at nodata) for metrics only.

Batches follow the one schedule (``training.data.schedule``) and are a pure
function of ``train.seed``, the rank and the batch key, so resuming is exact and ranks draw different
windows. No SLIC here: superpixels are precomputed by the shard builder only,
never at training time, so use shards when the SLIC losses are on. Rasters
smaller than ``S`` follow ``data.small_tiles`` (skip | pad | error).
"""
from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch

from mapseg.errors import SegmentError
from mapseg.raster.rasterio_io import range_metadata
from mapseg.scaling import input_range

from .crops import NODATA_TRIES, choose_window, collate, eligible_for_size, finish_item, least_nodata_crop
from ..config import batches_per_scale
from .schedule import BatchKey, step_loader


@dataclass(frozen=True)
class RasterInfo:
    path: str
    height: int
    width: int
    bands: tuple
    has_nodata: bool               # a nodata value, alpha band or mask: windows need their masks read
    target_path: Optional[str] = None
    target_nodata: Optional[float] = None
    input_max: float = 255.0       # raw value of full brightness: windows are scaled by 255 / input_max to 8 bits
    scaling: str = "uint8"         # how input_max is known


def _open(path):
    import rasterio
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return rasterio.open(path)


def _input_max(src, path, bands, input_max: float) -> tuple[float, str]:
    """(value of full brightness, how it is known) of an 8- or 16-bit raster (see the module doc)."""
    dtypes = {src.dtypes[b - 1] for b in bands}
    if len(dtypes) != 1 or dtypes.pop() not in ("uint8", "uint16"):
        raise ValueError(f"{path}: bands {list(bands)} are {'/'.join(sorted({src.dtypes[b - 1] for b in bands}))}; "
                         "inputs must be 8- or 16-bit RGB (convert or rescale the raster first)")
    dtype = src.dtypes[bands[0] - 1]
    if input_max > 0:
        return float(input_max), "data.input_max"
    if dtype == "uint8":
        return 255.0, "uint8"

    def sample() -> np.ndarray:  # a decimated read of the whole raster, valid pixels only
        scale = max(1.0, max(src.height, src.width) / 1024)
        shape = (3, max(1, int(src.height / scale)), max(1, int(src.width / scale)))
        data = src.read(list(bands), out_shape=shape, masked=True)
        return data.compressed()
    try:
        value, how = input_range({"dtype": dtype, **range_metadata(src, bands)}, sample)
    except SegmentError as exc:
        raise ValueError(f"{path}: {exc}".replace("--input-max N", "data.input_max")) from exc
    return value, how.replace("--input-max N", "data.input_max")


def inspect_rasters(raster_paths, target_paths=(), bands=(1, 2, 3), input_max: float = 0.0) -> list[RasterInfo]:
    """Check the rasters (and targets) once, from their headers; errors name the file and what to change.
    ``input_max`` > 0 sets the value of full brightness of 16-bit rasters (else: from the file, see module doc)."""
    from rasterio.enums import MaskFlags
    raster_paths, target_paths, bands = list(raster_paths), list(target_paths or ()), tuple(int(b) for b in bands)
    if not raster_paths:
        raise ValueError("config key 'data.raster_paths': no rasters given")
    if target_paths and len(target_paths) != len(raster_paths):
        raise ValueError(f"config key 'data.target_paths': {len(target_paths)} targets for {len(raster_paths)} "
                         "rasters; give one target per raster (same order) or none")
    if len(bands) != 3 or min(bands) < 1:
        raise ValueError(f"config key 'data.bands': expected three 1-based band numbers, got {bands}")
    out = []
    for i, path in enumerate(raster_paths):
        if not Path(path).is_file():
            raise FileNotFoundError(f"data.raster_paths[{i}]: {path} not found")
        with _open(path) as src:
            if max(bands) > src.count:
                raise ValueError(f"{path} has {src.count} band(s); data.bands={list(bands)} selects band "
                                 f"{max(bands)} (set data.bands to pick the RGB bands)")
            top, how = _input_max(src, path, bands, input_max)
            if how != "uint8":
                print(f"note: {path}: scaled x / {top:g} ({how})", file=sys.stderr)
            flags = [src.mask_flag_enums[b - 1] for b in bands]
            has_nodata = src.nodata is not None or any(MaskFlags.all_valid not in f for f in flags)
            shape, crs, transform = (src.height, src.width), src.crs, src.transform
        tpath, tnodata = None, None
        if target_paths:
            tpath = target_paths[i]
            if not Path(tpath).is_file():
                raise FileNotFoundError(f"data.target_paths[{i}]: {tpath} not found")
            with _open(tpath) as t:
                if t.count != 1 or np.dtype(t.dtypes[0]).kind not in "iu":
                    raise ValueError(f"{tpath}: a target must be one band of integer class ids "
                                     f"(has {t.count} band(s) of {t.dtypes[0]})")
                if (t.height, t.width) != shape:
                    raise ValueError(f"{tpath} is {t.height}x{t.width} but {path} is {shape[0]}x{shape[1]}; "
                                     "targets must be on the raster's pixel grid")
                if t.crs is not None and crs is not None and (t.crs != crs or not t.transform.almost_equals(transform)):
                    raise ValueError(f"{tpath} is not aligned with {path} (CRS or transform differ)")
                tnodata = t.nodata
        out.append(RasterInfo(str(path), shape[0], shape[1], bands, bool(has_nodata), tpath,
                              None if tnodata is None else float(tnodata), top, how))
    return out


class GeoPatchDataset(torch.utils.data.Dataset):
    """``ds[key]`` is the batch of windows of schedule key ``key`` (a ``BatchKey``) for this rank."""

    def __init__(self, cfg, rank: int = 0, world: int = 1):
        d = cfg.data
        self.seed, self.rank, self.world, self.aug = cfg.train.seed, rank, world, cfg.aug
        self.sizes_and_batches = batches_per_scale(cfg)
        self.max_nodata = float(cfg.data.max_nodata_fraction)
        self.rasters = inspect_rasters(d.raster_paths, d.target_paths, d.bands, d.input_max)
        self.with_labels = bool(d.target_paths)
        policy = cfg.data.small_tiles
        sizes = [(r.height, r.width) for r in self.rasters]
        self.eligible = [eligible_for_size(sizes, s, policy, "rasters of data.raster_paths")
                         for s, _ in self.sizes_and_batches]
        self.weights = []
        for el in self.eligible:
            area = np.array([self.rasters[i].height * self.rasters[i].width for i in el], dtype=np.float64)
            self.weights.append(area / area.sum())
        self._handles: dict = {}
        self._pid = None

    def __getstate__(self):  # open dataset handles never cross a process boundary
        state = dict(self.__dict__)
        state["_handles"], state["_pid"] = {}, None
        return state

    def _src(self, path: str):
        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        h = self._handles.get(path)
        if h is None:
            h = self._handles[path] = _open(path)
        return h

    def close(self) -> None:
        for h in self._handles.values():
            h.close()
        self._handles = {}

    def read_window(self, r: RasterInfo, window: tuple) -> dict:
        """{'image' (3,h,w) uint8, 'valid' (h,w) bool, 'labels' (h,w) int64 or None} of (row, col, h, w)."""
        from rasterio.windows import Window
        win = Window(window[1], window[0], window[3], window[2])
        src = self._src(r.path)
        image = src.read(list(r.bands), window=win)
        if r.scaling != "uint8":  # 16-bit (or data.input_max): to the 8 bits every source gives
            image = np.clip(np.rint(image.astype(np.float32) * (255.0 / r.input_max)), 0, 255).astype(np.uint8)
        if r.has_nodata:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # NodataShadowWarning on RGBN files: the nodata value is what we want
                masks = src.read_masks(list(r.bands), window=win)
            valid = np.all(masks > 0, axis=0)
        else:
            valid = np.ones(image.shape[1:], dtype=bool)
        labels = None
        if r.target_path is not None:
            labels = self._src(r.target_path).read(1, window=win).astype(np.int64)
            if r.target_nodata is not None:
                labels[labels == int(r.target_nodata)] = -1
            labels[~valid] = -1
        return {"image": image, "valid": valid, "labels": labels}

    def sample(self, si: int, size: int, rng: np.random.Generator) -> dict:
        """One window at scale ``si``: raster by area, position uniform, redrawn while mostly nodata."""
        def draw() -> dict:
            r = self.rasters[self.eligible[si][int(rng.choice(len(self.eligible[si]), p=self.weights[si]))]]
            return self.read_window(r, choose_window(r.height, r.width, size, rng))
        return least_nodata_crop(draw, NODATA_TRIES, self.max_nodata, size)

    def __getitem__(self, key: BatchKey) -> dict:
        items = []
        for j in range(key.n):
            rng = key.item_rng(self.seed, 0x6E0, j)
            items.append(finish_item(self.sample(key.scale, key.size, rng), rng, self.aug, self.with_labels, False))
        return collate(items)


def geotiff_batches(cfg, rank: int, world: int, start_step: int) -> Iterable[dict]:
    """Batches of random windows for this rank, in schedule order from ``start_step``."""
    return step_loader(GeoPatchDataset(cfg, rank, world), cfg, rank, start_step)
