"""mapseg through GDAL's own bindings (osgeo), the way it runs inside QGIS: no rasterio, no torch.

The GDAL path runs in the system Python that carries ``osgeo`` (Debian's python3-gdal, installed with
QGIS: ``apt-get install qgis python3-qgis``), with this repository on PYTHONPATH and MAPSEG_IO=gdal.
Its output must equal the rasterio path's: labels, CRS, transform, nodata, colour table.
Skipped with the reason when no such Python is present.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
torch = pytest.importorskip("torch")
from affine import Affine  # noqa: E402

import mapseg.segment as seg  # noqa: E402
from mapseg.segment import SegmentOptions, segment_raster  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAIP = ROOT / "examples" / "naip_nd_2020_rgb.tif"
SHIPPED = ROOT / "model" / "best"
SYSTEM_PY = shutil.which("python3", path="/usr/bin")


def _gdal_python() -> str | None:
    if not SYSTEM_PY:
        return None
    r = subprocess.run([SYSTEM_PY, "-c", "from osgeo import gdal, gdal_array; import numpy"], capture_output=True)
    return SYSTEM_PY if r.returncode == 0 else None


GDAL_PY = _gdal_python()
pytestmark = pytest.mark.skipif(GDAL_PY is None, reason="no system Python with osgeo (GDAL bindings) and numpy: "
                                                        "apt-get install python3-gdal (comes with python3-qgis)")

SCRIPT = """
import json, sys
from mapseg.segment import SegmentOptions, segment_raster
r = segment_raster(sys.argv[1], sys.argv[2],
                   SegmentOptions(k=int(sys.argv[3]), model=sys.argv[4], backend="numpy", tile=int(sys.argv[5])),
                   progress=False, log=lambda m: None)
mods = [m for m in ("torch", "rasterio") if m in sys.modules]
print(json.dumps({"io": r["io"], "backend": r["backend"], "imported": mods}))
"""


FIT_SCRIPT = """
import json, sys
import numpy as np
from mapseg.cluster import fit_centers
r = fit_centers(np.load(sys.argv[1]), np.load(sys.argv[2]), int(sys.argv[3]), "cosine", "embedding", {}, seed=0)
print(json.dumps(r.to_json()["centers"]))
"""


def run_gdal(src, out, k, model, tile=64, script=SCRIPT):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MAPSEG_IO": "gdal"}
    env.pop("VIRTUAL_ENV", None)
    r = subprocess.run([GDAL_PY, "-c", script, str(src), str(out), str(k), str(model), str(tile)], env=env,
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def model(export_tiny_student):
    return export_tiny_student(max_k=6)


def _raster(path, nodata=None):
    rng = np.random.default_rng(0)
    h, w = 90, 123
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 2) % 256, (yy * 3) % 256, ((xx + yy) * 5) % 256]).astype(np.uint8)
    img = np.clip(img.astype(int) + rng.integers(0, 20, img.shape), 1, 255).astype(np.uint8)
    if nodata is not None:
        img[:, :10, :] = nodata
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=3, dtype="uint8", crs="EPSG:32633",
                       transform=Affine(2.0, 0, 400000.0, 0, -2.0, 5000000.0), nodata=nodata) as ds:
        ds.write(img)
    return path


@pytest.mark.parametrize("nodata", [None, 0])
def test_gdal_io_equals_rasterio_io(tmp_path, model, nodata):
    src = _raster(tmp_path / "in.tif", nodata)
    segment_raster(src, tmp_path / "rio.tif", SegmentOptions(k=4, model=model, backend="numpy", tile=64),
                   progress=False, log=lambda m: None)
    info = run_gdal(src, tmp_path / "gdal.tif", 4, model, tile=32)
    assert info["io"] == "gdal" and info["backend"] == "numpy"
    assert info["imported"] == []          # neither torch nor rasterio was needed
    with rasterio.open(tmp_path / "rio.tif") as a, rasterio.open(tmp_path / "gdal.tif") as b:
        assert np.array_equal(a.read(1), b.read(1))
        assert a.crs == b.crs and a.transform.almost_equals(b.transform)
        assert a.nodata == b.nodata == (None if nodata is None else 255)
        assert a.colormap(1) == b.colormap(1)
        assert b.profile["tiled"] and b.profile["compress"] == "deflate"
        assert b.tags()["MAPSEG_K"] == "4"
    assert not list(tmp_path.glob(".*part*"))


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_gdal_io_keeps_gcp_georeference(tmp_path):
    from rasterio.control import GroundControlPoint
    from rasterio.crs import CRS

    src = _raster(tmp_path / "in.tif")
    with rasterio.open(src) as ds:
        img = ds.read()
    gcps = [GroundControlPoint(row=0, col=0, x=8.5, y=47.4), GroundControlPoint(row=90, col=123, x=8.51, y=47.39),
            GroundControlPoint(row=0, col=123, x=8.51, y=47.4, z=12.5)]
    gsrc = tmp_path / "gcp.tif"
    with rasterio.open(gsrc, "w", driver="GTiff", width=img.shape[2], height=img.shape[1], count=3,
                       dtype="uint8") as ds:
        ds.write(img)
        ds.gcps = (gcps, CRS.from_epsg(4326))
    run_gdal(gsrc, tmp_path / "gdal.tif", 3, "kmeans")
    with rasterio.open(tmp_path / "gdal.tif") as b:
        points, crs = b.gcps
        assert crs == CRS.from_epsg(4326) and b.transform.is_identity
        assert [(g.row, g.col, g.x, g.y, g.z or 0.0) for g in points] == [(g.row, g.col, g.x, g.y, g.z or 0.0)
                                                                          for g in gcps]


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_gdal_reader_errors_are_clear(tmp_path):
    with rasterio.open(tmp_path / "four.tif", "w", driver="GTiff", width=8, height=8, count=4, dtype="uint8") as ds:
        ds.write(np.zeros((4, 8, 8), np.uint8))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MAPSEG_IO": "gdal"}
    code = ("import sys\nfrom mapseg.raster import open_reader, RasterError\n"
            "try:\n    open_reader(sys.argv[1])\nexcept RasterError as e:\n    print(e)\n")
    r = subprocess.run([GDAL_PY, "-c", code, str(tmp_path / "four.tif")], env=env, capture_output=True, text=True)
    assert "has 4 band(s)" in r.stdout and "--bands" in r.stdout, r.stderr
    r = subprocess.run([GDAL_PY, "-c", code, str(tmp_path / "missing.tif")], env=env, capture_output=True, text=True)
    assert "does not exist" in r.stdout, r.stderr


def test_venv_and_qgis_python_agree_on_the_naip_raster(tmp_path, monkeypatch):
    """The same raster, model, K and seed here (numpy 2.x, rasterio, its OpenBLAS) and in QGIS's Python (numpy 1.x,
    GDAL, Debian's OpenBLAS): >= 99.9 % of the labels agree, and k-means on one sample gives the same centres bit
    for bit in both (it differed in the last bits before the fit summed exactly). The samples themselves differ in
    the last bits (the network's products on two BLAS builds), which is why labels are compared by agreement."""
    k = 5
    sample = {}
    fit = seg.fit_centers

    def keep_sample(features, colours, *args, **kwargs):
        sample["features"], sample["colours"] = features, colours
        return fit(features, colours, *args, **kwargs)

    monkeypatch.setattr(seg, "fit_centers", keep_sample)
    report = segment_raster(NAIP, tmp_path / "venv.tif", SegmentOptions(k=k, model=SHIPPED, backend="numpy"),
                            progress=False, log=lambda m: None)
    info = run_gdal(NAIP, tmp_path / "qgis.tif", k, SHIPPED, tile=1024)
    assert info["io"] == "gdal" and report["io"] == "rasterio"
    with rasterio.open(tmp_path / "venv.tif") as a, rasterio.open(tmp_path / "qgis.tif") as b:
        here, there = a.read(1), b.read(1)
    agreement = np.mean(here == there)
    assert agreement >= 0.999, f"{100 * agreement:.3f} % of the labels agree"

    np.save(tmp_path / "f.npy", sample["features"])
    np.save(tmp_path / "c.npy", sample["colours"])
    mine = fit(sample["features"], sample["colours"], k, "cosine", "embedding", {}, seed=0)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("VIRTUAL_ENV", None)
    r = subprocess.run([GDAL_PY, "-c", FIT_SCRIPT, str(tmp_path / "f.npy"), str(tmp_path / "c.npy"), str(k)],
                       env=env, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == mine.to_json()["centers"]


@pytest.mark.data
def test_venv_and_qgis_python_agree_on_a_raster_with_nodata(tmp_path):
    """The same agreement (>= 99.9 % of the labels) on a real aerial raster with nodata at its edges (NGI, South
    Africa, nodata 0), K=5: rasterio and numpy 2.x here, GDAL and numpy 1.x in QGIS's Python."""
    ngi = ROOT.parent / "shared" / "datasets" / "ngi_aerial" / "ngi_rgb_byte_1.tif"
    if not ngi.is_file():
        pytest.skip(f"{ngi} not found (../shared/datasets)")
    segment_raster(ngi, tmp_path / "venv.tif", SegmentOptions(k=5, model=SHIPPED, backend="numpy"),
                   progress=False, log=lambda m: None)
    info = run_gdal(ngi, tmp_path / "qgis.tif", 5, SHIPPED, tile=1024)
    assert info["io"] == "gdal"
    with rasterio.open(tmp_path / "venv.tif") as a, rasterio.open(tmp_path / "qgis.tif") as b:
        here, there = a.read(1), b.read(1)
        nodata = a.nodata
    assert (here == nodata).any() and ((here == nodata) == (there == nodata)).all()   # the same nodata cells
    agreement = np.mean(here == there)
    assert agreement >= 0.999, f"{100 * agreement:.3f} % of the labels agree"
