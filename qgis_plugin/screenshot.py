"""Render the plugin's result in QGIS, headless, for the README: ``/usr/bin/python3 qgis_plugin/screenshot.py RASTER OUT.png [K]``.

Runs ``mapseg:segment`` through the Processing framework (the repository's plugin folder, default
model), adds the result the way the dialog does (paletted, source CRS) and renders a QgsMapCanvas
offscreen: the input on the left, the segments over it on the right.
"""
import os
import sys
import tempfile

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from qgis.core import (QgsApplication, QgsProcessingContext, QgsProcessingFeedback, QgsProject,  # noqa: E402
                       QgsRasterLayer)
from qgis.gui import QgsMapCanvas  # noqa: E402
from qgis.PyQt.QtCore import QEventLoop, QSize, QTimer  # noqa: E402
from qgis.PyQt.QtGui import QColor, QImage, QPainter  # noqa: E402

raster, out_png = sys.argv[1], sys.argv[2]
k = int(sys.argv[3]) if len(sys.argv) > 3 else 5
app = QgsApplication([], True)
app.initQgis()
from map_segmenter.dialog import add_result_layer  # noqa: E402
from map_segmenter.provider import MapSegmenterProvider  # noqa: E402

provider = MapSegmenterProvider()  # keep a reference: the registry does not own it from Python
QgsApplication.processingRegistry().addProvider(provider)
alg = QgsApplication.processingRegistry().createAlgorithmById("mapseg:segment")
src = QgsRasterLayer(raster, os.path.basename(raster), "gdal")
QgsProject.instance().addMapLayer(src)
seg_path = os.path.join(tempfile.mkdtemp(), "segments.tif")
res, ok = alg.run({"INPUT": src, "K": k, "MODEL": 0, "OUTPUT": seg_path}, QgsProcessingContext(),
                  QgsProcessingFeedback())
assert ok, res
seg = add_result_layer(res["OUTPUT"], src, "segments")


def render(layers, size):
    canvas = QgsMapCanvas()
    canvas.resize(size)
    canvas.setCanvasColor(QColor("white"))
    canvas.setDestinationCrs(src.crs())
    canvas.setLayers(layers)
    canvas.setExtent(src.extent())
    loop = QEventLoop()
    canvas.mapCanvasRefreshed.connect(loop.quit)
    QTimer.singleShot(30000, loop.quit)
    canvas.refresh()
    loop.exec_()
    return canvas.grab().toImage()


w = 640
h = int(w * src.height() / src.width())
left = render([src], QSize(w, h))
seg.renderer().setOpacity(0.85)
right = render([seg, src], QSize(w, h))
img = QImage(2 * w + 8, h, QImage.Format_ARGB32)
img.fill(QColor("white"))
p = QPainter(img)
p.drawImage(0, 0, left)
p.drawImage(w + 8, 0, right)
p.end()
img.save(out_png)
print(f"wrote {out_png} ({img.width()} x {img.height()}); segments from {res['BACKEND']} backend")
os._exit(0)
