"""All raster I/O of the runtime: windowed reads with band selection and nodata, label writing.

Two implementations of the same contract: rasterio (``rasterio_io``: ``RasterReader`` /
``LabelWriter``) and GDAL's own bindings (``gdal_io``, for QGIS, whose Python has ``osgeo``
but not rasterio); ``common`` holds what they share. ``open_reader``, ``open_writer`` and
``io_env`` pick one per ``MAPSEG_IO`` (``auto``: rasterio when importable, else osgeo;
``rasterio`` or ``gdal`` to insist, an error if it is missing); ``io_library()`` says which,
and the run report records it. Neither library is imported when this package is imported.
``ArrayReader`` (``array``) serves an image in memory through the same reader interface.

Reads return channels-last ``(h, w, 3)`` arrays in the raster's dtype plus a
``valid`` mask: a pixel is nodata when all selected bands equal the nodata
value (``--nodata`` or the raster's own), or when the raster's per-dataset
mask or alpha band marks it.

Outputs are uint8 GeoTIFFs (tiled 256 x 256, DEFLATE; or a COG) with the
input's CRS and transform, a colour table, and nodata 255 where the input
had nodata. They are written under a temporary name in the target folder
and renamed into place only when complete.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..errors import RasterError
from . import gdal_io, rasterio_io
from .array import ArrayReader
from .common import (OUTPUT_NODATA, PALETTE, RasterInfo, colormap, common_dtype, common_nodata, nodata_valid,
                     parse_bands)
from .gdal_io import GdalLabelWriter, GdalRasterReader
from .preview import side_by_side, write_png
from .rasterio_io import LabelWriter, RasterReader
from .view import RasterView, Region, ground_resolution, parse_extent, parse_resolution

__all__ = ["OUTPUT_NODATA", "PALETTE", "ArrayReader", "GdalLabelWriter", "GdalRasterReader", "LabelWriter",
           "RasterError", "RasterInfo", "RasterReader", "RasterView", "Region", "colormap", "common_dtype",
           "common_nodata", "ground_resolution", "io_env", "io_library", "nodata_valid", "open_reader", "open_writer",
           "parse_bands", "parse_extent", "parse_resolution", "write_png", "write_preview"]

IO_LIBRARIES = ("rasterio", "gdal")


def io_library() -> str:
    """The raster library this process uses: MAPSEG_IO (auto|rasterio|gdal), auto = rasterio, else GDAL."""
    want = os.environ.get("MAPSEG_IO", "auto").strip().lower() or "auto"
    if want not in ("auto",) + IO_LIBRARIES:
        raise RasterError(f"MAPSEG_IO={want!r}: choose auto, rasterio or gdal")
    has = {"rasterio": importlib.util.find_spec("rasterio") is not None,
           "gdal": importlib.util.find_spec("osgeo") is not None}
    if want != "auto":
        if not has[want]:
            raise RasterError(f"MAPSEG_IO={want} but {'rasterio' if want == 'rasterio' else 'osgeo (GDAL)'} "
                              "is not importable")
        return want
    for lib in IO_LIBRARIES:
        if has[lib]:
            return lib
    raise RasterError("mapseg reads and writes rasters with rasterio or GDAL's Python bindings (osgeo); "
                      "neither is installed: pip install rasterio")


def open_reader(path, bands=None, nodata=None, region: Region | None = None):
    """A reader of ``path`` (three ``bands``, ``nodata`` overriding the raster's); with a ``region`` that asks for
    anything (``--extent``, ``--mask``, ``--resolution``), the ``RasterView`` of that area on its grid."""
    reader = GdalRasterReader(path, bands, nodata) if io_library() == "gdal" else RasterReader(path, bands, nodata)
    if region is None or not region.given:
        return reader
    try:
        return RasterView(reader, region)
    except BaseException:
        reader.close()
        raise


def open_writer(path, like, k: int, nodata, cog: bool = False, tags: dict | None = None, cmap: dict | None = None):
    """The label writer of the run's library; ``cmap`` (value -> (r, g, b, a)): the colour table, where not the
    palette's for labels 0..k-1 (a legend's colours: ``Legend.colormap()``)."""
    if io_library() == "gdal":
        return GdalLabelWriter(path, like, k, nodata, cog, tags, cmap)
    return LabelWriter(path, like, k, nodata, cog, tags, cmap)


def io_env():
    """The chosen library's settings for a run (bounded block cache, threaded decoding)."""
    return (gdal_io if io_library() == "gdal" else rasterio_io).env()


def write_preview(input_path, labels_path, png_path, bands=None, nodata=None, max_width: int = 1600,
                  region: Region | None = None) -> Path:
    """A PNG for eyes: the input (left) and its colour-coded segments (right), decimated to at most
    ``max_width`` wide and ``max_width`` tall; ``region``: the area the labels cover (as segmented)."""
    png_path = Path(png_path)
    if png_path.suffix.lower() != ".png":
        raise RasterError(f"--preview {png_path}: give a .png name")
    with io_env():
        with open_reader(input_path, bands, nodata, region) as reader:
            w, h = reader.width, reader.height
            scale = min(1.0, (max_width // 2) / w, max_width / h)  # bounded both ways: never a whole-raster read
            ow, oh = max(1, round(w * scale)), max(1, round(h * scale))
            rgb, valid = reader.read_decimated(oh, ow)
        with open_reader(labels_path, (1, 1, 1)) as lab_reader:
            labels = lab_reader.read_decimated(oh, ow)[0][..., 0]
    write_png(side_by_side(rgb, valid, labels), png_path)
    return png_path
