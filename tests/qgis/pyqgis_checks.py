"""Run inside QGIS's Python (/usr/bin/python3 with python3-qgis), headless: ``python3 pyqgis_checks.py CHECK PLUGINS_DIR RASTER OUT``.

Checks (each prints one JSON line):
  cancel  run mapseg:segment with a feedback that cancels at the first progress report past 15 %
  dialog  open the toolbar dialog on a layer, start its background task, wait, inspect the added layer
  cases   RASTER is a JSON list of {"name", "params"}: run mapseg:segment with each, report its log and outcome
  workflow  RASTER is a JSON spec ({"fit": params, "runs": [{"name", "params", "load", "mask_wkt"}]}): run
          mapseg:fit, then each mapseg:segment run (the string "@centers" in its params is the fitted file; with
          "mask_wkt" its MASK is a memory layer of that polygon in the "mask_crs"); with "load" through
          processing.runAndLoadResults (as the toolbox does): report the layer QGIS added, its renderer and class
          labels; then each of "errors" ({"name", "alg", "params", "cancel_at": cancel at the first progress
          report past this %}); also both algorithms' groups, help URLs,
          declared outputs and advanced parameters
All report which heavy modules got imported (torch must never be).
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
result = {"check": check, "help_url": alg.helpUrl()}
if check not in ("cases", "workflow"):
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
elif check == "workflow":
    sys.path.append("/usr/share/qgis/python/plugins")
    import processing  # noqa: E402
    from processing.core.Processing import Processing  # noqa: E402
    from qgis.core import QgsFeature, QgsGeometry, QgsVectorLayer  # noqa: E402

    Processing.initialize()
    with open(raster) as f:
        spec = json.load(f)

    def run(alg_id, params, cancel_at=None):
        feedback = QgsProcessingFeedback()
        if cancel_at is not None:  # cancel at the first progress report past cancel_at %
            feedback.progressChanged.connect(lambda p: feedback.cancel() if p > cancel_at else None)
        try:
            res, ok = QgsApplication.processingRegistry().createAlgorithmById(alg_id).run(
                params, QgsProcessingContext(), feedback)
            raised = None
        except Exception as exc:  # noqa: BLE001 - reported, the test decides
            res, ok, raised = {}, False, f"{type(exc).__name__}: {exc}"
        return {"ok": bool(ok), "raised": raised, "log": feedback.textLog(),
                "results": {k: v for k, v in (res or {}).items() if isinstance(v, (str, int, float))}}

    result["algorithms"] = {}
    for alg_id in ("mapseg:segment", "mapseg:fit"):
        a = QgsApplication.processingRegistry().algorithmById(alg_id)
        result["algorithms"][alg_id] = {
            "group": a.group(), "groupId": a.groupId(), "helpUrl": a.helpUrl(),
            "outputs": {o.name(): o.type() for o in a.outputDefinitions()},
            "advanced": sorted(p.name() for p in a.parameterDefinitions()
                               if p.flags() & p.FlagAdvanced)}
    result["fit"] = run("mapseg:fit", spec["fit"])
    centers = result["fit"]["results"].get("OUTPUT")
    result["runs"] = {}
    for item in spec["runs"]:
        params = {k: (centers if v == "@centers" else v) for k, v in item["params"].items()}
        if "mask_wkt" in item:
            mask = QgsVectorLayer(f"Polygon?crs={item['mask_crs']}", "mask", "memory")
            feature = QgsFeature()
            feature.setGeometry(QgsGeometry.fromWkt(item["mask_wkt"]))
            mask.dataProvider().addFeatures([feature])
            QgsProject.instance().addMapLayer(mask)
            params["MASK"] = mask
        if item.get("load"):
            before = set(QgsProject.instance().mapLayers())
            try:
                res = processing.runAndLoadResults("mapseg:segment", dict(params))
                entry = {"ok": True, "raised": None, "results": {k: v for k, v in res.items()
                                                                 if isinstance(v, (str, int, float))}}
            except Exception as exc:  # noqa: BLE001
                entry = {"ok": False, "raised": f"{type(exc).__name__}: {exc}", "results": {}}
            added = [QgsProject.instance().mapLayer(i) for i in set(QgsProject.instance().mapLayers()) - before]
            entry["loaded"] = [{"source": lyr.source(), "renderer": lyr.renderer().type(),
                                "classes": {int(c.value): c.label for c in lyr.renderer().classes()}
                                if lyr.renderer().type() == "paletted" else {}}
                               for lyr in added if isinstance(lyr, QgsRasterLayer)]
        else:
            entry = run("mapseg:segment", params)
        opened = QgsRasterLayer(item["params"]["OUTPUT"], "opened", "gdal")  # as Layer > Add Raster Layer opens it
        entry["opened"] = {"renderer": opened.renderer().type() if opened.isValid() else None,
                           "classes": {int(c.value): c.label for c in opened.renderer().classes()}
                           if opened.isValid() and opened.renderer().type() == "paletted" else {}}
        result["runs"][item["name"]] = entry
    result["errors"] = {item["name"]: run(item["alg"], item["params"], item.get("cancel_at"))
                        for item in spec.get("errors", [])}
result["imported"] = [m for m in ("torch", "rasterio", "onnxruntime") if m in sys.modules]
print(json.dumps(result), flush=True)
# QGIS 3.22 may crash while tearing down a headless application: leave without the teardown.
os._exit(0)
