"""Plugin object: registers the Processing provider and a toolbar action opening the dialog."""
import os

from qgis.core import QgsApplication
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import QAction

from .provider import MapSegmenterProvider


class MapSegmenterPlugin:
    def __init__(self, iface):
        self.iface = iface
        self.provider = None
        self.action = None
        self.dialog = None

    def initProcessing(self):  # noqa: N802 - QGIS's name; also called by qgis_process
        self.provider = MapSegmenterProvider()
        QgsApplication.processingRegistry().addProvider(self.provider)

    def initGui(self):  # noqa: N802
        self.initProcessing()
        icon = QIcon(os.path.join(os.path.dirname(__file__), "icon.png"))
        self.action = QAction(icon, "Segment raster (Map Segmenter)…", self.iface.mainWindow())
        self.action.triggered.connect(self.run)
        self.iface.addToolBarIcon(self.action)
        self.iface.addPluginToRasterMenu("Map Segmenter", self.action)

    def unload(self):
        if self.action is not None:
            self.iface.removeToolBarIcon(self.action)
            self.iface.removePluginRasterMenu("Map Segmenter", self.action)
            self.action = None
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None

    def run(self):
        from .dialog import SegmentDialog  # qgis.gui: only when the dialog is opened

        if self.dialog is None:
            self.dialog = SegmentDialog(self.iface.mainWindow(), self.iface)
        else:
            self.dialog.show_status()   # the dependency line again: onnxruntime may have been installed since
        self.dialog.show()
        self.dialog.raise_()
