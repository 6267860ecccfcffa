"""The Processing provider: id ``mapseg``, algorithms ``mapseg:segment`` and ``mapseg:fit``."""
import os

from qgis.core import QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon

from .algorithm import SegmentRasterAlgorithm
from .fit_algorithm import FitCentersAlgorithm


class MapSegmenterProvider(QgsProcessingProvider):
    def id(self):
        return "mapseg"

    def name(self):
        return "Map Segmenter"

    def icon(self):
        return QIcon(os.path.join(os.path.dirname(__file__), "icon.png"))

    def loadAlgorithms(self):
        self.addAlgorithm(SegmentRasterAlgorithm())
        self.addAlgorithm(FitCentersAlgorithm())

    def supportedOutputRasterLayerExtensions(self):
        return ["tif"]
