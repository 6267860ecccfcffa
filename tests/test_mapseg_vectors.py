"""Segments as polygons (mapseg.vectors, `mapseg polygonize`, `segment --polygons`): the polygons tile the valid
area without gaps or overlaps whatever the strips, the sieve's minimum area is in square metres (projected and
geographic rasters), simplification keeps shared edges and cuts vertices, formats by extension, clear errors."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
shapely = pytest.importorskip("shapely")
pyogrio = pytest.importorskip("pyogrio")

from affine import Affine  # noqa: E402
from rasterio.features import shapes  # noqa: E402

from mapseg.cli import main  # noqa: E402
from mapseg.errors import OutputError, RasterError, SegmentError  # noqa: E402
from mapseg.vectors import polygonize_labels  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets"
UTM = Affine(2, 0, 500000, 0, -2, 5600000)  # 2 m pixels, EPSG:32632


def write_labels(path, labels, crs="EPSG:32632", transform=UTM, nodata=255):
    labels = np.asarray(labels, np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=labels.shape[1], height=labels.shape[0], count=1,
                       dtype="uint8", crs=crs, transform=transform, nodata=nodata) as ds:
        ds.write(labels, 1)
    return path


def blocky_labels(h=120, w=160, cell=4, k=4, seed=1, nodata=True):
    """Labels on a stride-4 grid like mapseg's (cell x cell blocks), with a nodata corner and a nodata hole."""
    rng = np.random.default_rng(seed)
    a = np.repeat(np.repeat(rng.integers(0, k, (h // cell, w // cell)), cell, 0), cell, 1).astype(np.uint8)
    if nodata:
        a[:20, :24] = 255
        a[60:70, 90:100] = 255
    return a


def read(path):
    meta, _, wkb, fields = pyogrio.raw.read(str(path))
    return shapely.from_wkb(wkb), dict(zip(meta["fields"], fields)), meta


def valid_area(labels, transform=UTM):
    """The valid pixels as one geometry, in map coordinates."""
    mask = (labels != 255).astype(np.uint8)
    parts = [shapely.geometry.shape(g) for g, v in shapes(mask, mask=mask.astype(bool), transform=transform)]
    return shapely.union_all(parts)


def assert_tiles(geoms, area_of_valid=None, valid=None):
    """No overlaps (pairwise intersections of zero area; the sum of the areas is the union's), valid geometries,
    and the union is the valid area where given. Returns the union."""
    assert shapely.is_valid(geoms).all()
    union = shapely.union_all(geoms)
    assert shapely.area(geoms).sum() == pytest.approx(union.area, rel=1e-9)
    a, b = shapely.STRtree(geoms).query(geoms, predicate="intersects")
    keep = a < b
    if keep.any():
        assert shapely.area(shapely.intersection(geoms[a[keep]], geoms[b[keep]])).max() < 1e-6
    if valid is not None:
        assert union.symmetric_difference(valid).area < 1e-6
    if area_of_valid is not None:
        assert union.area == pytest.approx(area_of_valid, rel=1e-9)
    return union


@pytest.mark.parametrize("block_rows", [1024, 7])
def test_polygons_tile_the_valid_area_exactly(tmp_path, block_rows):
    labels = blocky_labels()
    src = write_labels(tmp_path / "l.tif", labels)
    out = tmp_path / "p.gpkg"
    summary = polygonize_labels(src, out, block_rows=block_rows)
    geoms, cols, _ = read(out)
    assert_tiles(geoms, valid=valid_area(labels))
    assert summary["polygons"] == len(geoms)
    assert sorted(set(cols["label"].tolist())) == [0, 1, 2, 3]            # 255 (nodata) not polygonized
    for v in range(4):                                                     # each label covers its pixels exactly
        assert shapely.area(geoms[cols["label"] == v]).sum() == (labels == v).sum() * 4
    assert np.allclose(cols["area_m2"], shapely.area(geoms))               # m²: 2 m pixels in a metre CRS


def test_strip_seams_leave_the_same_polygons_as_one_strip(tmp_path):
    labels = blocky_labels(seed=3)
    src = write_labels(tmp_path / "l.tif", labels)
    whole, strips = tmp_path / "whole.gpkg", tmp_path / "strips.gpkg"
    polygonize_labels(src, whole, block_rows=10_000)
    polygonize_labels(src, strips, block_rows=5)                          # seams every 5 rows, inside the blocks
    (g1, c1, _), (g2, c2, _) = read(whole), read(strips)
    assert len(g1) == len(g2)                                              # merged across every seam

    def key(g, c):
        return sorted(zip(c["label"].tolist(), [shapely.normalize(x).wkt for x in g]))

    assert key(g1, c1) == key(g2, c2)                                      # the same polygons, vertex for vertex


@pytest.mark.parametrize("connectivity", [4, 8])
def test_seams_merge_by_connectivity(tmp_path, connectivity):
    # a diagonal of 1s across seams every 2 rows: one region with 8-connectivity, four with 4
    a = np.zeros((4, 4), np.uint8)
    a[0, 0] = a[1, 1] = a[2, 2] = a[3, 3] = 1
    src = write_labels(tmp_path / "l.tif", a)
    out = tmp_path / "p.gpkg"
    polygonize_labels(src, out, connectivity=connectivity, block_rows=2)
    geoms, cols, _ = read(out)
    ones = geoms[cols["label"] == 1]
    assert len(ones) == (1 if connectivity == 8 else 4)
    assert shapely.area(ones).sum() == 4 * 4
    # speckle of single pixels: valid geometries (8-connected rings touch themselves at corners) that tile
    labels = blocky_labels(h=48, w=48, cell=1, k=2)
    src = write_labels(tmp_path / "speckle.tif", labels)
    for simplify in (0.0, 4.0):
        polygonize_labels(src, out, connectivity=connectivity, simplify=simplify, block_rows=7)
        geoms, _, _ = read(out)
        assert_tiles(geoms, area_of_valid=None if simplify else float((labels != 255).sum() * 4))


@pytest.mark.parametrize("block_rows", [1024, 9])
def test_simplification_keeps_shared_edges_and_cuts_vertices(tmp_path, block_rows):
    # discs on a stride-4 grid: staircase boundaries, which simplification straightens
    yy, xx = np.mgrid[0:160, 0:200]
    labels = (np.hypot(yy - 80, xx - 70) < 50).astype(np.uint8) + (np.hypot(yy - 60, xx - 160) < 30) * 2
    labels = np.repeat(np.repeat(labels[::4, ::4], 4, 0), 4, 1).astype(np.uint8)
    labels[:8, :] = 255                                                    # nodata along the top
    src = write_labels(tmp_path / "l.tif", labels)
    raw, simple = tmp_path / "raw.gpkg", tmp_path / "simple.gpkg"
    s_raw = polygonize_labels(src, raw, block_rows=block_rows)
    s_simple = polygonize_labels(src, simple, simplify=8.0, block_rows=block_rows)   # 8 m = 4 pixels
    (g_raw, c_raw, _), (g_simple, c_simple, _) = read(raw), read(simple)
    assert len(g_simple) == len(g_raw)
    assert s_simple["vertices"] < 0.5 * s_raw["vertices"]
    # no gaps between neighbours, no overlaps; the raster's straight edges stay, so the union is the valid area
    assert_tiles(g_simple, valid=valid_area(labels))
    for v in (0, 1, 2):                                                    # within the tolerance of its staircase
        mine = shapely.union_all(g_simple[c_simple["label"] == v])
        theirs = shapely.union_all(g_raw[c_raw["label"] == v])
        assert mine.hausdorff_distance(theirs) <= 8.0 + 1e-9


def test_min_area_in_square_metres_projected(tmp_path):
    a = np.zeros((40, 40), np.uint8)
    a[5:7, 5:10] = 1      # 10 pixels of 2 m x 2 m: 40 m²
    a[20:23, 20:23] = 2   # 9 pixels: 36 m²
    src = write_labels(tmp_path / "l.tif", a)
    for min_area, expect in ((36, {0, 1, 2}), (37, {0, 1}), (41, {0})):
        out = tmp_path / f"p{min_area}.gpkg"
        polygonize_labels(src, out, min_area=min_area, block_rows=8)
        geoms, cols, _ = read(out)
        assert set(cols["label"].tolist()) == expect, min_area
        assert_tiles(geoms, area_of_valid=40 * 40 * 4)                    # sieved regions joined a neighbour


def _equal_area(geom) -> float:
    """Area in m² by PROJ (rasterio.warp) on an equal-area projection: independent of mapseg's formula."""
    from rasterio.warp import transform_geom

    return shapely.geometry.shape(transform_geom("EPSG:4326", "EPSG:6933", shapely.geometry.mapping(geom))).area


@pytest.mark.parametrize("lat", [0.0, 60.0])
def test_min_area_and_areas_on_a_geographic_raster(tmp_path, lat):
    # 1e-4 degree pixels: about 123 m² at the equator, about 62 m² at 60 degrees
    a = np.zeros((20, 20), np.uint8)
    a[5:8, 5:8] = 1                                                        # 9 pixels
    src = write_labels(tmp_path / "l.tif", a, crs="EPSG:4326", transform=Affine(1e-4, 0, 10.0, 0, -1e-4, lat + 0.002))
    out = tmp_path / "p.gpkg"
    polygonize_labels(src, out)
    geoms, cols, _ = read(out)
    for g, area in zip(geoms, cols["area_m2"]):
        assert area == pytest.approx(_equal_area(g), rel=2e-3)            # on the ellipsoid, not in degrees²
    assert cols["area_m2"][cols["label"] == 1][0] == pytest.approx(1108 if lat == 0 else 557, rel=0.01)
    # 1000 m² removes the 9 pixels at 60 degrees (about 557 m²) but not at the equator (about 1108 m²)
    polygonize_labels(src, out, min_area=1000)
    _, cols, _ = read(out)
    assert (1 in cols["label"].tolist()) == (lat == 0.0)


@pytest.mark.parametrize("suffix,driver", [(".gpkg", "GPKG"), (".shp", "ESRI Shapefile"), (".geojson", "GeoJSON"),
                                           (".fgb", "FlatGeobuf")])
def test_any_ogr_format_by_extension(tmp_path, suffix, driver):
    src = write_labels(tmp_path / "l.tif", blocky_labels(h=40, w=40))
    out = tmp_path / f"p{suffix}"
    s = polygonize_labels(src, out, names={0: "water", 1: "trees", 2: "roofs", 3: "fields"})
    assert s["format"] == driver
    geoms, cols, meta = read(out)
    assert len(geoms) == s["polygons"] > 0
    assert set(cols) >= {"label", "class", "area_m2"}
    assert {c for c, v in zip(cols["class"], cols["label"]) if v == 1} == {"trees"}
    assert "32632" in (meta["crs"] or "")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporaries left
    polygonize_labels(src, out, min_area=1000)                             # written again: replaced
    assert len(read(out)[0]) < len(geoms)


def test_clear_errors(tmp_path):
    src = write_labels(tmp_path / "l.tif", blocky_labels(h=16, w=16, nodata=False))
    with pytest.raises(OutputError, match="extension"):
        polygonize_labels(src, tmp_path / "p.xyz")
    with pytest.raises(SegmentError, match="--min-area"):
        polygonize_labels(src, tmp_path / "p.gpkg", min_area=-1)
    with pytest.raises(SegmentError, match="--simplify"):
        polygonize_labels(src, tmp_path / "p.gpkg", simplify=float("nan"))
    with pytest.raises(SegmentError, match="connectivity"):
        polygonize_labels(src, tmp_path / "p.gpkg", connectivity=6)
    with pytest.raises(RasterError, match="does not exist"):
        polygonize_labels(tmp_path / "missing.tif", tmp_path / "p.gpkg")
    rgb = tmp_path / "rgb.tif"
    with rasterio.open(rgb, "w", driver="GTiff", width=8, height=8, count=3, dtype="uint8") as ds:
        ds.write(np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(RasterError, match="one-band"):
        polygonize_labels(rgb, tmp_path / "p.gpkg")
    plain = tmp_path / "plain.tif"
    with rasterio.open(plain, "w", driver="GTiff", width=8, height=8, count=1, dtype="uint8") as ds:
        ds.write(np.zeros((1, 8, 8), np.uint8))
    with pytest.raises(SegmentError, match="no CRS"):
        polygonize_labels(plain, tmp_path / "p.gpkg", min_area=10)
    assert not (tmp_path / "p.gpkg").exists()
    assert main(["polygonize", str(src), str(tmp_path / "p.xyz")]) == 2    # the CLI: error: ..., exit 2
    assert main(["polygonize", str(src), str(src)]) == 2                  # the output would be the input


def test_modules_import_with_numpy_alone_and_name_what_to_install(tmp_path):
    code = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('rasterio', 'shapely', 'pyogrio', 'osgeo', 'fiona'):
            raise ImportError(name + ' is blocked')
sys.meta_path.insert(0, _Block())
import mapseg.vectors, mapseg.legend
from mapseg.errors import SegmentError
try:
    mapseg.vectors.polygonize_labels('l.tif', 'p.gpkg')
except SegmentError as exc:
    print('ERR', exc)
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    assert "ERR polygons need rasterio, shapely, pyogrio" in res.stdout and "pip install" in res.stdout


def test_segment_writes_polygons_after_the_labels(tmp_path):
    rng = np.random.default_rng(0)
    img = np.repeat(np.repeat(rng.integers(0, 255, (3, 12, 16)), 8, 1), 8, 2).astype(np.uint8)
    src = tmp_path / "in.tif"
    with rasterio.open(src, "w", driver="GTiff", width=128, height=96, count=3, dtype="uint8", crs="EPSG:32632",
                       transform=Affine(1, 0, 500000, 0, -1, 5600000)) as ds:
        ds.write(img)
    out, poly = tmp_path / "labels.tif", tmp_path / "labels.gpkg"
    assert main(["segment", str(src), str(out), "-k", "3", "--model", "kmeans", "--no-progress",
                 "--polygons", str(poly), "--min-area", "20", "--simplify", "1"]) == 0
    geoms, cols, _ = read(poly)
    with rasterio.open(out) as ds:
        labels = ds.read(1)
    assert_tiles(geoms, area_of_valid=float((labels != 255).sum()))
    assert set(cols["class"]) <= {"segment 0", "segment 1", "segment 2"}  # the run's class names
    # --min-area without --polygons is refused before the run
    assert main(["segment", str(src), str(tmp_path / "b.tif"), "-k", "3", "--model", "kmeans", "--no-progress",
                 "--min-area", "20"]) == 2
    assert not (tmp_path / "b.tif").exists()


@pytest.mark.data
@pytest.mark.slow
@pytest.mark.parametrize("rel", ["geonrw_dev/images/aachen_296_5625.tif", "naip_rgbn/m_4709963_se_14_1_20200831.tif"])
def test_real_labels_tile_and_simplify(tmp_path, rel):
    raster = DATA / rel
    if not raster.is_file():
        pytest.skip(f"{raster} not found")
    labels = tmp_path / "labels.tif"
    bands = ["--bands", "1,2,3"] if "naip" in rel else []
    assert main(["segment", str(raster), str(labels), "-k", "5", "--no-progress", *bands]) == 0  # the default model
    with rasterio.open(labels) as ds:
        side = abs(ds.transform.a)
        valid = float((ds.read(1) != 255).sum()) * side ** 2
    raw, simple, strips = tmp_path / "raw.gpkg", tmp_path / "simple.gpkg", tmp_path / "strips.gpkg"
    min_area, tolerance = 100 * side ** 2, 3 * side       # 100 pixels; 3 pixels straightens the stride-4 staircase
    s_raw = polygonize_labels(labels, raw, min_area=min_area)
    s_simple = polygonize_labels(labels, simple, min_area=min_area, simplify=tolerance)
    s_strips = polygonize_labels(labels, strips, min_area=min_area, simplify=tolerance, block_rows=128)
    print(f"{rel}: {s_raw['polygons']} polygons, {s_raw['vertices']} vertices raw -> {s_simple['polygons']} / "
          f"{s_simple['vertices']} simplified; strips of 128 rows: {s_strips['polygons']} / {s_strips['vertices']}")
    assert s_simple["vertices"] < 0.6 * s_raw["vertices"]
    for out in (raw, simple, strips):
        geoms, cols, _ = read(out)
        union = shapely.union_all(geoms)
        assert shapely.is_valid(geoms).all()
        assert union.area == pytest.approx(valid, rel=1e-9)                   # no gaps: the valid area, all of it
        assert shapely.area(geoms).sum() == pytest.approx(union.area, rel=1e-9)   # no overlaps
        assert cols["area_m2"].sum() == pytest.approx(valid, rel=1e-9)
    # strips: the same regions survive the sieve (a removed region may join another neighbour near a seam)
    assert abs(s_strips["polygons"] - s_simple["polygons"]) <= 0.02 * s_simple["polygons"]


def test_an_interrupted_run_leaves_the_older_file_and_no_temporaries(tmp_path, monkeypatch):
    from mapseg import vectors

    src = write_labels(tmp_path / "l.tif", blocky_labels(h=64, w=64))
    out = tmp_path / "p.gpkg"
    polygonize_labels(src, out, block_rows=8)
    before = out.read_bytes()
    calls = {"n": 0}
    real_add = vectors._FeatureWriter.add

    def add_then_interrupt(self, group, geo):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        real_add(self, group, geo)

    monkeypatch.setattr(vectors._FeatureWriter, "add", add_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        polygonize_labels(src, out, min_area=100, block_rows=8)
    assert out.read_bytes() == before                                      # the older result, whole
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _equal_area_from(crs, geom) -> float:
    """Area in m² on EPSG:6933 (PROJ through rasterio.warp), densified so that PROJ follows the edges."""
    from rasterio.warp import transform_geom

    return shapely.geometry.shape(transform_geom(crs, "EPSG:6933", shapely.geometry.mapping(
        shapely.segmentize(geom, 5.0)))).area


@pytest.mark.parametrize("simplify", [0, 25])
def test_areas_and_min_area_in_a_crs_that_does_not_keep_areas(tmp_path, simplify):
    # Web Mercator at about 50 N, 10 m pixels: a pixel is about 41 m² on the ground, not 100
    a = np.zeros((60, 80), np.uint8)
    a[20:40, 30:50] = 1                                                   # 20 x 20 pixels: 16547 m², not 40000
    a[:6, :60] = 2                                                        # a band along the top
    transform = Affine(10, 0, 700000, 0, -10, 6446276)                    # y of 50 N in EPSG:3857
    src = write_labels(tmp_path / "l.tif", a, crs="EPSG:3857", transform=transform)
    out = tmp_path / "p.gpkg"
    s = polygonize_labels(src, out, simplify=simplify)
    assert s["area"] == "ellipsoid"
    geoms, cols, _ = read(out)
    for g, area in zip(geoms, cols["area_m2"]):
        assert area == pytest.approx(_equal_area_from("EPSG:3857", g), rel=0.01)
    assert cols["area_m2"][cols["label"] == 1][0] == pytest.approx(16547, rel=0.01)
    # the minimum area is ground area too: 20000 m² sieves the square (4e4 m² in the CRS's units)
    polygonize_labels(src, out, min_area=20000)
    assert 1 not in read(out)[1]["label"].tolist()
    polygonize_labels(src, out, min_area=15000)
    assert 1 in read(out)[1]["label"].tolist()


def test_a_crs_that_keeps_areas_keeps_its_own(tmp_path):
    src = write_labels(tmp_path / "l.tif", blocky_labels(h=40, w=40))         # UTM: within 0.5 % everywhere
    s = polygonize_labels(src, tmp_path / "p.gpkg")
    assert s["area"] == "planar"
    geoms, cols, _ = read(tmp_path / "p.gpkg")
    assert np.allclose(cols["area_m2"], shapely.area(geoms))


def test_the_sieve_is_exact_whatever_the_strips(tmp_path):
    """One sieve over the whole raster: strips of 5 rows give the features of one strip, vertex for vertex."""
    rng = np.random.default_rng(3)
    a = np.repeat(np.repeat(rng.integers(0, 3, (30, 40)), 2, 0), 2, 1).astype(np.uint8)  # speckle of 2-px cells
    a[:10, :10] = 255
    src = write_labels(tmp_path / "l.tif", a)
    results = []
    for rows in (1024, 5):
        out = tmp_path / f"p{rows}.gpkg"
        s = polygonize_labels(src, out, min_area=4 * 30, block_rows=rows)   # 30 pixels of 2 m x 2 m
        geoms, cols, _ = read(out)
        assert s["sieve_pixels"] == 30
        assert_tiles(geoms, valid=valid_area(a))
        results.append(sorted((int(v), g.normalize().wkb) for g, v in zip(geoms, cols["label"])))
    assert results[0] == results[1]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # the mask file went


def test_simplify_auto_straightens_the_staircase_and_counts_what_vanishes(tmp_path, capsys):
    labels = blocky_labels()
    src = write_labels(tmp_path / "l.tif", labels)
    raw = polygonize_labels(src, tmp_path / "raw.gpkg")
    messages = []
    auto = polygonize_labels(src, tmp_path / "auto.gpkg", simplify="auto", log=messages.append)
    assert auto["simplify_px"] == 3.0 and auto["simplify_m"] == pytest.approx(6.0)       # 3 pixels of 2 m
    assert auto["vanished"] > 0                                          # single 4-pixel cells close over
    assert auto["polygons"] + auto["vanished"] == raw["polygons"]        # every region: written or counted
    assert any(f"{auto['vanished']} region(s)" in m for m in messages)
    assert auto["vertices"] < raw["vertices"]
    assert_tiles(read(tmp_path / "auto.gpkg")[0])

    # a boundary along a diagonal of 4-pixel steps (8 m): a staircase, straightened by auto, not by 2 pixels
    rows, cols = np.mgrid[:120, :160] // 4
    diagonal = write_labels(tmp_path / "d.tif", np.where(cols > rows + 3, 0, 1).astype(np.uint8))
    for name, tol in (("raw", 0), ("auto", "auto"), ("two", 4.0)):
        polygonize_labels(diagonal, tmp_path / f"d-{name}.gpkg", simplify=tol)

    def stair(path):
        """The share of vertices that are a corner between two single 4-pixel (8 m) steps: the staircase."""
        xy = shapely.get_coordinates(shapely.get_exterior_ring(shapely.get_parts(read(path)[0])))
        steps = np.abs(np.diff(xy, axis=0))
        one = (steps == [8, 0]).all(1) | (steps == [0, 8]).all(1)
        return (one[:-1] & one[1:] & (steps[:-1] != steps[1:]).any(1)).sum() / len(steps)

    assert stair(tmp_path / "d-raw.gpkg") > 0.8 and stair(tmp_path / "d-two.gpkg") > 0.3
    assert stair(tmp_path / "d-auto.gpkg") == 0
    # auto works in pixels: a raster without a CRS takes it too
    plain = tmp_path / "plain.tif"
    with rasterio.open(plain, "w", driver="GTiff", width=40, height=40, count=1, dtype="uint8") as ds:
        ds.write(blocky_labels(h=40, w=40, nodata=False)[None])
    assert polygonize_labels(plain, tmp_path / "plain.gpkg", simplify="auto")["simplify_m"] is None
    # the CLI's default is auto; 0 keeps the staircase; anything else is refused
    assert main(["polygonize", str(src), str(tmp_path / "cli.gpkg")]) == 0
    assert len(read(tmp_path / "cli.gpkg")[0]) == auto["polygons"]
    assert main(["polygonize", str(src), str(tmp_path / "cli0.gpkg"), "--simplify", "0"]) == 0
    assert len(read(tmp_path / "cli0.gpkg")[0]) == raw["polygons"]
    with pytest.raises(SystemExit):
        main(["polygonize", str(src), str(tmp_path / "x.gpkg"), "--simplify", "lots"])
