"""The Processing provider: id ``mapseg``, one algorithm ``mapseg:segment``."""
import os

from qgis.core import QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon

from .algorithm import SegmentRasterAlgorithm


class MapSegmenterProvider(QgsProcessingProvider):
    def id(self):
        return "mapseg"

    def name(self):
        return "Map Segmenter"

    def icon(self):
        return QIcon(os.path.join(os.path.dirname(__file__), "icon.png"))

    def loadAlgorithms(self):
        self.addAlgorithm(SegmentRasterAlgorithm())

    def supportedOutputRasterLayerExtensions(self):
        return ["tif"]
