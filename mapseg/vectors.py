"""Segments as polygons: a label raster into a vector file (any OGR format, by extension), strip by strip.

    polygonize_labels("labels.tif", "segments.gpkg", min_area=500, simplify="auto")

1. **Sieve** (GDAL's, ``rasterio.features.sieve``), once over the whole raster before the strips: regions of
   fewer pixels than ``min_area`` (square metres; N pixels) are merged into their largest neighbour, in passes
   at 2, 4, 8, ... then N pixels (GDAL merges a small region only into a neighbour that is not small itself,
   so a single pass at N leaves clusters of small regions as they were). GDAL reads the labels from the file
   and the valid pixels from a mask file beside the output (written strip by strip, removed after) and writes
   into one array of the raster's size (1 byte a pixel for uint8 labels), in place from the second pass on,
   then into a GeoTIFF beside the output (removed after) that the strips read: the result does not depend on
   the strips, and the memory not on N. ``under_min_area`` counts the polygons left smaller than the minimum
   (a region with no neighbour to join: enclosed by nodata).

The (sieved) labels are then read in strips of ``block_rows`` rows (default ``strip_rows``: about 2 million
pixels, 64 to 1024 rows). For each strip:

2. **Polygonize** (``rasterio.features.shapes``) the strip's rows, nodata excluded, in pixel coordinates
   (integers: every union below is exact).
3. **Simplify** (``simplify`` metres, or ``"auto"``: AUTO_SIMPLIFY_PX = 3 pixels, 0.75 of mapseg's 4-pixel
   cell, which straightens the staircase of its edges; Douglas-Peucker) so that neighbours keep sharing their
   edges: the polygons' boundaries are noded into one linework, cut into arcs between junctions (and at every
   vertex on the strip's top and bottom lines, so nothing moves on a seam, and on the raster's left and
   right edges), each arc simplified once with its endpoints fixed, the simplified arcs noded and
   polygonized again, and each face given to the polygon holding most of the pixel centres inside it (a
   face mostly over nodata, such as a nodata hole, to none; a face holding no pixel centre, a sliver
   where two simplified arcs cross, to the polygon it overlaps most). The faces tile what the arcs
   enclose: no gaps, no overlaps. A region thinner than the tolerance can vanish (its neighbours close
   over it): ``vanished`` counts them. The tolerance is applied in pixel units: metres / the side of a
   square of one pixel's area.
4. **Merge across the seam** with the strip above: polygons of one value whose pixels touch across the
   seam (share an edge; with ``connectivity=8`` also a corner) become one feature. A feature is written
   once nothing of it touches the strip's bottom line.

Memory: while sieving (where ``min_area`` is given), the sieved raster (1 byte a pixel for uint8 labels) and
GDAL's tables of its regions; then one strip of labels, its polygons and their noding and polygonizing (about
100 bytes per strip pixel, GEOS); and the features still open at the seam (a region that spans the whole raster
is held until it closes: its geometry has to be built to be written). Formats that cannot append (FlatGeobuf,
...) get every feature at once at the end; GeoPackage, Shapefile and GeoJSON are written in batches.

Attributes: ``label`` (the raster value), ``class`` (its name, from a legend; see ``mapseg.legend``)
and ``area_m2``. Areas in square metres on the ground:

* projected CRSs whose own areas are within AREA_TOLERANCE (0.5 %) of the ground's at the raster's corners,
  edge midpoints and centre (equal-area CRSs, UTM, national grids): from the pixel size and the CRS's unit;
* geographic CRSs (degrees), on the GRS80 ellipsoid's authalic sphere: the area of a pixel row is
  R_q^2 * dlon * |sin b(lat_top) - sin b(lat_bottom)| (b the authalic latitude), and a polygon's area the
  line integral R_q^2 * dlon * |sum over edges of the integral of sin b dx| (exact for the staircase
  edges, Simpson's rule on simplified ones);
* other projected CRSs (Web Mercator, ...): on the same sphere, the line integral
  R_q^2 * |sum over edges of the integral of sin b dlon| over the vertices (and each edge's middle, for
  Simpson's rule) transformed to longitude and latitude by PROJ.

The sieve's threshold in pixels is taken from the pixel area at the raster's middle row (and column).

The output is written in a temporary folder beside it (``.OUT.polygons-<pid>-<host>-<id>``) and its
file(s) renamed into place when complete: an interrupted run leaves no half-written file.

rasterio, shapely and pyogrio are imported when a function needs them, not with this module
(QGIS's Python has numpy and osgeo alone).
"""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np

from .errors import OutputError, RasterError, SegmentError
from .fileio import check_outputs, remove_if_present, replace_output, temp_sibling
from .raster.common import OUTPUT_NODATA

# Strips of about STRIP_PIXELS pixels (block_rows = STRIP_PIXELS / width, within 64..1024 rows): the noding
# and polygonizing of a strip's boundaries take about 100 bytes per strip pixel (GEOS), which this bounds.
STRIP_PIXELS = 2_000_000
STRIP_ROWS = (64, 1024)
BATCH = 5000                     # features per write
# --simplify auto: 0.75 x mapseg's 4-pixel cell. The staircase of 4-pixel steps goes at a tolerance of about
# 2.83 pixels (half a cell's diagonal); 3 pixels straightens it and keeps regions of one cell or more.
AUTO_SIMPLIFY_PX = 3.0
SIEVE_DTYPES = ("uint8", "uint16", "int16", "int32")
SIEVE_CACHE_MB = 32
# GRS80 (WGS84 differs in the 9th digit of the flattening): authalic sphere for areas on geographic CRSs
ELLIPSOID_A = 6378137.0
ELLIPSOID_F = 1 / 298.257222101
_E = math.sqrt(ELLIPSOID_F * (2 - ELLIPSOID_F))
# A projected CRS's own areas are used where they are within this of the ground's all over the raster
AREA_TOLERANCE = 0.005
MULTI_FILE_SUFFIXES = {"ESRI Shapefile": (".shp", ".shx", ".dbf", ".prj", ".cpg", ".qix", ".sbn", ".sbx")}


def strip_rows(width: int) -> int:
    """Rows per strip for a raster ``width`` pixels wide: about STRIP_PIXELS pixels, 64..1024 rows."""
    return int(min(STRIP_ROWS[1], max(STRIP_ROWS[0], STRIP_PIXELS // max(1, width))))


def _libraries():
    """(rasterio, shapely, pyogrio), or a SegmentError naming what to install."""
    missing = []
    mods = []
    for name in ("rasterio", "shapely", "pyogrio"):
        try:
            mods.append(__import__(name))
        except ImportError:
            missing.append(name)
    if missing:
        raise SegmentError(f"polygons need {', '.join(missing)} (not installed): pip install rasterio shapely pyogrio")
    import shapely

    if int(shapely.__version__.split(".")[0]) < 2:
        raise SegmentError(f"polygons need shapely >= 2.0 (found {shapely.__version__}): pip install -U shapely")
    return tuple(mods)


def vector_driver(path: str | os.PathLike) -> str:
    """The OGR driver that writes ``path``, from its extension (.gpkg, .shp, .geojson, .fgb, ...)."""
    _, _, pyogrio = _libraries()
    from pyogrio.raw import detect_write_driver

    try:
        driver = detect_write_driver(str(path))
    except ValueError as exc:
        raise OutputError(f"polygons {path}: no vector format for the extension {Path(path).suffix or '(none)'!r}; "
                          "use .gpkg, .shp, .geojson, .fgb or another OGR format's extension") from exc
    modes = pyogrio.list_drivers(write=True)
    if driver not in modes:
        raise OutputError(f"polygons {path}: this GDAL cannot write {driver}; use .gpkg")
    return driver


def _number(value, flag: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise SegmentError(f"{flag} {value!r}: give a number") from exc
    if not math.isfinite(v) or v < 0:
        raise SegmentError(f"{flag} {value!r}: give a finite number >= 0")
    return v


# --------------------------------------------------------------------------- pixel areas

def _authalic_sin(lat_deg: np.ndarray) -> np.ndarray:
    """sin of the authalic latitude of geodetic latitudes (degrees) on the GRS80 ellipsoid."""
    s = np.sin(np.radians(np.clip(lat_deg, -90.0, 90.0)))

    def q(sin_phi):
        return (1 - _E ** 2) * (sin_phi / (1 - _E ** 2 * sin_phi ** 2)
                                - np.log((1 - _E * sin_phi) / (1 + _E * sin_phi)) / (2 * _E))

    return q(s) / q(np.float64(1.0))


def _authalic_radius() -> float:
    qp = (1 - _E ** 2) * (1 / (1 - _E ** 2) - math.log((1 - _E) / (1 + _E)) / (2 * _E))
    return ELLIPSOID_A * math.sqrt(qp / 2)


def _ring_sums(values: np.ndarray, ring: np.ndarray, n_rings: int) -> np.ndarray:
    return np.bincount(ring, weights=values, minlength=n_rings)


class PixelGeometry:
    """Pixel -> ground: the transform, the pixel area (m²) at a row, and polygon areas in m².

    Geographic CRSs: on the authalic sphere (``geographic``). Projected CRSs: the CRS's own area (pixel
    area = the pixel's sides in the CRS's unit, converted to metres) where it is within AREA_TOLERANCE of
    the area on the ground at the raster's corners, edge midpoints and centre (equal-area CRSs, UTM, national
    grids); else (``ground``: Web Mercator, ...) every area on the authalic sphere from the vertices
    transformed to longitude and latitude (PROJ, through rasterio)."""

    def __init__(self, transform, crs, path: str, width: int = 1, height: int = 1):
        self.t = transform
        self.crs = crs
        self.geographic = bool(crs is not None and crs.is_geographic)
        self.georeferenced = crs is not None
        self.ground = False
        self.distortion = 0.0          # largest |CRS area / ground area - 1| at the sample points
        self.width, self.height = int(width), int(height)
        if self.geographic:
            if transform.b or transform.d:
                raise RasterError(f"{path}: a rotated raster in geographic coordinates is not supported for areas")
            self.rq = _authalic_radius()
            self.dlon = abs(math.radians(transform.a))
        elif crs is not None:
            try:
                factor = float(crs.linear_units_factor[1])
            except Exception as exc:  # noqa: BLE001 - CRSError for CRSs without a linear unit
                raise RasterError(f"{path}: the CRS has no linear unit ({exc}); reproject to a projected CRS") from exc
            self.pixel_m2 = abs(transform.a * transform.e - transform.b * transform.d) * factor ** 2
            self.rq = _authalic_radius()
            cols = (0.5, self.width / 2, max(0.5, self.width - 0.5))
            rows = (0.5, self.height / 2, max(0.5, self.height - 0.5))
            try:
                self.distortion = max(abs(self.pixel_m2 / self._ground_pixel(c, r) - 1) for c in cols for r in rows)
            except Exception:  # noqa: BLE001 - a CRS PROJ cannot take to longitude and latitude: its own areas
                self.distortion = 0.0
            self.ground = self.distortion > AREA_TOLERANCE

    def _lat(self, y):
        return self.t.f + self.t.e * np.asarray(y, np.float64)

    # ---- projected CRSs that do not keep areas: on the authalic sphere, through longitude and latitude

    def _lonlat(self, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel coordinates -> (longitude, latitude) in degrees (WGS84; PROJ)."""
        from rasterio.warp import transform

        t = self.t
        x = t.a * xy[:, 0] + t.b * xy[:, 1] + t.c
        y = t.d * xy[:, 0] + t.e * xy[:, 1] + t.f
        lon, lat = transform(self.crs, "EPSG:4326", x, y)
        lon, lat = np.asarray(lon, np.float64), np.asarray(lat, np.float64)
        if not (np.isfinite(lon).all() and np.isfinite(lat).all()):
            raise RasterError("points outside the CRS's area of use")
        return lon, lat

    def _ground_rings(self, xy: np.ndarray, ring: np.ndarray, n_rings: int) -> np.ndarray:
        """Unsigned areas in m² of rings given as vertices (pixel coordinates, each ring closed) and their ring
        index: R_q² |the line integral of sin(authalic latitude) d(longitude)|, Simpson's rule per edge (its
        middle transformed too)."""
        if not len(xy):
            return np.zeros(n_rings)
        same = ring[1:] == ring[:-1]                       # edges within a ring
        mid = (xy[:-1][same] + xy[1:][same]) / 2
        lon, lat = self._lonlat(np.concatenate([xy, mid]))
        n = len(xy)
        s = _authalic_sin(lat)
        i0 = np.flatnonzero(same)
        dlon = np.radians((lon[i0 + 1] - lon[i0] + 180.0) % 360.0 - 180.0)   # across the antimeridian too
        part = dlon * (s[i0] + 4 * s[n:] + s[i0 + 1]) / 6
        return np.abs(_ring_sums(part, ring[i0], n_rings)) * self.rq ** 2

    def _ground_pixel(self, col: float, row: float) -> float:
        c, r = math.floor(col), math.floor(row)
        sq = np.array([[c, r], [c + 1, r], [c + 1, r + 1], [c, r + 1], [c, r]], np.float64)
        return float(self._ground_rings(sq, np.zeros(5, np.int64), 1)[0])

    def pixel_area(self, row: float) -> float:
        """Area in m² of one pixel of ``row`` (float rows: the pixel of that row's middle; in a projected CRS
        that does not keep areas, the pixel in the middle of the row)."""
        if self.geographic:
            r = math.floor(row)
            s = _authalic_sin(self._lat([r, r + 1]))
            return self.rq ** 2 * self.dlon * abs(float(s[0] - s[1]))
        if self.ground:
            return self._ground_pixel(self.width / 2, row)
        return self.pixel_m2

    def pixel_size(self, row: float) -> float:
        """Side in metres of a square of one pixel's area at ``row`` (the simplification's unit)."""
        return math.sqrt(self.pixel_area(row))

    def areas(self, geoms) -> np.ndarray:
        """Areas in m² of shapely polygons in pixel coordinates."""
        import shapely

        geoms = np.asarray(geoms, dtype=object)
        if not self.geographic and not self.ground:
            return shapely.area(geoms) * self.pixel_m2
        if self.ground:
            polys, owner = shapely.get_parts(geoms, return_index=True)
            rings, poly = shapely.get_rings(polys, return_index=True)
            xy, ring = shapely.get_coordinates(rings, return_index=True)
            ring_area = self._ground_rings(xy, ring, len(rings))
            exterior = np.r_[True, poly[1:] != poly[:-1]]     # get_rings: each polygon's exterior first
            signed = np.where(exterior, ring_area, -ring_area)
            return np.bincount(owner[poly], weights=signed, minlength=len(geoms))
        out = np.empty(len(geoms))
        for i, g in enumerate(geoms):
            total = 0.0
            for poly in shapely.get_parts(g):
                rings = [poly.exterior, *poly.interiors]
                for k, ring in enumerate(rings):
                    a = abs(self._ring_integral(shapely.get_coordinates(ring)))
                    total += a if k == 0 else -a
            out[i] = total * self.rq ** 2 * self.dlon
        return out

    def _ring_integral(self, xy: np.ndarray) -> float:
        """The line integral of sin(authalic latitude) dx around a ring (pixel coordinates)."""
        x0, y0, x1, y1 = xy[:-1, 0], xy[:-1, 1], xy[1:, 0], xy[1:, 1]
        dx = x1 - x0
        s0, s1 = _authalic_sin(self._lat(y0)), _authalic_sin(self._lat(y1))
        sm = _authalic_sin(self._lat((y0 + y1) / 2))
        return float(np.sum(dx * (s0 + 4 * sm + s1) / 6))  # exact where y0 == y1 (the staircase)

    def to_crs(self, geoms):
        """Pixel coordinates -> the raster's CRS (affine)."""
        import shapely

        t = self.t
        return shapely.transform(geoms, lambda xy: np.column_stack(
            (t.a * xy[:, 0] + t.b * xy[:, 1] + t.c, t.d * xy[:, 0] + t.e * xy[:, 1] + t.f)))


# --------------------------------------------------------------------------- one strip

def _seam_intervals(poly, y: float) -> list[tuple[float, float]]:
    """The x-intervals of ``poly``'s edges lying on the line ``y`` (its pixels' edges along a seam)."""
    import shapely

    out = []
    for ring in [poly.exterior, *poly.interiors]:
        xy = shapely.get_coordinates(ring)
        on = (xy[:-1, 1] == y) & (xy[1:, 1] == y)
        for i in np.flatnonzero(on):
            a, b = xy[i, 0], xy[i + 1, 0]
            out.append((min(a, b), max(a, b)))
    return out


def _split_arcs(chains, rows: tuple[float, float], cols: tuple[float, float]):
    """Chains of the noded linework cut at every inner vertex lying on the strip's top or bottom line (the seams)
    or on the raster's left or right edge, so that the simplification keeps those vertices: strips still meet
    and the raster's edges stay straight. Vectorised: one array of pieces."""
    import shapely

    xy, chain = shapely.get_coordinates(chains, return_index=True)
    if not len(xy):
        return np.asarray([], dtype=object)
    first = np.r_[True, chain[1:] != chain[:-1]]
    last = np.r_[chain[1:] != chain[:-1], True]
    cut = (np.isin(xy[:, 1], rows) | np.isin(xy[:, 0], cols)) & ~first & ~last
    piece = np.cumsum(first | cut) - 1                         # a cut vertex starts the next piece ...
    dup = np.flatnonzero(cut)                                  # ... and ends the one before
    order = np.r_[np.arange(len(xy)) * 2.0, dup * 2.0 - 1]
    ids = np.r_[piece, piece[dup] - 1]
    pts = np.r_[xy, xy[dup]]
    sort = np.lexsort((order, ids))
    return shapely.linestrings(pts[sort], indices=ids[sort])


def geojson_polygons(polys) -> list[dict]:
    """GeoJSON mappings of shapely Polygons, built from their coordinate arrays at once (rasterio's rasterize
    takes these as they are; shapely's ``__geo_interface__``, one polygon at a time, was 14 % of a run)."""
    import shapely

    polys = np.asarray(polys, dtype=object)
    out = [{"type": "Polygon", "coordinates": []} for _ in range(len(polys))]
    holed = shapely.get_num_interior_rings(polys) > 0
    for which, parts in ((np.flatnonzero(~holed), None), (np.flatnonzero(holed), "rings")):
        if not which.size:
            continue
        geoms = polys[which]
        if parts:                                           # each ring on its own: exterior, then holes
            geoms, owner = shapely.get_rings(geoms, return_index=True)
            owner = which[owner]
        else:                                               # one ring each: the polygon's coordinates
            owner = which
        xy, ring = shapely.get_coordinates(geoms, return_index=True)
        xy = xy.tolist()
        cut = (np.flatnonzero(ring[1:] != ring[:-1]) + 1).tolist()
        for p, i0, i1 in zip(owner[ring[[0] + cut]].tolist(), [0] + cut, cut + [len(xy)]):
            out[p]["coordinates"].append(xy[i0:i1])
    return out


def _face_owners(faces, polys, rows: tuple[float, float], poly_json=None) -> np.ndarray:
    """Per face: the index of the polygon holding most of its pixel centres, -1 where most are nodata, -2
    where it holds none. Rasterised on the strip's grid (rows[0]..rows[1], pixel coordinates); ``poly_json``:
    the polygons as GeoJSON mappings where the caller has them (rasterio converts shapely's slowly)."""
    from affine import Affine
    from rasterio.features import rasterize

    r0, r1 = int(rows[0]), int(rows[1])
    width = int(math.ceil(max(shapely_bounds(polys)[2], shapely_bounds(faces)[2], 1)))
    shape, grid = (r1 - r0, width), Affine(1, 0, 0, 0, 1, r0)
    face_id = rasterize(zip(geojson_polygons(faces), range(len(faces))), out_shape=shape, transform=grid, fill=-1,
                        dtype="int32")
    poly_id = rasterize(zip(polys if poly_json is None else poly_json, range(len(polys))), out_shape=shape,
                        transform=grid, fill=-1, dtype="int32")
    inside = face_id >= 0
    f, p = face_id[inside].astype(np.int64), poly_id[inside].astype(np.int64)
    total = np.bincount(f, minlength=len(faces))
    owner = np.where(total > 0, -1, -2)
    held = p >= 0
    if held.any():
        pair, count = np.unique(f[held] * len(polys) + p[held], return_counts=True)
        pf, pp = pair // len(polys), pair % len(polys)
        order = np.lexsort((-count, pf))                      # per face, the largest count first
        pf, pp, count = pf[order], pp[order], count[order]
        top = np.r_[True, pf[1:] != pf[:-1]]
        held_total = np.bincount(f[held], minlength=len(faces))
        mostly = held_total[pf[top]] * 2 >= total[pf[top]]    # else mostly nodata: a hole's face
        owner[pf[top][mostly]] = pp[top][mostly]
    return owner


def shapely_bounds(geoms) -> np.ndarray:
    """(minx, miny, maxx, maxy) of all ``geoms``."""
    import shapely

    b = shapely.bounds(np.asarray(geoms, dtype=object))
    return np.array([b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()])


def simplify_shared(polys, tolerance: float, rows: tuple[float, float], width: int, poly_json=None):
    """Polygons (pixel coordinates) simplified so that neighbours keep sharing their edges: a list with, per
    polygon, its simplified geometry or None where it vanished. Vertices on ``rows`` (the strip's seams) and on
    the raster's left and right edges (x = 0, ``width``) stay."""
    import shapely

    if not len(polys):
        return []
    polys = np.asarray(polys, dtype=object)
    lines = shapely.union_all(shapely.boundary(polys))          # noded: every junction is a vertex
    chains = shapely.get_parts(shapely.line_merge(lines))        # maximal chains between junctions
    arcs = _split_arcs(chains, rows, (0.0, float(width)))
    simple = shapely.simplify(arcs, tolerance, preserve_topology=False)
    collapsed = shapely.is_closed(arcs) & (shapely.get_num_coordinates(simple) < 4)
    simple[collapsed] = arcs[collapsed]                           # a ring must stay a ring
    faces = np.asarray(shapely.get_parts(shapely.polygonize(shapely.get_parts(shapely.union_all(simple)))),
                       dtype=object)
    result = [None] * len(polys)
    if not len(faces):
        return result
    # A face's owner: the polygon holding most of the pixel centres inside it (both rasterised on the strip's
    # grid); a face mostly over nodata pixels (a nodata hole) has none; the few faces holding no pixel centre
    # (slivers between crossing arcs) go to the polygon they overlap most.
    owner_of = _face_owners(faces, polys, rows, poly_json)
    sliver = np.flatnonzero(owner_of == -2)
    if sliver.size:
        fi, pi = shapely.STRtree(polys).query(faces[sliver], predicate="intersects")
        overlap = shapely.area(shapely.intersection(faces[sliver][fi], polys[pi]))
        face_area = shapely.area(faces[sliver])
        best: dict[int, tuple[int, float]] = {}
        covered = np.zeros(sliver.size)
        for f, p, a in zip(fi.tolist(), pi.tolist(), overlap.tolist()):
            covered[f] += a
            if a > best.get(f, (-1, 0.0))[1]:
                best[f] = (p, a)
        owner_of[sliver] = -1
        for f, (p, a) in best.items():
            if covered[f] >= 0.5 * face_area[f]:
                owner_of[sliver[f]] = p
    owner: dict[int, list] = {}
    for f in np.flatnonzero(owner_of >= 0).tolist():
        owner.setdefault(int(owner_of[f]), []).append(faces[f])
    for p, parts in owner.items():
        result[p] = parts[0] if len(parts) == 1 else shapely.union_all(parts)
    return result


# --------------------------------------------------------------------------- the whole raster

def _sieve_steps(n: int) -> list[int]:
    """The thresholds of the sieve passes for a minimum of ``n`` pixels: 2, 4, 8, ... then n. GDAL merges a
    small region into its largest neighbour only where that one is not small itself, so one pass at n leaves
    clusters of small regions (a field of speckle) as they were; growing thresholds merge them step by step."""
    steps, size = [], 2
    while size < n:
        steps.append(size)
        size *= 2
    return steps + [n] if n > 1 else []


class _Open:
    """A feature being built: its value and its (simplified) parts from each strip."""
    __slots__ = ("value", "parts")

    def __init__(self, value, parts):
        self.value, self.parts = value, parts


def _find(parent: dict, a):
    while parent[a] != a:
        parent[a] = parent[parent[a]]
        a = parent[a]
    return a


def _match(above, below, touch: bool):
    """Pairs (gid above, gid below) of one value whose seam intervals overlap (``touch``: or meet at a point)."""
    if not above or not below:
        return []
    below = sorted(below)
    x0 = np.array([b[0] for b in below])
    x1 = np.array([b[1] for b in below])
    pairs = []
    for a0, a1, value, gid in above:
        lo = np.searchsorted(x1, a0, side="left" if touch else "right")
        hi = np.searchsorted(x0, a1, side="right" if touch else "left")
        for j in range(lo, hi):
            if below[j][2] == value:
                pairs.append((gid, below[j][3]))
    return pairs


def simplify_tolerance(simplify) -> float | str:
    """``--simplify``: ``"auto"`` (also None) or a number of metres >= 0 (0: the staircase kept)."""
    if simplify is None or (isinstance(simplify, str) and simplify.strip().lower() == "auto"):
        return "auto"
    return _number(simplify, "--simplify")


def _sieve_whole(ds, n: int, connectivity: int, nodata, out_path: Path, block_rows: int, rasterio,
                 sieved_path: Path | None = None):
    """The whole label raster sieved at ``n`` pixels (passes at 2, 4, 8, ... n): one array in the raster's
    dtype, or (``sieved_path``) a GeoTIFF of it, the array let go. GDAL's sieve reads the source band from the
    file and the valid pixels from a mask file beside the output (written strip by strip, removed after), so
    it holds the result (1 byte a pixel for uint8 labels) and its tables of regions, whatever ``n``."""
    import warnings

    from rasterio.features import sieve
    from rasterio.windows import Window

    height, width = ds.height, ds.width
    steps = _sieve_steps(n)
    mask_path = temp_sibling(out_path, "sieve", ".tif")
    # GDAL's sieve reads both files line by line: a small block cache holds a row of tiles of each (GDAL's default,
    # 5 % of the RAM, would keep the labels and the mask whole); rasterio hands GDAL_CACHEMAX over in bytes
    try:
        any_nodata = False
        with warnings.catch_warnings(), rasterio.Env(GDAL_CACHEMAX=SIEVE_CACHE_MB * 2**20):
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with rasterio.open(mask_path, "w", driver="GTiff", width=width, height=height, count=1, dtype="uint8",
                               tiled=True, compress="deflate", zlevel=1, BIGTIFF="IF_SAFER") as m:
                for r0 in range(0, height, block_rows):
                    win = Window(0, r0, width, min(height, r0 + block_rows) - r0)
                    valid = ds.read(1, window=win) != nodata
                    any_nodata = any_nodata or not valid.all()
                    m.write(valid.view(np.uint8), 1, window=win)
            out = np.empty((height, width), ds.dtypes[0])
            with rasterio.open(mask_path) as m:
                mask = rasterio.band(m, 1) if any_nodata else None
                sieve(rasterio.band(ds, 1), steps[0], out=out, mask=mask, connectivity=connectivity)
                for size in steps[1:]:
                    sieve(out, size, out=out, mask=mask, connectivity=connectivity)   # in place
            if sieved_path is None:
                return out
            with rasterio.open(sieved_path, "w", driver="GTiff", width=width, height=height, count=1,
                               dtype=out.dtype.name, nodata=nodata, crs=ds.crs, transform=ds.transform, tiled=True,
                               compress="deflate", zlevel=1, BIGTIFF="IF_SAFER") as f:
                f.write(out, 1)
            return sieved_path
    finally:
        remove_if_present(mask_path)


def polygonize_labels(labels_path, out_path, min_area: float = 0.0, simplify: float | str = 0.0,
                      connectivity: int = 4, names: dict | None = None, block_rows: int | None = None, log=None,
                      check: bool = True) -> dict:
    """Write the segments of a label raster as polygons to ``out_path`` (format by extension); see the module.

    ``simplify``: metres, or ``"auto"`` (None too): AUTO_SIMPLIFY_PX pixels, which straightens the staircase
    of mapseg's 4-pixel cells (the CLI's default; 0 keeps the staircase). ``names``: value -> class name (the
    ``class`` attribute; without it the field is left out). Returns a summary: ``polygons``, ``vertices``,
    ``vanished`` (regions that vanished in the simplification), ``under_min_area``, ``sieve_pixels``,
    ``simplify_m`` / ``simplify_px`` (the tolerance at the raster's middle row), ``area`` (``planar``,
    ``ellipsoid`` or None: how areas were computed), ``format``, ``output``. ``check``: check the output
    against the input first (False where the caller did)."""
    rasterio, shapely, pyogrio = _libraries()
    from affine import Affine

    log = log or (lambda msg: None)
    min_area = _number(min_area, "--min-area")
    simplify = simplify_tolerance(simplify)
    if connectivity not in (4, 8):
        raise SegmentError(f"--connectivity {connectivity!r}: 4 or 8")
    if block_rows is not None and int(block_rows) < 1:
        raise SegmentError(f"block_rows {block_rows!r}: give a positive number of rows")
    out_path = Path(out_path)
    driver = vector_driver(out_path)
    if check:
        check_outputs([("polygons", out_path)], [("the labels raster", labels_path)])
    if not Path(labels_path).is_file():
        raise RasterError(f"labels raster {labels_path} does not exist")
    # no rasterio.Env(GDAL_CACHEMAX=...) here: a small block cache makes GDAL's rasterize (face owners) chunk
    # its work and run 25 times slower; the reads are whole strips anyway
    with rasterio.Env():
        try:
            ds = rasterio.open(labels_path)
        except rasterio.errors.RasterioIOError as exc:
            raise RasterError(f"cannot read {labels_path} as a raster ({exc})") from exc
        with ds:
            if ds.count != 1 or ds.dtypes[0] not in SIEVE_DTYPES:
                raise RasterError(f"{labels_path}: polygons are made from a one-band integer label raster "
                                  f"({', '.join(SIEVE_DTYPES)}); this has {ds.count} band(s) of {ds.dtypes[0]}")
            nodata = OUTPUT_NODATA if ds.nodata is None else ds.nodata  # mapseg's, where the file states none
            geo = PixelGeometry(ds.transform, ds.crs, str(labels_path), ds.width, ds.height)
            if not geo.georeferenced and (min_area or (simplify != "auto" and simplify)):
                raise SegmentError(f"{labels_path} has no CRS: --min-area (m²) and --simplify (m) need a "
                                   "georeferenced raster (--simplify auto works in pixels)")
            if geo.ground:
                log(f"areas on the ellipsoid: the CRS's own areas differ from the ground's by up to "
                    f"{100 * geo.distortion:.1f} % over {Path(labels_path).name}")
            summary = _polygonize(ds, out_path, driver, geo, nodata, min_area, simplify, connectivity, names,
                                  strip_rows(ds.width) if block_rows is None else int(block_rows), rasterio,
                                  shapely, pyogrio, Affine)
    if simplify == "auto":
        metres = "" if summary["simplify_m"] is None else f" = {summary['simplify_m']:.2f} m"
        log(f"--simplify auto: {AUTO_SIMPLIFY_PX:g} pixels{metres}")
    log(f"wrote {summary['polygons']} polygons ({summary['vertices']} vertices) to {out_path}")
    if summary["vanished"]:
        log(f"{summary['vanished']} region(s) thinner than the simplification's tolerance vanished (their "
            "neighbours closed over them); --simplify 0 keeps every region")
    if summary["under_min_area"]:
        log(f"{summary['under_min_area']} polygon(s) stay under --min-area {min_area:g} m²: regions with no larger "
            "neighbour to join (enclosed by nodata, or simplified below it)")
    return summary


def _polygonize(ds, out_path, driver, geo, nodata, min_area, simplify, connectivity, names, block_rows,
                rasterio, shapely, pyogrio, Affine) -> dict:
    from rasterio.features import shapes
    from rasterio.windows import Window

    height, width = ds.height, ds.width
    crs_wkt = ds.crs.to_wkt() if ds.crs is not None else None
    middle = height / 2
    n = math.ceil(min_area / geo.pixel_area(middle)) if min_area > 0 else 0
    if simplify == "auto":
        tol_m = AUTO_SIMPLIFY_PX * geo.pixel_size(middle) if geo.georeferenced else None
    else:
        tol_m = simplify
    writer = _FeatureWriter(out_path, driver, crs_wkt, names, pyogrio, min_area)
    parent: dict[int, int] = {}
    groups: dict[int, _Open] = {}
    prev_edges: list = []      # (x0, x1, value, gid) on the seam above the current strip
    next_gid = 0
    # the sieve's result in a GeoTIFF beside the output (removed after), read strip by strip like the labels
    sieved_path = temp_sibling(out_path, "sieved", ".tif") if n > 1 else None
    src = ds
    try:
        if sieved_path is not None:
            _sieve_whole(ds, n, connectivity, nodata, out_path, block_rows, rasterio, sieved_path)
            src = rasterio.open(sieved_path)
        for r0 in range(0, height, block_rows):
            r1 = min(height, r0 + block_rows)
            core = src.read(1, window=Window(0, r0, width, r1 - r0))
            core_valid = core != nodata
            polys, values, mappings = [], [], []
            for g, v in shapes(core, mask=core_valid, connectivity=connectivity, transform=Affine(1, 0, 0, 0, 1, r0)):
                polys.append(shapely.geometry.shape(g))
                mappings.append(g)
                values.append(int(v))
            if (simplify == "auto" or simplify > 0) and polys:
                tol = AUTO_SIMPLIFY_PX if simplify == "auto" else simplify / geo.pixel_size((r0 + r1) / 2)
                simple = simplify_shared(polys, tol, (float(r0), float(r1)), width, mappings)
            else:
                simple = polys
            # new features, and where they meet the open ones above
            new_top, new_bottom = [], []
            for p, v, s in zip(polys, values, simple):
                gid = next_gid
                next_gid += 1
                parent[gid] = gid
                groups[gid] = _Open(v, [] if s is None else [s])
                if r0 > 0 and p.bounds[1] == r0:
                    new_top += [(a, b, v, gid) for a, b in _seam_intervals(p, float(r0))]
                if r1 < height and p.bounds[3] == r1:
                    new_bottom += [(a, b, v, gid) for a, b in _seam_intervals(p, float(r1))]
            for a, b in _match(prev_edges, new_top, connectivity == 8):
                ra, rb = _find(parent, a), _find(parent, b)
                if ra != rb:
                    keep, drop = min(ra, rb), max(ra, rb)
                    parent[drop] = keep
                    groups[keep].parts += groups.pop(drop).parts
            prev_edges = [(a, b, v, _find(parent, g)) for a, b, v, g in new_bottom]
            still_open = {g for _, _, _, g in prev_edges}
            for gid in sorted(g for g in groups if g not in still_open):
                writer.add(groups.pop(gid), geo)
            # the union-find keeps only what may still be met: the open roots
            parent = {g: g for g in groups}
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        if src is not ds:
            src.close()
        if sieved_path is not None:
            remove_if_present(sieved_path)
    return {"output": str(out_path), "format": driver, "polygons": writer.count, "vertices": writer.vertices,
            "vanished": writer.vanished, "sieve_pixels": n, "min_area_m2": min_area, "under_min_area": writer.small,
            "simplify": simplify, "simplify_m": tol_m,
            "simplify_px": AUTO_SIMPLIFY_PX if simplify == "auto" else (simplify / geo.pixel_size(middle) if simplify
                                                                        and geo.georeferenced else 0.0),
            "area": ("ellipsoid" if geo.geographic or geo.ground else "planar") if geo.georeferenced else None,
            "connectivity": connectivity, "block_rows": block_rows}


class _FeatureWriter:
    """Features written in batches into a temporary folder beside the output, moved into place by ``finish``."""

    def __init__(self, out_path: Path, driver: str, crs_wkt, names, pyogrio, min_area: float = 0.0):
        self.out_path, self.driver, self.crs, self.names, self.pyogrio = out_path, driver, crs_wkt, names, pyogrio
        self.min_area, self.small, self.vanished = min_area, 0, 0
        self.append = "a" in pyogrio.list_drivers(write=True).get(driver, "")
        self.tmp_dir = temp_sibling(out_path, "polygons", "")
        os.mkdir(self.tmp_dir)
        self.tmp = self.tmp_dir / out_path.name
        self.batch: list = []
        self.count = self.vertices = 0
        self.written = False

    def add(self, group: _Open, geo: PixelGeometry) -> None:
        import shapely

        if not group.parts:
            self.vanished += 1                                # vanished in the simplification
            return
        geom = group.parts[0] if len(group.parts) == 1 else shapely.union_all(group.parts)
        # straight runs lose their inner vertices (seam and junction points of others' arcs): the same shape
        geom = shapely.simplify(geom, 0.0, preserve_topology=True)
        if not geom.is_valid:   # 8-connected regions: a ring touching itself at a corner; split there
            geom = shapely.make_valid(geom, method="structure", keep_collapsed=False)
        if geom.is_empty:
            self.vanished += 1
            return
        self._geo = geo
        self.batch.append((geom, group.value))
        if self.append and len(self.batch) >= BATCH:
            self._flush(geo)

    def _flush(self, geo: PixelGeometry) -> None:
        import shapely

        if not self.batch and self.written:
            return
        geoms = np.array([g for g, _ in self.batch], dtype=object)
        values = np.array([v for _, v in self.batch], dtype=np.int32)
        area = geo.areas(geoms) if geo.georeferenced else np.full(len(geoms), np.nan)
        self.small += int(np.sum(area < self.min_area * (1 - 1e-9))) if self.min_area else 0
        world = geo.to_crs(geoms) if len(geoms) else geoms
        self.vertices += int(shapely.get_num_coordinates(world).sum()) if len(geoms) else 0
        fields, data = ["label"], [values]
        if self.names is not None:
            fields.append("class")
            data.append(np.array([self.names.get(int(v), "") for v in values], dtype=object))
        fields.append("area_m2")
        data.append(area)
        wkb = shapely.to_wkb(world) if len(geoms) else np.array([], dtype=object)
        self.pyogrio.raw.write(str(self.tmp), wkb, data, fields, driver=self.driver, crs=self.crs,
                               geometry_type="MultiPolygon", promote_to_multi=True, layer="segments",
                               append=self.written)
        self.written = True
        self.count += len(geoms)
        self.batch = []

    def finish(self) -> None:
        geo = getattr(self, "_geo", None)
        if geo is None:   # no feature at all: an empty layer still says what the fields are
            geo = PixelGeometry(None, None, "")
        self._flush(geo)
        folder = self.out_path.parent
        stem = self.out_path.with_suffix("").name
        made = {p.name for p in self.tmp_dir.iterdir()}
        for suffix in MULTI_FILE_SUFFIXES.get(self.driver, ()):  # an older shapefile's parts not written now
            old = folder / (stem + suffix)
            if old.name not in made and old.exists():
                old.unlink()
        for name in sorted(made):
            replace_output(self.tmp_dir / name, folder / name)
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
