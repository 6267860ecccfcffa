"""Screenshots of the plugin in QGIS, rendered headless (``QT_QPA_PLATFORM=offscreen``) in QGIS's own Python.

    /usr/bin/python3 qgis_plugin/screenshot.py RASTER OUT.png [K]      # README: input | segments over it
    /usr/bin/python3 qgis_plugin/screenshot.py --dialog OUT.png [RASTER [CENTERS]]
    /usr/bin/python3 qgis_plugin/screenshot.py --named RASTER CENTERS OUT.png
    /usr/bin/python3 qgis_plugin/screenshot.py --docs                  # both docs/img images from examples/

``RASTER OUT.png [K]``: runs ``mapseg:segment`` through the Processing framework (the repository's
plugin folder, default model), adds the result the way the dialog does (paletted, source CRS) and
renders a QgsMapCanvas: the input on the left, the segments over it on the right.

``--dialog``: the toolbar dialog after a run on RASTER (default examples/naip_nd_2020_rgb.tif, with the
centres file examples/naip_centers.json), so its status line shows the backend and speed
(``QWidget.grab()``) -> docs/img/qgis_dialog.png.

``--named``: ``mapseg:segment`` with a centres file that keeps a legend (class names and colours); the
result is loaded as QGIS loads any raster (it picks up the ``OUT.qml`` mapseg writes beside it), and a
print layout with the input, the named segments and their legend (QgsLayoutItemLegend) is exported
to PNG -> docs/img/qgis_named_result.png.
"""
import os
import shutil
import sys
import tempfile

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from qgis.core import (QgsApplication, QgsLayoutExporter, QgsLayoutItemLabel, QgsLayoutItemLegend,  # noqa: E402
                       QgsLayoutItemMap, QgsLayoutPoint, QgsLayoutSize, QgsLegendStyle, QgsMapLayerLegendUtils,
                       QgsPrintLayout, QgsProcessingContext, QgsProcessingFeedback, QgsProject, QgsRasterLayer,
                       QgsUnitTypes)
from qgis.gui import QgsMapCanvas  # noqa: E402
from qgis.PyQt.QtCore import QEventLoop, QSize, QTimer  # noqa: E402
from qgis.PyQt.QtGui import QColor, QFont, QImage, QPainter  # noqa: E402

EXAMPLE = os.path.join(REPO, "examples", "naip_nd_2020_rgb.tif")
EXAMPLE_CENTERS = os.path.join(REPO, "examples", "naip_centers.json")

app = QgsApplication([], True)
app.initQgis()
from map_segmenter.dialog import SegmentDialog, add_result_layer  # noqa: E402
from map_segmenter.provider import MapSegmenterProvider  # noqa: E402

provider = MapSegmenterProvider()  # keep a reference: the registry does not own it from Python
QgsApplication.processingRegistry().addProvider(provider)


def segment(src, out, **params):
    alg = QgsApplication.processingRegistry().createAlgorithmById("mapseg:segment")
    res, ok = alg.run({"INPUT": src, "MODEL": 0, "OUTPUT": out, **params}, QgsProcessingContext(),
                      QgsProcessingFeedback())
    assert ok, res
    return res


def scratch_copy(raster, folder=None):
    """A copy of ``raster`` in a scratch folder: QGIS writes statistics (``.aux.xml``) beside what it renders,
    and the repository's examples stay as they are."""
    folder = folder or tempfile.mkdtemp(prefix="mapseg-")
    dst = os.path.join(folder, os.path.basename(raster))
    shutil.copyfile(raster, dst)
    return dst


def load(path, name):
    layer = QgsRasterLayer(path, name, "gdal")
    assert layer.isValid(), path
    QgsProject.instance().addMapLayer(layer)
    return layer


def save_png(img, out_png, colours=256):
    """Save as an 8-bit palette PNG when that keeps the picture (flat colours, small files)."""
    small = img.convertToFormat(QImage.Format_Indexed8) if colours else img
    small.save(out_png)
    print(f"wrote {out_png} ({img.width()} x {img.height()}, {os.path.getsize(out_png) / 1e3:.0f} KB)")


def result_screenshot(raster, out_png, k):
    src = load(scratch_copy(raster), os.path.basename(raster))
    res = segment(src, os.path.join(tempfile.mkdtemp(), "segments.tif"), K=k)
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


def dialog_screenshot(out_png, raster=EXAMPLE, centers=EXAMPLE_CENTERS):
    """The dialog as a user sees it after a run: layer chosen, default model, the centres file (so K is
    fixed by it and disabled), an output name, and the status line (backend, MP/s, dependencies)."""
    # short relative paths in the picture (no machine's folders): run from a scratch folder holding
    # a link to the centres file and a results/ folder
    work = tempfile.mkdtemp(prefix="mapseg-")
    os.makedirs(os.path.join(work, "examples"))
    os.makedirs(os.path.join(work, "results"))
    os.chdir(work)
    src = load(scratch_copy(os.path.abspath(raster), work), os.path.splitext(os.path.basename(raster))[0])
    dlg = SegmentDialog()
    dlg.layer.setLayer(src)
    dlg.k.setValue(5)
    if centers:
        os.symlink(os.path.abspath(centers), os.path.join("examples", os.path.basename(centers)))
        dlg.centers.setFilePath(os.path.join("examples", os.path.basename(centers)))
    dlg.output.setFilePath(os.path.join("results", "naip_segments.tif"))
    dlg.start()
    loop_until(lambda: dlg.finished is not None)
    assert dlg.finished, "the dialog's run failed"
    dlg.show()
    dlg.resize(max(dlg.sizeHint().width(), 760), dlg.sizeHint().height())
    app.processEvents()
    img = dlg.grab().toImage()
    dlg.hide()
    save_png(img, out_png, colours=0)


def loop_until(done, timeout_ms=300000):
    import time

    t0 = time.time()
    while not done() and (time.time() - t0) * 1000 < timeout_ms:
        app.processEvents()
        time.sleep(0.02)


def named_screenshot(raster, centers, out_png):
    """A print layout: the input, its named segments (the .qml mapseg wrote, picked up on loading), the legend."""
    project = QgsProject.instance()
    src = load(scratch_copy(raster), "NAIP 2020 (input)")
    out = os.path.join(tempfile.mkdtemp(prefix="mapseg-"), "naip_segments.tif")
    res = segment(src, out, CENTERS=centers)
    assert os.path.isfile(os.path.splitext(out)[0] + ".qml"), "mapseg wrote no .qml beside the labels"
    seg = load(res["OUTPUT"], "segments (naip_centers.json)")
    assert seg.renderer().type() == "paletted", seg.renderer().type()
    names = [c.label for c in seg.renderer().classes()]
    assert names and not any(n.startswith("segment ") for n in names), names  # the centres file's names

    layout = QgsPrintLayout(project)
    layout.initializeDefaults()
    page_w, margin, gap = 297.0, 6.0, 4.0
    map_w = 100.0
    map_h = map_w * src.height() / src.width()
    page_h = map_h + 2 * margin + 10
    layout.pageCollection().page(0).setPageSize(QgsLayoutSize(page_w, page_h, QgsUnitTypes.LayoutMillimeters))

    def add_map(layers, x, title):
        item = QgsLayoutItemMap(layout)
        item.attemptMove(QgsLayoutPoint(x, margin + 8, QgsUnitTypes.LayoutMillimeters))
        item.attemptResize(QgsLayoutSize(map_w, map_h, QgsUnitTypes.LayoutMillimeters))
        item.setLayers(layers)
        item.setCrs(src.crs())
        item.setExtent(src.extent())
        item.setFrameEnabled(True)
        layout.addLayoutItem(item)
        label = QgsLayoutItemLabel(layout)
        label.setText(title)
        label.setFont(QFont("DejaVu Sans", 11))
        label.attemptMove(QgsLayoutPoint(x, margin, QgsUnitTypes.LayoutMillimeters))
        label.attemptResize(QgsLayoutSize(map_w, 7, QgsUnitTypes.LayoutMillimeters))
        layout.addLayoutItem(label)
        return item

    add_map([src], margin, "Input: NAIP 2020, North Dakota (1 m)")
    seg_map = add_map([seg], margin + map_w + gap, "Segments, named by naip_centers.json")
    legend = QgsLayoutItemLegend(layout)
    legend.setTitle("Legend")
    legend.setLinkedMap(seg_map)
    legend.setAutoUpdateModel(False)
    root = legend.model().rootGroup()
    root.removeAllChildren()
    node = root.addLayer(seg)
    # the legend shows the class names, without the renderer's "Band 1 (Palette)" title line
    QgsMapLayerLegendUtils.setLegendNodeOrder(node, list(range(1, len(names) + 1)))
    legend.model().refreshLayerLegend(node)
    legend.setStyleFont(QgsLegendStyle.Title, QFont("DejaVu Sans", 12, QFont.Bold))
    legend.setStyleFont(QgsLegendStyle.Subgroup, QFont("DejaVu Sans", 10, QFont.Bold))
    legend.setStyleFont(QgsLegendStyle.SymbolLabel, QFont("DejaVu Sans", 10))
    legend.setSymbolWidth(8)
    legend.setSymbolHeight(5)
    legend.attemptMove(QgsLayoutPoint(margin + 2 * (map_w + gap), margin + 8, QgsUnitTypes.LayoutMillimeters))
    layout.addLayoutItem(legend)
    legend.adjustBoxSize()

    settings = QgsLayoutExporter.ImageExportSettings()
    settings.dpi = 100
    tmp_png = os.path.join(tempfile.mkdtemp(), "layout.png")
    result = QgsLayoutExporter(layout).exportToImage(tmp_png, settings)
    assert result == QgsLayoutExporter.Success, result
    save_png(QImage(tmp_png), out_png, colours=0)
    print(f"classes: {names}; backend {res['BACKEND']}")


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--dialog"]:
        dialog_screenshot(os.path.abspath(args[1]), *[os.path.abspath(a) for a in args[2:4]])
    elif args[:1] == ["--named"]:
        named_screenshot(args[1], args[2], args[3])
    elif args[:1] == ["--docs"]:
        img = os.path.join(REPO, "docs", "img")
        named_screenshot(EXAMPLE, EXAMPLE_CENTERS, os.path.join(img, "qgis_named_result.png"))
        QgsProject.instance().removeAllMapLayers()
        dialog_screenshot(os.path.join(img, "qgis_dialog.png"))
    else:
        result_screenshot(args[0], args[1], int(args[2]) if len(args) > 2 else 5)
    # QGIS 3.22 may crash while tearing down a headless application: leave without the teardown.
    sys.stdout.flush()
    os._exit(0)
