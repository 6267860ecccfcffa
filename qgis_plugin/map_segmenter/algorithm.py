"""The "Segment raster" Processing algorithm (``mapseg:segment``): mapseg's whole-raster pipeline in QGIS."""
import math
import os
import shutil

from qgis.core import (QgsCoordinateReferenceSystem, QgsDistanceArea, QgsGeometry, QgsProcessing,
                       QgsProcessingAlgorithm, QgsProcessingException, QgsProcessingLayerPostProcessorInterface,
                       QgsProcessingOutputNumber, QgsProcessingOutputString, QgsProcessingParameterBoolean,
                       QgsProcessingParameterDefinition, QgsProcessingParameterEnum, QgsProcessingParameterExtent,
                       QgsProcessingParameterFeatureSource, QgsProcessingParameterFile,
                       QgsProcessingParameterNumber, QgsProcessingParameterRasterDestination,
                       QgsProcessingParameterRasterLayer, QgsProcessingParameterString,
                       QgsProcessingParameterVectorDestination, QgsProcessingUtils, QgsProject, QgsRectangle,
                       QgsUnitTypes, QgsVectorFileWriter, QgsVectorLayer)
from qgis.PyQt.QtCore import QUrl

from . import render, runtime

MODELS = ["Shipped default model", "Model folder (below)", "Colour k-means (no network)"]
BACKENDS = ["auto (onnxruntime if installed, else numpy)", "numpy", "onnx"]
GROUP, GROUP_ID = "Segmentation", "segmentation"


def help_url():
    """A file:// URL of docs/qgis.md: the copy bundled in the plugin folder, else the development checkout's;
    None when neither exists."""
    for path in (os.path.join(runtime.HERE, "docs", "qgis.md"), os.path.join(runtime.REPO, "docs", "qgis.md")):
        if os.path.isfile(path):
            return QUrl.fromLocalFile(path).toString()
    return None


def advanced(parameter):
    parameter.setFlags(parameter.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
    return parameter


def add_model_parameters(alg):
    """MODEL, MODEL_DIR and BACKEND (advanced), shared by mapseg:segment and mapseg:fit."""
    alg.addParameter(QgsProcessingParameterEnum("MODEL", "Model", MODELS, defaultValue=0))
    alg.addParameter(QgsProcessingParameterFile("MODEL_DIR", "Model folder (model.npz + meta.json)",
                                                behavior=QgsProcessingParameterFile.Folder, optional=True))
    alg.addParameter(advanced(QgsProcessingParameterEnum("BACKEND", "Backend", BACKENDS, defaultValue=0)))


def load_model(alg, parameters, context, feedback):
    """The feature model MODEL / MODEL_DIR / BACKEND name, loaded (a QgsProcessingException when it cannot be)."""
    features = runtime.submodule("features")
    errors = runtime.submodule("errors")
    choice = alg.parameterAsEnum(parameters, "MODEL", context)
    if choice == 2:
        return features.load_features("kmeans", "numpy")
    if choice == 1:
        path = alg.parameterAsFile(parameters, "MODEL_DIR", context)
        if not path:
            raise QgsProcessingException("Model: 'Model folder' needs a folder holding model.npz and meta.json")
    else:
        path = runtime.default_model()
        if path is None:
            raise QgsProcessingException("no default model is bundled with this plugin; choose a model folder "
                                         "or colour k-means")
    requested = ["auto", "numpy", "onnx"][alg.parameterAsEnum(parameters, "BACKEND", context)]
    backend = runtime.backend_choice(requested)
    try:
        try:
            return features.load_features(path, backend)
        except errors.BackendUnavailable as exc:
            if requested == "onnx":
                raise
            feedback.pushInfo(f"onnx backend unavailable ({exc}); using the numpy backend")
            return features.load_features(path, "numpy")
    except errors.USER_ERRORS + (ValueError, OSError) as exc:
        raise QgsProcessingException(str(exc))


class _LegendStyle(QgsProcessingLayerPostProcessorInterface):
    """Applies OUT.qml (the run's class names and colours, written by mapseg) to the layer Processing loads."""

    def __init__(self, qml):
        super().__init__()
        self.qml = qml

    def postProcessLayer(self, layer, context, feedback):
        if os.path.isfile(self.qml):
            message, ok = layer.loadNamedStyle(self.qml)
            if not ok:
                feedback.pushInfo(f"could not apply the class names of {self.qml}: {message}")
            layer.triggerRepaint()


_STYLERS = []  # the post-processors must outlive processAlgorithm (Processing keeps no Python reference)


def pixel_area_m2(path):
    """(ground area of one pixel of the raster at ``path`` in m², how it was measured): the pixels at the
    raster's middle measured on the CRS's ellipsoid (QgsDistanceArea: right for degrees and Web Mercator
    alike), or their planar area where that is within 0.5 % of it (as mapseg.vectors); None for a raster
    without a CRS."""
    from osgeo import gdal

    ds = gdal.Open(path)
    gt, w, h, wkt = ds.GetGeoTransform(), ds.RasterXSize, ds.RasterYSize, ds.GetProjection()
    ds = None
    crs = QgsCoordinateReferenceSystem.fromWkt(wkt) if wkt else QgsCoordinateReferenceSystem()
    if not crs.isValid():
        return None, "the raster has no CRS"
    nx, ny = min(w, 16), min(h, 16)  # a block of pixels at the middle: less rounding than one tiny pixel
    c0, r0 = (w - nx) // 2, (h - ny) // 2
    xs = (gt[0] + c0 * gt[1], gt[0] + (c0 + nx) * gt[1])
    ys = (gt[3] + r0 * gt[5], gt[3] + (r0 + ny) * gt[5])
    box = QgsRectangle(min(xs), min(ys), max(xs), max(ys))
    da = QgsDistanceArea()
    da.setSourceCrs(crs, QgsProject.instance().transformContext())
    name = crs.authid() or crs.description()
    planar = None
    if not crs.isGeographic() and crs.mapUnits() != QgsUnitTypes.DistanceDegrees:
        factor = QgsUnitTypes.fromUnitToUnitFactor(crs.mapUnits(), QgsUnitTypes.DistanceMeters)
        if math.isfinite(factor) and factor > 0:
            planar = box.width() * box.height() * factor * factor
    ellipsoid = crs.ellipsoidAcronym()
    if ellipsoid and ellipsoid.upper() != "NONE" and da.setEllipsoid(ellipsoid) and da.willUseEllipsoid():
        area = da.convertAreaMeasurement(da.measureArea(QgsGeometry.fromRect(box)), QgsUnitTypes.AreaSquareMeters)
        # as mapseg: a projected CRS whose areas are within 0.5 % of the ground's (UTM, national grids,
        # equal-area) keeps its own; others (Web Mercator) and degrees are measured on the ellipsoid
        if planar is not None and area > 0 and abs(planar / area - 1) < 0.005:
            return planar / (nx * ny), f"planar in {name}, within 0.5 % of the ground's"
        return area / (nx * ny), f"on the ellipsoid of {name}"
    if planar is None:
        return None, f"{name} has no ellipsoid to measure degrees on"
    return planar / (nx * ny), f"planar in {name}"


class MapSegmenterAlgorithm(QgsProcessingAlgorithm):
    """What every algorithm of the provider shares: its group and its help page."""

    def group(self):
        return GROUP

    def groupId(self):
        return GROUP_ID

    def helpUrl(self):
        return help_url() or ""


class SegmentRasterAlgorithm(MapSegmenterAlgorithm):
    INPUT, K, MODEL, MODEL_DIR, BANDS, TILE, SMOOTH, CENTERS, BACKEND = (
        "INPUT", "K", "MODEL", "MODEL_DIR", "BANDS", "TILE", "SMOOTH", "CENTERS", "BACKEND")
    UPSAMPLE = "UPSAMPLE"
    # mapseg segment --upsample: the model's own (meta.json), or one asked for
    UPSAMPLES = ["The model's own (the shipped model: guided)", "Guided (edges follow the image)",
                 "Nearest (4 x 4 cells, faster)"]
    OUTPUT, OUTPUT_POLYGONS, MIN_AREA, COG, INPUT_MAX = "OUTPUT", "OUTPUT_POLYGONS", "MIN_AREA", "COG", "INPUT_MAX"
    EXTENT, MASK, RESOLUTION, LEGEND, SIMPLIFY = "EXTENT", "MASK", "RESOLUTION", "LEGEND", "SIMPLIFY"

    def name(self):
        return "segment"

    def displayName(self):
        return "Segment raster"

    def shortHelpString(self):
        return ("Cuts an RGB raster into K segments without labels, window by window (any size), with cluster "
                "centres fitted once on a sample of the whole raster, so labels mean the same everywhere. "
                "Model: the shipped default (a small CNN distilled from an ImageNet teacher), an exported model "
                "folder, or plain colour k-means. Bands: three 1-based band numbers for rasters that are not "
                "3-band RGB (e.g. 1,2,3 for RGBN). Input maximum: the raw value of full brightness (e.g. 4095 "
                "for 12-bit imagery stored as 16-bit); 0 = 255 for 8-bit, for 16-bit what the file says (NBITS, "
                "statistics) or a sampled range, as the log states. Smoothing: majority filter radius in 4-pixel "
                "cells. "
                "Centres file: from 'Fit cluster centres' (mapseg:fit) or 'mapseg fit', to give several rasters the "
                "same labels and class names. Extent: segment only this area (any CRS; cut to the raster). Mask: "
                "polygons; pixels outside them are nodata (without an extent the output covers their bounds). "
                "Resolution: metres per output pixel, resampled on read (0 = the raster's own). Legend: a "
                "legend.json naming and colouring labels; the output layer shows the names. Output: uint8 "
                "GeoTIFF with the input's CRS, labels 0..K-1, 255 = nodata, a colour table, OUT.qml and "
                "OUT.tif.aux.xml with the class names; optionally polygons (GDAL polygonize after merging patches "
                "under the minimum area, in m² on the ground, into their neighbours; optionally simplified with a "
                "tolerance in metres, neighbours keeping one common edge: no gaps, no overlaps).")

    def createInstance(self):
        return SegmentRasterAlgorithm()

    def initAlgorithm(self, config=None):
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, "Input raster"))
        self.addParameter(QgsProcessingParameterNumber(self.K, "Number of segments (K)",
                                                       QgsProcessingParameterNumber.Integer, 6, False, 2, 16))
        add_model_parameters(self)
        self.addParameter(QgsProcessingParameterString(self.BANDS, "Bands as R,G,B (e.g. 1,2,3; empty: a 3-band "
                                                                   "raster's bands)", optional=True))
        self.addParameter(QgsProcessingParameterFile(self.CENTERS, "Cluster centres file (from mapseg:fit)",
                                                     extension="json", optional=True))
        self.addParameter(QgsProcessingParameterFile(self.LEGEND, "Legend: class names and colours (legend.json)",
                                                     extension="json", optional=True))
        self.addParameter(QgsProcessingParameterExtent(self.EXTENT, "Extent (empty: the whole raster; required for online layers)",
                                                       optional=True))
        self.addParameter(QgsProcessingParameterFeatureSource(
            self.MASK, "Mask: segment inside these polygons only", [QgsProcessing.TypeVectorPolygon],
            optional=True))
        self.addParameter(QgsProcessingParameterNumber(self.RESOLUTION,
                                                       "Resolution (metres per pixel, 0 = as is; online layers: 1 m)",
                                                       QgsProcessingParameterNumber.Double, 0.0, True, 0.0))
        self.addParameter(advanced(QgsProcessingParameterNumber(
            self.INPUT_MAX, "Input maximum: raw value of full brightness (0 = from the file: 255 for 8-bit, "
            "NBITS/statistics/sampled range for 16-bit)", QgsProcessingParameterNumber.Double, 0.0, True, 0.0)))
        self.addParameter(advanced(QgsProcessingParameterNumber(
            self.TILE, "Window size (pixels, multiple of 4)", QgsProcessingParameterNumber.Integer,
            runtime.submodule("windows").DEFAULT_TILE, False, 64, 8192)))
        self.addParameter(advanced(QgsProcessingParameterNumber(
            self.SMOOTH, "Smoothing radius (cells, 0 = none)", QgsProcessingParameterNumber.Integer, 0, False, 0, 8)))
        self.addParameter(advanced(QgsProcessingParameterEnum(
            self.UPSAMPLE, "Upsampling of the 4 x 4-pixel cells (colour k-means: none)", self.UPSAMPLES,
            defaultValue=0)))
        self.addParameter(advanced(QgsProcessingParameterBoolean(self.COG, "Write a Cloud Optimized GeoTIFF",
                                                                 False)))
        self.addParameter(QgsProcessingParameterRasterDestination(self.OUTPUT, "Segments"))
        self.addParameter(QgsProcessingParameterVectorDestination(
            self.OUTPUT_POLYGONS, "Segments as polygons", QgsProcessing.TypeVectorPolygon, optional=True,
            createByDefault=False))
        self.addParameter(QgsProcessingParameterNumber(self.MIN_AREA, "Polygons: minimum area (m² on the ground)",
                                                       QgsProcessingParameterNumber.Double, 0.0, True, 0.0))
        self.addParameter(QgsProcessingParameterNumber(
            self.SIMPLIFY, "Polygons: simplification tolerance (metres, 0 = none; shared edges kept)",
            QgsProcessingParameterNumber.Double, 0.0, True, 0.0))
        self.addOutput(QgsProcessingOutputNumber("K", "Number of segments"))
        self.addOutput(QgsProcessingOutputNumber("MEGAPIXELS_PER_S", "Speed (megapixels per second)"))
        self.addOutput(QgsProcessingOutputString("BACKEND", "Backend used"))
        self.addOutput(QgsProcessingOutputString("SCALING", "Input scaling"))

    # ------------------------------------------------------------------ run

    def _extent(self, parameters, context, layer):
        """(xmin, ymin, xmax, ymax) and the CRS they are in (None: the raster's), or (None, None)."""
        if parameters.get(self.EXTENT) in (None, ""):
            return None, None
        crs = self.parameterAsExtentCrs(parameters, self.EXTENT, context)
        rect = self.parameterAsExtent(parameters, self.EXTENT, context)
        if rect.isNull() or rect.isEmpty():
            return None, None
        box = (rect.xMinimum(), rect.yMinimum(), rect.xMaximum(), rect.yMaximum())
        if not crs.isValid() or crs == layer.crs():
            return box, None
        return box, crs.authid() or crs.toWkt(QgsCoordinateReferenceSystem.WKT_PREFERRED_GDAL)

    def _render_online(self, parameters, context, feedback, layer):
        """An online layer (XYZ, WMS, WCS, ...) rendered over EXTENT at RESOLUTION into a temporary GeoTIFF."""
        if parameters.get(self.EXTENT) in (None, ""):
            raise QgsProcessingException(
                f"Extent: {layer.name()} is a {layer.providerType()} layer (a service, not a file): give the extent "
                "to segment; it is rendered at the resolution (metres per pixel) and segmented")
        crs = self.parameterAsExtentCrs(parameters, self.EXTENT, context)
        if not crs.isValid():
            crs = layer.crs()
        rect = self.parameterAsExtent(parameters, self.EXTENT, context, crs)
        res = self.parameterAsDouble(parameters, self.RESOLUTION, context)
        if not res:
            res = render.DEFAULT_RESOLUTION
            feedback.pushInfo(f"resolution 0: {layer.name()} is rendered at {res:g} m per pixel")
        path = QgsProcessingUtils.generateTempFilename("online_layer.tif")
        return render.render_layer_to_geotiff(layer, rect, crs, res, path, feedback,
                                              transform_context=context.transformContext(), progress_span=(0.0, 20.0))

    def _mask(self, parameters, context, feedback):
        """The mask's polygons as a one-layer file mapseg reads: the layer's own file when it is one, else a
        temporary GeoPackage (memory layers, selections, subsets, files of several layers)."""
        if parameters.get(self.MASK) in (None, ""):
            return None
        if self.parameterAsSource(parameters, self.MASK, context) is None:
            raise QgsProcessingException("Mask: not a vector layer of polygons")
        path, layer_name = self.parameterAsCompatibleSourceLayerPathAndLayerName(
            parameters, self.MASK, context, ["gpkg", "shp", "geojson", "json", "fgb"], "gpkg", feedback)
        if layer_name:
            from osgeo import ogr

            ds = ogr.Open(path)
            several = ds is not None and ds.GetLayerCount() > 1
            ds = None
            if several:  # mapseg takes a file of one layer: copy that layer out
                source = QgsVectorLayer(f"{path}|layername={layer_name}", "mask", "ogr")
                out = QgsProcessingUtils.generateTempFilename("mask.gpkg")
                options = QgsVectorFileWriter.SaveVectorOptions()
                options.driverName = "GPKG"
                err = QgsVectorFileWriter.writeAsVectorFormatV2(source, out, context.transformContext(), options)
                if err[0] != QgsVectorFileWriter.NoError:
                    raise QgsProcessingException(f"Mask: copying layer {layer_name} of {path} failed ({err[1]})")
                path = out
        feedback.pushInfo(f"mask: {path}")
        return path

    def processAlgorithm(self, parameters, context, feedback):
        segment = runtime.submodule("segment")
        raster = runtime.submodule("raster")
        errors = runtime.submodule("errors")
        layer = self.parameterAsRasterLayer(parameters, self.INPUT, context)
        if layer is None:
            raise QgsProcessingException("Input raster: not a raster layer")
        out = self.parameterAsOutputLayer(parameters, self.OUTPUT, context)
        if os.path.splitext(out)[1].lower() not in (".tif", ".tiff"):
            out = os.path.splitext(out)[0] + ".tif"
        k = self.parameterAsInt(parameters, self.K, context)
        centers = self.parameterAsFile(parameters, self.CENTERS, context) or None
        legend = self.parameterAsFile(parameters, self.LEGEND, context) or None
        input_max = self.parameterAsDouble(parameters, self.INPUT_MAX, context) or None
        resolution = self.parameterAsDouble(parameters, self.RESOLUTION, context) or None
        polygons = self.parameterAsOutputLayer(parameters, self.OUTPUT_POLYGONS, context)
        extent, extent_crs = self._extent(parameters, context, layer)
        mask = self._mask(parameters, context, feedback)
        # an online layer (XYZ, WMS, WCS, ...) is drawn by QGIS over EXTENT at RESOLUTION into a temporary GeoTIFF
        rendered = self._render_online(parameters, context, feedback, layer) if render.needs_rendering(layer) else None
        source = rendered or layer.source().split("|")[0]
        start = 20.0 if rendered else 0.0
        if rendered:  # the rendered file is the extent at the resolution already
            extent, extent_crs, resolution = None, None, None
        try:
            bands = raster.parse_bands(self.parameterAsString(parameters, self.BANDS, context).strip() or None)
            model = load_model(self, parameters, context, feedback)
            upsample = [None, "guided", "nearest"][self.parameterAsEnum(parameters, self.UPSAMPLE, context)]
            if model.stride == 1:  # colour k-means labels pixels: nothing to upsample, whatever was chosen
                upsample = None
            options = segment.SegmentOptions(
                k=None if centers else k, centers=centers, model=model,
                tile=self.parameterAsInt(parameters, self.TILE, context), bands=bands, input_max=input_max,
                smooth=self.parameterAsInt(parameters, self.SMOOTH, context), upsample=upsample,
                cog=self.parameterAsBool(parameters, self.COG, context), extent=extent, extent_crs=extent_crs,
                mask=mask, resolution=resolution, legend=legend)
            feedback.pushInfo(f"mapseg from {os.path.dirname(segment.__file__)}; raster I/O: {raster.io_library()}")
            report = segment.segment_raster(
                source, out, options, progress=False, log=feedback.pushInfo,
                callback=lambda fraction, stage: (feedback.setProgress(start + (100.0 - start) * fraction),
                                                  not feedback.isCanceled())[1],
                other_outputs={"polygons": polygons or None})
        except errors.SegmentCancelled:
            raise QgsProcessingException("Cancelled: no output was written")
        except errors.USER_ERRORS + (ValueError, OSError) as exc:  # every failure a message, never a traceback
            raise QgsProcessingException(str(exc))
        finally:
            if rendered and os.path.exists(rendered):
                os.remove(rendered)
        qml = str(runtime.submodule("legend").style_path(out))
        if context.willLoadLayerOnCompletion(out):  # the layer Processing adds shows the class names
            styler = _LegendStyle(qml)
            _STYLERS.append(styler)
            context.layerToLoadOnCompletionDetails(out).setPostProcessor(styler)
        results = {self.OUTPUT: out, "K": report["k"], "BACKEND": report["backend"],
                   "MEGAPIXELS_PER_S": report["megapixels_per_s"], "SCALING": report["scaling"]}
        if polygons:
            min_area = self.parameterAsDouble(parameters, self.MIN_AREA, context)
            try:
                names = {c["value"]: c["name"] for c in report.get("classes", [])}
                simplify = self.parameterAsDouble(parameters, self.SIMPLIFY, context)
                results[self.OUTPUT_POLYGONS] = polygonize(out, polygons, min_area, feedback, names, simplify)
            except (RuntimeError, OSError) as exc:  # GDAL/OGR: a message, not a traceback
                raise QgsProcessingException(f"Segments as polygons: writing {polygons} failed ({exc}); "
                                             f"the label raster {out} is complete")
        return results


def sieve_passes(pixels):
    """GDAL's sieve merges a small region only into a neighbour that is not small itself: thresholds of
    2, 4, 8, ... up to ``pixels`` merge speckle step by step (as mapseg.vectors does)."""
    steps, t = [], 2
    while t < pixels:
        steps.append(t)
        t *= 2
    return steps + [pixels]


def _douglas_peucker(points, tolerance):
    """Douglas-Peucker of one arc (a list of (x, y)), its end points kept."""
    keep = [False] * len(points)
    keep[0] = keep[-1] = True
    stack = [(0, len(points) - 1)]
    while stack:
        a, b = stack.pop()
        if b <= a + 1:
            continue
        (xa, ya), (xb, yb) = points[a], points[b]
        dx, dy = xb - xa, yb - ya
        norm = math.hypot(dx, dy)
        best, where = -1.0, None
        for i in range(a + 1, b):
            x, y = points[i]
            d = abs(dy * (x - xa) - dx * (y - ya)) / norm if norm else math.hypot(x - xa, y - ya)
            if d > best:
                best, where = d, i
        if best > tolerance:
            keep[where] = True
            stack += [(a, where), (where, b)]
    return [p for p, k in zip(points, keep) if k]


def _arcs(segments, fixed):
    """The noded segments (pairs of points) chained into arcs between junctions: points of any degree but 2,
    and the ``fixed`` points (on the raster's edge)."""
    from collections import defaultdict

    nbrs = defaultdict(list)
    for a, b in segments:
        nbrs[a].append(b)
        nbrs[b].append(a)
    node = {p for p, n in nbrs.items() if len(n) != 2 or fixed(p)}
    seen, arcs = set(), []

    def walk(start, nxt):
        arc = [start, nxt]
        seen.add(frozenset((start, nxt)))
        while arc[-1] not in node and arc[-1] != start:
            prev, cur = arc[-2], arc[-1]
            step = nbrs[cur][0] if nbrs[cur][1] == prev else nbrs[cur][1]
            if frozenset((cur, step)) in seen:
                break
            seen.add(frozenset((cur, step)))
            arc.append(step)
        return arc

    for p in node:
        for q in nbrs[p]:
            if frozenset((p, q)) not in seen:
                arcs.append(walk(p, q))
    for p in nbrs:  # rings with no junction (an island's outline): one arc, start and end fixed
        for q in nbrs[p]:
            if frozenset((p, q)) not in seen:
                arcs.append(walk(p, q))
    return arcs


def simplify_coverage(polygons, tolerance, bounds, cancelled=lambda: False):
    """Simplify a coverage (a list of (label, ogr polygon) sharing edges exactly, as GDAL's polygonize writes
    them) without gaps or overlaps: the outlines are noded (GEOS, through OGR) and cut into arcs between
    junctions; each arc, shared by its two polygons, is simplified once (Douglas-Peucker, its end points and
    any point on the raster's edge ``bounds`` fixed); the arcs are noded and polygonized again and each face
    goes to the polygon it overlaps most. Returns [(label, ogr multipolygon)], without the polygons that
    vanished (thinner than the tolerance); None when ``cancelled()`` turned true."""
    from osgeo import ogr

    lines = ogr.Geometry(ogr.wkbMultiLineString)
    for _, poly in polygons:
        for i in range(poly.GetGeometryCount()):
            ring = poly.GetGeometryRef(i)
            line = ogr.Geometry(ogr.wkbLineString)
            for x, y in ring.GetPoints():
                line.AddPoint_2D(x, y)
            lines.AddGeometry(line)
    noded = lines.Union(lines)  # GEOS nodes the linework: one piece per segment between vertices
    segments = []
    for i in range(noded.GetGeometryCount()):
        pts = noded.GetGeometryRef(i).GetPoints()
        segments += [((a[0], a[1]), (b[0], b[1])) for a, b in zip(pts, pts[1:])]
    xmin, ymin, xmax, ymax = bounds
    eps = 1e-9 * max(abs(xmax - xmin), abs(ymax - ymin), 1.0)

    def fixed(p):
        return (abs(p[0] - xmin) < eps or abs(p[0] - xmax) < eps or abs(p[1] - ymin) < eps
                or abs(p[1] - ymax) < eps)

    simplified = ogr.Geometry(ogr.wkbMultiLineString)
    for arc in _arcs(segments, fixed):
        line = ogr.Geometry(ogr.wkbLineString)
        for x, y in _douglas_peucker(arc, tolerance):
            line.AddPoint_2D(x, y)
        if line.GetPointCount() >= 2 and line.Length() > 0:
            simplified.AddGeometry(line)
    faces = simplified.Union(simplified).Polygonize()  # simplified arcs may cross: noded again first
    # each face to the polygon it overlaps most (an index of the polygons' envelopes in a memory layer)
    mem = ogr.GetDriverByName("Memory").CreateDataSource("")
    index = mem.CreateLayer("index", None, ogr.wkbPolygon)
    for i, (_, poly) in enumerate(polygons):
        feature = ogr.Feature(index.GetLayerDefn())
        feature.SetGeometry(poly)
        feature.SetFID(i)
        index.CreateFeature(feature)
    parts = {}
    for j in range(faces.GetGeometryCount() if faces is not None else 0):
        if j % 256 == 0 and cancelled():
            return None
        face = faces.GetGeometryRef(j)
        index.SetSpatialFilter(face)
        best, owner = 0.0, None
        for feature in index:
            inter = feature.GetGeometryRef().Intersection(face)
            surface = inter is not None and ogr.GT_Flatten(inter.GetGeometryType()) in (
                ogr.wkbPolygon, ogr.wkbMultiPolygon, ogr.wkbGeometryCollection)
            area = inter.GetArea() if surface else 0.0
            if area > best:
                best, owner = area, feature.GetFID()
        if owner is not None:
            parts.setdefault(owner, []).append(face.Clone())
    out = []
    for i, (label, _) in enumerate(polygons):
        if i not in parts:
            continue
        merged = ogr.Geometry(ogr.wkbMultiPolygon)
        for face in parts[i]:
            merged.AddGeometry(face)
        out.append((label, ogr.ForceToMultiPolygon(merged.UnionCascaded())))
    return out


def polygonize(label_path, out_path, min_area, feedback, names=None, simplify=0.0):
    """GDAL polygonize of the label raster (nodata excluded) into a vector file with fields 'label' and (with
    ``names``, value -> name) 'class'; patches under ``min_area`` m² on the ground are first merged into their
    neighbours (GDAL sieve); with ``simplify`` (metres) the outlines are simplified keeping shared edges
    (``simplify_coverage``)."""
    from osgeo import gdal, ogr, osr

    gdal.UseExceptions()
    src = gdal.Open(label_path)
    band = src.GetRasterBand(1)
    gt = src.GetGeoTransform()
    work, work_band = src, band
    area, how = pixel_area_m2(label_path) if (min_area and min_area > 0) or simplify else (None, "")
    if area is None:
        area, how = abs(gt[1] * gt[5]), f"{how}: metres are taken as the raster's map units"
    if min_area and min_area > 0:
        pixels = int(math.ceil(min_area / area))
        feedback.pushInfo(f"a pixel covers {area:.6g} m² ({how}); minimum area {min_area:g} m² = {pixels} pixels")
        if pixels > 1:
            work = gdal.GetDriverByName("MEM").CreateCopy("", src)
            work_band = work.GetRasterBand(1)
            for threshold in sieve_passes(pixels):
                gdal.SieveFilter(work_band, band.GetMaskBand(), work_band, threshold, 4)
            feedback.pushInfo(f"merged patches under {min_area:g} m² ({pixels} pixels) into their neighbours "
                              "before polygonizing")
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
        lyr = ds.CreateLayer("segments", srs, ogr.wkbMultiPolygon if simplify else ogr.wkbPolygon)
        lyr.CreateField(ogr.FieldDefn("label", ogr.OFTInteger))
        if names:
            lyr.CreateField(ogr.FieldDefn("class", ogr.OFTString))
        target = lyr
        if simplify:  # polygonized into memory first, simplified, then written
            mem = ogr.GetDriverByName("Memory").CreateDataSource("")
            target = mem.CreateLayer("raw", srs, ogr.wkbPolygon)
            target.CreateField(ogr.FieldDefn("label", ogr.OFTInteger))
        gdal.Polygonize(work_band, work_band.GetMaskBand(), target, 0, [],
                        callback=lambda frac, msg, data: 0 if feedback.isCanceled() else 1)
        if simplify and not feedback.isCanceled():
            # metres to map units through the pixel's ground size (at the raster's middle)
            tolerance = simplify / math.sqrt(area) * math.sqrt(abs(gt[1] * gt[5]))
            raw = [(f.GetField("label"), f.GetGeometryRef().Clone()) for f in target]
            bounds = (min(gt[0], gt[0] + src.RasterXSize * gt[1]), min(gt[3], gt[3] + src.RasterYSize * gt[5]),
                      max(gt[0], gt[0] + src.RasterXSize * gt[1]), max(gt[3], gt[3] + src.RasterYSize * gt[5]))
            simplified = simplify_coverage(raw, tolerance, bounds, feedback.isCanceled)
            if simplified is not None:
                ds.StartTransaction()
                for label, geom in simplified:
                    feature = ogr.Feature(lyr.GetLayerDefn())
                    feature.SetField("label", label)
                    feature.SetGeometry(geom)
                    lyr.CreateFeature(feature)
                ds.CommitTransaction()
                feedback.pushInfo(f"simplified the outlines at {simplify:g} m ({tolerance:.6g} map units), shared "
                                  f"edges kept: {len(raw)} polygons, {len(raw) - len(simplified)} vanished "
                                  "(thinner than the tolerance)")
            target = mem = None
        if names and not feedback.isCanceled():
            ds.StartTransaction()
            for feature in lyr:
                feature.SetField("class", names.get(feature.GetField("label"), ""))
                lyr.SetFeature(feature)
            ds.CommitTransaction()
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
