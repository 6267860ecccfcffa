"""The QGIS plugin in real, headless QGIS (3.22 from Debian): packaging, loading, qgis_process, cancel, dialog.

Needs ``apt-get install -y --no-install-recommends qgis python3-qgis`` (``.ci/run`` installs it);
skipped with the reason when ``qgis_process.bin`` or QGIS's Python is absent. The algorithm runs in
QGIS's own Python, which has neither torch nor rasterio: the tests check neither gets imported.
"""
from __future__ import annotations

import configparser
import json
import os
import sqlite3
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import QGIS_PROCESS, QGIS_PY, crop_raster, needs_qgis

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets"


pytestmark = needs_qgis()

rasterio = pytest.importorskip("rasterio")
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    """The built zip, installed into a fresh QGIS profile (as "Install from ZIP" would) and enabled."""
    from training.artifact import export_artifact
    from training.models.student_cnn import StudentEmbeddingNet

    tmp = tmp_path_factory.mktemp("qgis")
    torch.manual_seed(0)
    model = tmp / "model"
    export_artifact(StudentEmbeddingNet(embed_dim=8, width=16, depth=2, norm_groups=4), {"model": {"max_k": 8}},
                    model, {"score": 0.0, "step": 0})
    r = subprocess.run([sys.executable, str(ROOT / "qgis_plugin" / "build.py"), "--out", str(tmp / "dist"),
                        "--model", str(model)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    zips = list((tmp / "dist").glob("map_segmenter-*.zip"))
    assert len(zips) == 1
    plugins = tmp / "plugins"
    plugins.mkdir()
    with zipfile.ZipFile(zips[0]) as z:
        z.extractall(plugins)
    env = {**os.environ, "HOME": str(tmp / "home"), "QT_QPA_PLATFORM": "offscreen", "QGIS_PLUGINPATH": str(plugins)}
    env.pop("VIRTUAL_ENV", None)
    (tmp / "home").mkdir()
    r = subprocess.run([QGIS_PROCESS, "plugins", "enable", "map_segmenter"], env=env, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    return {"zip": zips[0], "plugins": plugins, "env": env, "tmp": tmp}


def test_zip_is_an_installable_plugin(plugin):
    with zipfile.ZipFile(plugin["zip"]) as z:
        names = set(z.namelist())
        meta = configparser.ConfigParser()
        meta.read_string(z.read("map_segmenter/metadata.txt").decode())
    assert {"map_segmenter/__init__.py", "map_segmenter/metadata.txt", "map_segmenter/icon.png",
            "map_segmenter/mapseg/segment.py", "map_segmenter/mapseg/raster/gdal_io.py",
            "map_segmenter/model/model.npz", "map_segmenter/model/meta.json"} <= names
    assert not any("torch" in n or n.startswith("map_segmenter/training") for n in names)
    g = meta["general"]
    assert g["hasProcessingProvider"] == "yes" and g["icon"] == "icon.png" and g["qgisMinimumVersion"] == "3.22"


def test_plugin_loads_and_registers_the_algorithms(plugin):
    r = subprocess.run([QGIS_PROCESS, "plugins"], env=plugin["env"], capture_output=True, text=True, timeout=180)
    assert "* map_segmenter" in r.stdout, r.stdout
    r = subprocess.run([QGIS_PROCESS, "help", "mapseg:segment"], env=plugin["env"], capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0 and "Number of segments (K)" in r.stdout, r.stdout + r.stderr
    for name in ("EXTENT", "MASK", "RESOLUTION", "LEGEND", "MIN_AREA", "MEGAPIXELS_PER_S"):
        assert name in r.stdout, name
    r = subprocess.run([QGIS_PROCESS, "help", "mapseg:fit"], env=plugin["env"], capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0 and "Input rasters" in r.stdout and "Centres file" in r.stdout, r.stdout + r.stderr


@pytest.mark.data
@pytest.mark.parametrize("model", [0, 2], ids=["default-model", "colour-kmeans"])
def test_qgis_process_segments_a_real_raster(plugin, tmp_path, model):
    src = DATA / "ngi_aerial" / "ngi_rgb_byte_1.tif"
    if not src.is_file():
        pytest.skip(f"{src} not found (../shared/datasets)")
    crop = crop_raster(src, tmp_path / "crop.tif", (0, 0, 300, 260))     # the top-left corner holds nodata (0)
    out = tmp_path / "seg.tif"
    r = subprocess.run([QGIS_PROCESS, "run", "mapseg:segment", f"--INPUT={crop}", "--K=4", f"--MODEL={model}",
                        "--TILE=128", f"--OUTPUT={out}", "--OUTPUT_POLYGONS=" + str(tmp_path / "seg.gpkg"),
                        "--MIN_AREA=400"],
                       env=plugin["env"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "raster I/O: gdal" in r.stdout
    with rasterio.open(crop) as a, rasterio.open(out) as b:
        assert b.crs == a.crs and b.transform.almost_equals(a.transform) and (b.width, b.height) == (a.width, a.height)
        assert b.dtypes[0] == "uint8" and b.nodata == 255
        labels = b.read(1)
        nodata = (a.read() == 0).all(axis=0)
    assert nodata.any() and (labels[nodata] == 255).all()
    assert set(np.unique(labels[~nodata])) == {0, 1, 2, 3}
    with sqlite3.connect(tmp_path / "seg.gpkg") as db:
        n = db.execute("select count(*) from segments").fetchone()[0]
    assert n > 0


def _pyqgis(plugin, check, raster, out, timeout=300):
    r = subprocess.run([QGIS_PY, str(ROOT / "tests" / "qgis" / "pyqgis_checks.py"), check, str(plugin["plugins"]),
                        str(raster), str(out)], env=plugin["env"], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _synthetic_raster(path: Path, size=(384, 320)):
    from affine import Affine

    rng = np.random.default_rng(1)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx // 40 * 50) % 256, (yy // 40 * 70) % 256, ((xx + yy) // 50 * 30) % 256]).astype(np.uint8)
    img = np.clip(img + rng.integers(0, 25, img.shape), 1, 255).astype(np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=3, dtype="uint8", crs="EPSG:32634",
                       transform=Affine(1.0, 0, 600000.0, 0, -1.0, 6000000.0)) as ds:
        ds.write(img)
    return path


def test_cancel_stops_the_run_and_leaves_no_output(plugin, tmp_path):
    src = _synthetic_raster(tmp_path / "in.tif")
    res = _pyqgis(plugin, "cancel", src, tmp_path / "out.tif")
    assert res["ok"] is False and "Cancelled" in (res["error"] or "")
    assert res["output_exists"] is False and res["leftovers"] == []
    assert res["last_progress"] < 100
    assert res["imported"] == []       # no torch, no rasterio, no onnxruntime in QGIS's Python here
    # the algorithm's help: the docs/qgis.md the zip bundles
    assert res["help_url"] == (plugin["plugins"] / "map_segmenter" / "docs" / "qgis.md").as_uri()


def test_dialog_runs_a_background_task_and_adds_a_paletted_layer(plugin, tmp_path):
    src = _synthetic_raster(tmp_path / "in.tif")
    res = _pyqgis(plugin, "dialog", src, tmp_path / "out.tif")
    assert res["complete"] and res["layers"] == 1
    assert res["renderer"] == "paletted" and res["crs_same"]
    assert res["classes"] == [0, 1, 2, 3]
    assert "torch" not in res["imported"]


def test_bad_inputs_are_messages_in_the_feedback_not_tracebacks(plugin, tmp_path):
    """Issue 16 through the Processing algorithm: an output that is the input, a missing folder, a corrupt
    raster, a one-pixel raster: a message in QGIS's feedback, no traceback, no output; a 3x5 raster and
    12-bit imagery: the right result, the scaling stated in the log (and taken from INPUT_MAX when given)."""
    src = _synthetic_raster(tmp_path / "in.tif")
    before = src.read_bytes()
    big = np.tile(rasterio.open(src).read(), (1, 3, 3))
    with rasterio.open(src) as ds:
        profile = ds.profile | {"width": big.shape[2], "height": big.shape[1], "tiled": True, "blockxsize": 64,
                                "blockysize": 64, "compress": "deflate"}
    with rasterio.open(tmp_path / "big.tif", "w", **profile) as ds:
        ds.write(big)
    data = (tmp_path / "big.tif").read_bytes()
    (tmp_path / "corrupt.tif").write_bytes(data[:len(data) // 3])
    with rasterio.open(src) as ds:
        twelve = (ds.read().astype(np.int64) * 4095 // 255).astype(np.uint16)
        with rasterio.open(tmp_path / "u12.tif", "w", **(ds.profile | {"dtype": "uint16"}), nbits=12) as out:
            out.write(twelve)
        for name, shape in (("one.tif", (1, 1)), ("small.tif", (3, 5))):
            with rasterio.open(tmp_path / name, "w", **(ds.profile | {"height": shape[0], "width": shape[1],
                                                                       "tiled": False})) as out:
                out.write(ds.read(window=((0, shape[0]), (37, 37 + shape[1]))))
    outs = tmp_path / "outs"
    outs.mkdir()
    cases = {"same": (src, src, {}), "no_folder": (src, tmp_path / "no" / "o.tif", {}),
             "corrupt": (tmp_path / "corrupt.tif", outs / "corrupt.tif", {}),
             "one_pixel": (tmp_path / "one.tif", outs / "one.tif", {}),
             "small": (tmp_path / "small.tif", outs / "small.tif", {"K": 2, "MODEL": 2}),
             "twelve_bit": (tmp_path / "u12.tif", outs / "u12.tif", {}),
             "input_max": (tmp_path / "u12.tif", outs / "u12m.tif", {"INPUT_MAX": 4095})}
    spec = [{"name": name, "params": {"INPUT": str(i), "OUTPUT": str(o), "K": 4, "MODEL": 0, "TILE": 64, **extra}}
            for name, (i, o, extra) in cases.items()]
    (tmp_path / "cases.json").write_text(json.dumps(spec))
    res = _pyqgis(plugin, "cases", tmp_path / "cases.json", tmp_path / "unused.tif")["cases"]
    for name, case in res.items():
        assert case["raised"] is None and "Traceback" not in case["log"], (name, case)
        assert case["leftovers"] == [], (name, case)
    expect_error = {"same": "is the input raster", "no_folder": "does not exist",
                    "corrupt": "truncated or corrupt", "one_pixel": "a single cell of 4 x 4 pixels"}
    for name, message in expect_error.items():
        assert not res[name]["ok"] and message in res[name]["log"], (name, res[name]["log"][-1500:])
        assert not res[name]["output_exists"] or name == "same", name
    assert src.read_bytes() == before
    for name in ("small", "twelve_bit", "input_max"):
        assert res[name]["ok"] and res[name]["output_exists"], (name, res[name]["log"][-1500:])
    assert "scaling: x / 4095 (uint16 with NBITS=12 in the file)" in res["twelve_bit"]["log"]
    assert "scaling: x / 4095 (uint16; input maximum given)" in res["input_max"]["log"]
    with rasterio.open(outs / "small.tif") as ds:
        assert ds.shape == (3, 5)
