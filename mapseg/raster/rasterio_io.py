"""Raster I/O through rasterio: ``RasterReader`` and ``LabelWriter`` (the contract: ``mapseg.raster``).

rasterio itself is imported when a reader, writer or ``env`` is first made, not with this module.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from ..errors import RasterError
from .common import (COG_OPTIONS, GDAL_CACHE_MB, GTIFF_OPTIONS, LabelWriterBase, RasterInfo, ReaderBase,
                     check_input_exists, choose_bands, colormap, common_dtype, common_nodata, nodata_valid, range_hint)


def _rasterio():
    try:
        import rasterio
    except ImportError as exc:
        raise RasterError("mapseg reads and writes rasters with rasterio: pip install rasterio") from exc
    return rasterio


def env():
    """GDAL settings for a run: a bounded block cache (it counts in the process's memory), and
    multi-threaded decoding of compressed inputs."""
    # rasterio hands GDAL_CACHEMAX to GDALSetCacheMax, which counts bytes (GDAL's own "< 100000 means MB" rule
    # is for the configuration option): 64 here was a 64-byte cache, every block decoded again for each read.
    return _rasterio().Env(GDAL_CACHEMAX=GDAL_CACHE_MB * 2**20, GDAL_NUM_THREADS="ALL_CPUS")


def range_metadata(ds, bands) -> dict:
    """{"nbits", "statistics_max"} of these 1-based bands of an open rasterio dataset (None where the file
    does not say): with the dtype, what ``mapseg.scaling.input_range`` reads (training's loaders too)."""
    nbits, top = range_hint((ds.tags(b, ns="IMAGE_STRUCTURE").get("NBITS") for b in bands),
                            (ds.tags(b).get("STATISTICS_MAXIMUM") for b in bands))
    return {"nbits": nbits, "statistics_max": top}


class RasterReader(ReaderBase):
    """Windowed reads of three bands of one raster (any GDAL-readable format), through rasterio."""
    library = "rasterio"

    def __init__(self, path: str | os.PathLike, bands: tuple[int, ...] | None = None, nodata: float | None = None):
        rasterio = _rasterio()
        from rasterio.enums import MaskFlags

        self.path = str(path)
        check_input_exists(self.path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                self.ds = rasterio.open(self.path)
        except rasterio.errors.RasterioIOError as exc:
            raise RasterError(f"cannot read {self.path} as a raster ({exc}): is it a complete raster file? "
                              "Copy or export it again") from exc
        ds = self.ds
        if ds.width == 0 or ds.height == 0 or ds.count == 0:
            self.close()
            raise RasterError(f"{self.path} is empty ({ds.width} x {ds.height} pixels, {ds.count} bands)")
        try:
            self.bands = choose_bands(self.path, ds.count, bands,
                                      lambda: ", ".join(f"{i + 1}={c.name}" for i, c in enumerate(ds.colorinterp)))
            self.nodata = (common_nodata(self.path, (ds.nodatavals[b - 1] for b in self.bands)) if nodata is None
                           else float(nodata))
            dtype = common_dtype(self.path, (ds.dtypes[b - 1] for b in self.bands))
        except RasterError:
            self.close()
            raise
        flags = ds.mask_flag_enums[self.bands[0] - 1]
        self.has_mask = MaskFlags.per_dataset in flags or MaskFlags.alpha in flags
        points, gcp_crs = ds.gcps
        gcps = tuple((g.row, g.col, g.x, g.y, g.z or 0.0) for g in points)
        georef = ds.crs is not None or not ds.transform.is_identity or bool(gcps)
        hint = range_metadata(ds, self.bands)
        self.info = RasterInfo(self.path, ds.width, ds.height, ds.count, dtype, self.bands,
                               self.nodata, self.has_mask, ds.crs, ds.transform, georef, gcps,
                               gcp_crs.to_wkt() if gcps and gcp_crs else None, hint["nbits"], hint["statistics_max"],
                               tuple(ds.files))
        self.read_errors = (rasterio.errors.RasterioError, rasterio._err.CPLE_BaseError, OSError)

    def _read(self, row0: int, row1: int, col0: int, col1: int) -> tuple[np.ndarray, np.ndarray]:
        from rasterio.windows import Window

        win = Window(col0, row0, col1 - col0, row1 - row0)
        unique = sorted(set(self.bands))
        planes = self.ds.read(unique, window=win)
        data = np.stack([planes[unique.index(b)] for b in self.bands], axis=-1)
        valid = nodata_valid(data, self.nodata)
        if self.has_mask:
            valid &= self.ds.read_masks(self.bands[0], window=win) != 0
        return data, valid

    def _read_decimated(self, out_h: int, out_w: int, box=None) -> tuple[np.ndarray, np.ndarray]:
        from rasterio.enums import Resampling
        from rasterio.windows import Window

        row0, row1, col0, col1 = box or (0, self.height, 0, self.width)
        win = Window(col0, row0, col1 - col0, row1 - row0)
        unique = sorted(set(self.bands))
        planes = self.ds.read(unique, window=win, out_shape=(len(unique), out_h, out_w), resampling=Resampling.nearest)
        data = np.stack([planes[unique.index(b)] for b in self.bands], axis=-1)
        valid = nodata_valid(data, self.nodata)
        if self.has_mask:
            valid &= self.ds.read_masks(self.bands[0], window=win, out_shape=(out_h, out_w)) != 0
        return data, valid

    def close(self) -> None:
        if getattr(self, "ds", None) is not None:
            self.ds.close()
            self.ds = None


class LabelWriter(LabelWriterBase):
    """A uint8 label raster written window by window under a temporary name, renamed by ``commit`` (rasterio).
    Its colour table: ``cmap`` (value -> (r, g, b, a), a legend's colours) where given, else the palette's for
    labels 0..k-1."""
    library = "rasterio"

    def __init__(self, path: str | os.PathLike, like: RasterInfo, k: int, nodata: int | None, cog: bool = False,
                 tags: dict | None = None, cmap: dict | None = None):
        rasterio = _rasterio()
        self.write_errors = (rasterio.errors.RasterioError, rasterio._err.CPLE_BaseError, OSError)
        self._prepare(path, cog)
        profile = {"driver": "GTiff", "width": like.width, "height": like.height, "count": 1, "dtype": "uint8",
                   **GTIFF_OPTIONS, "nodata": nodata}
        if like.georeferenced and not like.gcps:
            profile.update(crs=like.crs, transform=like.transform)
        self.ds = None
        with self._creating():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                self.ds = rasterio.open(self.tmp, "w", **profile)
            if like.gcps:  # GCP georeference: the points, which also carry the CRS
                from rasterio.control import GroundControlPoint
                from rasterio.crs import CRS

                self.ds.gcps = ([GroundControlPoint(row=r, col=c, x=x, y=y, z=z) for r, c, x, y, z in like.gcps],
                                CRS.from_wkt(like.gcp_crs) if like.gcp_crs else None)
            self.ds.write_colormap(1, colormap(k if cmap is None else cmap))
            if tags:
                self.ds.update_tags(**{str(a): str(b) for a, b in tags.items()})

    def _write(self, labels: np.ndarray, row0: int, col0: int) -> None:
        from rasterio.windows import Window

        h, w = labels.shape
        self.ds.write(labels, 1, window=Window(col0, row0, w, h))

    def _commit(self) -> Path:
        ds, self.ds = self.ds, None  # let go first: abort() after a failed close must not close it again
        ds.close()
        src = self.tmp
        if self.cog:
            import rasterio.shutil

            try:
                rasterio.shutil.copy(str(self.tmp), str(self.tmp_cog), driver="COG", **COG_OPTIONS)
            except Exception as exc:  # noqa: BLE001 - GDAL errors come in several types
                self.abort()
                raise RasterError(f"writing a COG failed ({exc}); GDAL >= 3.1 has the COG driver") from exc
            src = self.tmp_cog
        return self._move_into_place(src)

    def abort(self) -> None:
        if self.ds is not None:
            try:
                self.ds.close()
            finally:
                self.ds = None
        self._remove_temporaries()


# --------------------------------------------------------------------------- coordinate reference systems
# What mapseg.raster.view needs of a CRS (the same functions in gdal_io, through osr).

def parse_crs(text, what: str = "--extent-crs"):
    """A CRS from user text (``EPSG:4326``, WKT, a PROJ string, an OGC URN) or a rasterio CRS."""
    rasterio = _rasterio()
    from rasterio.crs import CRS

    if isinstance(text, CRS):
        return text
    try:
        return CRS.from_user_input(text)
    except rasterio.errors.CRSError as exc:
        raise RasterError(f"{what} {text!r} is not a CRS PROJ knows ({exc}); e.g. EPSG:4326") from exc


def transform_xy(src, dst, xs, ys) -> tuple[np.ndarray, np.ndarray]:
    """Points from CRS ``src`` to ``dst`` (x = longitude / easting first, whatever the CRS's axis order)."""
    from rasterio.warp import transform

    xs, ys = transform(parse_crs(src), parse_crs(dst), list(map(float, xs)), list(map(float, ys)))
    return np.asarray(xs, np.float64), np.asarray(ys, np.float64)


def crs_units(crs) -> tuple[str, float | None]:
    """("degree", None) for a geographic CRS, else (unit name, metres per unit)."""
    crs = parse_crs(crs, "CRS")
    if crs.is_geographic:
        return "degree", None
    name, factor = crs.linear_units_factor
    return name, float(factor)


def crs_name(crs) -> str:
    """A short name: ``EPSG:25832``, else the name the WKT gives (``unnamed CRS (no EPSG code)``)."""
    import re

    crs = parse_crs(crs, "CRS")
    code = crs.to_epsg()
    if code:
        return f"EPSG:{code}"
    named = re.match(r'\s*\w+\["([^"]*)"', crs.to_wkt())
    return f"{named.group(1) if named else 'unnamed'} CRS (no EPSG code)"
