"""mapseg:fit and mapseg:segment's area, mask, resolution, legend and minimum area, in real headless QGIS.

One QGIS process (tests/qgis/pyqgis_checks.py ``workflow``, the development checkout's plugin folder, a
fresh profile) runs every algorithm call on crops of two real NGI aerial rasters; the test then reads the
outputs with rasterio. Colour k-means keeps it fast: the network path is tested in test_qgis_plugin.py.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import QGIS_PY, crop_raster, needs_qgis

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets"


pytestmark = needs_qgis() + [pytest.mark.data]

rasterio = pytest.importorskip("rasterio")
shapely = pytest.importorskip("shapely")
pyogrio = pytest.importorskip("pyogrio")

LEGEND = {"classes": [{"value": 0, "name": "water", "color": "#1f78b4"},
                      {"value": 2, "name": "roofs", "color": "#e31a1c"}]}
NAMES = {"0": "water", "1": "segment 1", "2": "roofs", "3": "segment 3"}


def _to_4326(src: Path, dst: Path) -> Path:
    """``src`` warped to EPSG:4326 (degrees): areas in m² need the latitude."""
    from rasterio.warp import Resampling, calculate_default_transform, reproject

    with rasterio.open(src) as ds:
        transform, w, h = calculate_default_transform(ds.crs, "EPSG:4326", ds.width, ds.height, *ds.bounds)
        profile = ds.profile | {"crs": "EPSG:4326", "transform": transform, "width": w, "height": h}
        with rasterio.open(dst, "w", **profile) as out:
            for b in range(1, ds.count + 1):
                reproject(rasterio.band(ds, b), rasterio.band(out, b), resampling=Resampling.nearest)
    return dst


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    from rasterio.warp import transform_bounds, transform_geom

    sources = [DATA / "ngi_aerial" / "ngi_rgb_byte_1.tif", DATA / "ngi_aerial" / "ngi_rgb_byte_2.tif"]
    for src in sources:
        if not src.is_file():
            pytest.skip(f"{src} not found (../shared/datasets)")
    tmp = tmp_path_factory.mktemp("qgis_algorithms")
    r0 = crop_raster(sources[0], tmp / "r0.tif", (0, 0, 300, 260))      # nodata (0) in the top-left corner
    r1 = crop_raster(sources[1], tmp / "r1.tif", (100, 100, 300, 260))
    geo = _to_4326(r1, tmp / "r1_4326.tif")
    (tmp / "legend.json").write_text(json.dumps(LEGEND))
    (tmp / "bad_legend.json").write_text(json.dumps({"classes": [{"value": 7, "name": "x"}]}))
    with rasterio.open(r0) as ds:
        crs, b = ds.crs, ds.bounds
    inner = (b.left + 200, b.bottom + 300, b.left + 900, b.bottom + 1000)   # in the raster's CRS (metres)
    ext = transform_bounds(crs, "EPSG:4326", *inner)                          # given to QGIS in degrees
    triangle = [(b.left + 300, b.bottom + 200), (b.left + 1200, b.bottom + 200), (b.left + 800, b.bottom + 1100)]
    ring = transform_geom(crs, "EPSG:4326", {"type": "Polygon", "coordinates": [triangle + triangle[:1]]})
    wkt = "POLYGON((" + ",".join(f"{x!r} {y!r}" for x, y in ring["coordinates"][0]) + "))"
    # the triangle in files: a GeoJSON of one layer (passed on as it is), a GeoPackage of two layers (its
    # layer copied out: mapseg takes a file of one layer)
    poly = shapely.Polygon(triangle)
    pyogrio.raw.write(tmp / "mask.geojson", np.array([shapely.to_wkb(shapely.Polygon(ring["coordinates"][0]))],
                                                     dtype=object), [], [], geometry_type="Polygon",
                      crs="EPSG:4326", driver="GeoJSON")
    for layer, geom in (("parcels", poly), ("other", shapely.box(*inner))):
        pyogrio.raw.write(tmp / "masks.gpkg", np.array([shapely.to_wkb(geom)], dtype=object), [], [],
                          geometry_type="Polygon", crs=crs.to_wkt(), layer=layer, driver="GPKG",
                          append=layer == "other")
    common = {"MODEL": 2, "TILE": 128}
    spec = {
        "fit": {"INPUTS": [str(r0), str(r1)], "K": 4, "MODEL": 2, "LEGEND": str(tmp / "legend.json"),
                "OUTPUT": str(tmp / "centers.json")},
        "runs": [
            {"name": "a", "load": True, "params": {"INPUT": str(r0), "CENTERS": "@centers",
                                                   "OUTPUT": str(tmp / "a.tif"), **common}},
            {"name": "b", "params": {"INPUT": str(r1), "CENTERS": "@centers", "OUTPUT": str(tmp / "b.tif"), **common}},
            {"name": "extent", "params": {"INPUT": str(r0), "K": 4, "OUTPUT": str(tmp / "ext.tif"), **common,
                                          "EXTENT": f"{ext[0]!r},{ext[2]!r},{ext[1]!r},{ext[3]!r} [EPSG:4326]"}},
            {"name": "mask", "mask_wkt": wkt, "mask_crs": "EPSG:4326",
             "params": {"INPUT": str(r0), "K": 4, "OUTPUT": str(tmp / "mask.tif"), **common}},
            {"name": "mask_geojson", "params": {"INPUT": str(r0), "K": 4, "MASK": str(tmp / "mask.geojson"),
                                                "OUTPUT": str(tmp / "mask_geojson.tif"), **common}},
            {"name": "mask_gpkg_layer", "params": {"INPUT": str(r0), "K": 4,
                                                   "MASK": f"{tmp / 'masks.gpkg'}|layername=parcels",
                                                   "OUTPUT": str(tmp / "mask_gpkg.tif"), **common}},
            {"name": "resolution", "params": {"INPUT": str(r0), "K": 4, "RESOLUTION": 10,
                                              "OUTPUT": str(tmp / "res.tif"), **common}},
            {"name": "staircase", "params": {"INPUT": str(r0), "K": 4, "OUTPUT": str(tmp / "stairs.tif"),
                                             "OUTPUT_POLYGONS": str(tmp / "stairs.gpkg"), "MIN_AREA": 400, **common}},
            {"name": "simplified", "params": {"INPUT": str(r0), "K": 4, "OUTPUT": str(tmp / "simple.tif"),
                                              "OUTPUT_POLYGONS": str(tmp / "simple.gpkg"), "MIN_AREA": 400,
                                              "SIMPLIFY": 15, **common}},
            {"name": "up_model", "params": {"INPUT": str(r0), "K": 4, "MODEL": 0, "TILE": 128,
                                            "OUTPUT": str(tmp / "up_model.tif")}},
            {"name": "up_nearest", "params": {"INPUT": str(r0), "K": 4, "MODEL": 0, "TILE": 128, "UPSAMPLE": 2,
                                              "OUTPUT": str(tmp / "up_nearest.tif")}},
            {"name": "min_area", "params": {"INPUT": str(geo), "K": 4, "OUTPUT": str(tmp / "geo.tif"),
                                            "OUTPUT_POLYGONS": str(tmp / "geo.gpkg"), "MIN_AREA": 400,
                                            "LEGEND": str(tmp / "legend.json"), **common}}],
        "errors": [
            {"name": "fit_bad_legend", "alg": "mapseg:fit",
             "params": {"INPUTS": [str(r0)], "K": 4, "MODEL": 2, "LEGEND": str(tmp / "bad_legend.json"),
                        "OUTPUT": str(tmp / "bad.json")}},
            {"name": "fit_output_is_input", "alg": "mapseg:fit",
             "params": {"INPUTS": [str(r0)], "K": 4, "MODEL": 2, "OUTPUT": str(tmp / "legend.json"),
                        "LEGEND": str(tmp / "legend.json")}},
            {"name": "fit_cancelled", "alg": "mapseg:fit", "cancel_at": 0,
             "params": {"INPUTS": [str(r0), str(r1)], "K": 4, "MODEL": 2, "OUTPUT": str(tmp / "cancelled.json")}},
            {"name": "segment_bad_legend", "alg": "mapseg:segment",
             "params": {"INPUT": str(r0), "K": 4, "LEGEND": str(tmp / "bad_legend.json"),
                        "OUTPUT": str(tmp / "bad.tif"), **common}},
            {"name": "extent_misses", "alg": "mapseg:segment",
             "params": {"INPUT": str(r0), "K": 4, "EXTENT": "0,1,0,1 [EPSG:4326]", "OUTPUT": str(tmp / "miss.tif"),
                        **common}}]}
    (tmp / "spec.json").write_text(json.dumps(spec))
    (tmp / "home").mkdir()
    env = {**os.environ, "HOME": str(tmp / "home"), "QT_QPA_PLATFORM": "offscreen"}
    env.pop("VIRTUAL_ENV", None)
    # the development checkout's plugin folder: runtime.py takes the repository's mapseg and model
    r = subprocess.run([QGIS_PY, str(ROOT / "tests" / "qgis" / "pyqgis_checks.py"), "workflow",
                        str(ROOT / "qgis_plugin"), str(tmp / "spec.json"), str(tmp / "unused")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    return {"res": res, "tmp": tmp, "inner": inner, "triangle": triangle, "r0": r0, "r1": r1, "geo": geo}


def _read(path):
    with rasterio.open(path) as ds:
        return ds.read(1), ds.transform, ds.crs, ds.nodata


def test_algorithms_are_grouped_documented_and_declare_their_outputs(workflow):
    algs = workflow["res"]["algorithms"]
    for alg in algs.values():
        assert alg["group"] == "Segmentation" and alg["groupId"] == "segmentation"
        assert alg["helpUrl"] == (ROOT / "docs" / "qgis.md").as_uri()
    seg = algs["mapseg:segment"]
    assert seg["outputs"] == {"OUTPUT": "outputRaster", "OUTPUT_POLYGONS": "outputVector", "K": "outputNumber",
                              "MEGAPIXELS_PER_S": "outputNumber", "BACKEND": "outputString",
                              "SCALING": "outputString"}
    assert seg["advanced"] == ["BACKEND", "COG", "INPUT_MAX", "SMOOTH", "TILE", "UPSAMPLE"]
    assert algs["mapseg:fit"]["outputs"] == {"OUTPUT": "outputFile", "K": "outputNumber"}
    a = workflow["res"]["runs"]["a"]["results"]
    assert a["K"] == 4 and a["BACKEND"] == "none" and a["SCALING"] == "x / 255 (uint8)"
    assert a["MEGAPIXELS_PER_S"] > 0
    assert workflow["res"]["imported"] == []


def test_upsampling_is_the_models_own_unless_chosen(workflow):
    """UPSAMPLE: the model's own (the shipped model's guided upsampling) or nearest, whose labels are whole
    4 x 4 cells; the same centres-free run otherwise, so the two differ only along edges."""
    res, tmp = workflow["res"], workflow["tmp"]
    for name in ("up_model", "up_nearest"):
        assert res["runs"][name]["ok"], res["runs"][name]
    assert "upsampling: guided" in res["runs"]["up_model"]["log"]
    assert "upsampling: nearest" in res["runs"]["up_nearest"]["log"]
    model, nearest = _read(tmp / "up_model.tif")[0], _read(tmp / "up_nearest.tif")[0]
    h, w = (d // 4 * 4 for d in nearest.shape)
    cells = nearest[:h, :w].reshape(h // 4, 4, w // 4, 4).transpose(0, 2, 1, 3).reshape(-1, 16)
    valid = cells != 255
    assert all(len(set(c[v])) <= 1 for c, v in zip(cells, valid))
    assert ((model != nearest) & (model != 255)).mean() > 0.01


def test_fit_then_segment_gives_two_rasters_the_same_labels_and_names(workflow):
    res, tmp = workflow["res"], workflow["tmp"]
    assert res["fit"]["ok"], res["fit"]
    assert res["fit"]["results"] == {"OUTPUT": str(tmp / "centers.json"), "K": 4}
    assert "on 2 raster(s)" in res["fit"]["log"]
    centers = json.loads((tmp / "centers.json").read_text())
    assert {c["value"]: c["name"] for c in centers["legend"]["classes"]} == {int(k): v for k, v in NAMES.items()}
    for name in ("a", "b"):
        run = res["runs"][name]
        assert run["ok"], run
        assert run["opened"] == {"renderer": "paletted", "classes": NAMES}    # OUT.qml, read by QGIS
    # the layer Processing adds to the project (runAndLoadResults, as the toolbox does) shows the names
    assert res["runs"]["a"]["loaded"] == [{"source": str(tmp / "a.tif"), "renderer": "paletted", "classes": NAMES}]
    # same label, same meaning: each label's mean colour in one raster is nearest to its own in the other
    means = []
    for name, src in (("a", workflow["r0"]), ("b", workflow["r1"])):
        labels = _read(tmp / f"{name}.tif")[0]
        with rasterio.open(src) as ds:
            rgb = ds.read().astype(float)
        assert set(np.unique(labels)) <= {0, 1, 2, 3, 255}
        means.append({v: rgb[:, labels == v].mean(axis=1) for v in range(4) if (labels == v).sum() > 50})
    common = sorted(set(means[0]) & set(means[1]))
    assert len(common) >= 3
    for v in common:
        nearest = min(common, key=lambda u: np.abs(means[1][u] - means[0][v]).sum())
        assert nearest == v, (v, means)


def test_extent_in_another_crs_mask_layer_and_resolution(workflow):
    res, tmp = workflow["res"], workflow["tmp"]
    labels0, t0, crs0, _ = _read(workflow["r0"])
    # extent given in EPSG:4326: its bounding box in the raster's CRS, snapped outward to whole pixels
    run = res["runs"]["extent"]
    assert run["ok"], run
    labels, t, crs, _ = _read(tmp / "ext.tif")
    assert crs == crs0 and (t.a, t.e) == (t0.a, t0.e)
    left, top = t.c, t.f
    right, bottom = left + labels.shape[1] * t.a, top + labels.shape[0] * t.e
    x0, y0, x1, y1 = workflow["inner"]
    assert ((left - t0.c) / 5) % 1 == 0 and ((top - t0.f) / 5) % 1 == 0           # on the source grid
    assert x0 - 20 < left <= x0 and y1 <= top < y1 + 20 and x1 <= right < x1 + 20 and y0 - 20 < bottom <= y0
    # mask: a memory layer (written to a temporary file for mapseg), in EPSG:4326; outside it nodata
    run = res["runs"]["mask"]
    assert run["ok"] and "pixels outside the 1 polygon(s)" in run["log"], run
    labels, t, crs, nodata = _read(tmp / "mask.tif")
    assert crs == crs0 and nodata == 255
    rows, cols = np.mgrid[0:labels.shape[0], 0:labels.shape[1]]
    xs, ys = t.c + (cols + 0.5) * t.a, t.f + (rows + 0.5) * t.e
    triangle = shapely.Polygon(workflow["triangle"])
    inside = shapely.contains_xy(triangle, xs, ys)
    # centres on an edge (the half-open rule, docs/runtime.md, decides them) are left out of the comparison
    clear = shapely.distance(shapely.points(xs, ys), triangle.exterior) > 0.01
    assert (inside & clear).sum() > 1000 and (~inside & clear).sum() > 1000
    assert (labels[~inside & clear] == 255).all()
    assert (labels[inside & clear] != 255).mean() > 0.99            # the source's own nodata corner aside
    # the same polygon from a GeoJSON file (read by mapseg itself) and from one layer of a GeoPackage
    assert f"mask: {tmp / 'mask.geojson'}" in res["runs"]["mask_geojson"]["log"]
    log = res["runs"]["mask_gpkg_layer"]["log"]
    assert "mask: " in log and f"mask: {tmp / 'masks.gpkg'}" not in log        # a copy of the one layer
    for name in ("mask_geojson", "mask_gpkg_layer"):
        assert res["runs"][name]["ok"], res["runs"][name]
        other, t2, _, _ = _read(tmp / f"{name.replace('_layer', '')}.tif")
        assert t2 == t and ((other == 255) == (labels == 255))[clear].all(), name
    xmin, ymin, xmax, ymax = shapely.Polygon(workflow["triangle"]).bounds
    assert xmin - 5 < t.c <= xmin and ymax <= t.f < ymax + 5   # covers the polygon's bounds
    # resolution: 10 m pixels on the same CRS, the raster's whole area
    run = res["runs"]["resolution"]
    assert run["ok"], run
    labels, t, crs, _ = _read(tmp / "res.tif")
    assert crs == crs0 and (t.a, t.e) == (10, -10) and labels.shape == (130, 150) and (t.c, t.f) == (t0.c, t0.f)


def test_minimum_area_is_in_square_metres_on_a_geographic_raster(workflow):
    res, tmp = workflow["res"], workflow["tmp"]
    run = res["runs"]["min_area"]
    assert run["ok"], run
    with rasterio.open(workflow["geo"]) as ds:
        t, h = ds.transform, ds.height
    lat = math.radians(t.f + h / 2 * t.e)
    # a pixel of degrees on the sphere, at the raster's middle row (the ellipsoid differs by well under 1 %)
    expect = (6371008.8 ** 2) * math.radians(t.a) * math.radians(-t.e) * math.cos(lat)
    line = [s for s in run["log"].splitlines() if s.startswith("a pixel covers")][0]
    area = float(line.split()[3])
    assert abs(area - expect) / expect < 0.01, (line, expect)
    pixels = math.ceil(400 / area)
    assert f"minimum area 400 m² = {pixels} pixels" in line and 10 < pixels < 30
    _, _, geoms, fields = pyogrio.raw.read(tmp / "geo.gpkg")
    polygons = shapely.from_wkb(geoms)
    sizes = shapely.area(polygons) / (t.a * -t.e)
    assert len(sizes) > 20 and sizes.min() >= pixels - 1e-6     # nothing under the minimum is left
    names = dict(zip(fields[0].tolist(), fields[1].tolist()))
    assert names == {int(k): v for k, v in NAMES.items()}


def test_errors_are_messages_not_tracebacks(workflow):
    errs = workflow["res"]["errors"]
    expect = {"fit_bad_legend": "names value(s) 7 but the run has K=4",
              "fit_output_is_input": "is the legend file",
              "segment_bad_legend": "names value(s) 7 but the run has K=4",
              "fit_cancelled": "Cancelled: no centres file was written",
              "extent_misses": "nothing to segment"}
    for name, message in expect.items():
        case = errs[name]
        assert not case["ok"] and case["raised"] is None and "Traceback" not in case["log"], (name, case)
        assert message in case["log"], (name, case["log"][-1500:])
    tmp = workflow["tmp"]
    assert "of " + str(workflow["r1"]) not in errs["fit_cancelled"]["log"]      # stopped after the first raster
    assert not (tmp / "cancelled.json").exists()
    assert not (tmp / "bad.json").exists() and not (tmp / "bad.tif").exists() and not (tmp / "miss.tif").exists()
    assert json.loads((tmp / "legend.json").read_text()) == LEGEND


def _vertices(geoms):
    return int(sum(shapely.get_num_coordinates(geoms)))


def test_simplified_polygons_keep_shared_edges(workflow):
    """SIMPLIFY (metres): fewer vertices, every polygon valid, no overlaps (the areas add up to their union) and no
    gaps (the union still covers the labelled pixels, to the simplification along nodata)."""
    res, tmp = workflow["res"], workflow["tmp"]
    for name in ("staircase", "simplified"):
        assert res["runs"][name]["ok"], res["runs"][name]
    line = [s for s in res["runs"]["simplified"]["log"].splitlines() if s.startswith("simplified the outlines")][0]
    assert line.startswith("simplified the outlines at 15 m (") and "shared edges kept" in line, line
    assert abs(float(line.split("(")[1].split()[0]) - 15) < 0.01, line      # 5 m pixels: 15 m = 15 map units
    labels, t, _, _ = _read(tmp / "simple.tif")
    assert (labels == _read(tmp / "stairs.tif")[0]).all()
    stairs = shapely.from_wkb(pyogrio.raw.read(tmp / "stairs.gpkg")[2])
    simple = shapely.from_wkb(pyogrio.raw.read(tmp / "simple.gpkg")[2])
    assert shapely.is_valid(simple).all() and len(simple) >= 0.8 * len(stairs)
    assert _vertices(simple) < 0.5 * _vertices(stairs), (_vertices(simple), _vertices(stairs))
    union = shapely.union_all(simple).area
    assert abs(shapely.area(simple).sum() - union) < 1e-6 * union                  # no overlaps
    covered = (labels != 255).sum() * t.a * -t.e
    assert abs(union - covered) < 0.01 * covered, (union, covered)                   # no gaps
    # each simplified polygon lies where its region was: its area is mostly inside the staircase union
    assert shapely.intersection(shapely.union_all(stairs), shapely.union_all(simple)).area > 0.99 * union
