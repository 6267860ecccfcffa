"""examples/gis_workflow.sh: area of interest, resolution, named classes and polygons in one run.

Runs the script (as the README shows it) into tmp_path with this interpreter's mapseg and checks what it
writes: the label raster and its sidecars, polygons carrying the legend's names, and the labels' grid
(2.5 m over the bounds of examples/naip_aoi.geojson reprojected to the raster's CRS).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
pytest.importorskip("shapely")
pyogrio = pytest.importorskip("pyogrio")
from rasterio.warp import transform

ROOT = Path(__file__).resolve().parents[1]
EX = ROOT / "examples"
RESOLUTION = 2.5  # what the script passes to --resolution


def test_committed_files_tie_together():
    legend = json.loads((EX / "naip_legend.json").read_text())
    centers_file = EX / "naip_centers.json"
    assert centers_file.stat().st_size < 50_000
    centers = json.loads(centers_file.read_text())
    assert centers["k"] == 5 and len(centers["centers"]) == 5
    assert centers["legend"] == legend                  # fitted with --legend examples/naip_legend.json
    region = centers["sample"]["rasters"][0]["region"]
    assert region["mask"] == "examples/naip_aoi.geojson" and region["resolution_m"] == RESOLUTION
    aoi = json.loads((EX / "naip_aoi.geojson").read_text())
    assert aoi["crs"]["properties"]["name"] == "urn:ogc:def:crs:OGC:1.3:CRS84"   # lon/lat, as RFC 7946
    assert [f["geometry"]["type"] for f in aoi["features"]] == ["Polygon"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gis_workflow_script(tmp_path):
    out = tmp_path / "out"
    cli = tmp_path / "mapseg"
    cli.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m mapseg "$@"\n')
    cli.chmod(0o755)
    res = subprocess.run(["bash", "examples/gis_workflow.sh", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, check=False, env={**os.environ, "MAPSEG": str(cli)})
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("labels.tif", "labels.qml", "labels.tif.aux.xml", "segments.gpkg"):
        assert (out / name).stat().st_size > 0, name

    legend = {c["value"]: c["name"] for c in json.loads((EX / "naip_legend.json").read_text())["classes"]}
    # the sidecars carry the names (from the centres file's legend)
    qml = (out / "labels.qml").read_text()
    aux = (out / "labels.tif.aux.xml").read_text()
    for name in legend.values():
        assert name in qml and name in aux

    # polygons: each feature's class is the legend's name of its label; every class occurs
    meta, _, geoms, fields = pyogrio.raw.read(out / "segments.gpkg")
    cols = dict(zip(meta["fields"], fields))
    assert len(geoms) > 20
    assert all(legend[int(v)] == c for v, c in zip(cols["label"], cols["class"]))
    assert set(cols["class"]) == set(legend.values())
    assert np.all(cols["area_m2"] > 0)

    # the labels' grid: 2.5 m pixels from the top-left corner of the mask's bounds in the raster's CRS
    with rasterio.open(EX / "naip_nd_2020_rgb.tif") as src:
        crs = src.crs
    aoi = json.loads((EX / "naip_aoi.geojson").read_text())
    ring = np.array(aoi["features"][0]["geometry"]["coordinates"][0])
    xs, ys = transform("EPSG:4326", crs, ring[:, 0].tolist(), ring[:, 1].tolist())
    xmin, xmax, ymin, ymax = min(xs), max(xs), min(ys), max(ys)
    with rasterio.open(out / "labels.tif") as lab:
        assert lab.crs == crs
        assert lab.res == (RESOLUTION, RESOLUTION)
        t = lab.transform
        assert t.b == 0 and t.d == 0
        assert t.c == pytest.approx(xmin, abs=1e-3) and t.f == pytest.approx(ymax, abs=1e-3)
        assert lab.width == round((xmax - xmin) / RESOLUTION)
        assert lab.height == round((ymax - ymin) / RESOLUTION)
        labels = lab.read(1)
        assert lab.nodata == 255
    assert set(np.unique(labels)) == {0, 1, 2, 3, 4, 255}   # 255: outside the (non-rectangular) polygon
    assert (labels != 255).mean() > 0.95
