"""The toolbar dialog: the common case of ``mapseg:segment`` run as a background QgsTask.

The interface stays responsive; progress shows in QGIS's task manager; the result is added to the
project as a paletted layer in the source CRS when the task finishes (with the class names and colours
of the ``OUT.qml`` mapseg writes beside it), and the dialog states the backend and speed of the run.

An output that is loaded in the project: on Windows a file QGIS holds open cannot be replaced, so
before the run the dialog releases it (removes the layers reading it, remembering their names and
places in the layer tree) and puts the new result in the same place after; a failed run puts the old
layers back. If the replacement still fails (the file is held by another program, or by GDAL's
connection pool), the dialog runs once more into a new free name beside it (``OUT_1.tif``, ...) and says so.
"""
import os
import re
import tempfile

from qgis.core import (
    QgsApplication,
    QgsMapLayerProxyModel,
    QgsPalettedRasterRenderer,
    QgsProcessingAlgRunnerTask,
    QgsProcessingContext,
    QgsProcessingFeedback,
    QgsProject,
    QgsRasterLayer,
    QgsTask,
)
from qgis.gui import QgsFileWidget, QgsMapLayerComboBox
from qgis.PyQt.QtWidgets import (
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QLabel,
    QMessageBox,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
)

from .algorithm import MODELS, SegmentRasterAlgorithm

MODEL_DEFAULT, MODEL_FOLDER, MODEL_KMEANS = 0, 1, 2
# what a failed replacement of an open output looks like in the log (POSIX errno 13, Windows errors 5 and 32)
REPLACE_FAILED = re.compile(r"open in another program|PermissionError|Permission denied|Errno 13|WinError (5|32)|"
                            r"used by another process",
                            re.IGNORECASE)

TOOLTIPS = {
    "layer": "The raster to segment: an RGB image (8-bit, or 16-bit with its brightness range) any GDAL format.",
    "k": "Number of segments (2-16). Not used with a centres file: the file fixes K.",
    "model": "Shipped default model: a small CNN distilled from an ImageNet teacher (bundled).\n"
             "Model folder: an exported model (model.npz + meta.json) chosen below.\n"
             "Colour k-means: plain clustering of colours, no network (fastest, coarsest).",
    "model_dir": "An exported model folder holding model.npz and meta.json (from 'mapseg export'). "
                 "Only used with 'Model folder'.",
    "centers": "Optional cluster centres file from 'mapseg fit' (.json): several rasters get the same labels "
               "(and the file's class names). Fixes K. Must come from the chosen model.",
    "legend": "Optional legend file (legend.json): class names and colours of the labels 0..K-1, written to "
              "OUT.qml and shown in the layer. Empty: the centres file's names, else 'segment 0..K-1'.",
    "smooth": "Majority filter radius in 4-pixel cells, 0 = none: removes speckle.",
    "output": "Label GeoTIFF to write (labels 0..K-1, 255 = nodata, with OUT.qml and OUT.tif.aux.xml beside). "
              "Empty: a temporary file. An output already loaded in the project is released first.",
    "status": "The backend and speed of the last run, and the optional packages QGIS's Python has.",
    "install": "Install onnxruntime and threadpoolctl with QGIS's own pip into a private folder of your QGIS "
               "profile (QGIS's numpy is never replaced): the network runs several times faster. Needs network "
               "access (about 30 MB); active at once, no restart.",
}


def dependency_text():
    """One line on the optional packages (onnxruntime etc.) from ``deps.status_text()`` where the plugin has it;
    empty otherwise. The one place the dialog asks about dependencies."""
    try:
        from . import deps
    except ImportError:
        return ""
    status_text = getattr(deps, "status_text", None)
    if status_text is None:
        return ""
    try:
        return str(status_text())
    except Exception as exc:  # noqa: BLE001 - a status line must never break the dialog
        return f"dependencies: unknown ({exc})"


def run_summary(results):
    """'backend numpy, 3.1 MP/s' from the algorithm's results (BACKEND, MEGAPIXELS_PER_S)."""
    parts = []
    backend = results.get("BACKEND")
    if backend:
        parts.append("colour k-means (no network)" if backend == "none" else f"backend {backend}")
    speed = results.get("MEGAPIXELS_PER_S")
    if isinstance(speed, (int, float)):
        parts.append(f"{speed:.2f} MP/s")
    return ", ".join(parts)


def _file_key(path):
    return os.path.normcase(os.path.realpath(os.path.abspath(path)))


def layers_reading(path, project=None):
    """The project's layers whose data source is the file ``path`` (sub-layer options after '|' ignored)."""
    project = project or QgsProject.instance()
    key = _file_key(path)
    return [lyr for lyr in project.mapLayers().values()
            if lyr.source() and _file_key(lyr.source().split("|")[0]) == key]


def free_name(path):
    """``OUT_1.tif``, ``OUT_2.tif``, ...: the first name beside ``path`` with no file and no sidecar."""
    stem, ext = os.path.splitext(path)
    i = 1
    while any(os.path.exists(p) for p in (f"{stem}_{i}{ext}", f"{stem}_{i}.qml", f"{stem}_{i}{ext}.aux.xml")):
        i += 1
    return f"{stem}_{i}{ext}"


class ReleasedLayers:
    """Layers removed from the project so their file can be replaced; their names and layer-tree places are kept
    for the new result (``place``) or for putting the old file back (``restore``)."""

    def __init__(self, path, project=None):
        self.project = project or QgsProject.instance()
        self.path = path
        self.entries = []          # (name, parent group, index in it, source, provider)
        root = self.project.layerTreeRoot()
        for lyr in layers_reading(path, self.project):
            node = root.findLayer(lyr.id())
            parent = node.parent() if node is not None else root
            index = parent.children().index(node) if node is not None else 0
            self.entries.append((lyr.name(), parent, index, lyr.source(), lyr.providerType()))
            self.project.removeMapLayer(lyr.id())   # the project owns it: deleted, its GDAL handle released

    def __bool__(self):
        return bool(self.entries)

    def _insert(self, layer, parent, index):
        self.project.addMapLayer(layer, False)
        parent.insertLayer(min(index, len(parent.children())), layer)

    def place(self, layer):
        """Add ``layer`` (the new result) where the first released layer was, under its name."""
        if not self.entries:
            self.project.addMapLayer(layer)
            return layer
        name, parent, index, _, _ = self.entries[0]
        layer.setName(name)
        self._insert(layer, parent, index)
        self.entries = []
        return layer

    def restore(self):
        """Put the released layers back (the old file, its default style), e.g. after a failed run."""
        for name, parent, index, source, provider in self.entries:
            layer = QgsRasterLayer(source, name, provider)
            if layer.isValid():
                self._insert(layer, parent, index)
        self.entries = []


def add_result_layer(path, source_layer=None, name=None, project=None, place=None):
    """Add the label raster as a paletted layer in the source CRS: with the class names and colours of the
    ``OUT.qml`` mapseg writes beside it (QGIS applies it on opening), else from the colour table.
    ``place``: a ``ReleasedLayers`` whose place (and name) the result takes."""
    project = project or QgsProject.instance()
    layer = QgsRasterLayer(path, name or os.path.splitext(os.path.basename(path))[0], "gdal")
    if not layer.isValid():
        raise RuntimeError(f"QGIS cannot open the result {path}")
    if source_layer is not None and source_layer.crs().isValid():
        layer.setCrs(source_layer.crs())
    styled = (os.path.isfile(os.path.splitext(path)[0] + ".qml") and layer.renderer() is not None
              and layer.renderer().type() == "paletted")
    if not styled:
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
    if place is not None:
        place.place(layer)
    else:
        project.addMapLayer(layer)
    return layer


class SegmentDialog(QDialog):
    def __init__(self, parent=None, iface=None):
        super().__init__(parent)
        self.iface = iface
        self.task = None
        self.finished = None        # None while a task runs (or before any); then True / False
        self.result_layer = None
        self.results = None         # the algorithm's results of the last successful run
        self.notice = ""            # what the user was told about the output (a new name, a released layer)
        self.summary = ""           # "Last run: backend ..., ... MP/s"
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
        self.centers = QgsFileWidget()
        self.centers.setStorageMode(QgsFileWidget.GetFile)
        self.centers.setFilter("Centres file (*.json)")
        self.legend = QgsFileWidget()
        self.legend.setStorageMode(QgsFileWidget.GetFile)
        self.legend.setFilter("Legend (*.json)")
        self.smooth = QSpinBox()
        self.smooth.setRange(0, 8)
        self.output = QgsFileWidget()
        self.output.setStorageMode(QgsFileWidget.SaveFile)
        self.output.setFilter("GeoTIFF (*.tif)")
        self.status = QLabel()
        self.status.setWordWrap(True)
        self.fields = {"layer": self.layer, "k": self.k, "model": self.model, "model_dir": self.model_dir,
                       "centers": self.centers, "legend": self.legend, "smooth": self.smooth, "output": self.output,
                       "status": self.status}
        rows = [("Raster layer", "layer"), ("Segments (K)", "k"), ("Model", "model"), ("Model folder", "model_dir"),
                ("Centres file (optional)", "centers"), ("Legend (optional)", "legend"),
                ("Smoothing (cells)", "smooth"), ("Output GeoTIFF (empty: temporary)", "output")]
        for label, key in rows:
            widget = self.fields[key]
            widget.setToolTip(TOOLTIPS[key])
            caption = QLabel(label)
            caption.setToolTip(TOOLTIPS[key])
            caption.setBuddy(widget)
            form.addRow(caption, widget)
        self.status.setToolTip(TOOLTIPS["status"])
        self.install_button = QPushButton("Install the faster backend (onnxruntime)...")
        self.install_button.setToolTip(TOOLTIPS["install"])
        self.install_button.clicked.connect(lambda: self.install_dependencies())
        self.install_task = None
        self.install_message = ""
        buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel)
        buttons.button(QDialogButtonBox.Ok).setText("Run")
        buttons.accepted.connect(self.start)
        buttons.rejected.connect(self.reject)
        box = QVBoxLayout(self)
        box.addLayout(form)
        box.addWidget(self.status)
        box.addWidget(self.install_button)
        box.addWidget(buttons)
        self.model.currentIndexChanged.connect(self.update_fields)
        self.centers.fileChanged.connect(self.update_fields)
        self.update_fields()
        self.show_status()

    def update_fields(self, *_):
        """Enable the fields that apply: the model folder only for 'Model folder'; K only without a centres file."""
        self.model_dir.setEnabled(self.model.currentIndex() == MODEL_FOLDER)
        self.k.setEnabled(not self.centers.filePath())

    def show_status(self, summary=None):
        """The last run's backend and speed (kept when ``summary`` is None) and the dependency line, refreshed."""
        if summary is not None:
            self.summary = summary
        lines = [self.summary] if self.summary else []
        deps_line = dependency_text()
        if deps_line:
            lines.append(deps_line)
        self.status.setText("\n".join(lines))
        self.status.setVisible(bool(lines))
        missing = self.missing_dependencies()
        self.install_button.setVisible(bool(missing))
        self.install_button.setEnabled(bool(missing) and self.install_task is None)  # one install at a time

    def missing_dependencies(self):
        """The optional packages QGIS's Python lacks (deps.missing()); [] where the plugin cannot tell."""
        try:
            from . import deps

            return deps.missing()
        except Exception:  # noqa: BLE001 - the button is an offer; it must never break the dialog
            return []

    def install_dependencies(self, wheel_dir=None, confirm=True):
        """Offer, then run ``deps.install`` (QGIS's own pip, a private folder) as a background task; returns the
        task (tests wait on it), or None when declined or nothing is missing. ``wheel_dir``: install offline
        from a folder of wheels."""
        from . import deps

        missing = self.missing_dependencies()
        if not missing:
            self.show_status()
            return None
        if confirm and QMessageBox.question(
                self, "Map Segmenter", f"Install {', '.join(missing)} into {deps.deps_dir()} with QGIS's own pip? "
                "QGIS's numpy is not touched; the plugin uses them at once.") != QMessageBox.Yes:
            return None
        lines = []

        def run(task):
            try:
                deps.install(wheel_dir, log=lines.append)
                return True
            except deps.DepsError as exc:
                self.install_message = str(exc)
                return False

        def finished(exception, ok=None):
            self.install_task = None  # the task manager deletes a finished task
            if ok:
                self.install_message = "installed: " + deps.status_text()
            elif not self.install_message:
                self.install_message = f"install failed: {exception or 'see the log'}"
            self.tell(self.install_message, "success" if ok else "critical")
            self.show_status()

        self.install_message = ""
        self.install_button.setEnabled(False)
        self.install_task = QgsTask.fromFunction("Map Segmenter: install onnxruntime", run, on_finished=finished)
        QgsApplication.taskManager().addTask(self.install_task)
        return self.install_task

    def parameters(self):
        layer = self.layer.currentLayer()
        out = self.output.filePath() or os.path.join(tempfile.mkdtemp(prefix="mapseg-"), "segments.tif")
        if os.path.splitext(out)[1].lower() not in (".tif", ".tiff"):
            out = os.path.splitext(out)[0] + ".tif"
        model = self.model.currentIndex()
        return {"INPUT": layer, "K": self.k.value(), "MODEL": model,
                "MODEL_DIR": (self.model_dir.filePath() or None) if model == MODEL_FOLDER else None,
                "CENTERS": self.centers.filePath() or None, "SMOOTH": self.smooth.value(), "OUTPUT": out,
                **({"LEGEND": self.legend.filePath()} if self.legend.filePath() else {})}

    def tell(self, text, level="info"):
        self.notice = text
        if self.iface is not None:
            bar = self.iface.messageBar()
            {"info": bar.pushInfo, "warning": bar.pushWarning, "success": bar.pushSuccess,
             "critical": bar.pushCritical}[level]("Map Segmenter", text)

    def start(self):
        """Run the algorithm as a background task; returns the task (tests wait on it)."""
        params = self.parameters()
        if params["INPUT"] is None:
            QMessageBox.warning(self, "Map Segmenter", "Choose a raster layer first.")
            return None
        source = params["INPUT"].source().split("|")[0]
        if source and _file_key(source) == _file_key(params["OUTPUT"]):
            # refused here, before any layer is released (the input is one of them): the dialog stays open
            self.tell(f"The output {params['OUTPUT']} is the input raster: choose another output file.", "warning")
            self.show_status()
            self.status.setText(self.notice + ("\n" + self.status.text() if self.status.text() else ""))
            self.status.setVisible(True)
            return None
        self.finished = None
        self.result_layer = None
        self.results = None
        self.notice = ""
        released = ReleasedLayers(params["OUTPUT"])
        if released:
            self.tell(f"{os.path.basename(params['OUTPUT'])} was loaded in the project: released so it can be "
                      "replaced; the new result takes its place")
        self.accept()
        return self._run(params, released, retried=False)

    def _run(self, params, released, retried):
        self.context = QgsProcessingContext()
        self.context.setProject(QgsProject.instance())
        self.feedback = QgsProcessingFeedback()
        self.alg = SegmentRasterAlgorithm()
        self.alg.initAlgorithm()
        self.task = QgsProcessingAlgRunnerTask(self.alg, params, self.context, self.feedback)
        source = params["INPUT"]
        name = f"{source.name()} segments" + ("" if params.get("CENTERS") else f" (K={params['K']})")

        def done(ok, results):
            if ok:
                try:
                    self.result_layer = add_result_layer(results["OUTPUT"], source, name, place=released)
                except RuntimeError as exc:
                    self.tell(str(exc), "critical")
                    released.restore()
                    self.finished = False
                    return
                self.results = dict(results)
                summary = run_summary(results)
                self.show_status(f"Last run: {summary}" if summary else "")
                self.finished = True
                if self.iface is not None and summary:
                    self.iface.messageBar().pushSuccess("Map Segmenter", f"segmented: {summary}")
                return
            log = self.feedback.textLog() if hasattr(self.feedback, "textLog") else ""
            if not retried and not self.feedback.isCanceled() and REPLACE_FAILED.search(log or ""):
                new = free_name(params["OUTPUT"])
                released.restore()      # the old file is untouched: its layers come back
                self.tell(f"{params['OUTPUT']} could not be replaced (open in QGIS or another program); "
                          f"writing {new} instead", "warning")
                self._run({**params, "OUTPUT": new}, ReleasedLayers(new), retried=True)
                return
            released.restore()
            self.finished = False
            if self.iface is not None and not self.feedback.isCanceled():
                self.iface.messageBar().pushCritical("Map Segmenter", "segmentation failed: see the log panel")

        self.task.executed.connect(done)
        QgsApplication.taskManager().addTask(self.task)
        return self.task
