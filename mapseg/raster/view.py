"""An area of interest at a ground resolution (``--extent``, ``--mask``, ``--resolution``) as a raster of its own.

``RasterView(reader, region)`` wraps any reader of ``mapseg.raster`` (rasterio or GDAL) and presents the
area as a raster: ``info`` (its width, height and transform, the source's CRS and files), ``read``
(data in the source's dtype and validity), ``read_decimated``, ``inside`` (the ``--mask`` polygons), so
the pipeline (sampling, windows, the label writer, which takes the grid from ``info``) runs unchanged.

* **The area**: ``--extent xmin,ymin,xmax,ymax`` in the raster's CRS (or ``--extent-crs``: its outline,
  densified, is transformed and its bounding box taken), else the bounds of the ``--mask`` polygons, else
  the whole raster; always cut to the raster's own bounds. An area that misses the raster is an error.
* **The grid**: without ``--resolution`` the area snaps outward to the source's pixel grid, and the view
  reads the source's pixels as they are (an integer offset: no resampling). With ``--resolution R`` (metres)
  the grid starts at the area's top-left corner with R-metre pixels (in a geographic CRS, R converted to
  degrees at the area's centre latitude), as many as round(area size / R) along each axis.
* **Resampling** (``--resolution`` only), per axis: area average where the pixels get larger than the
  source's (each source pixel weighted by the length of it the output pixel covers), bilinear where they get
  smaller (the two nearest source pixel centres, the edge pixel repeated past the border). Nodata source
  pixels carry no weight; an output pixel is nodata when less than half its weight is valid. Every output
  pixel is computed from its own global row and column with a fixed sequence of float64 operations
  (``_taps``, ``_resample``), so its value does not depend on the window it is read in: labels stay
  identical for any ``--tile``.
* **The mask**: pixels whose centre is outside every polygon are nodata for the output and the sample;
  the network still sees their values (they are real imagery), so inside the polygons the labels are
  those of a run with the same area and no mask. The file is read once while it is unchanged (many rasters,
  one mask) and reprojected per raster; polygons whose bounding box misses the view's grid are left out.
"""
from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, replace

import numpy as np

from ..errors import RasterError
from . import gdal_io, rasterio_io
from .common import ReaderBase
from .polygons import PolygonMask, flatten, mask_files, read_polygons, unflatten

SNAP_EPS = 1e-6           # pixels: an extent this close to a pixel edge is on it (float noise of the bounds)
HALF_VALID = 0.5 - 1e-9   # an output pixel needs at least half its weight on valid source pixels
CHUNK_PIXELS = 1_000_000  # source pixels resampled at a time (bounded memory at any resolution ratio)
DENSIFY = 21              # points per side of an --extent outline transformed to the raster's CRS


# --------------------------------------------------------------------------- the request

@dataclass(frozen=True)
class Region:
    """What part of a raster to segment and at which ground resolution; all None: the whole raster as it is."""
    extent: tuple[float, float, float, float] | None = None   # xmin, ymin, xmax, ymax
    extent_crs: str | None = None                             # CRS of ``extent`` (default: the raster's)
    mask: str | None = None                                   # vector file of polygons
    resolution: float | None = None                           # metres per output pixel

    def __post_init__(self):
        if self.extent is not None:
            object.__setattr__(self, "extent", check_extent(self.extent))
        if self.extent_crs is not None and self.extent is None:
            raise RasterError("--extent-crs says in which CRS --extent is given: give --extent too")
        if self.resolution is not None:
            object.__setattr__(self, "resolution", parse_resolution(self.resolution))
        if self.mask is not None:
            object.__setattr__(self, "mask", str(self.mask))

    @property
    def given(self) -> bool:
        return any(v is not None for v in (self.extent, self.mask, self.resolution))

    def flags(self) -> str:
        names = [f for f, v in (("--extent", self.extent), ("--mask", self.mask), ("--resolution", self.resolution))
                 if v is not None]
        return "/".join(names)


def check_extent(values) -> tuple[float, float, float, float]:
    try:
        xmin, ymin, xmax, ymax = (float(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise RasterError(f"--extent {values!r}: give four numbers xmin,ymin,xmax,ymax") from exc
    if not all(math.isfinite(v) for v in (xmin, ymin, xmax, ymax)):
        raise RasterError(f"--extent {values!r}: the four numbers must be finite")
    if not (xmin < xmax and ymin < ymax):
        raise RasterError(f"--extent {xmin:g},{ymin:g},{xmax:g},{ymax:g}: give xmin,ymin,xmax,ymax with "
                          "xmin < xmax and ymin < ymax")
    return xmin, ymin, xmax, ymax


def parse_extent(text) -> tuple[float, float, float, float] | None:
    """``--extent "xmin,ymin,xmax,ymax"`` (commas or spaces between the numbers)."""
    if text is None or str(text).strip() == "":
        return None
    parts = str(text).replace(",", " ").split()
    if len(parts) != 4:
        raise RasterError(f"--extent {text!r}: give four numbers xmin,ymin,xmax,ymax")
    try:
        values = [float(p) for p in parts]
    except ValueError as exc:
        raise RasterError(f"--extent {text!r}: give four numbers xmin,ymin,xmax,ymax") from exc
    return check_extent(values)


def parse_resolution(value) -> float | None:
    if value is None:
        return None
    try:
        res = float(value)
    except (TypeError, ValueError) as exc:
        raise RasterError(f"--resolution {value!r}: give the ground size of an output pixel in metres") from exc
    if not (math.isfinite(res) and res > 0):
        raise RasterError(f"--resolution {value!r}: must be a positive number of metres")
    return res


# --------------------------------------------------------------------------- geometry helpers

def crs_tools(library: str):
    """The CRS functions (``parse_crs``, ``transform_xy``, ``crs_units``, ``crs_name``) of a reader's library."""
    return gdal_io if library == "gdal" else rasterio_io


def geotransform(transform) -> tuple[float, ...]:
    """(x0, dx, rx, y0, ry, dy), GDAL's order, from a rasterio ``Affine`` or a GDAL tuple."""
    if isinstance(transform, tuple):
        return tuple(float(v) for v in transform)
    return tuple(float(v) for v in transform.to_gdal())


def like_transform(transform, gt: tuple[float, ...]):
    """``gt`` in the type of ``transform`` (a GDAL tuple, or the rasterio reader's ``Affine``)."""
    return tuple(gt) if isinstance(transform, tuple) else type(transform).from_gdal(*gt)


def metres_per_degree(lat: float) -> tuple[float, float]:
    """(metres per degree of longitude, of latitude) at latitude ``lat`` on the WGS 84 ellipsoid (series, < 1 cm)."""
    p = math.radians(lat)
    lon = 111412.84 * math.cos(p) - 93.5 * math.cos(3 * p) + 0.118 * math.cos(5 * p)
    lat_m = 111132.92 - 559.82 * math.cos(2 * p) + 1.175 * math.cos(4 * p) - 0.0023 * math.cos(6 * p)
    return lon, lat_m


def ground_resolution(reader) -> tuple[float | None, str]:
    """(metres per pixel or None when unknown, a phrase for the log) of a reader's grid."""
    info = reader.info
    path = getattr(reader, "path", "the raster")
    if not getattr(info, "georeferenced", False) or getattr(info, "gcps", ()) or info.transform is None:
        why = "georeferenced by ground control points only" if getattr(info, "gcps", ()) else "not georeferenced"
        return None, f"the ground resolution of {path} is unknown ({why})"
    x0, dx, rx, y0, ry, dy = geotransform(info.transform)
    sx, sy = math.hypot(dx, ry), math.hypot(rx, dy)
    if info.crs is None:
        return None, f"the ground resolution of {path} is unknown (a pixel is {sx:g} x {sy:g} units of no stated CRS)"
    tools = crs_tools(reader.library)
    unit, factor = tools.crs_units(info.crs)
    name = tools.crs_name(info.crs)
    if unit == "degree":
        lat = y0 + dy * info.height / 2 + ry * info.width / 2
        mx, my = metres_per_degree(lat)
        m_x, m_y = sx * mx, sy * my
        text = f"{_m(m_x, m_y)}/px ({sx:.3g} x {sy:.3g} degrees of {name} at latitude {lat:.2f})"
    else:
        m_x, m_y = sx * factor, sy * factor
        text = f"{_m(m_x, m_y)}/px ({name})"
    return math.sqrt(m_x * m_y), f"ground resolution of {path}: {text}"


def _m(a: float, b: float) -> str:
    return f"{a:.3g} m" if abs(a - b) <= 1e-3 * max(a, b) else f"{a:.3g} x {b:.3g} m"


# --------------------------------------------------------------------------- resampling

def _taps(j0: int, j1: int, offset: float, f: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights ((j1 - j0, T) each) of output pixels j0..j1-1 along one axis: pixel j covers
    source coordinates [offset + j f, offset + (j + 1) f). Area average for f >= 1, bilinear below. Weights come
    from j alone; padding taps (weight 0) leave every sum unchanged, so a pixel's value is the same in any window."""
    j = np.arange(j0, j1, dtype=np.float64)
    if f >= 1:
        lo, hi = offset + j * f, offset + (j + 1) * f
        first = np.floor(lo).astype(np.int64)
        last = np.ceil(hi).astype(np.int64) - 1
        t = int((last - first).max()) + 1
        idx = first[:, None] + np.arange(t)[None, :]
        w = (np.minimum(hi[:, None], idx + 1.0) - np.maximum(lo[:, None], idx.astype(np.float64))) / f
        w[(idx > last[:, None]) | (idx < 0) | (idx >= n) | (w < 0)] = 0.0
    else:
        s = offset + (j + 0.5) * f - 0.5
        i0 = np.floor(s)
        frac = s - i0
        idx = i0.astype(np.int64)[:, None] + np.arange(2)[None, :]
        w = np.column_stack([1.0 - frac, frac])
    return np.clip(idx, 0, n - 1), w


def _resample(data: np.ndarray, valid: np.ndarray, iy, wy, ix, wx, dtype, fill) -> tuple[np.ndarray, np.ndarray]:
    """Weighted means of the valid source pixels (``data`` (h, w, 3) with ``valid``; ``iy``/``ix`` relative to it)."""
    ok = valid.copy()
    if np.issubdtype(data.dtype, np.floating):
        ok &= np.isfinite(data).all(axis=-1)
    v = np.where(ok[..., None], data, 0).astype(np.float64)
    m = ok.astype(np.float64)
    a = np.zeros((v.shape[0], ix.shape[0], 3))
    b = np.zeros((v.shape[0], ix.shape[0]))
    for t in range(ix.shape[1]):  # taps in a fixed order: the same operations for a pixel in any window
        a += wx[None, :, t, None] * v[:, ix[:, t]]
        b += wx[None, :, t] * m[:, ix[:, t]]
    num = np.zeros((iy.shape[0], ix.shape[0], 3))
    den = np.zeros((iy.shape[0], ix.shape[0]))
    for t in range(iy.shape[1]):
        num += wy[:, t, None, None] * a[iy[:, t]]
        den += wy[:, t, None] * b[iy[:, t]]
    good = den >= HALF_VALID
    value = num / np.where(good, den, 1.0)[..., None]
    dt = np.dtype(dtype)
    if np.issubdtype(dt, np.integer):
        lim = np.iinfo(dt)
        value = np.clip(np.rint(value), lim.min, lim.max)
    out = value.astype(dt)
    out[~good] = fill
    return out, good


# --------------------------------------------------------------------------- the view

class RasterView(ReaderBase):
    """The area and grid of ``region`` over ``reader`` as a raster of its own (module doc). ``notes``: what the
    run's log should say (a transformed extent, an area cut to the raster, a resolution converted to degrees)."""
    read_errors = ()  # the source reader's reads already name the file and window

    def __init__(self, reader, region: Region):
        self.base, self.region = reader, region
        self.path, self.library = reader.path, reader.library
        self.notes: list[str] = []
        info = reader.info
        flags = region.flags()
        if not getattr(info, "georeferenced", False) or info.gcps or info.transform is None:
            why = "it is georeferenced by ground control points only" if info.gcps else "it has no CRS or geotransform"
            verb = "needs" if "/" not in flags else "need"
            raise RasterError(f"{flags} {verb} a georeferenced raster: {self.path} is not ({why}, so its ground "
                              "resolution is unknown); georeference it first (e.g. gdalwarp), or leave out " + flags)
        x0, dx, rx, y0, ry, dy = geotransform(info.transform)
        if rx or ry:
            raise RasterError(f"{flags}: {self.path} has a rotated or sheared geotransform; warp it to a north-up "
                              "grid first (gdalwarp)")
        crs = info.crs
        if crs is None and (region.extent_crs or region.mask or region.resolution):
            raise RasterError(f"{flags}: {self.path} has a geotransform but no CRS, so its units are unknown; "
                              "assign one first (gdal_edit.py -a_srs EPSG:...)")
        tools = crs_tools(self.library)
        W, H = info.width, info.height

        def to_px(x, y):
            return (np.asarray(x, np.float64) - x0) / dx, (np.asarray(y, np.float64) - y0) / dy

        def world(col0, row0, col1, row1):
            xa, xb = sorted((x0 + dx * col0, x0 + dx * col1))
            ya, yb = sorted((y0 + dy * row0, y0 + dy * row1))
            return xa, ya, xb, yb

        raster_bounds = world(0, 0, W, H)
        crs_label = tools.crs_name(crs) if crs is not None else "the raster's units"
        area = (0.0, 0.0, float(W), float(H))  # col0, row0, col1, row1 in source pixels
        what = "the raster"
        if region.extent is not None:
            xmin, ymin, xmax, ymax = region.extent
            if region.extent_crs is not None:
                t = np.linspace(0.0, 1.0, DENSIFY)
                xs = np.concatenate([xmin + (xmax - xmin) * t, np.full(DENSIFY, xmax), xmax - (xmax - xmin) * t,
                                     np.full(DENSIFY, xmin)])
                ys = np.concatenate([np.full(DENSIFY, ymin), ymin + (ymax - ymin) * t, np.full(DENSIFY, ymax),
                                     ymax - (ymax - ymin) * t])
                tx, ty = tools.transform_xy(tools.parse_crs(region.extent_crs), crs, xs, ys)
                if not (np.isfinite(tx).all() and np.isfinite(ty).all()):
                    raise RasterError(f"--extent {_fmt(region.extent)} in {region.extent_crs} cannot be transformed "
                                      f"to {crs_label}, the CRS of {self.path}")
                xmin, ymin, xmax, ymax = float(tx.min()), float(ty.min()), float(tx.max()), float(ty.max())
                self.notes.append(f"--extent {_fmt(region.extent)} in {region.extent_crs} is "
                                  f"{_fmt((xmin, ymin, xmax, ymax))} in {crs_label} (the bounding box of its outline)")
            cx, cy = to_px([xmin, xmax], [ymin, ymax])
            area = (float(cx.min()), float(cy.min()), float(cx.max()), float(cy.max()))
            what = f"--extent {_fmt((xmin, ymin, xmax, ymax))}"
            self._check_overlap(area, W, H, what, raster_bounds, crs_label)
        self.mask_count = 0
        polygons = None
        if region.mask is not None:
            polygons, mask_crs, how = _read_polygons_once(region.mask)
            self.mask_count = len(polygons)
            xs, ys = flatten(polygons)
            if mask_crs is None:
                self.notes.append(f"--mask {region.mask} states no CRS: its coordinates are taken to be in "
                                  f"{crs_label}, the raster's")
            else:
                xs, ys = tools.transform_xy(tools.parse_crs(mask_crs, "the CRS of --mask"), crs, xs, ys)
                if not (np.isfinite(xs).all() and np.isfinite(ys).all()):
                    raise RasterError(f"--mask {region.mask}: its polygons cannot be transformed to {crs_label}, "
                                      f"the CRS of {self.path}")
            polygons = unflatten(polygons, xs, ys)
            self.notes.append(f"--mask {region.mask}: {len(polygons)} polygon(s), read with {how}")
            pc, pr = to_px(xs, ys)
            mask_area = (float(pc.min()), float(pr.min()), float(pc.max()), float(pr.max()))
            if region.extent is None:
                area, what = mask_area, f"the polygons of --mask {region.mask}"
            elif not (mask_area[0] < area[2] and mask_area[2] > area[0] and mask_area[1] < area[3]
                      and mask_area[3] > area[1]):
                raise RasterError(f"--mask {region.mask}: its polygons lie outside {what}: nothing to segment")
        cut = self._check_overlap(area, W, H, what, raster_bounds, crs_label)
        if cut != area:
            self.notes.append(f"{what} reaches past {self.path}: cut to the raster's bounds")

        if region.resolution is None:
            c0, r0 = math.floor(cut[0] + SNAP_EPS), math.floor(cut[1] + SNAP_EPS)
            c1, r1 = max(c0 + 1, math.ceil(cut[2] - SNAP_EPS)), max(r0 + 1, math.ceil(cut[3] - SNAP_EPS))
            self.offset, self.scale = (float(c0), float(r0)), (1.0, 1.0)
            width, height = c1 - c0, r1 - r0
        else:
            res = region.resolution
            unit, factor = tools.crs_units(crs)
            if unit == "degree":
                lat = y0 + dy * (cut[1] + cut[3]) / 2
                mx, my = metres_per_degree(lat)
                ux, uy = res / mx, res / my
                self.notes.append(f"--resolution {res:g} m in {crs_label} (degrees): {ux:.6g} x {uy:.6g} degrees, "
                                  f"converted at the area's centre latitude {lat:.4f}")
            else:
                ux = uy = res / factor
            fx, fy = ux / abs(dx), uy / abs(dy)
            self.offset, self.scale = (cut[0], cut[1]), (fx, fy)
            width = max(1, math.floor((cut[2] - cut[0]) / fx + 0.5))
            height = max(1, math.floor((cut[3] - cut[1]) / fy + 0.5))
        (co, ro), (fx, fy) = self.offset, self.scale
        self.exact = fx == 1.0 and fy == 1.0 and co == int(co) and ro == int(ro)
        # resampling: the source is read under the view's own lock and windows resample in parallel
        self.locks_its_reads, self._lock = not self.exact, threading.Lock()
        gt = (x0 + dx * co, dx * fx, 0.0, y0 + dy * ro, 0.0, dy * fy)
        self.info = replace(info, width=int(width), height=int(height), transform=like_transform(info.transform, gt),
                            has_mask=info.has_mask or polygons is not None, gcps=(), gcp_crs=None)
        self.source_window = (int(math.floor(ro)), min(H, int(math.ceil(ro + height * fy - SNAP_EPS))),
                              int(math.floor(co)), min(W, int(math.ceil(co + width * fx - SNAP_EPS))))
        self.mask = None
        if polygons is not None:
            polygons = self._polygons_in_grid(polygons, pc, pr, what)
            gx0, gdx, _, gy0, _, gdy = gt
            self.mask = PolygonMask([[np.column_stack([(r[:, 0] - gx0) / gdx, (r[:, 1] - gy0) / gdy]) for r in rings]
                                     for rings in polygons])
        self.bounds = world(co, ro, co + width * fx, ro + height * fy)
        self.crs_label = crs_label
        self.resampling = self._resampling_text()

    def _polygons_in_grid(self, polygons, pc: np.ndarray, pr: np.ndarray, what: str):
        """The polygons whose bounding box (``pc``, ``pr``: every vertex in source pixels, in order) reaches the
        view's grid; the others cannot hold one of its pixel centres (each half an output pixel inside the grid;
        a quarter of one kept as margin against rounding), so leaving them out changes no pixel."""
        (co, ro), (fx, fy) = self.offset, self.scale
        counts = np.array([sum(r.shape[0] for r in rings) for rings in polygons], np.int64)
        starts = np.cumsum(counts) - counts  # every polygon has vertices (read_polygons drops empty ones)
        c_lo, c_hi = np.minimum.reduceat(pc, starts), np.maximum.reduceat(pc, starts)
        r_lo, r_hi = np.minimum.reduceat(pr, starts), np.maximum.reduceat(pr, starts)
        reach = ((c_hi >= co + 0.25 * fx) & (c_lo <= co + (self.info.width - 0.25) * fx)
                 & (r_hi >= ro + 0.25 * fy) & (r_lo <= ro + (self.info.height - 0.25) * fy))
        if not reach.any():
            where = what if self.region.extent is not None else str(self.path)
            raise RasterError(f"--mask {self.region.mask}: none of its {len(polygons)} polygon(s) reaches {where}: "
                              "nothing to segment")
        if not reach.all():
            self.notes.append(f"--mask {self.region.mask}: {int(reach.sum())} of its {len(polygons)} polygons reach "
                              "the area; the others are left out")
        return [rings for rings, ok in zip(polygons, reach) if ok]

    def _check_overlap(self, area, W: int, H: int, what: str, raster_bounds, crs_label: str):
        """``area`` (source pixels) cut to the raster; an error naming the raster when nothing is left."""
        cut = (max(area[0], 0.0), max(area[1], 0.0), min(area[2], float(W)), min(area[3], float(H)))
        if not (cut[0] < cut[2] and cut[1] < cut[3]):
            raise RasterError(f"{what} misses {self.path}: the raster covers {_fmt(raster_bounds)} in {crs_label}; "
                              "nothing to segment")
        return cut

    def _resampling_text(self) -> str:
        if self.exact:
            return "none: the source's pixels on the source's grid"
        kinds = ["area average" if f >= 1 else "bilinear" for f in self.scale]
        kind = kinds[0] if kinds[0] == kinds[1] else f"{kinds[0]} across, {kinds[1]} down"
        return (f"{kind} (output pixel = {self.scale[0]:.4g} x {self.scale[1]:.4g} source pixels; nodata when less "
                "than half of it is valid)")

    def describe(self) -> dict:
        """The run report's ``region``: what was asked and the grid it gave."""
        x0, dx, _, y0, _, dy = geotransform(self.info.transform)
        return {"extent": list(self.region.extent) if self.region.extent else None,
                "extent_crs": self.region.extent_crs, "mask": self.region.mask, "mask_polygons": self.mask_count,
                "resolution_m": self.region.resolution, "resampling": self.resampling,
                "bounds": list(self.bounds), "crs": self.crs_label, "pixel_size": [abs(dx), abs(dy)],
                "width": self.info.width, "height": self.info.height,
                "source_window": dict(zip(("row0", "row1", "col0", "col1"), self.source_window))}

    # reads -----------------------------------------------------------------------------------------------------
    def _fill(self):
        nodata = self.info.nodata
        return 0 if nodata is None or nodata != nodata else nodata

    def _read(self, row0: int, row1: int, col0: int, col1: int) -> tuple[np.ndarray, np.ndarray]:
        (co, ro), (fx, fy) = self.offset, self.scale
        if self.exact:
            return self.base.read(row0 + int(ro), row1 + int(ro), col0 + int(co), col1 + int(co))
        bw, bh = self.base.width, self.base.height
        ix, wx = _taps(col0, col1, co, fx, bw)
        sc0, sc1 = int(ix.min()), int(ix.max()) + 1
        step = max(1, int(CHUNK_PIXELS / ((sc1 - sc0) * max(1.0, fy))))
        data = np.empty((row1 - row0, col1 - col0, 3), self.info.dtype)
        valid = np.empty((row1 - row0, col1 - col0), bool)
        for a in range(row0, row1, step):
            b = min(row1, a + step)
            iy, wy = _taps(a, b, ro, fy, bh)
            sr0, sr1 = int(iy.min()), int(iy.max()) + 1
            with self._lock:
                src, ok = self.base.read(sr0, sr1, sc0, sc1)
            data[a - row0:b - row0], valid[a - row0:b - row0] = _resample(src, ok, iy - sr0, wy, ix - sc0, wx,
                                                                          self.info.dtype, self._fill())
        return data, valid

    def _read_decimated(self, out_h: int, out_w: int, box=None) -> tuple[np.ndarray, np.ndarray]:
        """Nearest source pixels of the view's area (for a preview), the mask applied."""
        if box is not None:
            raise RasterError("a view reads decimated over its whole area only")
        data, valid = self.base.read_decimated(out_h, out_w, self.source_window)
        if self.mask is not None:
            valid &= self.mask.scaled(out_w / self.width, out_h / self.height).inside(0, out_h, 0, out_w)
        return data, valid

    def inside(self, row0: int, row1: int, col0: int, col1: int) -> np.ndarray | None:
        return None if self.mask is None else self.mask.inside(row0, row1, col0, col1)

    def close(self) -> None:
        self.base.close()


_POLYGONS: dict = {}  # (path, the stat of each of its files) -> read_polygons(path): one read for many rasters
_POLYGONS_LOCK = threading.Lock()


def _read_polygons_once(path: str):
    """``read_polygons(path)``, read once while its files stay unchanged (a fit or a batch over many rasters
    with one mask reads it once; each raster still reprojects the vertices to its own CRS)."""
    try:
        key = (path,) + tuple((f, st.st_mtime_ns, st.st_size) for f in mask_files(path) for st in [os.stat(f)])
    except OSError:
        return read_polygons(path)  # not a local file (/vsi...) or missing: read_polygons says what it is
    with _POLYGONS_LOCK:
        hit = _POLYGONS.get(key)
    if hit is None:
        hit = read_polygons(path)
        with _POLYGONS_LOCK:
            if len(_POLYGONS) >= 4:
                _POLYGONS.pop(next(iter(_POLYGONS)))
            _POLYGONS[key] = hit
    polygons, crs, how = hit
    return list(polygons), crs, how


def _fmt(box) -> str:
    return ",".join(f"{v:.10g}" for v in box)


__all__ = ["Region", "RasterView", "ground_resolution", "metres_per_degree", "parse_extent", "parse_resolution"]
