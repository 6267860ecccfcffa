"""Online raster layers (XYZ, WMS/WMTS, WCS, ArcGIS MapServer) as inputs: render them to a GeoTIFF first.

mapseg reads files GDAL can open; a layer served by QGIS's ``wms``, ``wcs`` or ``arcgismapserver``
provider is not one. :func:`render_layer_to_geotiff` draws such a layer with QGIS's own raster pipe
(the layer's provider, its renderer and filters, and a projector into the requested CRS) over an
extent at a ground resolution, window by window, into a 3-band uint8 GeoTIFF with the exact grid
(CRS and geotransform) mapseg then keeps. Transparent pixels (no tile, outside the service's
coverage, transparent colours of the layer's style) become the GeoTIFF's mask, so mapseg leaves
them as nodata; semi-transparent edges are un-premultiplied, never blended with a background.
"""
import math
import os

import numpy as np
from qgis.core import (Qgis, QgsCoordinateReferenceSystem, QgsProcessingException, QgsProject, QgsRasterBlockFeedback,
                       QgsRasterPipe, QgsRasterProjector, QgsRectangle, QgsUnitTypes)

from . import runtime

MAX_PIXELS = 50_000_000     # 50 megapixels, e.g. 7000 x 7000
DEFAULT_RESOLUTION = 1.0    # metres per pixel when none is given (an online layer has no pixel size of its own)
CHUNK = 1024                # window side (pixels) requested from the pipe at a time
MIN_ALPHA = 128             # rendered pixels less opaque than this are masked (nodata)


def needs_rendering(layer) -> bool:
    """True for a raster layer mapseg cannot read as a file: any provider but ``gdal`` (XYZ/WMS/WMTS through
    ``wms``, ``wcs``, ``arcgismapserver``, and others such as ``postgresraster``); False for GDAL layers."""
    return layer is not None and layer.providerType() != "gdal"


def pixel_size(extent, crs, resolution_m):
    """(x size, y size) in ``crs`` units of a ``resolution_m`` metre pixel; a geographic CRS converts at the
    extent's centre latitude (as mapseg's --resolution does)."""
    if not resolution_m or resolution_m <= 0:
        raise QgsProcessingException(f"Resolution: {resolution_m} m per pixel; give a positive value")
    units = crs.mapUnits()
    if units == QgsUnitTypes.DistanceDegrees:
        mx, my = runtime.submodule("raster.view").metres_per_degree(extent.center().y())  # as mapseg converts
        return resolution_m / mx, resolution_m / my
    factor = QgsUnitTypes.fromUnitToUnitFactor(units, QgsUnitTypes.DistanceMeters)
    if units == QgsUnitTypes.DistanceUnknownUnit or not factor or factor <= 0:
        raise QgsProcessingException(f"{crs.authid() or crs.description()}: its units are unknown, so a resolution "
                                     "in metres cannot be converted; choose a projected or geographic CRS")
    return resolution_m / factor, resolution_m / factor


def render_grid(extent, crs, resolution_m):
    """(x0, y0 top, pixel x size, pixel y size, width, height): the grid from the extent's top-left corner,
    round(size / pixel) pixels a side (at least 1)."""
    ux, uy = pixel_size(extent, crs, resolution_m)
    width = max(1, math.floor(extent.width() / ux + 0.5))
    height = max(1, math.floor(extent.height() / uy + 0.5))
    return extent.xMinimum(), extent.yMaximum(), ux, uy, width, height


def _argb_to_rgb(block, w, h):
    """A rendered ARGB32 (premultiplied or not) QgsRasterBlock -> (3, h, w) uint8 RGB, (h, w) bool valid."""
    raw = np.frombuffer(bytes(block.data()), dtype="<u4", count=w * h).reshape(h, w)
    alpha = (raw >> 24).astype(np.uint16)
    rgb = np.stack([(raw >> 16) & 255, (raw >> 8) & 255, raw & 255]).astype(np.uint16)
    if block.dataType() == Qgis.ARGB32_Premultiplied:
        safe = np.maximum(alpha, 1)
        rgb = np.where(alpha > 0, np.minimum((rgb * 255 + safe // 2) // safe, 255), 0)
    valid = alpha >= MIN_ALPHA
    rgb = np.where(valid, rgb, 0).astype(np.uint8)
    return rgb, valid


def clone_pipe(layer):
    """A copy of the layer's pipe (provider, renderer, brightness/contrast, hue/saturation, resampling, projector:
    clones, so the layer can be drawn meanwhile), with a projector even if the layer's pipe lacks one."""
    pipe = QgsRasterPipe()
    source = layer.pipe()
    for i in range(source.size()):
        iface = source.at(i).clone()
        if iface is None or not pipe.set(iface):
            raise QgsProcessingException(f"Input raster: {_name(layer)}: its raster pipe cannot be copied "
                                         f"(interface {i} of {source.size()})")
    if pipe.projector() is None:
        pipe.set(QgsRasterProjector())
    return pipe


def _name(layer):
    """The layer's name for messages (a layer from a URI on the command line has none)."""
    return layer.name() or f"the {layer.providerType()} layer"


def _remove(path):
    for p in (path, path + ".aux.xml", path + ".msk"):
        try:
            os.remove(p)
        except OSError:
            pass


def render_layer_to_geotiff(layer, extent, crs, resolution_m, out_path, feedback, *, max_pixels=MAX_PIXELS,
                            transform_context=None, progress_span=(0.0, 100.0), pipe=None) -> str:
    """Render ``layer`` over ``extent`` (a QgsRectangle in ``crs``) at ``resolution_m`` metres per pixel into
    ``out_path``: a 3-band uint8 GeoTIFF (RGB, pixel-interleaved, tiled) in ``crs`` whose grid starts at the
    extent's top-left corner, with a per-dataset mask where nothing opaque was rendered.

    ``feedback`` (a QgsFeedback, or None): progress from ``progress_span[0]`` to ``[1]`` window by window,
    and cancellation (also inside a window's download). ``pipe``: a :func:`clone_pipe` of the layer made
    beforehand (e.g. in the main thread, in prepareAlgorithm); by default cloned here. Every failure
    (cancelled, too many pixels, invalid layer, nothing rendered) is a QgsProcessingException and leaves no
    file. Returns ``out_path``."""
    from osgeo import gdal

    gdal.UseExceptions()
    if layer is None or not layer.isValid():
        raise QgsProcessingException(f"Input raster: {_name(layer) if layer is not None else 'the layer'} is not "
                                     "a valid layer (is the service reachable?)")
    if extent is None or extent.isNull() or extent.isEmpty() or not (extent.width() > 0 and extent.height() > 0):
        raise QgsProcessingException(f"Extent: an online layer ({_name(layer)}) needs an extent to render; "
                                     "give one with a width and a height")
    crs = crs if crs is not None and crs.isValid() else layer.crs()
    x0, y0, ux, uy, width, height = render_grid(extent, crs, resolution_m)
    if width * height > max_pixels:
        coarser = resolution_m * math.sqrt(width * height / max_pixels) * 1.001
        raise QgsProcessingException(
            f"Rendering {_name(layer)} over this extent at {resolution_m:g} m per pixel needs {width} x {height} = "
            f"{width * height / 1e6:.1f} megapixels, more than the limit of {max_pixels / 1e6:g} megapixels: "
            f"choose a coarser resolution (at least {coarser:.3g} m per pixel for this extent) or a smaller extent")
    if transform_context is None:
        transform_context = QgsProject.instance().transformContext()
    pipe = pipe if pipe is not None else clone_pipe(layer)
    if pipe.renderer() is None:
        raise QgsProcessingException(f"Input raster: {_name(layer)} has no renderer to draw it with")
    pipe.renderer().setOpacity(1.0)             # the layer's opacity must not become transparency (nodata)
    if pipe.projector() is not None:
        pipe.projector().setCrs(layer.crs(), crs, transform_context)
    last = pipe.last()
    lo, hi = progress_span
    n_rows, n_cols = math.ceil(height / CHUNK), math.ceil(width / CHUNK)
    total, done = n_rows * n_cols, 0

    def cancelled():
        return feedback is not None and feedback.isCanceled()

    if feedback is not None:
        units = QgsUnitTypes.toString(crs.mapUnits())
        feedback.pushInfo(f"rendering {_name(layer)} ({layer.providerType()}) into "
                          f"{crs.authid() or crs.description() or 'the CRS'} at {resolution_m:g} m per pixel "
                          f"({ux:.6g} x {uy:.6g} {units}): {width} x {height} pixels, {total} window(s)")
    thread_opt = "GDAL_TIFF_INTERNAL_MASK"
    old = gdal.GetThreadLocalConfigOption(thread_opt, None)
    gdal.SetThreadLocalConfigOption(thread_opt, "YES")
    ds = None
    ok = False
    any_valid = False
    try:
        if cancelled():
            raise QgsProcessingException("Cancelled while rendering: no output was written")
        ds = gdal.GetDriverByName("GTiff").Create(
            out_path, width, height, 3, gdal.GDT_Byte,
            ["TILED=YES", "BLOCKXSIZE=256", "BLOCKYSIZE=256", "INTERLEAVE=PIXEL", "PHOTOMETRIC=RGB",
             "BIGTIFF=IF_SAFER"])
        ds.SetGeoTransform((x0, ux, 0.0, y0, 0.0, -uy))
        ds.SetProjection(crs.toWkt(QgsCoordinateReferenceSystem.WKT_PREFERRED_GDAL))
        ds.CreateMaskBand(gdal.GMF_PER_DATASET)
        mask_band = ds.GetRasterBand(1).GetMaskBand()
        for i in range(n_rows):
            for j in range(n_cols):
                if cancelled():
                    raise QgsProcessingException("Cancelled while rendering: no output was written")
                c0, r0 = j * CHUNK, i * CHUNK
                w, h = min(CHUNK, width - c0), min(CHUNK, height - r0)
                window = QgsRectangle(x0 + c0 * ux, y0 - (r0 + h) * uy, x0 + (c0 + w) * ux, y0 - r0 * uy)
                block_feedback = QgsRasterBlockFeedback()
                if feedback is not None:
                    feedback.canceled.connect(block_feedback.cancel)
                try:
                    block = last.block(1, window, w, h, block_feedback)
                finally:
                    if feedback is not None:
                        feedback.canceled.disconnect(block_feedback.cancel)
                if cancelled() or block_feedback.isCanceled():
                    raise QgsProcessingException("Cancelled while rendering: no output was written")
                errors = list(block_feedback.errors()) if hasattr(block_feedback, "errors") else []
                if block is None or not block.isValid() or block.width() != w or block.height() != h:
                    raise QgsProcessingException(f"Rendering {_name(layer)} failed at pixels {c0},{r0} ({w} x {h})"
                                                 + (": " + "; ".join(errors) if errors else ""))
                if errors and feedback is not None:
                    feedback.reportError("; ".join(errors), False)
                rgb, valid = _argb_to_rgb(block, w, h)
                any_valid = any_valid or bool(valid.any())
                for b in range(3):
                    ds.GetRasterBand(b + 1).WriteArray(rgb[b], c0, r0)
                mask_band.WriteArray(valid.astype(np.uint8) * 255, c0, r0)
                done += 1
                if feedback is not None:
                    feedback.setProgress(lo + (hi - lo) * done / total)
        if not any_valid:
            raise QgsProcessingException(
                f"Rendering {_name(layer)} gave no opaque pixel over the extent: the layer has no data there, or "
                "the service did not answer" + (f" ({'; '.join(errors)})" if errors else ""))
        ds.FlushCache()
        ds = None
        ok = True
    finally:
        ds = None
        gdal.SetThreadLocalConfigOption(thread_opt, old)
        if not ok:
            _remove(out_path)
    return out_path
