"""Area-of-interest polygons (``--mask``): read from a vector file, rasterised exactly per window.

``read_polygons(path)`` -> ``(polygons, crs, how)``: every polygon of the file as a list of rings
((n, 2) float64 arrays of x, y; the first the outer ring, the rest holes), multipolygons split into
their parts. GeoJSON (``.geojson``, ``.json``) is read with the standard library alone (so the mask
works in QGIS's Python with numpy only); other formats (GeoPackage, Shapefile, ...) through the first
of pyogrio, fiona or GDAL's ``osgeo.ogr`` that is importable, and a clear error naming them when none is.

``PolygonMask`` holds polygons in the pixel coordinates of a grid (column, row; pixel (r, c) spans
[c, c + 1) x [r, r + 1)) and says which pixel centres lie inside (``inside``): even-odd within a
polygon (holes), union across polygons. Each pixel's answer is computed from its own global row and
column and the fixed edges alone, whatever window asked for it, so labels stay tile-invariant.
"""
from __future__ import annotations

import json
import struct
from fractions import Fraction
from pathlib import Path

import numpy as np

from ..errors import RasterError

GEOJSON_SUFFIXES = (".geojson", ".json")
GEOJSON_CRS = "EPSG:4326"  # RFC 7946: GeoJSON without a "crs" member is longitude, latitude on WGS 84
SHAPEFILE_SIDECARS = (".shp", ".shx", ".dbf", ".prj", ".cpg", ".qix", ".sbn", ".sbx")


def mask_files(path) -> list[str]:
    """The files a mask reads (a Shapefile's sidecars too): none may be an output."""
    p = Path(path)
    if p.suffix.lower() == ".shp":
        return [str(p.with_suffix(s)) for s in SHAPEFILE_SIDECARS if p.with_suffix(s).exists()] or [str(p)]
    return [str(p)]


# --------------------------------------------------------------------------- reading

def read_polygons(path) -> tuple[list[list[np.ndarray]], str | None, str]:
    """(polygons, CRS as text or None when the file has none, how it was read) of a vector file."""
    path = str(path)
    if not Path(path).exists() and not path.startswith("/vsi"):
        raise RasterError(f"--mask {path} does not exist")
    if Path(path).suffix.lower() in GEOJSON_SUFFIXES:
        polygons, crs = _read_geojson(path)
        how = "GeoJSON (json module)"
    else:
        polygons, crs, how = _read_ogr(path)
    polygons = clean_polygons(polygons, path)
    if not polygons:
        raise RasterError(f"--mask {path} holds no polygons (none with an outer ring of 3 or more distinct, "
                          "non-collinear vertices): give a file of polygons (the area to segment)")
    return polygons, crs, how


def clean_polygons(polygons, path: str = "the mask") -> list[list[np.ndarray]]:
    """``polygons`` without the rings that enclose no area (fewer than 3 distinct vertices, or all exactly on
    one line), and without the polygons whose outer ring was one of them or that have no rings at all (an
    empty polygon: its holes are not an area of their own); a vertex that is not a finite number is an error."""
    out = []
    for rings in polygons:
        if not rings or not _encloses(rings[0], path):
            continue
        out.append([rings[0]] + [r for r in rings[1:] if _encloses(r, path)])
    return out


def _encloses(ring: np.ndarray, path: str) -> bool:
    if ring.shape[0] and not np.isfinite(ring).all():
        raise RasterError(f"--mask {path} holds a vertex that is not a finite number")
    if ring.shape[0] < 3:
        return False
    d = ring - ring[0]
    d = d[(d != 0).any(axis=1)]
    if d.shape[0] < 2:  # fewer than 3 distinct vertices
        return False
    if (d[:, 0] * d[0, 1] != d[:, 1] * d[0, 0]).any():  # off the line through the first two: encloses area
        return True
    # rare (a ring that looks collinear): confirm with exact arithmetic (products of floats round)
    pts = [(Fraction(float(x)), Fraction(float(y))) for x, y in ring]
    (x0, y0), distinct = pts[0], [p for p in pts if p != pts[0]]
    ax, ay = distinct[0][0] - x0, distinct[0][1] - y0
    return any((x - x0) * ay != (y - y0) * ax for x, y in distinct[1:])


def _read_geojson(path: str):
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RasterError(f"--mask {path} cannot be read as GeoJSON ({exc})") from exc
    crs = GEOJSON_CRS
    named = (doc.get("crs") or {}).get("properties", {}).get("name") if isinstance(doc, dict) else None
    if named:
        crs = str(named)
    if not isinstance(doc, dict) or "type" not in doc:
        raise RasterError(f"--mask {path} is not GeoJSON (no 'type')")
    if doc["type"] == "FeatureCollection":
        geoms = [f.get("geometry") for f in doc.get("features", [])]
    elif doc["type"] == "Feature":
        geoms = [doc.get("geometry")]
    else:
        geoms = [doc]
    polygons = []
    for g in geoms:
        if g is not None:
            polygons += _geojson_polygons(g, path)
    return polygons, crs


def _geojson_polygons(geom: dict, path: str) -> list[list[np.ndarray]]:
    kind = geom.get("type")
    if kind == "Polygon":
        return [_rings(geom["coordinates"])]
    if kind == "MultiPolygon":
        return [_rings(p) for p in geom["coordinates"]]
    if kind == "GeometryCollection":
        return [p for g in geom.get("geometries", []) for p in _geojson_polygons(g, path)]
    raise RasterError(f"--mask {path} holds a {kind}: the mask must hold polygons (the area to segment)")


def _rings(coords) -> list[np.ndarray]:
    # empty rings kept (as (0, 2)): clean_polygons drops them, and a polygon whose outer ring is empty
    return [np.asarray([pt[:2] for pt in ring], np.float64).reshape(-1, 2) for ring in coords]


def _read_ogr(path: str):
    """Any OGR format, through pyogrio, else fiona, else osgeo.ogr."""
    import importlib.util

    for name in ("pyogrio", "fiona", "osgeo"):
        if importlib.util.find_spec(name) is not None:
            reader = {"pyogrio": _read_pyogrio, "fiona": _read_fiona, "osgeo": _read_osgeo}[name]
            try:
                polygons, crs = reader(path)
            except RasterError:
                raise
            except Exception as exc:  # noqa: BLE001 - each library has its own error types
                raise RasterError(f"--mask {path} cannot be read as a vector file ({type(exc).__name__}: "
                                  f"{exc})") from exc
            return polygons, crs, name
    raise RasterError(f"--mask {path}: reading {Path(path).suffix or 'this'} files needs pyogrio (pip install "
                      "pyogrio), fiona or GDAL's osgeo; none is installed. A GeoJSON mask (.geojson) needs none of them")


def _one_layer(path: str, layers: list[str]) -> None:
    if len(layers) > 1:
        raise RasterError(f"--mask {path} has {len(layers)} layers ({', '.join(layers)}): keep the area of "
                          "interest in a file of its own (one layer)")


def _read_pyogrio(path: str):
    import pyogrio
    import pyogrio.raw

    _one_layer(path, [str(row[0]) for row in pyogrio.list_layers(path)])
    meta, _, geometry, _ = pyogrio.raw.read(path, columns=[])
    polygons = []
    for wkb in geometry:
        if wkb is not None:
            polygons += wkb_polygons(bytes(wkb), path)
    return polygons, meta.get("crs")


def _read_fiona(path: str):
    import fiona

    _one_layer(path, list(fiona.listlayers(path)))
    polygons = []
    with fiona.open(path) as src:
        crs = src.crs_wkt or None
        for feature in src:
            geom = feature["geometry"]
            if geom is not None:
                polygons += _geojson_polygons(dict(getattr(geom, "__geo_interface__", geom)), path)
    return polygons, crs


def _read_osgeo(path: str):
    from osgeo import ogr

    ogr.UseExceptions()
    ds = ogr.Open(path)
    if ds is None:
        raise RasterError(f"--mask {path} cannot be opened as a vector file")
    _one_layer(path, [ds.GetLayerByIndex(i).GetName() for i in range(ds.GetLayerCount())])
    layer = ds.GetLayerByIndex(0)
    srs = layer.GetSpatialRef()
    polygons = []
    for feature in layer:
        geom = feature.GetGeometryRef()
        if geom is not None:
            polygons += _geojson_polygons(json.loads(geom.ExportToJson()), path)
    return polygons, srs.ExportToWkt() if srs is not None else None


def wkb_polygons(wkb: bytes, path: str = "the mask") -> list[list[np.ndarray]]:
    """The polygons of one WKB geometry (ISO or extended WKB; Z and M dropped)."""
    polygons: list = []

    def geometry(pos: int) -> int:
        order = "<" if wkb[pos] == 1 else ">"
        (code,) = struct.unpack_from(order + "I", wkb, pos + 1)
        pos += 5
        dims = 2 + bool(code & 0x80000000) + bool(code & 0x40000000)  # extended WKB: Z, M flags
        if code & 0x20000000:  # extended WKB: an SRID follows
            pos += 4
        code &= 0x0FFFFFFF
        kind = code % 1000
        dims += {1: 1, 2: 1, 3: 2}.get(code // 1000, 0)  # ISO WKB: 1000s Z, 2000s M, 3000s ZM
        if kind == 3:
            rings, pos = polygon(pos, order, dims)
            polygons.append(rings)
            return pos
        if kind in (6, 7):  # MultiPolygon, GeometryCollection
            (n,) = struct.unpack_from(order + "I", wkb, pos)
            pos += 4
            for _ in range(n):
                pos = geometry(pos)
            return pos
        names = {1: "Point", 2: "LineString", 4: "MultiPoint", 5: "MultiLineString"}
        raise RasterError(f"--mask {path} holds a {names.get(kind, f'geometry of WKB type {code}')}: the mask must "
                          "hold polygons (the area to segment)")

    def polygon(pos: int, order: str, dims: int):
        (n_rings,) = struct.unpack_from(order + "I", wkb, pos)
        pos += 4
        rings = []
        for _ in range(n_rings):
            (n,) = struct.unpack_from(order + "I", wkb, pos)
            pos += 4
            pts = np.frombuffer(wkb, np.dtype(order + "f8"), n * dims, pos).reshape(n, dims)[:, :2]
            pos += 8 * n * dims
            rings.append(pts.astype(np.float64))
        return rings, pos

    geometry(0)
    return polygons


# --------------------------------------------------------------------------- rasterising

class PolygonMask:
    """Polygons in a grid's pixel coordinates (rings: (n, 2) arrays of column, row); ``inside`` rasterises them.

    A pixel is inside when its centre is: inside a polygon's outer ring and outside its holes (even-odd over
    the polygon's rings), in any polygon (union). The rule is half-open like the pixels themselves: a centre
    exactly on a polygon's left or top edge is inside, on its right or bottom edge outside, so two polygons
    that share an edge never both take, or both leave out, a pixel.

    ``inside`` rasterises every polygon that can reach the window in one pass, so its cost follows the edges
    near the window, not the polygons of the file: the rings whose bounding box misses the window are dropped
    (exactly: they cannot change a pixel of it), and each remaining non-horizontal edge gives a crossing on
    each pixel row whose centre line it spans (half-open in y). On a row that one polygon alone crosses, the
    parity of the crossings left of a pixel is the answer (even-odd); on a row that several cross, each
    polygon's crossings, sorted, pair up into its runs of inside pixels, and a pixel is inside when a run
    covers it (the union). Both go into one (rows, columns + 1) array and one cumulative sum along the rows.
    """

    def __init__(self, polygons: list[list[np.ndarray]]):
        edges, ring_poly, ring_box, ring_edges = [], [], [], [0]
        for p, rings in enumerate(polygons):
            for ring in rings:
                ring = np.asarray(ring, np.float64).reshape(-1, 2)
                if ring.shape[0] < 3 or not np.isfinite(ring).all():
                    continue
                if not np.array_equal(ring[0], ring[-1]):
                    ring = np.vstack([ring, ring[:1]])
                a, b = ring[:-1], ring[1:]
                keep = a[:, 1] != b[:, 1]  # horizontal edges never cross a centre line
                if not keep.any():
                    continue
                edges.append(np.hstack([a[keep], b[keep]]))
                ring_poly.append(p)
                ring_box.append(np.concatenate([ring.min(0), ring.max(0)]))
                ring_edges.append(ring_edges[-1] + int(keep.sum()))
        self._set(np.vstack(edges) if edges else np.zeros((0, 4)), np.asarray(ring_poly, np.int64),
                  np.asarray(ring_box, np.float64).reshape(-1, 4), np.asarray(ring_edges, np.int64))

    def _set(self, edges, ring_poly, ring_box, ring_edges) -> None:
        self.edges = edges            # (E, 4): x1, y1, x2, y2 of every non-horizontal edge, ring after ring
        self.ring_poly = ring_poly    # (R,): the polygon of each ring
        self.ring_box = ring_box      # (R, 4): col0, row0, col1, row1 of each ring's vertices
        self.ring_edges = ring_edges  # (R + 1,): ring r's edges are edges[ring_edges[r]:ring_edges[r + 1]]
        self.y_lo = np.minimum(edges[:, 1], edges[:, 3])
        self.y_hi = np.maximum(edges[:, 1], edges[:, 3])
        if ring_box.shape[0]:
            lo, hi = ring_box[:, :2].min(0), ring_box[:, 2:].max(0)
        else:
            lo, hi = np.full(2, np.inf), np.full(2, -np.inf)
        self.bounds = (float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1]))  # col0, row0, col1, row1

    @property
    def empty(self) -> bool:
        return not self.ring_poly.size

    def scaled(self, sx: float, sy: float) -> PolygonMask:
        """The same polygons on a grid of pixels ``sx`` x ``sy`` times as many (a decimated preview)."""
        out = PolygonMask([])
        out._set(self.edges * np.array([sx, sy, sx, sy]), self.ring_poly, self.ring_box * np.array([sx, sy, sx, sy]),
                 self.ring_edges)
        return out

    def inside(self, row0: int, row1: int, col0: int, col1: int) -> np.ndarray:
        """(row1 - row0, col1 - col0) bool: True where the pixel's centre lies in a polygon."""
        h, w = row1 - row0, col1 - col0
        if h <= 0 or w <= 0 or self.empty:
            return np.zeros((max(h, 0), max(w, 0)), bool)
        # rings that can flip a centre of the window. A ring wholly right of it (every crossing x > col1 - 0.5,
        # one pixel of margin against rounding) only adds crossings at the row's end; one wholly left of it an
        # even number at its start: neither changes a run. The row test is the edges' own (below).
        box = self.ring_box
        rings = np.flatnonzero((box[:, 1] < row1) & (box[:, 3] > row0) & (box[:, 0] <= col1 + 0.5)
                               & (box[:, 2] >= col0 - 0.5))
        if rings.size == 0:
            return np.zeros((h, w), bool)
        first_edge, n_edges = self.ring_edges[rings], self.ring_edges[rings + 1] - self.ring_edges[rings]
        e = _ranges(first_edge, n_edges)
        yc = np.arange(row0, row1, dtype=np.float64) + 0.5
        # the rows whose centre line y an edge spans: min(y1, y2) <= y < max(y1, y2), i.e. (y1 <= y) != (y2 <= y)
        lo = np.searchsorted(yc, self.y_lo[e], "left")
        n = np.searchsorted(yc, self.y_hi[e], "left") - lo
        some = n > 0
        e, lo, n = e[some], lo[some], n[some]
        if e.size == 0:
            return np.zeros((h, w), bool)
        # the polygons of the window, numbered 0..P-1 (edges come ring after ring, polygon after polygon)
        poly_of_edge = np.repeat(self.ring_poly[rings], n_edges)[some]
        cut = np.flatnonzero(np.r_[True, poly_of_edge[1:] != poly_of_edge[:-1]])
        poly = np.cumsum(np.r_[False, poly_of_edge[1:] != poly_of_edge[:-1]])
        n_poly = cut.size
        # rows crossed by one polygon alone: its crossings' parity is the answer there (no sort needed)
        p_lo, p_hi = np.minimum.reduceat(lo, cut), np.maximum.reduceat(lo + n, cut)
        shared = np.cumsum(np.bincount(p_lo, minlength=h + 1) - np.bincount(p_hi, minlength=h + 1))[:h] > 1
        rows = _ranges(lo, n)                      # window row of each crossing
        idx = np.repeat(np.arange(e.size), n)      # its edge (among e)
        x1, y1, x2, y2 = (self.edges[e, k][idx] for k in range(4))
        x = x1 + (yc[rows] - y1) * (x2 - x1) / (y2 - y1)
        # a crossing at x flips every centre c + 0.5 >= x of its row: columns from ceil(x - 0.5)
        first = np.clip(np.ceil(x - 0.5) - col0, 0, w).astype(np.int64)
        size = h * (w + 1)
        many = shared[rows]
        acc = np.bincount(rows[~many] * (w + 1) + first[~many], minlength=size)
        if many.any():
            acc += self._runs(rows[many], poly[idx[many]], first[many], h, w, n_poly)
        acc = np.cumsum(acc.reshape(h, w + 1)[:, :w], axis=1)
        # rows of one polygon: odd crossings to the left (even-odd); shared rows: covered by a run (the union)
        return np.where(shared[:, None], acc > 0, (acc & 1).astype(bool))

    @staticmethod
    def _runs(rows, poly, first, h: int, w: int, n_poly: int) -> np.ndarray:
        """+1 where each polygon's runs of inside pixels start and -1 where they end, flat over (h, w + 1)."""
        group = rows * n_poly + poly               # (row, polygon)
        bits = int(w).bit_length()                 # first <= w < 2 ** bits
        if (h * n_poly) << bits < 2 ** 62:
            key = np.sort((group << bits) | first)
            group, first = key >> bits, key & ((1 << bits) - 1)
        else:
            order = np.lexsort((first, group))
            group, first = group[order], first[order]
        # the crossings of a polygon's closed rings on a row are even in number, so sorted per (row, polygon)
        # they pair up into the runs [first[0], first[1]), [first[2], first[3]), ... of even-odd; a group left
        # odd (not for closed rings) runs to the row's end, as the parity would
        starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
        odd = np.flatnonzero(np.diff(np.r_[starts, group.size]) & 1)
        if odd.size:
            ends = np.r_[starts[1:], group.size][odd]
            group = np.insert(group, ends, group[ends - 1])
            first = np.insert(first, ends, w)
        row = group[0::2] // n_poly
        size = h * (w + 1)
        return (np.bincount(row * (w + 1) + first[0::2], minlength=size)
                - np.bincount(row * (w + 1) + first[1::2], minlength=size))

def _ranges(start: np.ndarray, count: np.ndarray) -> np.ndarray:
    """start[0], start[0] + 1, ... (count[0] values), then the same for start[1], ...: one int64 array."""
    total = int(count.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    offsets = np.cumsum(count) - count
    return np.arange(total, dtype=np.int64) + np.repeat(start - offsets, count)


def polygons_in_pixels(polygons, to_pixels) -> PolygonMask:
    """``PolygonMask`` of ``polygons`` whose rings go through ``to_pixels(x, y) -> (col, row)`` (arrays)."""
    moved = []
    for rings in polygons:
        out = []
        for ring in rings:
            col, row = to_pixels(ring[:, 0], ring[:, 1])
            out.append(np.column_stack([col, row]))
        moved.append(out)
    return PolygonMask(moved)


def flatten(polygons) -> tuple[np.ndarray, np.ndarray]:
    """(xs, ys) of every vertex of ``polygons``, in order (for one batched coordinate transformation)."""
    rings = [ring for rings in polygons for ring in rings]
    pts = np.vstack(rings) if rings else np.zeros((0, 2))
    return pts[:, 0], pts[:, 1]


def unflatten(polygons, xs: np.ndarray, ys: np.ndarray) -> list[list[np.ndarray]]:
    """``polygons`` with their vertices replaced, in order, by (xs, ys)."""
    out, i = [], 0
    for rings in polygons:
        moved = []
        for ring in rings:
            n = ring.shape[0]
            moved.append(np.column_stack([xs[i:i + n], ys[i:i + n]]))
            i += n
        out.append(moved)
    return out


__all__ = ["PolygonMask", "clean_polygons", "flatten", "mask_files", "polygons_in_pixels", "read_polygons", "unflatten",
           "wkb_polygons"]
