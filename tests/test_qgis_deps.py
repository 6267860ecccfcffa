"""The plugin's dependency helper (qgis_plugin/map_segmenter/deps.py) in Debian's QGIS Python.

From a wheel folder this test prepares (pip download of onnxruntime and threadpoolctl for QGIS's Python
version and platform), ``deps.install`` runs QGIS's own pip (``/usr/bin/python3 -m pip``) into a
temporary private folder; then the plugin, loaded in QGIS's Python (headless QgsApplication) and in
``qgis_process.bin``, takes the onnx backend from that folder while numpy stays QGIS's own. The same
real raster is segmented with the numpy and the onnx backend and both speeds are printed (``-s``).
Skipped when QGIS is absent, or when the wheels cannot be downloaded (no network, no pip cache).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import QGIS_PROCESS, QGIS_PY, needs_qgis

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_PARENT = ROOT / "qgis_plugin"
DATA = ROOT.parent / "shared" / "datasets"
RASTER = DATA / "swissimage" / "big_img" / "1091-322_00.tif"


def _run_qgis_py(code: str, env_extra=None, timeout=300, check=True):
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", **(env_extra or {})}
    for name in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
        env.pop(name, None)
    r = subprocess.run([QGIS_PY, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


pytestmark = needs_qgis(process=False)

PRELUDE = f"import json, os, sys\nsys.path.insert(0, {str(PLUGIN_PARENT)!r})\nfrom map_segmenter import deps\n"


def _last_json(r):
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def qgis_python():
    """QGIS's Python: version, and numpy's version and path (which nothing here may change)."""
    r = _run_qgis_py("import json, sys, numpy; print(json.dumps([sys.version_info[0], sys.version_info[1], "
                     "numpy.__version__, numpy.__file__]))")
    major, minor, np_version, np_file = _last_json(r)
    return {"version": f"{major}.{minor}", "numpy": [np_version, np_file]}


@pytest.fixture(scope="module")
def wheels(tmp_path_factory, qgis_python):
    """onnxruntime and threadpoolctl wheels for QGIS's Python (version and Linux x86_64), as a user would have
    downloaded them on a computer with network access."""
    folder = tmp_path_factory.mktemp("wheels")
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--no-deps",
                        "--python-version", qgis_python["version"], "--platform", "manylinux_2_28_x86_64",
                        "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
                        "-d", str(folder), "onnxruntime", "threadpoolctl"],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        pytest.skip("cannot download the onnxruntime/threadpoolctl wheels: " + r.stderr.strip()[-300:])
    return folder


@pytest.fixture(scope="module")
def installed(tmp_path_factory, wheels, qgis_python):
    """deps.install from the wheel folder, with QGIS's own Python and pip, into a private folder."""
    target = tmp_path_factory.mktemp("profile") / "map_segmenter_deps"
    code = PRELUDE + (
        "before = deps.missing(); text_before = deps.status_text(); lines = []\n"
        f"report = deps.install({str(wheels)!r}, log=lines.append)\n"
        "import numpy\n"
        "from map_segmenter import runtime\n"
        "print(json.dumps({'before': before, 'choice': runtime.backend_choice('auto'), 'text_before': text_before,"
        " 'report': report, 'after': deps.missing(),"
        " 'text_after': deps.status_text(), 'log': lines, 'numpy': [numpy.__version__, numpy.__file__]}))")
    res = _last_json(_run_qgis_py(code, {"MAPSEG_QGIS_DEPS": str(target)}))
    if res["before"] != ["onnxruntime", "threadpoolctl"]:
        pytest.skip(f"QGIS's Python already has onnxruntime or threadpoolctl (missing: {res['before']}): "
                    "this test needs neither")
    return {"target": target, **res}


def test_install_from_a_wheel_folder_keeps_qgis_numpy(installed, qgis_python):
    target = installed["target"]
    assert "backend: numpy, one window at a time" in installed["text_before"]
    report = installed["report"]
    assert report["python"].startswith("/usr/bin/python3")
    assert "--no-index" in installed["log"][0] and "--no-deps" in installed["log"][0]
    assert report["numpy"] == qgis_python["numpy"] == installed["numpy"]
    assert report["onnxruntime"][1] == str(target / "onnxruntime" / "__init__.py")
    assert report["threadpoolctl"][1] == str(target / "threadpoolctl.py")
    assert "CPUExecutionProvider" in report["providers"]
    assert installed["after"] == [] and installed["choice"] == "onnx"     # usable at once, no restart
    assert installed["text_after"] == f"backend: onnx (onnxruntime {report['onnxruntime'][0]} installed in {target})"
    names = {p.name for p in target.iterdir()}
    assert not names & {"numpy", "google", "flatbuffers", "sympy", "packaging"}, names
    assert not any(p.name.endswith((".new", ".old")) for p in target.parent.iterdir())
    # and QGIS's Python without the plugin's folder is as it was
    r = _run_qgis_py("import numpy, importlib.util as u; print(numpy.__version__, numpy.__file__, "
                     "u.find_spec('onnxruntime') is None)")
    assert r.stdout.split() == [*qgis_python["numpy"], "True"]


def test_a_failed_install_keeps_the_previous_folder(installed, tmp_path):
    """No wheel for a package: pip fails, the message says so, the installed folder is untouched."""
    code = PRELUDE + (
        "try:\n"
        f"    deps.install({str(tmp_path)!r}, log=lambda s: None)\n"
        "    print(json.dumps({'error': None}))\n"
        "except deps.DepsError as exc:\n"
        "    print(json.dumps({'error': str(exc), 'missing': deps.missing()}))\n")
    res = _last_json(_run_qgis_py(code, {"MAPSEG_QGIS_DEPS": str(installed["target"])}))
    assert res["error"] and "pip failed" in res["error"] and "no wheel for this Python/platform" in res["error"]
    assert "--target" in res["error"]                      # the command to do it by hand
    assert res["missing"] == []
    assert (installed["target"] / "onnxruntime" / "__init__.py").is_file()


def test_a_python_without_pip_gets_a_message_saying_what_to_do(tmp_path):
    """A real Python without pip (a venv made --without-pip from Debian's python3): no install, a message."""
    venv = tmp_path / "nopip"
    subprocess.run([QGIS_PY, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
    python = venv / "bin" / "python"
    assert subprocess.run([str(python), "-m", "pip", "--version"], capture_output=True).returncode != 0
    target = tmp_path / "deps"
    code = PRELUDE + (
        "try:\n"
        f"    deps.install(log=lambda s: None, python={str(python)!r})\n"
        "    print(json.dumps({'error': None}))\n"
        "except deps.DepsError as exc:\n"
        "    print(json.dumps({'error': str(exc)}))\n")
    error = _last_json(_run_qgis_py(code, {"MAPSEG_QGIS_DEPS": str(target)}))["error"]
    assert error and f"QGIS's Python ({python}) has no pip" in error
    if os.path.isfile("/etc/debian_version"):
        assert "sudo apt install python3-pip" in error
    assert f"--target \"{target}\" --no-deps" in error and "onnxruntime threadpoolctl" in error
    assert "numpy backend" in error
    assert not target.exists() and not Path(str(target) + ".new").exists()


SEGMENT = PRELUDE + r"""
import time
from qgis.core import QgsApplication, QgsProcessingContext, QgsProcessingFeedback
app = QgsApplication([], False)
app.initQgis()
from map_segmenter import runtime
from map_segmenter.provider import MapSegmenterProvider
provider = MapSegmenterProvider()  # kept referenced: a collected provider takes its algorithms with it
QgsApplication.processingRegistry().addProvider(provider)
alg = QgsApplication.processingRegistry().createAlgorithmById("mapseg:segment")
raster, outdir, backends = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
out = {"status": deps.status_text(), "missing": deps.missing(), "runs": {}}
for i, backend in enumerate(backends):
    fb = QgsProcessingFeedback()
    path = os.path.join(outdir, backend + ".tif")
    t0, c0 = time.perf_counter(), time.process_time()
    res, ok = alg.run({"INPUT": raster, "K": 6, "MODEL": 0, "BACKEND": ["auto", "numpy", "onnx"].index(backend),
                       "OUTPUT": path}, QgsProcessingContext(), fb)
    out["runs"][backend] = {"ok": ok, "backend": res.get("BACKEND"), "mp_s": res.get("MEGAPIXELS_PER_S"),
                            "seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
                            "log": fb.textLog(), "path": path}
import numpy
from osgeo import gdal
out["numpy"] = [numpy.__version__, numpy.__file__]
if len(backends) == 2:
    a, b = (gdal.Open(out["runs"][name]["path"]).ReadAsArray() for name in backends)
    out["shape"], out["agreement"] = list(a.shape), float((a == b).mean())
out["onnxruntime"] = sys.modules["onnxruntime"].__file__ if "onnxruntime" in sys.modules else None
print(json.dumps(out), flush=True)
os._exit(0)
"""


def _segment(raster, outdir, backends, deps_dir):
    env = {"QT_QPA_PLATFORM": "offscreen", "MAPSEG_QGIS_DEPS": str(deps_dir)}
    full = {**os.environ, **env}
    for name in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
        full.pop(name, None)
    r = subprocess.run([QGIS_PY, "-c", SEGMENT, str(raster), str(outdir), ",".join(backends)], env=full,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return _last_json(r)


@pytest.mark.data
def test_plugin_runs_onnx_from_the_private_folder_and_measures_both(installed, qgis_python, tmp_path):
    if not RASTER.is_file():
        pytest.skip(f"{RASTER} not found (../shared/datasets)")
    res = _segment(RASTER, tmp_path, ["auto", "numpy"], installed["target"])
    assert res["missing"] == [] and res["status"].startswith("backend: onnx (onnxruntime ")
    assert res["numpy"] == qgis_python["numpy"]
    assert res["onnxruntime"] == str(installed["target"] / "onnxruntime" / "__init__.py")
    auto, numpy_run = res["runs"]["auto"], res["runs"]["numpy"]
    assert auto["ok"] and auto["backend"] == "onnx", auto["log"][-2000:]
    assert numpy_run["ok"] and numpy_run["backend"] == "numpy", numpy_run["log"][-2000:]
    assert "onnxruntime 1." in auto["log"]
    # threadpoolctl from the same folder: the numpy backend may now run windows in parallel
    assert "threadpoolctl is not installed" not in numpy_run["log"]
    assert res["shape"] == [600, 875]
    assert res["agreement"] > 0.99                           # same network, float rounding apart
    # without the private folder: the plugin as it is in a bare QGIS (numpy, one window at a time)
    bare = _segment(RASTER, tmp_path, ["auto"], tmp_path / "no_such_folder")
    assert bare["missing"] == ["onnxruntime", "threadpoolctl"] and bare["onnxruntime"] is None
    assert bare["runs"]["auto"]["backend"] == "numpy"
    assert "threadpoolctl is not installed" in bare["runs"]["auto"]["log"]
    print(f"\n{RASTER.name} 875 x 600 in QGIS's Python: onnx {auto['mp_s']:.3f} MP/s, numpy with threadpoolctl "
          f"{numpy_run['mp_s']:.3f} MP/s, bare numpy {bare['runs']['auto']['mp_s']:.3f} MP/s")


@pytest.mark.skipif(QGIS_PROCESS is None, reason="qgis_process.bin is not installed")
def test_qgis_process_loads_the_private_folder_at_plugin_start(installed, tmp_path):
    """qgis_process (Python embedded in QGIS, as in QGIS desktop) with the development plugin: the algorithm's
    'auto' backend is onnx, from the folder appended to sys.path when the plugin loads."""
    if not RASTER.is_file():
        pytest.skip(f"{RASTER} not found (../shared/datasets)")
    env = {**os.environ, "HOME": str(tmp_path / "home"), "QT_QPA_PLATFORM": "offscreen",
           "QGIS_PLUGINPATH": str(PLUGIN_PARENT), "MAPSEG_QGIS_DEPS": str(installed["target"])}
    for name in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
        env.pop(name, None)
    (tmp_path / "home").mkdir()
    r = subprocess.run([QGIS_PROCESS, "plugins", "enable", "map_segmenter"], env=env, capture_output=True,
                       text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([QGIS_PROCESS, "run", "mapseg:segment", f"--INPUT={RASTER}", "--K=4", "--TILE=128",
                        f"--OUTPUT={tmp_path / 'seg.tif'}"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "BACKEND:\tonnx" in r.stdout, r.stdout[-2000:]
    assert str(installed["target"]) in r.stdout or "onnxruntime 1." in r.stdout


DIALOG = PRELUDE + """
import time
from qgis.core import QgsApplication
app = QgsApplication([], True)
app.initQgis()
from map_segmenter.dialog import SegmentDialog
dlg = SegmentDialog()
before = {"visible": not dlg.install_button.isHidden(), "missing": dlg.missing_dependencies()}
task = dlg.install_dependencies(sys.argv[1], confirm=False)
t0 = time.time()
while task is not None and not dlg.install_message and time.time() - t0 < 600:  # set when the task finished
    app.processEvents()
    time.sleep(0.05)
for _ in range(20):
    app.processEvents()
print(json.dumps({"before": before, "started": task is not None, "running": dlg.install_task is not None,
                  "missing": deps.missing(), "visible": not dlg.install_button.isHidden(),
                  "message": dlg.install_message, "status_text": dlg.status.text(),
                  "again": dlg.install_dependencies(confirm=False) is None}))
os._exit(0)
"""


def test_the_dialog_offers_the_install_and_runs_it_in_the_background(wheels, tmp_path):
    """The toolbar dialog shows an install button while onnxruntime is missing; it runs deps.install as a
    background task (here offline from the wheel folder), after which the button goes and the status line
    names the onnx backend."""
    target = tmp_path / "map_segmenter_deps"
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "MAPSEG_QGIS_DEPS": str(target), "HOME": str(tmp_path)}
    for name in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
        env.pop(name, None)
    r = subprocess.run([QGIS_PY, "-c", DIALOG, str(wheels)], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = _last_json(r)
    if res["before"]["missing"] != ["onnxruntime", "threadpoolctl"]:
        pytest.skip(f"QGIS's Python already has some of them: {res['before']['missing']}")
    assert res["before"]["visible"]
    assert res["started"] and not res["running"], res
    assert res["missing"] == [] and not res["visible"] and res["again"]
    assert res["message"].startswith("installed: ") and "backend: onnx" in res["status_text"]
