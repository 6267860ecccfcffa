"""Area of interest and ground resolution: --extent, --extent-crs, --mask, --resolution (mapseg.raster.view).

On real GeoNRW tiles (1000 x 1000 at 1 m, EPSG:25832): an extent gives the grid of a clipped copy and its
labels; a mask (with a hole, and a second polygon) is nodata outside and the unmasked labels inside;
--resolution resamples by area average (checked against a block mean) and writes on the coarser grid;
labels do not depend on --tile with all of them at once; bad requests are clear errors.
"""
from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATASETS
from conftest import need_data as need

rasterio = pytest.importorskip("rasterio")
from affine import Affine  # noqa: E402
from rasterio.windows import Window  # noqa: E402

from mapseg.artifact import ArtifactError, load_artifact  # noqa: E402
from mapseg.cli import main  # noqa: E402
from mapseg.errors import RasterError  # noqa: E402
from mapseg.raster import Region, open_reader  # noqa: E402
from mapseg.raster.polygons import PolygonMask, wkb_polygons  # noqa: E402
from mapseg.raster.view import metres_per_degree  # noqa: E402
from mapseg.segment import SegmentOptions, fit_raster_centers, segment_raster  # noqa: E402

DATA = SHARED_DATASETS
pytestmark = [pytest.mark.data,
              pytest.mark.skipif(not DATA.is_dir(), reason=f"real imagery not found at {DATA}")]
TILE = "geonrw_dev/images/aachen_296_5625.tif"        # 296000..297000 E, 5625000..5626000 N
OTHER = "geonrw_dev/images/aachen_299_5619.tif"       # 299000..300000 E, 5619000..5620000 N
X0, Y0 = 296000.0, 5626000.0
QUIET = {"progress": False, "log": lambda msg: None}


@pytest.fixture(scope="module")
def model(export_tiny_student):
    return str(export_tiny_student(max_k=6))


def run(*argv) -> int:
    return main([str(a) for a in argv])


def grid(path):
    with rasterio.open(path) as ds:
        return ds.read(1), ds.transform, ds.crs, ds.nodata


def clip_copy(src: Path, out: Path, row0: int, row1: int, col0: int, col1: int) -> Path:
    """What gdal_translate -srcwin makes: the pixels of a window, georeferenced, as a raster of its own."""
    win = Window(col0, row0, col1 - col0, row1 - row0)
    with rasterio.open(src) as ds:
        profile = {"driver": "GTiff", "width": win.width, "height": win.height, "count": 3, "dtype": "uint8",
                   "crs": ds.crs, "transform": ds.window_transform(win)}
        data = ds.read(window=win)
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(data)
    return out


def square(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def test_extent_in_the_raster_crs_is_a_clipped_copy(model, tmp_path):
    src = need(TILE)
    # not on the pixel grid: snaps outward to columns 100-356, rows 707-900
    extent = "296100.3,5625100,296356,5625292.7"
    copy = clip_copy(src, tmp_path / "copy.tif", 707, 900, 100, 356)
    assert run("fit", src, "-k", 4, "-o", tmp_path / "c_view.json", "--model", model, "--extent", extent,
               "--no-progress") == 0
    assert run("fit", copy, "-k", 4, "-o", tmp_path / "c_copy.json", "--model", model, "--no-progress") == 0
    # the view reads exactly the copy's pixels: the same sample, the same centres
    view_c = json.loads((tmp_path / "c_view.json").read_text())
    assert view_c["centers"] == json.loads((tmp_path / "c_copy.json").read_text())["centers"]
    assert view_c["sample"]["rasters"][0]["region"]["extent"] == [296100.3, 5625100, 296356, 5625292.7]
    assert run("segment", src, tmp_path / "view.tif", "--centers", tmp_path / "c_view.json", "--model", model,
               "--extent", extent, "--tile", 96, "--no-progress") == 0
    assert run("segment", copy, tmp_path / "copy_l.tif", "--centers", tmp_path / "c_view.json", "--model", model,
               "--no-progress") == 0
    labels, transform, crs, _ = grid(tmp_path / "view.tif")
    assert labels.shape == (193, 256)
    assert transform == Affine(1, 0, 296100, 0, -1, 5625293) and crs == "EPSG:25832"
    np.testing.assert_array_equal(labels, grid(tmp_path / "copy_l.tif")[0])


def test_extent_in_lon_lat(model, tmp_path):
    from rasterio.warp import transform_bounds

    src = need(TILE)
    lonlat = transform_bounds("EPSG:25832", "EPSG:4326", 296200, 5625300, 296500, 5625600)
    box = (lonlat[0] + 0.0003, lonlat[1] + 0.0003, lonlat[2] - 0.0003, lonlat[3] - 0.0003)  # inside the tile
    want = transform_bounds("EPSG:4326", "EPSG:25832", *box, densify_pts=101)
    lines = []
    report = segment_raster(src, tmp_path / "ll.tif", SegmentOptions(k=4, model=model, extent=box,
                                                                    extent_crs="EPSG:4326"),
                            progress=False, log=lines.append)
    labels, t, crs, _ = grid(tmp_path / "ll.tif")
    assert crs == "EPSG:25832" and (t.a, t.e) == (1, -1) and t.c == int(t.c) and t.f == int(t.f)
    left, top = t.c, t.f
    right, bottom = left + labels.shape[1], top - labels.shape[0]
    # the outline's bounding box, snapped outward to whole pixels
    assert left <= want[0] < left + 1 and right - 1 < want[2] <= right
    assert bottom <= want[1] < bottom + 1 and top - 1 < want[3] <= top
    assert any("in EPSG:4326 is" in m for m in lines), lines
    assert report["region"]["extent_crs"] == "EPSG:4326" and report["region"]["bounds"] == [left, bottom, right, top]
    # the same labels as a clipped copy of that area with the same centres
    row0, col0 = int(Y0 - top), int(left - X0)
    copy = clip_copy(src, tmp_path / "copy.tif", row0, row0 + labels.shape[0], col0, col0 + labels.shape[1])
    (tmp_path / "c.json").write_text(json.dumps(report["centers"]))
    segment_raster(copy, tmp_path / "copy_l.tif", SegmentOptions(centers=tmp_path / "c.json", model=model), **QUIET)
    np.testing.assert_array_equal(labels, grid(tmp_path / "copy_l.tif")[0])


def mask_geojson(path: Path, crs: str | None = "EPSG:25832") -> Path:
    """A square with a square hole, and a second small square: a MultiPolygon in the tile's CRS."""
    doc = {"type": "FeatureCollection",
           "features": [{"type": "Feature", "properties": {}, "geometry": {
               "type": "MultiPolygon",
               "coordinates": [[square(296100, 5625500, 296300, 5625700), square(296160, 5625560, 296240, 5625640)],
                               [square(296320, 5625400, 296360, 5625440)]]}}]}
    if crs:
        doc["crs"] = {"type": "name", "properties": {"name": crs}}
    path.write_text(json.dumps(doc))
    return path


def expected_inside(transform: Affine, shape) -> np.ndarray:
    """The mask's pixel-centre rule, worked out from the squares' coordinates."""
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    x, y = transform @ (cols + 0.5, rows + 0.5)

    def inn(x0, y0, x1, y1):
        return (x > x0) & (x < x1) & (y > y0) & (y < y1)

    return (inn(296100, 5625500, 296300, 5625700) & ~inn(296160, 5625560, 296240, 5625640)) \
        | inn(296320, 5625400, 296360, 5625440)


def test_mask_with_a_hole_is_nodata_outside_and_keeps_the_labels_inside(model, tmp_path):
    src = need(TILE)
    mask = mask_geojson(tmp_path / "aoi.geojson")
    assert run("fit", src, "-k", 4, "-o", tmp_path / "c.json", "--model", model, "--no-progress") == 0
    common = ["--centers", tmp_path / "c.json", "--model", model, "--no-progress"]
    assert run("segment", src, tmp_path / "m.tif", "--mask", mask, "--tile", 64, "--report", tmp_path / "r.json",
               *common) == 0
    labels, t, crs, nodata = grid(tmp_path / "m.tif")
    # without --extent the output covers the polygons' bounds
    assert labels.shape == (300, 260) and t == Affine(1, 0, 296100, 0, -1, 5625700) and nodata == 255
    inside = expected_inside(t, labels.shape)
    assert (labels[~inside] == 255).all() and (labels[inside] != 255).all()
    assert labels[100:140, 60:140].max() == 255  # the hole
    # inside, the labels of a run over the same area without the mask (the network sees the same pixels)
    assert run("segment", src, tmp_path / "e.tif", "--extent", "296100,5625400,296360,5625700", *common) == 0
    plain = grid(tmp_path / "e.tif")[0]
    np.testing.assert_array_equal(labels[inside], plain[inside])
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["region"]["mask"] == str(mask) and report["region"]["mask_polygons"] == 2
    # the mask is an input: no output may overwrite it
    assert run("segment", src, tmp_path / "x.tif", "--mask", mask, "--report", mask, *common) == 2
    assert json.loads(mask.read_text())["type"] == "FeatureCollection"


def test_a_geopackage_mask_in_lon_lat_gives_the_same_pixels(model, tmp_path):
    pyogrio = pytest.importorskip("pyogrio")
    import pyogrio.raw
    from rasterio.warp import transform as warp

    src = need(TILE)
    rings = [square(296100, 5625500, 296300, 5625700), square(296160, 5625560, 296240, 5625640)]
    ll = []
    for ring in rings:
        xs, ys = warp("EPSG:25832", "EPSG:4326", [p[0] for p in ring], [p[1] for p in ring])
        ll.append(list(zip(xs, ys)))
    wkb = bytearray(b"\x01" + (3).to_bytes(4, "little") + len(ll).to_bytes(4, "little"))
    for ring in ll:
        wkb += len(ring).to_bytes(4, "little") + np.asarray(ring, "<f8").tobytes()
    assert len(wkb_polygons(bytes(wkb))[0]) == 2
    gpkg = tmp_path / "aoi.gpkg"
    pyogrio.raw.write(gpkg, np.array([bytes(wkb)], dtype=object), [], [], geometry_type="Polygon", crs="EPSG:4326",
                      driver="GPKG")
    geojson = tmp_path / "aoi.geojson"
    geojson.write_text(json.dumps({"type": "Polygon", "coordinates": rings,
                                   "crs": {"type": "name", "properties": {"name": "EPSG:25832"}}}))
    outs = []
    for mask in (gpkg, geojson):
        segment_raster(src, tmp_path / f"{mask.suffix[1:]}.tif",
                       SegmentOptions(k=3, model="kmeans", mask=mask, extent=(296100, 5625500, 296300, 5625700)),
                       **QUIET)
        outs.append(grid(tmp_path / f"{mask.suffix[1:]}.tif")[0])
    assert (outs[0] == 255).sum() == 80 * 80  # the hole
    np.testing.assert_array_equal(outs[0] == 255, outs[1] == 255)


def test_resolution_2_on_a_1_m_tile_is_an_area_average_on_a_2_m_grid(model, tmp_path):
    src = need(TILE)
    lines = []
    report = segment_raster(src, tmp_path / "r2.tif", SegmentOptions(k=4, model="kmeans", resolution=2),
                            progress=False, log=lines.append)
    labels, t, crs, _ = grid(tmp_path / "r2.tif")
    assert labels.shape == (500, 500) and t == Affine(2, 0, X0, 0, -2, Y0) and crs == "EPSG:25832"
    assert report["region"]["resolution_m"] == 2 and "area average" in report["region"]["resampling"]
    assert report["ground_resolution_m"] == pytest.approx(2)
    assert any("ground resolution of" in m and "2 m/px" in m for m in lines), lines
    with rasterio.open(src) as ds:
        raw = ds.read(window=Window(200, 300, 64, 48)).transpose(1, 2, 0).astype(np.float64)
    block = np.rint(raw.reshape(24, 2, 32, 2, 3).mean(axis=(1, 3)))
    with open_reader(src, region=Region(resolution=2)) as view:
        data, valid = view.read(150, 174, 100, 132)
    assert data.dtype == np.uint8 and valid.all()
    np.testing.assert_array_equal(data, block)


def test_resolution_finer_than_the_tile_is_bilinear(tmp_path):
    """--resolution 0.7 on a 1 m tile, from an origin off the pixel grid: each output value is the bilinear
    interpolation of the four nearest source pixel centres (the edge pixel repeated past the border), worked
    out here independently on a float32 copy of the tile (so no rounding to uint8 hides a difference)."""
    src = need(TILE)
    with rasterio.open(src) as ds:
        raw = ds.read(window=Window(80, 560, 160, 120)).astype(np.float32)  # columns 80-240, rows 560-680
        profile = {"driver": "GTiff", "width": 160, "height": 120, "count": 3, "dtype": "float32", "crs": ds.crs,
                   "transform": ds.window_transform(Window(80, 560, 160, 120))}
    raw += np.linspace(0, 0.9, 160, dtype=np.float32)[None, None, :]  # not integers: a fractional weight shows
    copy = tmp_path / "f32.tif"
    with rasterio.open(copy, "w", **profile) as dst:
        dst.write(raw)
    img = raw.transpose(1, 2, 0).astype(np.float64)
    # the area starts 0.3 px right of column 80 and 0.55 px below row 560 of the tile: in the copy's pixels
    col0, row0, f = 0.3, 0.55, 0.7
    with open_reader(copy, region=Region(extent=(296080.3, 5625320, 296240, 5625439.45), resolution=0.7)) as view:
        assert "bilinear" in view.resampling and view.offset == pytest.approx((col0, row0))
        h, w = view.height, view.width
        data, valid = view.read(0, h, 0, w)
    assert data.dtype == np.float32 and valid.all() and (h, w) == (round(119.45 / f), round(159.7 / f))

    def axis(n_out, start, n_src):  # source index below each output centre, its weight, clamped at the border
        s = start + (np.arange(n_out) + 0.5) * f - 0.5
        i = np.floor(s).astype(int)
        return np.clip(i, 0, n_src - 1), np.clip(i + 1, 0, n_src - 1), s - i

    r0, r1, fy = axis(h, row0, img.shape[0])
    c0, c1, fx = axis(w, col0, img.shape[1])
    fy, fx = fy[:, None, None], fx[None, :, None]
    ref = ((1 - fy) * ((1 - fx) * img[r0][:, c0] + fx * img[r0][:, c1])
           + fy * ((1 - fx) * img[r1][:, c0] + fx * img[r1][:, c1]))
    np.testing.assert_allclose(data, ref, rtol=0, atol=1e-3)


def test_labels_do_not_depend_on_the_tile_with_extent_mask_and_resolution(model, tmp_path):
    src = need(TILE)
    mask = mask_geojson(tmp_path / "aoi.geojson")
    for res in (1.5, 0.75):  # area average with fractional weights; bilinear
        ref = None
        for tile, workers in ((48, 2), (100, 2), (4096, 1)):  # 2 workers resample windows in parallel
            out = tmp_path / f"{res}_{tile}_{workers}.tif"
            segment_raster(src, out, SegmentOptions(k=4, model=model, tile=tile, workers=workers, backend="numpy",
                                                    mask=mask,
                                                    extent=(296090.2, 5625390.7, 296370.9, 5625650.3),
                                                    resolution=res), **QUIET)
            labels, t, _, _ = grid(out)
            if ref is None:
                ref = labels
                assert (t.a, t.e) == (res, -res) and (t.c, t.f) == (296090.2, 5625650.3)
                assert labels.shape == (round(259.6 / res), round(280.7 / res))
                assert 255 in labels and len(set(np.unique(labels)) - {255}) == 4
            np.testing.assert_array_equal(labels, ref, err_msg=f"resolution {res}, tile {tile}, workers {workers}")


def test_resolution_in_a_geographic_crs_is_converted_at_the_centre_latitude(tmp_path):
    src = tmp_path / "ll.tif"
    rng = np.random.default_rng(0)
    with rasterio.open(src, "w", driver="GTiff", width=120, height=80, count=3, dtype="uint8", crs="EPSG:4326",
                       transform=Affine(1e-4, 0, 7.0, 0, -1e-4, 47.004)) as ds:
        ds.write(rng.integers(0, 255, (3, 80, 120), dtype=np.uint8))
    lines = []
    segment_raster(src, tmp_path / "out.tif", SegmentOptions(k=3, model="kmeans", resolution=15),
                   progress=False, log=lines.append)
    _, t, crs, _ = grid(tmp_path / "out.tif")
    mx, my = metres_per_degree(47.0)
    assert 70_000 < mx < 80_000 and 111_000 < my < 111_300
    assert t.a == pytest.approx(15 / mx, rel=1e-9) and -t.e == pytest.approx(15 / my, rel=1e-9)
    assert any("centre latitude 47.0000" in m for m in lines), lines


def test_model_resolution_is_compared_with_the_input(model, tmp_path):
    src = need(TILE)
    art = tmp_path / "art"
    shutil.copytree(model, art)
    meta = json.loads((art / "meta.json").read_text())
    meta["resolution"] = {"m_per_px": 0.3, "range_m_per_px": None, "how": "test"}
    (art / "meta.json").write_text(json.dumps(meta))
    assert load_artifact(art).resolution["m_per_px"] == 0.3
    lines = []
    opts = dict(k=3, model=str(art), extent=(296000, 5625800, 296200, 5626000))
    segment_raster(src, tmp_path / "a.tif", SegmentOptions(**opts), progress=False, log=lines.append)
    assert any("warning:" in m and "1 m/px, more than 2x from the 0.3 m/px" in m for m in lines), lines
    lines.clear()
    segment_raster(src, tmp_path / "b.tif", SegmentOptions(**opts, resolution=0.4), progress=False, log=lines.append)
    assert not any("warning:" in m for m in lines), lines
    meta["resolution"] = {"m_per_px": -1, "range_m_per_px": None, "how": "bad"}
    (art / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="m_per_px must be a positive number"):
        load_artifact(art)
    # unknown (the shipped model's case): said once for a fit over two rasters
    meta["resolution"] = {"m_per_px": None, "range_m_per_px": None, "how": "unknown here"}
    (art / "meta.json").write_text(json.dumps(meta))
    lines.clear()
    fit_raster_centers([src, src], SegmentOptions(k=3, model=str(art), extent=opts["extent"]), log=lines.append)
    assert sum("training resolution is unknown (unknown here)" in m for m in lines) == 1, lines


def test_unreferenced_input_says_its_resolution_is_unknown(tmp_path, capsys):
    jpg = need("dubai_dev/tile_1/images/image_part_001.jpg")
    assert run("segment", jpg, tmp_path / "a.tif", "-k", 3, "--model", "kmeans", "--no-progress") == 0
    assert "ground resolution of" in capsys.readouterr().err
    assert run("segment", jpg, tmp_path / "b.tif", "-k", 3, "--model", "kmeans", "--no-progress",
               "--extent", "0,0,10,10") == 2
    err = capsys.readouterr().err
    assert "error: --extent needs a georeferenced raster" in err and "ground resolution is unknown" in err
    assert not (tmp_path / "b.tif").exists()


@pytest.mark.parametrize("argv, message", [
    (["--extent", "1,2,3"], "give four numbers"),
    (["--extent", "a,b,c,d"], "give four numbers"),
    (["--extent", "296500,5625000,296400,5625100"], "xmin < xmax"),
    (["--extent", "0,0,100,100"], "misses .*aachen_296_5625.tif: the raster covers 296000,5625000,297000,5626000"),
    (["--extent-crs", "EPSG:4326"], "give --extent too"),
    (["--extent", "6,50,7,51", "--extent-crs", "EPSG:99999999"], "is not a CRS"),
    (["--resolution", "0"], "positive number of metres"),
    (["--mask", "missing.geojson"], "does not exist"),
])
def test_bad_requests_are_clear_errors(tmp_path, capsys, argv, message):
    src = need(TILE)
    out = tmp_path / "out.tif"
    argv = [a.replace("missing.geojson", str(tmp_path / "missing.geojson")) for a in argv]
    assert run("segment", src, out, "-k", 3, "--model", "kmeans", "--no-progress", *argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and __import__("re").search(message, err), err
    assert not out.exists()


def test_fit_names_the_raster_an_extent_misses(tmp_path, capsys):
    a, b = need(TILE), need(OTHER)
    assert run("fit", a, b, "-k", 3, "-o", tmp_path / "c.json", "--model", "kmeans", "--no-progress",
               "--extent", "296100,5625100,296300,5625300") == 2
    err = capsys.readouterr().err
    assert f"misses {b}" in err and not (tmp_path / "c.json").exists()


def test_polygon_mask_rule_on_shared_edges_and_holes():
    """Two squares sharing an edge take every pixel once; a hole is left out; centres on an edge go right."""
    left = [np.array(square(0, 0, 4, 4), float)]
    right = [np.array(square(4, 0, 8, 4), float)]
    a, b = PolygonMask([left]).inside(0, 4, 0, 8), PolygonMask([right]).inside(0, 4, 0, 8)
    assert not (a & b).any() and (a | b).all()
    holed = PolygonMask([[np.array(square(0, 0, 8, 8), float), np.array(square(2, 2, 6, 6), float)]])
    got = holed.inside(0, 8, 0, 8)
    assert got.sum() == 64 - 16 and not got[2:6, 2:6].any()
    # any window of it gives the same pixels
    np.testing.assert_array_equal(holed.inside(3, 7, 1, 5), got[3:7, 1:5])
    edge = PolygonMask([[np.array(square(1.5, 0, 3.5, 1), float)]]).inside(0, 1, 0, 5)
    assert edge.tolist() == [[False, True, True, False, False]]
    assert math.isfinite(PolygonMask([left]).bounds[2])


def reference_inside(polygons, row0, row1, col0, col1):
    """The rule worked out polygon by polygon over the whole window (slow): even-odd over each polygon's rings,
    union across polygons; a crossing at x flips the centres c + 0.5 >= x of its row; rows half-open in y."""
    h, w = row1 - row0, col1 - col0
    out = np.zeros((h, w), bool)
    yc = np.arange(row0, row1) + 0.5
    for rings in polygons:
        flips = np.zeros((h, w + 1), np.int32)
        for ring in rings:
            ring = np.vstack([ring, ring[:1]]) if not np.array_equal(ring[0], ring[-1]) else ring
            for (x1, y1), (x2, y2) in itertools.pairwise(ring):
                if y1 == y2:
                    continue
                for r in np.flatnonzero((y1 <= yc) != (y2 <= yc)):
                    x = x1 + (yc[r] - y1) * (x2 - x1) / (y2 - y1)
                    flips[r, int(np.clip(np.ceil(x - 0.5) - col0, 0, w))] += 1
        out |= (np.cumsum(flips[:, :w], axis=1) & 1).astype(bool)
    return out


def many_polygons(rng, n=70):
    """Squares on the pixel grid and on pixel centres, polygons with holes, stars, bow ties (self-intersecting),
    overlapping and edge-sharing neighbours, unclosed rings: in pixels over about (-10, 110)."""
    def star(cx, cy, r, k, snap):
        t = np.sort(rng.uniform(0, 2 * np.pi, k))
        pts = np.column_stack([cx + r * rng.uniform(0.3, 1, k) * np.cos(t), cy + r * rng.uniform(0.3, 1, k) * np.sin(t)])
        return np.round(pts * 2) / 2 if snap else pts

    polys = []
    for _ in range(n):
        cx, cy = rng.uniform(-10, 110, 2)
        kind, snap = rng.integers(0, 5), rng.random() < 0.5
        if kind == 0:
            x0, y0 = np.round(rng.uniform(-10, 100, 2) * 2) / 2
            polys.append([np.array(square(x0, y0, x0 + rng.integers(1, 30) / 2, y0 + rng.integers(1, 30) / 2), float)])
        elif kind == 1:
            polys.append([np.array(square(cx - 15, cy - 12, cx + 15, cy + 12), float),
                          star(cx - 6, cy, 5, 7, snap)[::-1], star(cx + 7, cy + 2, 4, 5, snap)])
        elif kind == 2:
            pts = np.array([cx, cy]) + rng.uniform(-12, 12, (6, 2))
            polys.append([np.round(pts * 2) / 2 if snap else pts])
        elif kind == 3:
            polys.append([star(cx, cy, rng.uniform(2, 15), 60, snap)])
        else:
            x0, y0 = np.floor(rng.uniform(-10, 100, 2)) + 0.5
            polys += [[np.array(square(x0, y0, x0 + 6, y0 + 5), float)],
                      [np.array(square(x0 + 6, y0, x0 + 11, y0 + 5), float)],
                      [np.array(square(x0 + 3, y0 + 2, x0 + 9, y0 + 9), float)]]
    return polys


def test_polygon_mask_is_the_per_polygon_rule_in_any_window():
    """One pass over all polygons gives the pixels of the rule applied polygon by polygon, in the whole grid, in
    windows cut through polygons and past the polygons, and on a decimated grid (the preview)."""
    rng = np.random.default_rng(7)
    polys = many_polygons(rng)
    mask = PolygonMask(polys)
    whole = mask.inside(0, 100, 0, 100)
    np.testing.assert_array_equal(whole, reference_inside(polys, 0, 100, 0, 100))
    assert 0.2 < whole.mean() < 0.8
    for _ in range(12):
        r0, c0 = (int(v) for v in rng.integers(0, 90, 2))
        r1, c1 = min(100, r0 + int(rng.integers(1, 40))), min(100, c0 + int(rng.integers(1, 40)))
        np.testing.assert_array_equal(mask.inside(r0, r1, c0, c1), whole[r0:r1, c0:c1], err_msg=str((r0, c0)))
    np.testing.assert_array_equal(mask.inside(90, 130, -20, 10), reference_inside(polys, 90, 130, -20, 10))
    assert not mask.inside(300, 310, 0, 50).any() and mask.inside(0, 0, 0, 5).shape == (0, 5)
    np.testing.assert_array_equal(mask.scaled(0.37, 0.61).inside(0, 61, 0, 37),
                                  reference_inside([[r * [0.37, 0.61] for r in rings] for rings in polys], 0, 61, 0, 37))


def test_polygon_mask_matches_gdal_rasterize_on_a_geojson_of_many_polygons(tmp_path):
    """Against rasterio.features.rasterize (GDAL: pixel centres) on polygons read back from a GeoJSON:
    multipolygons with holes, overlapping and disjoint, vertices off the pixel centres (where GDAL and the
    half-open rule can only agree)."""
    from rasterio.features import rasterize

    from mapseg.raster.polygons import read_polygons

    rng = np.random.default_rng(3)
    feats = []
    for _ in range(60):
        cx, cy = rng.uniform(-5, 205, 2)
        r = rng.uniform(2, 25)
        t = np.sort(rng.uniform(0, 2 * np.pi, 24))
        outer = np.column_stack([cx + r * np.cos(t), cy + r * np.sin(t)])
        hole = np.column_stack([cx + 0.4 * r * np.cos(t[::-2]), cy + 0.4 * r * np.sin(t[::-2])])
        part = [outer.tolist() + outer[:1].tolist(), hole.tolist() + hole[:1].tolist()]
        small = square(cx + r + 1.13, cy - 2.71, cx + r + 6.29, cy + 3.37)
        feats.append({"type": "Feature", "properties": {},
                      "geometry": {"type": "MultiPolygon", "coordinates": [part, [small]]}})
    path = tmp_path / "many.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    polygons, _, _ = read_polygons(path)
    assert len(polygons) == 120
    gdal = rasterize([({"type": "Polygon", "coordinates": [r.tolist() for r in rings]}, 1) for rings in polygons],
                     out_shape=(200, 200), transform=Affine.identity(), dtype="uint8").astype(bool)
    ours = PolygonMask(polygons).inside(0, 200, 0, 200)
    assert 0.2 < ours.mean() < 0.8
    np.testing.assert_array_equal(ours, gdal)
    np.testing.assert_array_equal(PolygonMask(polygons).inside(37, 141, 55, 190), gdal[37:141, 55:190])


def test_a_mask_reads_once_and_keeps_only_the_polygons_that_reach_the_area(tmp_path, monkeypatch):
    import mapseg.raster.view as view_module

    src = need(TILE)
    near = mask_geojson(tmp_path / "near.geojson")
    doc = json.loads(near.read_text())
    far = {"type": "Feature", "properties": {}, "geometry": {"type": "MultiPolygon", "coordinates": [
        [square(296700, 5625100, 296800, 5625200)], [square(300000, 5600000, 300100, 5600100)]]}}
    doc["features"].append(far)
    both = tmp_path / "both.geojson"
    both.write_text(json.dumps(doc))
    reads = []
    real = view_module.read_polygons
    monkeypatch.setattr(view_module, "read_polygons", lambda path: reads.append(path) or real(path))
    region = Region(mask=str(both), extent=(296090, 5625390, 296370, 5625710))
    with open_reader(src, region=region) as a, open_reader(src, region=region) as b:
        assert reads == [str(both)] and a.mask_count == 4  # read once for two rasters
        assert set(a.mask.ring_poly.tolist()) == {0, 1}  # the two far squares are left out
        assert any("2 of its 4 polygons reach the area" in n for n in a.notes), a.notes
        with open_reader(src, region=Region(mask=str(near), extent=region.extent)) as c:
            np.testing.assert_array_equal(a.inside(0, a.height, 0, a.width), c.inside(0, c.height, 0, c.width))
        np.testing.assert_array_equal(b.inside(10, 200, 30, 270), a.inside(10, 200, 30, 270))
    # none of them in the area: a clear error, not an empty run
    with pytest.raises(RasterError, match="none of its 4 polygon.s. reaches --extent 296400"):
        open_reader(src, region=Region(mask=str(both), extent=(296400, 5625300, 296500, 5625380)))


@pytest.mark.parametrize("geometry", [
    {"type": "Polygon", "coordinates": []},
    {"type": "MultiPolygon", "coordinates": [[], [[]]]},
    {"type": "Polygon", "coordinates": [[[296100, 5625100]] * 4]},                             # one point
    {"type": "Polygon", "coordinates": [[[296100, 5625100], [296300, 5625100], [296100, 5625100]]]},  # a line
    {"type": "Polygon", "coordinates": [[[296100, 5625100], [296200, 5625200], [296300, 5625300],
                                         [296100, 5625100]]]},                                  # collinear
    {"type": "Polygon", "coordinates": [[], square(296100, 5625100, 296300, 5625300)]},       # a hole alone
])
def test_a_mask_without_an_area_is_a_clear_error(tmp_path, capsys, geometry):
    src = need(TILE)
    mask = tmp_path / "empty.geojson"
    mask.write_text(json.dumps({"type": "Feature", "properties": {}, "geometry": geometry,
                                "crs": {"type": "name", "properties": {"name": "EPSG:25832"}}}))
    out = tmp_path / "out.tif"
    assert run("segment", src, out, "-k", 3, "--model", "kmeans", "--no-progress", "--mask", mask) == 2
    err = capsys.readouterr().err
    assert f"error: --mask {mask} holds no polygons" in err and "misses" not in err, err
    assert "Traceback" not in err and not out.exists()


def test_degenerate_rings_are_dropped_and_real_ones_kept():
    from mapseg.raster.polygons import clean_polygons

    tri = np.array([[0, 0], [4, 0], [0, 3]], float)
    point = np.array([[1, 1], [1, 1], [1, 1], [1, 1]], float)
    bowtie = np.array([[0, 0], [2, 2], [2, 0], [0, 2]], float)  # zero signed area, but two triangles
    kept = clean_polygons([[tri, point], [point, tri], [], [bowtie], [np.zeros((0, 2)), tri]])
    assert len(kept) == 2 and len(kept[0]) == 1 and kept[1][0] is bowtie
    with pytest.raises(RasterError, match="not a finite number"):
        clean_polygons([[np.array([[0, 0], [1, np.nan], [0, 1]])]])


SYSTEM_PY = shutil.which("python3", path="/usr/bin")


def _gdal_python() -> str | None:
    import subprocess

    if not SYSTEM_PY:
        return None
    r = subprocess.run([SYSTEM_PY, "-c", "from osgeo import gdal, ogr, osr; import numpy"], capture_output=True)
    return SYSTEM_PY if r.returncode == 0 else None


def test_the_gdal_path_gives_the_same_area_grid_and_labels(tmp_path):
    """QGIS's way (osgeo for the raster, osr for the CRSs, ogr for a GeoPackage, no rasterio) against the venv's:
    an NGI tile (a CRS without an EPSG code, nodata 0 at the edges), an extent in lon/lat, a lon/lat polygon
    mask, resampled to 7 m (area average over 1.4 source pixels, nodata pixels carrying no weight)."""
    import os
    import subprocess

    gdal_py = _gdal_python()
    if gdal_py is None:
        pytest.skip("no system Python with osgeo (GDAL bindings) and numpy: apt-get install python3-gdal")
    src = need("ngi_aerial/ngi_rgb_byte_1.tif")
    ring = [[24.392, -33.694], [24.416, -33.694], [24.416, -33.651], [24.392, -33.651], [24.392, -33.694]]
    hole = [[24.400, -33.680], [24.408, -33.680], [24.408, -33.665], [24.400, -33.665], [24.400, -33.680]]
    geojson = tmp_path / "aoi.geojson"  # no "crs" member: lon/lat (RFC 7946)
    geojson.write_text(json.dumps({"type": "Polygon", "coordinates": [ring, hole]}))
    gpkg = tmp_path / "aoi.gpkg"
    r = subprocess.run(["ogr2ogr", "-f", "GPKG", str(gpkg), str(geojson)], capture_output=True, text=True) \
        if shutil.which("ogr2ogr") else None
    masks = [geojson] + ([gpkg] if r is not None and r.returncode == 0 else [])
    centres = tmp_path / "c.json"
    assert run("fit", src, "-k", 4, "-o", centres, "--model", "kmeans", "--no-progress") == 0
    flags = ["--extent=24.3906,-33.6951,24.4178,-33.6500", "--extent-crs", "EPSG:4326", "--resolution", "7",
             "--centers", centres, "--model", "kmeans", "--tile", "64", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "MAPSEG_IO": "gdal"}
    env.pop("VIRTUAL_ENV", None)
    for mask in masks:
        ours, theirs = tmp_path / f"venv_{mask.suffix[1:]}.tif", tmp_path / f"gdal_{mask.suffix[1:]}.tif"
        assert run("segment", src, ours, "--mask", mask, *flags) == 0
        r = subprocess.run([gdal_py, "-c", "import sys; from mapseg.cli import main; sys.exit(main(sys.argv[1:]))",
                            "segment", str(src), str(theirs), "--mask", str(mask), *map(str, flags)],
                           env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "area average" in r.stderr and "7 m/px (unnamed CRS (no EPSG code))" in r.stderr, r.stderr
        a, ta, ca, na = grid(ours)
        b, tb, cb, nb = grid(theirs)
        assert a.shape == b.shape and ca == cb and na == nb == 255
        assert all(abs(u - v) < 1e-6 for u, v in zip(ta[:6], tb[:6])), (ta, tb)
        assert (ta.a, ta.e) == (7, -7)
        assert ((a == 255) == (b == 255)).mean() > 0.999 and (a == b).mean() > 0.999
        assert (a == 255).any() and (a != 255).mean() > 0.5


def test_an_extent_past_the_edge_is_cut_and_the_preview_shows_the_area(tmp_path, capsys):
    from PIL import Image

    src = need(TILE)
    out, png = tmp_path / "cut.tif", tmp_path / "cut.png"
    assert run("segment", src, out, "-k", 3, "--model", "kmeans", "--no-progress", "--preview", png,
               "--extent", "295500,5625800,296300,5626500") == 0
    err = capsys.readouterr().err
    assert "reaches past" in err and "cut to the raster's bounds" in err
    labels, t, _, _ = grid(out)
    assert labels.shape == (200, 300) and t == Affine(1, 0, X0, 0, -1, Y0)
    shown = np.asarray(Image.open(png).convert("RGB"))
    with rasterio.open(src) as ds:  # the preview's left half is the area, not the whole raster
        np.testing.assert_array_equal(shown[:, :300], ds.read(window=Window(0, 0, 300, 200)).transpose(1, 2, 0))


def test_a_shapefile_mask_and_its_sidecars_are_inputs(tmp_path, capsys):
    if not shutil.which("ogr2ogr"):
        pytest.skip("ogr2ogr not installed")
    import subprocess

    src = need(TILE)
    geojson = mask_geojson(tmp_path / "aoi.geojson")
    shp = tmp_path / "aoi.shp"
    subprocess.run(["ogr2ogr", "-f", "ESRI Shapefile", str(shp), str(geojson)], check=True, capture_output=True)
    assert (tmp_path / "aoi.dbf").exists()
    common = ["-k", 3, "--model", "kmeans", "--no-progress", "--mask", shp]
    assert run("segment", src, tmp_path / "s.tif", *common) == 0
    labels, t, _, _ = grid(tmp_path / "s.tif")
    np.testing.assert_array_equal(labels != 255, expected_inside(t, labels.shape))
    dbf = tmp_path / "aoi.dbf"
    before = dbf.read_bytes()
    assert run("segment", src, tmp_path / "x.tif", *common, "--report", dbf) == 2
    assert "the --mask file" in capsys.readouterr().err and dbf.read_bytes() == before


@pytest.mark.parametrize("res", [7, 3.3])  # area average over 1.4 source pixels; bilinear
def test_resampling_around_nodata_does_not_depend_on_the_window(tmp_path, res):
    """NGI tile 1 (5 m, nodata 0 at its edges): nodata pixels carry no weight, wherever a window cuts."""
    src = need("ngi_aerial/ngi_rgb_byte_1.tif")
    outs = []
    for tile in (48, 4096):
        segment_raster(src, tmp_path / f"{tile}.tif", SegmentOptions(k=4, model="kmeans", tile=tile, resolution=res,
                                                                   extent=(-57200, -3726000, -55500, -3723800)),
                       **QUIET)
        outs.append(grid(tmp_path / f"{tile}.tif"))
    (a, t, _, nodata), (b, _, _, _) = outs
    assert nodata == 255 and 0.02 < (a == 255).mean() < 0.5 and t.a == pytest.approx(res)
    np.testing.assert_array_equal(a, b)
