"""Run inside QGIS's Python (/usr/bin/python3 with python3-qgis), headless: ``python3 pyqgis_checks.py CHECK PLUGINS_DIR RASTER OUT``.

Checks (each prints one JSON line):
  cancel  run mapseg:segment with a feedback that cancels at the first progress report past 15 %
  dialog  open the toolbar dialog on a layer, start its background task, wait, inspect the added layer
  cases   RASTER is a JSON list of {"name", "params"}: run mapseg:segment with each, report its log and outcome
Both report which heavy modules got imported (torch must never be).
"""
import json
import os
import sys
import time

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
check, plugins, raster, out = sys.argv[1:5]
sys.path.insert(0, plugins)

from qgis.core import (QgsApplication, QgsProcessingContext, QgsProcessingFeedback, QgsProject,  # noqa: E402
                       QgsRasterLayer)

app = QgsApplication([], check == "dialog")
app.initQgis()
from map_segmenter.provider import MapSegmenterProvider  # noqa: E402

provider = MapSegmenterProvider()
QgsApplication.processingRegistry().addProvider(provider)
alg = QgsApplication.processingRegistry().createAlgorithmById("mapseg:segment")
result = {"check": check}
if check != "cases":
    layer = QgsRasterLayer(raster, "input", "gdal")
    assert layer.isValid(), raster

if check == "cancel":
    feedback = QgsProcessingFeedback()
    seen = []

    def on_progress(p):
        seen.append(p)
        if p > 15:
            feedback.cancel()

    feedback.progressChanged.connect(on_progress)
    context = QgsProcessingContext()
    params = {"INPUT": layer, "K": 4, "MODEL": 0, "TILE": 64, "OUTPUT": out}
    t0 = time.time()
    try:
        res, ok = alg.run(params, context, feedback)
    except Exception as exc:  # QgsProcessingException
        res, ok = {"error": str(exc)}, False
    log = feedback.textLog() if hasattr(feedback, "textLog") else ""
    result.update(ok=ok, error=(res.get("error") if isinstance(res, dict) else None) or log,
                  output_exists=os.path.exists(out),
                  last_progress=max(seen) if seen else None, seconds=time.time() - t0,
                  leftovers=[f for f in os.listdir(os.path.dirname(out)) if ".part" in f])
elif check == "dialog":
    from map_segmenter.dialog import SegmentDialog

    QgsProject.instance().addMapLayer(layer)
    dlg = SegmentDialog()
    dlg.layer.setLayer(layer)
    dlg.k.setValue(4)
    dlg.output.setFilePath(out)
    dlg.start()
    t0 = time.time()
    while dlg.finished is None and time.time() - t0 < 240:
        app.processEvents()
        time.sleep(0.05)
    added = [lyr for lyr in QgsProject.instance().mapLayers().values() if lyr.id() != layer.id()]
    result.update(complete=dlg.finished is True, layers=len(added), seconds=time.time() - t0)
    if added:
        seg = added[0]
        result.update(name=seg.name(), renderer=seg.renderer().type(), crs_same=seg.crs() == layer.crs(),
                      classes=[int(c.value) for c in seg.renderer().classes()], source=seg.source())
elif check == "cases":
    result["cases"] = {}
    for case in json.load(open(raster)):
        feedback = QgsProcessingFeedback()
        try:
            res, ok = alg.run(case["params"], QgsProcessingContext(), feedback)
            raised = None
        except Exception as exc:  # noqa: BLE001 - reported, the test decides
            res, ok, raised = {}, False, f"{type(exc).__name__}: {exc}"
        folder = os.path.dirname(case["params"]["OUTPUT"])
        result["cases"][case["name"]] = {
            "ok": bool(ok), "raised": raised, "log": feedback.textLog(),
            "output_exists": os.path.exists(case["params"]["OUTPUT"]),
            "leftovers": sorted(f for f in os.listdir(folder) if f.startswith(".")) if os.path.isdir(folder) else [],
            "results": {k: v for k, v in (res or {}).items() if isinstance(v, (str, int, float))}}
result["imported"] = [m for m in ("torch", "rasterio", "onnxruntime") if m in sys.modules]
print(json.dumps(result), flush=True)
# QGIS 3.22 may crash while tearing down a headless application: leave without the teardown.
os._exit(0)
