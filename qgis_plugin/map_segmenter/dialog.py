"""The toolbar dialog: the common case of ``mapseg:segment`` run as a background QgsTask.

The interface stays responsive; progress shows in QGIS's task manager; the result is added to the
project as a paletted layer in the source CRS when the task finishes.
"""
import os
import tempfile

from qgis.core import (QgsApplication, QgsMapLayerProxyModel, QgsPalettedRasterRenderer, QgsProcessingAlgRunnerTask,
                       QgsProcessingContext, QgsProcessingFeedback, QgsProject, QgsRasterLayer)
from qgis.gui import QgsFileWidget, QgsMapLayerComboBox
from qgis.PyQt.QtWidgets import (QComboBox, QDialog, QDialogButtonBox, QFormLayout, QMessageBox, QSpinBox,
                                 QVBoxLayout)

from .algorithm import MODELS, SegmentRasterAlgorithm


def add_result_layer(path, source_layer=None, name=None, project=None):
    """Add the label raster as a paletted layer (classes from its colour table) in the source CRS."""
    project = project or QgsProject.instance()
    layer = QgsRasterLayer(path, name or os.path.splitext(os.path.basename(path))[0], "gdal")
    if not layer.isValid():
        raise RuntimeError(f"QGIS cannot open the result {path}")
    if source_layer is not None and source_layer.crs().isValid():
        layer.setCrs(source_layer.crs())
    provider = layer.dataProvider()
    from osgeo import gdal

    ds = gdal.Open(path)
    k = int(ds.GetMetadataItem("MAPSEG_K") or 16)   # mapseg tags its outputs with K
    ds = None
    classes = QgsPalettedRasterRenderer.colorTableToClassData(provider.colorTable(1))
    classes = [c for c in classes if c.value < k]
    for c in classes:
        c.label = f"segment {int(c.value)}"
    layer.setRenderer(QgsPalettedRasterRenderer(provider, 1, classes))
    project.addMapLayer(layer)
    return layer


class SegmentDialog(QDialog):
    def __init__(self, parent=None, iface=None):
        super().__init__(parent)
        self.iface = iface
        self.task = None
        self.finished = None        # None while a task runs (or before any); then True / False
        self.result_layer = None
        self.setWindowTitle("Map Segmenter: segment raster")
        form = QFormLayout()
        self.layer = QgsMapLayerComboBox()
        self.layer.setFilters(QgsMapLayerProxyModel.RasterLayer)
        self.k = QSpinBox()
        self.k.setRange(2, 16)
        self.k.setValue(6)
        self.model = QComboBox()
        self.model.addItems(MODELS)
        self.model_dir = QgsFileWidget()
        self.model_dir.setStorageMode(QgsFileWidget.GetDirectory)
        self.smooth = QSpinBox()
        self.smooth.setRange(0, 8)
        self.output = QgsFileWidget()
        self.output.setStorageMode(QgsFileWidget.SaveFile)
        self.output.setFilter("GeoTIFF (*.tif)")
        form.addRow("Raster layer", self.layer)
        form.addRow("Segments (K)", self.k)
        form.addRow("Model", self.model)
        form.addRow("Model folder", self.model_dir)
        form.addRow("Smoothing (cells)", self.smooth)
        form.addRow("Output GeoTIFF (empty: temporary)", self.output)
        buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel)
        buttons.accepted.connect(self.start)
        buttons.rejected.connect(self.reject)
        box = QVBoxLayout(self)
        box.addLayout(form)
        box.addWidget(buttons)

    def parameters(self):
        layer = self.layer.currentLayer()
        out = self.output.filePath() or os.path.join(tempfile.mkdtemp(prefix="mapseg-"), "segments.tif")
        return {"INPUT": layer, "K": self.k.value(), "MODEL": self.model.currentIndex(),
                "MODEL_DIR": self.model_dir.filePath() or None, "SMOOTH": self.smooth.value(), "OUTPUT": out}

    def start(self):
        """Run the algorithm as a background task; returns the task (tests wait on it)."""
        params = self.parameters()
        if params["INPUT"] is None:
            QMessageBox.warning(self, "Map Segmenter", "Choose a raster layer first.")
            return None
        self.context = QgsProcessingContext()
        self.context.setProject(QgsProject.instance())
        self.feedback = QgsProcessingFeedback()
        self.alg = SegmentRasterAlgorithm()
        self.alg.initAlgorithm()
        self.task = QgsProcessingAlgRunnerTask(self.alg, params, self.context, self.feedback)
        source = params["INPUT"]

        self.finished = None
        self.result_layer = None

        def done(ok, results):
            if ok:
                self.result_layer = add_result_layer(results["OUTPUT"], source,
                                                     f"{source.name()} segments (K={params['K']})")
            self.finished = bool(ok)
            if not ok and self.iface is not None and not self.feedback.isCanceled():
                self.iface.messageBar().pushCritical("Map Segmenter", "segmentation failed: see the log panel")

        self.task.executed.connect(done)
        QgsApplication.taskManager().addTask(self.task)
        self.accept()
        return self.task
