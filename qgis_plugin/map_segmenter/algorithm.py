"""The "Segment raster" Processing algorithm (``mapseg:segment``): mapseg's whole-raster pipeline in QGIS."""
import math
import os
import shutil

from qgis.core import (QgsProcessing, QgsProcessingAlgorithm, QgsProcessingException,
                       QgsProcessingParameterBoolean, QgsProcessingParameterEnum, QgsProcessingParameterFile,
                       QgsProcessingParameterNumber, QgsProcessingParameterRasterDestination,
                       QgsProcessingParameterRasterLayer, QgsProcessingParameterString,
                       QgsProcessingParameterVectorDestination)

from . import runtime

MODELS = ["Shipped default model", "Model folder (below)", "Colour k-means (no network)"]
BACKENDS = ["auto (onnxruntime if installed, else numpy)", "numpy", "onnx"]


class SegmentRasterAlgorithm(QgsProcessingAlgorithm):
    INPUT, K, MODEL, MODEL_DIR, BANDS, TILE, SMOOTH, CENTERS, BACKEND = (
        "INPUT", "K", "MODEL", "MODEL_DIR", "BANDS", "TILE", "SMOOTH", "CENTERS", "BACKEND")
    OUTPUT, OUTPUT_POLYGONS, MIN_AREA, COG, INPUT_MAX = "OUTPUT", "OUTPUT_POLYGONS", "MIN_AREA", "COG", "INPUT_MAX"

    def name(self):
        return "segment"

    def displayName(self):
        return "Segment raster"

    def group(self):
        return ""

    def groupId(self):
        return ""

    def shortHelpString(self):
        return ("Cuts an RGB raster into K segments without labels, window by window (any size), with cluster "
                "centres fitted once on a sample of the whole raster, so labels mean the same everywhere. "
                "Model: the shipped default (a small CNN distilled from an ImageNet teacher), an exported model "
                "folder, or plain colour k-means. Bands: three 1-based band numbers for rasters that are not "
                "3-band RGB (e.g. 1,2,3 for RGBN). Input maximum: the raw value of full brightness (e.g. 4095 "
                "for 12-bit imagery stored as 16-bit); 0 = 255 for 8-bit, for 16-bit what the file says (NBITS, "
                "statistics) or a sampled range, as the log states. Smoothing: majority filter radius in 4-pixel cells. "
                "Centres file: from 'mapseg fit', to give several rasters the same labels. Output: uint8 "
                "GeoTIFF with the input's CRS and extent, labels 0..K-1, 255 = nodata, and a colour table; "
                "optionally polygons (GDAL polygonize after removing patches under the minimum area).")

    def createInstance(self):
        return SegmentRasterAlgorithm()

    def initAlgorithm(self, config=None):
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, "Input raster"))
        self.addParameter(QgsProcessingParameterNumber(self.K, "Number of segments (K)",
                                                       QgsProcessingParameterNumber.Integer, 6, False, 2, 16))
        self.addParameter(QgsProcessingParameterEnum(self.MODEL, "Model", MODELS, defaultValue=0))
        self.addParameter(QgsProcessingParameterFile(self.MODEL_DIR, "Model folder (model.npz + meta.json)",
                                                     behavior=QgsProcessingParameterFile.Folder, optional=True))
        self.addParameter(QgsProcessingParameterString(self.BANDS, "Bands as R,G,B (e.g. 1,2,3; empty: a 3-band "
                                                                   "raster's bands)", optional=True))
        self.addParameter(QgsProcessingParameterNumber(self.INPUT_MAX, "Input maximum: raw value of full brightness "
                                                       "(0 = from the file: 255 for 8-bit, NBITS/statistics/"
                                                       "sampled range for 16-bit)",
                                                       QgsProcessingParameterNumber.Double, 0.0, True, 0.0))
        self.addParameter(QgsProcessingParameterNumber(self.TILE, "Window size (pixels, multiple of 4)",
                                                       QgsProcessingParameterNumber.Integer,
                                                       runtime.submodule("windows").DEFAULT_TILE, False, 64, 8192))
        self.addParameter(QgsProcessingParameterNumber(self.SMOOTH, "Smoothing radius (cells, 0 = none)",
                                                       QgsProcessingParameterNumber.Integer, 0, False, 0, 8))
        self.addParameter(QgsProcessingParameterFile(self.CENTERS, "Cluster centres file (from mapseg fit)",
                                                     extension="json", optional=True))
        self.addParameter(QgsProcessingParameterEnum(self.BACKEND, "Backend", BACKENDS, defaultValue=0))
        self.addParameter(QgsProcessingParameterBoolean(self.COG, "Write a Cloud Optimized GeoTIFF", False))
        self.addParameter(QgsProcessingParameterRasterDestination(self.OUTPUT, "Segments"))
        self.addParameter(QgsProcessingParameterVectorDestination(
            self.OUTPUT_POLYGONS, "Segments as polygons", QgsProcessing.TypeVectorPolygon, optional=True,
            createByDefault=False))
        self.addParameter(QgsProcessingParameterNumber(self.MIN_AREA, "Polygons: minimum area (map units²)",
                                                       QgsProcessingParameterNumber.Double, 0.0, True, 0.0))

    # ------------------------------------------------------------------ run

    def _features(self, parameters, context, feedback):
        features = runtime.submodule("features")
        backends = runtime.submodule("backends")
        choice = self.parameterAsEnum(parameters, self.MODEL, context)
        if choice == 2:
            return features.load_features("kmeans", "numpy")
        if choice == 1:
            path = self.parameterAsFile(parameters, self.MODEL_DIR, context)
            if not path:
                raise QgsProcessingException("Model: 'Model folder' needs a folder holding model.npz and meta.json")
        else:
            path = runtime.default_model()
            if path is None:
                raise QgsProcessingException("no default model is bundled with this plugin; choose a model folder "
                                             "or colour k-means")
        requested = ["auto", "numpy", "onnx"][self.parameterAsEnum(parameters, self.BACKEND, context)]
        backend = runtime.backend_choice(requested)
        try:
            return features.load_features(path, backend)
        except backends.BackendUnavailable as exc:
            if requested == "onnx":
                raise QgsProcessingException(str(exc))
            feedback.pushInfo(f"onnx backend unavailable ({exc}); using the numpy backend")
            return features.load_features(path, "numpy")

    def processAlgorithm(self, parameters, context, feedback):
        segment = runtime.submodule("segment")
        raster = runtime.submodule("raster")
        errors = runtime.submodule("errors")
        layer = self.parameterAsRasterLayer(parameters, self.INPUT, context)
        if layer is None:
            raise QgsProcessingException("Input raster: not a raster layer")
        if layer.providerType() != "gdal":
            raise QgsProcessingException(f"Input raster: {layer.name()} is a {layer.providerType()} layer; "
                                         "Map Segmenter reads files GDAL can open")
        source = layer.source().split("|")[0]
        out = self.parameterAsOutputLayer(parameters, self.OUTPUT, context)
        if os.path.splitext(out)[1].lower() not in (".tif", ".tiff"):
            out = os.path.splitext(out)[0] + ".tif"
        k = self.parameterAsInt(parameters, self.K, context)
        centers = self.parameterAsFile(parameters, self.CENTERS, context) or None
        input_max = self.parameterAsDouble(parameters, self.INPUT_MAX, context) or None
        polygons = self.parameterAsOutputLayer(parameters, self.OUTPUT_POLYGONS, context)
        try:
            bands = raster.parse_bands(self.parameterAsString(parameters, self.BANDS, context).strip() or None)
            options = segment.SegmentOptions(
                k=None if centers else k, centers=centers, model=self._features(parameters, context, feedback),
                tile=self.parameterAsInt(parameters, self.TILE, context), bands=bands, input_max=input_max,
                smooth=self.parameterAsInt(parameters, self.SMOOTH, context),
                cog=self.parameterAsBool(parameters, self.COG, context))
            feedback.pushInfo(f"mapseg from {os.path.dirname(segment.__file__)}; raster I/O: {raster.io_library()}")
            report = segment.segment_raster(
                source, out, options, progress=False, log=feedback.pushInfo,
                callback=lambda fraction, stage: (feedback.setProgress(100.0 * fraction),
                                                  not feedback.isCanceled())[1],
                other_outputs={"polygons": polygons or None})
        except errors.SegmentCancelled:
            raise QgsProcessingException("Cancelled: no output was written")
        except errors.USER_ERRORS + (ValueError, OSError) as exc:  # every failure a message, never a traceback
            raise QgsProcessingException(str(exc))
        results = {self.OUTPUT: out, "K": report["k"], "BACKEND": report["backend"],
                   "MEGAPIXELS_PER_S": report["megapixels_per_s"], "SCALING": report["scaling"]}
        if polygons:
            min_area = self.parameterAsDouble(parameters, self.MIN_AREA, context)
            try:
                results[self.OUTPUT_POLYGONS] = polygonize(out, polygons, min_area, feedback)
            except (RuntimeError, OSError) as exc:  # GDAL/OGR: a message, not a traceback
                raise QgsProcessingException(f"Segments as polygons: writing {polygons} failed ({exc}); "
                                             f"the label raster {out} is complete")
        return results


def polygonize(label_path, out_path, min_area, feedback):
    """GDAL polygonize of the label raster (nodata excluded) into a vector file with a 'label' field;
    patches under ``min_area`` map units² are first merged into their neighbours (GDAL sieve)."""
    from osgeo import gdal, ogr, osr

    gdal.UseExceptions()
    src = gdal.Open(label_path)
    band = src.GetRasterBand(1)
    gt = src.GetGeoTransform()
    work, work_band = src, band
    if min_area and min_area > 0:
        pixels = int(math.ceil(min_area / abs(gt[1] * gt[5])))
        if pixels > 1:
            work = gdal.GetDriverByName("MEM").CreateCopy("", src)
            work_band = work.GetRasterBand(1)
            gdal.SieveFilter(band, band.GetMaskBand(), work_band, pixels, 4)
            feedback.pushInfo(f"removed patches under {min_area} map units² ({pixels} pixels) before polygonizing")
    ext = os.path.splitext(out_path)[1].lower().lstrip(".") or "gpkg"
    driver_name = {"gpkg": "GPKG", "shp": "ESRI Shapefile", "geojson": "GeoJSON", "fgb": "FlatGeobuf"}.get(ext)
    if driver_name is None:
        raise QgsProcessingException(f"Segments as polygons: unsupported format .{ext} (use .gpkg, .shp, .geojson)")
    drv = ogr.GetDriverByName(driver_name)
    # Written in a temporary folder beside the target and moved into place only when complete (a shapefile is
    # several files): a cancelled or failed run leaves no half-written polygons, and keeps an older result.
    out_dir = os.path.dirname(os.path.abspath(out_path))
    # named as mapseg's temporaries are (process id, host): a run killed here leaves a folder the next run removes
    tmp_dir = str(runtime.submodule("fileio").temp_sibling(os.path.abspath(out_path), "polygons", ""))
    os.mkdir(tmp_dir)
    try:
        tmp_path = os.path.join(tmp_dir, os.path.basename(out_path))
        ds = drv.CreateDataSource(tmp_path)
        srs = None
        if src.GetProjection():
            srs = osr.SpatialReference()
            srs.ImportFromWkt(src.GetProjection())
        lyr = ds.CreateLayer("segments", srs, ogr.wkbPolygon)
        lyr.CreateField(ogr.FieldDefn("label", ogr.OFTInteger))
        gdal.Polygonize(work_band, work_band.GetMaskBand(), lyr, 0, [],
                        callback=lambda frac, msg, data: 0 if feedback.isCanceled() else 1)
        n = lyr.GetFeatureCount()
        lyr = ds = None
        if feedback.isCanceled():
            raise QgsProcessingException("Cancelled while polygonizing: no polygons written")
        if os.path.exists(out_path):
            drv.DeleteDataSource(out_path)
        for name in os.listdir(tmp_dir):
            os.replace(os.path.join(tmp_dir, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    feedback.pushInfo(f"wrote {n} polygons to {out_path}")
    return out_path
