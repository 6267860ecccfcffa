"""Raster I/O through GDAL's own Python bindings (``osgeo``), for QGIS, whose Python has GDAL but not rasterio.

Same contract as the rasterio classes in ``mapseg.raster.rasterio_io`` (``mapseg.raster`` documents it):
``GdalRasterReader`` reads three bands window by window with nodata and mask
handling, ``GdalLabelWriter`` writes the tiled, compressed uint8 label GeoTIFF
(or COG) with CRS, transform, nodata 255 and a colour table under a temporary
name, renamed when complete. ``mapseg.raster.open_reader`` / ``open_writer``
choose between the two (``MAPSEG_IO=auto|rasterio|gdal``).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import RasterError
from .common import (COG_OPTIONS, GDAL_CACHE_MB, GTIFF_OPTIONS, LabelWriterBase, RasterInfo, ReaderBase,
                     check_input_exists, choose_bands, colormap, common_dtype, common_nodata, nodata_valid, option_list,
                     range_hint, set_gdal_colours)

# GDAL data type names -> numpy dtype names
_DTYPES = {"Byte": "uint8", "UInt16": "uint16", "Int16": "int16", "UInt32": "uint32", "Int32": "int32",
           "Float32": "float32", "Float64": "float64", "Int8": "int8", "UInt64": "uint64", "Int64": "int64"}
IDENTITY_GT = (0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _gdal():
    try:
        from osgeo import gdal
    except ImportError as exc:
        raise RasterError("GDAL's Python bindings (osgeo) are not installed: pip install rasterio, or run inside "
                          "QGIS / with python3-gdal") from exc
    gdal.UseExceptions()
    return gdal


@contextmanager
def env():
    """A bounded block cache and multi-threaded decoding for the run; previous settings restored after."""
    gdal = _gdal()
    settings = {"GDAL_CACHEMAX": str(GDAL_CACHE_MB), "GDAL_NUM_THREADS": "ALL_CPUS"}
    old = {k: gdal.GetConfigOption(k) for k in settings}
    for k, v in settings.items():
        gdal.SetConfigOption(k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            gdal.SetConfigOption(k, v)


class GdalRasterReader(ReaderBase):
    """Windowed reads of three bands of one raster through osgeo.gdal (see ``rasterio_io.RasterReader``)."""
    library = "gdal"
    read_errors = (RuntimeError, OSError)  # gdal.UseExceptions(): a failed read raises RuntimeError

    def __init__(self, path: str | os.PathLike, bands: tuple[int, ...] | None = None, nodata: float | None = None):
        gdal = _gdal()
        self.path = str(path)
        self.ds = None
        check_input_exists(self.path)
        try:
            self.ds = gdal.Open(self.path, gdal.GA_ReadOnly)
        except RuntimeError as exc:
            raise RasterError(f"cannot read {self.path} as a raster ({exc}): is it a complete raster file? "
                              "Copy or export it again") from exc
        ds = self.ds
        if ds is None or ds.RasterXSize == 0 or ds.RasterYSize == 0 or ds.RasterCount == 0:
            shape = (0, 0, 0) if ds is None else (ds.RasterXSize, ds.RasterYSize, ds.RasterCount)
            self.close()
            raise RasterError(f"{self.path} is empty ({shape[0]} x {shape[1]} pixels, {shape[2]} bands)")
        count = ds.RasterCount

        def interp():
            return ", ".join(
                f"{i}={gdal.GetColorInterpretationName(ds.GetRasterBand(i).GetColorInterpretation()).lower()}"
                for i in range(1, count + 1))

        try:
            self.bands = choose_bands(self.path, count, bands, interp)
            self.band_objs = {b: ds.GetRasterBand(b) for b in set(self.bands)}
            self.nodata = (common_nodata(self.path, (self.band_objs[b].GetNoDataValue() for b in self.bands))
                           if nodata is None else float(nodata))
            dtype = common_dtype(self.path, (_DTYPES.get(gdal.GetDataTypeName(self.band_objs[b].DataType), "unknown")
                                             for b in self.bands))
        except RasterError:
            self.close()
            raise
        first = self.band_objs[self.bands[0]]
        flags = first.GetMaskFlags()
        self.has_mask = bool(flags & (gdal.GMF_PER_DATASET | gdal.GMF_ALPHA)) and not flags & gdal.GMF_ALL_VALID
        gt = tuple(ds.GetGeoTransform(can_return_null=True) or IDENTITY_GT)
        wkt = ds.GetProjection() or ""
        gcps = tuple((g.GCPLine, g.GCPPixel, g.GCPX, g.GCPY, g.GCPZ) for g in (ds.GetGCPs() or ()))
        georef = bool(wkt) or gt != IDENTITY_GT or bool(gcps)
        nbits, top = range_hint((self.band_objs[b].GetMetadataItem("NBITS", "IMAGE_STRUCTURE") for b in self.bands),
                                (self.band_objs[b].GetMetadataItem("STATISTICS_MAXIMUM") for b in self.bands))
        self.info = RasterInfo(self.path, ds.RasterXSize, ds.RasterYSize, count, dtype, self.bands,
                               self.nodata, self.has_mask, wkt or None, gt, georef, gcps,
                               (ds.GetGCPProjection() or None) if gcps else None, nbits, top,
                               tuple(ds.GetFileList() or ()))

    def _read(self, row0: int, row1: int, col0: int, col1: int) -> tuple[np.ndarray, np.ndarray]:
        h, w = row1 - row0, col1 - col0
        planes = {b: band.ReadAsArray(col0, row0, w, h) for b, band in self.band_objs.items()}
        data = np.stack([planes[b] for b in self.bands], axis=-1)
        valid = nodata_valid(data, self.nodata)
        if self.has_mask:
            valid &= self.band_objs[self.bands[0]].GetMaskBand().ReadAsArray(col0, row0, w, h) != 0
        return data, valid

    def _read_decimated(self, out_h: int, out_w: int, box=None) -> tuple[np.ndarray, np.ndarray]:
        row0, row1, col0, col1 = box or (0, self.height, 0, self.width)
        w, h = col1 - col0, row1 - row0
        planes = {b: band.ReadAsArray(col0, row0, w, h, buf_xsize=out_w, buf_ysize=out_h)
                  for b, band in self.band_objs.items()}
        data = np.stack([planes[b] for b in self.bands], axis=-1)
        valid = nodata_valid(data, self.nodata)
        if self.has_mask:
            mask = self.band_objs[self.bands[0]].GetMaskBand().ReadAsArray(col0, row0, w, h, buf_xsize=out_w,
                                                                           buf_ysize=out_h)
            valid &= mask != 0
        return data, valid

    def close(self) -> None:
        self.band_objs = {}
        self.ds = None


class GdalLabelWriter(LabelWriterBase):
    """The uint8 label GeoTIFF through osgeo.gdal (see ``rasterio_io.LabelWriter``)."""
    library = "gdal"
    write_errors = (RuntimeError, OSError)

    def __init__(self, path: str | os.PathLike, like: RasterInfo, k: int, nodata: int | None, cog: bool = False,
                 tags: dict | None = None, cmap: dict | None = None):
        gdal = self.gdal = _gdal()
        self._prepare(path, cog)
        self.ds = self.band = None
        with self._creating():
            self.ds = gdal.GetDriverByName("GTiff").Create(
                str(self.tmp), like.width, like.height, 1, gdal.GDT_Byte,
                options=option_list(GTIFF_OPTIONS))
            if like.gcps:  # GCP georeference: the points and their CRS
                self.ds.SetGCPs([gdal.GCP(x, y, z, c, r) for r, c, x, y, z in like.gcps], like.gcp_crs or "")
            elif like.georeferenced:
                gt, crs = like.transform, like.crs
                if not isinstance(gt, tuple):  # a rasterio Affine (info from the rasterio reader)
                    gt = tuple(gt.to_gdal())
                self.ds.SetGeoTransform(gt)
                if crs:
                    self.ds.SetProjection(crs if isinstance(crs, str) else crs.to_wkt())
            self.band = self.ds.GetRasterBand(1)
            if nodata is not None:
                self.band.SetNoDataValue(float(nodata))
            set_gdal_colours(gdal, self.band, colormap(k if cmap is None else cmap))
            if tags:
                self.ds.SetMetadata({str(a): str(b) for a, b in tags.items()})

    def _write(self, labels: np.ndarray, row0: int, col0: int) -> None:
        self.band.WriteArray(np.ascontiguousarray(labels, dtype=np.uint8), int(col0), int(row0))

    def _commit(self) -> Path:
        self.band = None
        self.ds.FlushCache()
        self.ds = None
        src = self.tmp
        if self.cog:
            try:
                self.gdal.Translate(str(self.tmp_cog), str(self.tmp), format="COG",
                                    creationOptions=option_list(COG_OPTIONS))
            except RuntimeError as exc:
                self.abort()
                raise RasterError(f"writing a COG failed ({exc}); GDAL >= 3.1 has the COG driver") from exc
            src = self.tmp_cog
        return self._move_into_place(src)

    def abort(self) -> None:
        self.band = None
        self.ds = None
        self._remove_temporaries()


# --------------------------------------------------------------------------- coordinate reference systems
# What mapseg.raster.view needs of a CRS (the same functions in rasterio_io).

def parse_crs(text, what: str = "--extent-crs"):
    """An ``osr.SpatialReference`` from user text (``EPSG:4326``, WKT, PROJ, an OGC URN), x = longitude first."""
    _gdal()
    from osgeo import osr

    osr.UseExceptions()
    if isinstance(text, osr.SpatialReference):
        return text
    srs = osr.SpatialReference()
    try:
        srs.SetFromUserInput(str(text))
    except RuntimeError as exc:
        raise RasterError(f"{what} {text!r} is not a CRS GDAL knows ({exc}); e.g. EPSG:4326") from exc
    srs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    return srs


def transform_xy(src, dst, xs, ys) -> tuple[np.ndarray, np.ndarray]:
    """Points from CRS ``src`` to ``dst`` (x = longitude / easting first)."""
    from osgeo import osr

    ct = osr.CoordinateTransformation(parse_crs(src), parse_crs(dst))
    pts = ct.TransformPoints([(float(x), float(y)) for x, y in zip(xs, ys)])
    return (np.asarray([p[0] for p in pts], np.float64), np.asarray([p[1] for p in pts], np.float64))


def crs_units(crs) -> tuple[str, float | None]:
    """("degree", None) for a geographic CRS, else (unit name, metres per unit)."""
    srs = parse_crs(crs, "CRS")
    if srs.IsGeographic():
        return "degree", None
    return srs.GetLinearUnitsName(), float(srs.GetLinearUnits())


def crs_name(crs) -> str:
    """A short name: ``EPSG:25832``, else the CRS's own name (``unnamed CRS (no EPSG code)``)."""
    srs = parse_crs(crs, "CRS")
    try:
        srs.AutoIdentifyEPSG()  # a WKT without its code: find it, for the log's name only
    except RuntimeError:
        pass
    auth, code = srs.GetAuthorityName(None), srs.GetAuthorityCode(None)
    return f"{auth}:{code}" if auth and code else f"{srs.GetName() or 'unnamed'} CRS (no EPSG code)"
