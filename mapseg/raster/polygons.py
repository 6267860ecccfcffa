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
    if not polygons:
        raise RasterError(f"--mask {path} holds no polygons: give a file of polygons (the area to segment)")
    return polygons, crs, how


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
    return [np.asarray([pt[:2] for pt in ring], np.float64).reshape(-1, 2) for ring in coords if len(ring)]


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
            if n:
                rings.append(pts.astype(np.float64))
        return rings, pos

    geometry(0)
    return polygons


# --------------------------------------------------------------------------- rasterising

class PolygonMask:
    """Polygons in a grid's pixel coordinates (``rings``: (n, 2) arrays of column, row); ``inside`` rasterises them.

    A pixel is inside when its centre is: inside a polygon's outer ring and outside its holes (even-odd over
    the polygon's rings), in any polygon. A centre exactly on an edge belongs to the pixel on the edge's
    right (the half-open rule), so two polygons that share an edge never both take, or both leave out, a pixel.
    """

    def __init__(self, polygons: list[list[np.ndarray]]):
        self.edges = []  # per polygon: (x1, y1, x2, y2) of every non-horizontal edge of all its rings
        lo, hi = np.full(2, np.inf), np.full(2, -np.inf)
        for rings in polygons:
            parts = []
            for ring in rings:
                ring = np.asarray(ring, np.float64)
                if ring.shape[0] < 3:
                    continue
                if not np.array_equal(ring[0], ring[-1]):
                    ring = np.vstack([ring, ring[:1]])
                a, b = ring[:-1], ring[1:]
                keep = a[:, 1] != b[:, 1]
                parts.append(np.hstack([a[keep], b[keep]]))
                lo, hi = np.minimum(lo, ring.min(0)), np.maximum(hi, ring.max(0))
            if parts:
                self.edges.append(np.vstack(parts))
        self.bounds = (float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1]))  # col0, row0, col1, row1

    @property
    def empty(self) -> bool:
        return not self.edges

    def scaled(self, sx: float, sy: float) -> PolygonMask:
        """The same polygons on a grid of pixels ``sx`` x ``sy`` times as many (a decimated preview)."""
        out = PolygonMask([])
        out.edges = [e * np.array([sx, sy, sx, sy]) for e in self.edges]
        c0, r0, c1, r1 = self.bounds
        out.bounds = (c0 * sx, r0 * sy, c1 * sx, r1 * sy)
        return out

    def inside(self, row0: int, row1: int, col0: int, col1: int) -> np.ndarray:
        """(row1 - row0, col1 - col0) bool: True where the pixel's centre lies in a polygon."""
        h, w = row1 - row0, col1 - col0
        out = np.zeros((h, w), bool)
        yc = np.arange(row0, row1, dtype=np.float64) + 0.5
        for e in self.edges:
            x1, y1, x2, y2 = e[:, 0], e[:, 1], e[:, 2], e[:, 3]
            near = (np.minimum(y1, y2) < row1) & (np.maximum(y1, y2) > row0)
            if not near.any():
                continue
            x1, y1, x2, y2 = x1[near], y1[near], x2[near], y2[near]
            y = yc[:, None]
            crosses = (y1 <= y) != (y2 <= y)  # the edge spans the centre line (half-open in y)
            rows, idx = np.nonzero(crosses)
            if rows.size == 0:
                continue
            yr = yc[rows]
            x = x1[idx] + (yr - y1[idx]) * (x2[idx] - x1[idx]) / (y2[idx] - y1[idx])
            # a crossing at x flips every centre c + 0.5 >= x of its row: columns from ceil(x - 0.5)
            first = np.clip(np.ceil(x - 0.5) - col0, 0, w).astype(np.int64)
            flips = np.zeros((h, w + 1), np.int32)
            np.add.at(flips, (rows, first), 1)
            out |= (np.cumsum(flips[:, :w], axis=1) & 1).astype(bool)
        return out


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
    pts = np.vstack([ring for rings in polygons for ring in rings]) if polygons else np.zeros((0, 2))
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


__all__ = ["PolygonMask", "flatten", "mask_files", "polygons_in_pixels", "read_polygons", "unflatten",
           "wkb_polygons"]
