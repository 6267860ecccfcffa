"""The "Fit cluster centres" Processing algorithm (``mapseg:fit``): one centres file for several rasters.

``mapseg fit`` in QGIS: K centres fitted on a sample drawn from every input raster, saved as a centres file
(with the legend's class names and colours when one is given). ``mapseg:segment`` with that file as its
centres gives every raster the same labels, meaning the same thing, with the same names: segment a batch of
layers with it (the batch interface, or a model).
"""
import os

from qgis.core import (QgsProcessing, QgsProcessingException,
                       QgsProcessingOutputNumber, QgsProcessingParameterFile,
                       QgsProcessingParameterFileDestination, QgsProcessingParameterMultipleLayers,
                       QgsProcessingParameterNumber, QgsProcessingParameterString)

from . import runtime
from .algorithm import MapSegmenterAlgorithm, add_model_parameters, advanced, load_model


class _Cancelled(Exception):
    pass


class FitCentersAlgorithm(MapSegmenterAlgorithm):
    INPUTS, K, BANDS, INPUT_MAX, RESOLUTION, LEGEND, OUTPUT = (
        "INPUTS", "K", "BANDS", "INPUT_MAX", "RESOLUTION", "LEGEND", "OUTPUT")

    def name(self):
        return "fit"

    def displayName(self):
        return "Fit cluster centres (same labels for several rasters)"

    def shortHelpString(self):
        return ("Fits K cluster centres on a sample drawn from every input raster and saves them as a centres "
                "file (.json). Give that file as 'Cluster centres file' of 'Segment raster' (one run per raster, "
                "e.g. in the batch interface): every raster then gets the same labels, meaning the same thing. "
                "A legend (legend.json) is kept in the file, so every output gets the same class names and "
                "colours. Use the same model, bands and resolution as the segment runs will.")

    def createInstance(self):
        return FitCentersAlgorithm()

    def initAlgorithm(self, config=None):
        self.addParameter(QgsProcessingParameterMultipleLayers(self.INPUTS, "Input rasters",
                                                               QgsProcessing.TypeRaster))
        self.addParameter(QgsProcessingParameterNumber(self.K, "Number of segments (K)",
                                                       QgsProcessingParameterNumber.Integer, 6, False, 2, 16))
        add_model_parameters(self)
        self.addParameter(QgsProcessingParameterString(self.BANDS, "Bands as R,G,B (e.g. 1,2,3; empty: a 3-band "
                                                                   "raster's bands)", optional=True))
        self.addParameter(QgsProcessingParameterFile(self.LEGEND, "Legend: class names and colours (legend.json)",
                                                     extension="json", optional=True))
        self.addParameter(QgsProcessingParameterNumber(self.RESOLUTION, "Resolution (metres per pixel, 0 = as is)",
                                                       QgsProcessingParameterNumber.Double, 0.0, True, 0.0))
        self.addParameter(advanced(QgsProcessingParameterNumber(
            self.INPUT_MAX, "Input maximum: raw value of full brightness (0 = from each file)",
            QgsProcessingParameterNumber.Double, 0.0, True, 0.0)))
        self.addParameter(QgsProcessingParameterFileDestination(self.OUTPUT, "Centres file", "JSON files (*.json)"))
        self.addOutput(QgsProcessingOutputNumber("K", "Number of segments"))

    def processAlgorithm(self, parameters, context, feedback):
        segment = runtime.submodule("segment")
        raster = runtime.submodule("raster")
        errors = runtime.submodule("errors")
        legend_mod = runtime.submodule("legend")
        layers = self.parameterAsLayerList(parameters, self.INPUTS, context)
        if not layers:
            raise QgsProcessingException("Input rasters: give at least one raster layer")
        paths = []
        for layer in layers:
            if layer.providerType() != "gdal":
                raise QgsProcessingException(f"Input rasters: {layer.name()} is a {layer.providerType()} layer; "
                                             "Map Segmenter reads files GDAL can open")
            paths.append(layer.source().split("|")[0])
        out = self.parameterAsFileOutput(parameters, self.OUTPUT, context)
        if not out.lower().endswith(".json"):
            out = os.path.splitext(out)[0] + ".json"
        k = self.parameterAsInt(parameters, self.K, context)
        legend_path = self.parameterAsFile(parameters, self.LEGEND, context) or None
        try:
            legend = legend_mod.load_legend(legend_path)
            if legend is not None:
                legend.check_k(k, f"legend {legend_path}")
            if legend_path and os.path.exists(out) and os.path.samefile(legend_path, out):
                raise QgsProcessingException(f"Centres file {out} is the legend file: choose another name")
            options = segment.SegmentOptions(
                k=k, model=load_model(self, parameters, context, feedback),
                bands=raster.parse_bands(self.parameterAsString(parameters, self.BANDS, context).strip() or None),
                input_max=self.parameterAsDouble(parameters, self.INPUT_MAX, context) or None,
                resolution=self.parameterAsDouble(parameters, self.RESOLUTION, context) or None)
            feedback.pushInfo(f"fitting K={k} centres on {len(paths)} raster(s)")
            sampled = []

            def log(message):  # mapseg logs each raster's steps: progress by raster, and a cancel point
                feedback.pushInfo(message)
                if message.startswith("sampled "):
                    sampled.append(message)
                    feedback.setProgress(90.0 * len(sampled) / len(paths))
                if feedback.isCanceled():
                    raise _Cancelled()

            centers = segment.fit_raster_centers(paths, options, log=log, output=out)
            if feedback.isCanceled():
                raise _Cancelled()
            if legend is not None:
                centers.legend = legend.completed(range(centers.k)).to_json()
            centers.save(out)
        except _Cancelled:
            raise QgsProcessingException("Cancelled: no centres file was written")
        except errors.USER_ERRORS + (ValueError, OSError) as exc:  # every failure a message, never a traceback
            raise QgsProcessingException(str(exc))
        feedback.setProgress(100.0)
        feedback.pushInfo(f"wrote {out}: K={centers.k} centres from {len(paths)} raster(s)")
        return {self.OUTPUT: out, "K": centers.k}
