"""Run inside QGIS's Python (/usr/bin/python3 with python3-qgis), headless:
``python3 online_checks.py PLUGIN_PARENT SOURCE_TIF WORKDIR``.

Makes local XYZ tiles (Web Mercator, one zoom level, 256 x 256 RGBA PNG, tiles with no data left out)
from a real georeferenced raster with GDAL, adds them to QGIS as an XYZ layer (provider ``wms``, file://
URL: no network), and renders it with ``map_segmenter.render.render_layer_to_geotiff``:
  mercator  EPSG:3857 on the tiles' own pixel grid, reaching past the tiles (a masked part)
  faded     the same with the layer at 50 % opacity (must not change the pixels or the mask)
  source    the source raster's CRS at 5 m per pixel, inside the tiles
  geographic EPSG:4326 at 5 m per pixel (pixel size in degrees at the centre latitude)
  thread    ``mercator`` again, from a QgsTask (a worker thread, as Processing runs from the toolbox)
  too_big   a pixel limit below the request: the error message
  cancel    cancelled after the first window: the error, no file left
  http      ``mercator`` from the same tiles served over HTTP by a local server
  unreachable  from a server that is down: the error
  wms       ``mercator`` from a local WMS 1.3.0 (GetMap answered with GDAL from the tiles' mosaic)
  cancel_download  from a server that answers after 3 s, cancelled 0.3 s in: the error, quickly, no file
  bad_extent   an empty extent: the error
then converts two small rendered blocks (premultiplied ARGB and plain) to RGB and mask, and segments
``mercator`` with mapseg's segment_raster (colour k-means, K=4) through the plugin's runtime.
Writes WORKDIR/mosaic_3857.tif (the tiles as one RGBA GeoTIFF), WORKDIR/<name>.tif and prints one JSON line.
"""
import functools
import http.server
import json
import math
import os
import sys
import threading
import time
import urllib.parse

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
plugin_parent, source, work = sys.argv[1:4]
sys.path.insert(0, plugin_parent)

from osgeo import gdal  # noqa: E402
from qgis.core import (Qgis, QgsApplication, QgsProcessingUtils, QgsCoordinateReferenceSystem, QgsCoordinateTransform,  # noqa: E402
                       QgsProcessingException, QgsProcessingFeedback, QgsProject, QgsRasterBlock, QgsRasterLayer,
                       QgsRectangle)
from qgis.PyQt.QtCore import QTimer  # noqa: E402
from qgis.PyQt.QtGui import qRgba  # noqa: E402

gdal.UseExceptions()
app = QgsApplication([], False)
app.initQgis()
from map_segmenter import render, runtime  # noqa: E402

ZOOM = 15
ORIGIN = 20037508.342789244
RES = 2 * ORIGIN / 256 / 2 ** ZOOM          # metres (of Web Mercator) per pixel at ZOOM
TILE_M = 256 * RES
result = {"zoom": ZOOM, "res": RES}

# ---- the tiles: source -> EPSG:3857 on the zoom level's pixel grid, snapped outward to whole tiles
probe = gdal.Warp("", source, format="VRT", dstSRS="EPSG:3857", xRes=RES, yRes=RES)
gt = probe.GetGeoTransform()
minx, maxy = gt[0], gt[3]
maxx, miny = minx + gt[1] * probe.RasterXSize, maxy + gt[5] * probe.RasterYSize
probe = None
tx0, tx1 = math.floor((minx + ORIGIN) / TILE_M), math.ceil((maxx + ORIGIN) / TILE_M)
ty0, ty1 = math.floor((ORIGIN - maxy) / TILE_M), math.ceil((ORIGIN - miny) / TILE_M)
bounds = (-ORIGIN + tx0 * TILE_M, ORIGIN - ty1 * TILE_M, -ORIGIN + tx1 * TILE_M, ORIGIN - ty0 * TILE_M)
mosaic_path = os.path.join(work, "mosaic_3857.tif")
gdal.Warp(mosaic_path, source, dstSRS="EPSG:3857", outputBounds=bounds, xRes=RES, yRes=RES, dstAlpha=True,
          resampleAlg="bilinear", srcNodata=0, creationOptions=["TILED=YES"])
mosaic = gdal.Open(mosaic_path).ReadAsArray()       # (4, H, W) RGBA
tiles = os.path.join(work, "tiles")
png = gdal.GetDriverByName("PNG")
mem = gdal.GetDriverByName("MEM")
written = skipped = 0
for ty in range(ty0, ty1):
    for tx in range(tx0, tx1):
        r0, c0 = (ty - ty0) * 256, (tx - tx0) * 256
        tile = mosaic[:, r0:r0 + 256, c0:c0 + 256]
        if not tile[3].any():
            skipped += 1
            continue
        os.makedirs(os.path.join(tiles, str(ZOOM), str(tx)), exist_ok=True)
        ds = mem.Create("", 256, 256, 4, gdal.GDT_Byte)
        for b in range(4):
            ds.GetRasterBand(b + 1).WriteArray(tile[b])
        png.CreateCopy(os.path.join(tiles, str(ZOOM), str(tx), f"{ty}.png"), ds)
        written += 1
result.update(tiles_written=written, tiles_skipped=skipped, mosaic_bounds=bounds)

uri = f"type=xyz&url=file://{tiles}/{{z}}/{{x}}/{{y}}.png&zmax={ZOOM}&zmin={ZOOM}"
layer = QgsRasterLayer(uri, "local tiles", "wms")
assert layer.isValid(), layer.error().summary()
QgsProject.instance().addMapLayer(layer)
file_layer = QgsRasterLayer(source, "file", "gdal")
result["needs_rendering"] = {
    "xyz": render.needs_rendering(layer), "gdal": render.needs_rendering(file_layer),
    **{p: render.needs_rendering(QgsRasterLayer(u, p, p)) for p, u in (
        ("wms", "crs=EPSG:4326&format=image/png&layers=a&styles=&url=http://127.0.0.1:9/wms"),
        ("wcs", "identifier=a&url=http://127.0.0.1:9/wcs"),
        ("arcgismapserver", "url=http://127.0.0.1:9/arcgis/rest/services/a/MapServer layer='0'"))}}


def run(name, extent, crs, res, **kw):
    feedback = kw.pop("feedback", None) or QgsProcessingFeedback()
    out = os.path.join(work, name + ".tif")
    try:
        render.render_layer_to_geotiff(layer, extent, crs, res, out, feedback, **kw)
        error = None
    except QgsProcessingException as exc:
        error = str(exc)
    result[name] = {"error": error, "exists": os.path.exists(out), "log": feedback.textLog()}
    return out


merc = QgsCoordinateReferenceSystem("EPSG:3857")
# on the tiles' grid: 40 pixels in from the left, 30 down from the top, reaching 200 pixels past the right edge
W, H = mosaic.shape[2], mosaic.shape[1]
x0, y0 = bounds[0] + 40 * RES, bounds[3] - 30 * RES
ext = QgsRectangle(x0, y0 - (H - 60) * RES, x0 + (W - 40 + 200) * RES, y0)
result["mercator_window"] = [40, 30, W - 40 + 200, H - 60]
run("mercator", ext, merc, RES)
layer.renderer().setOpacity(0.5)
run("faded", ext, merc, RES)
layer.renderer().setOpacity(1.0)

src = gdal.Open(source)
sgt = src.GetGeoTransform()
src_crs = QgsCoordinateReferenceSystem.fromWkt(src.GetProjection())
sx0, sy0 = sgt[0] + 100 * sgt[1], sgt[3] + 200 * sgt[5]
run("source", QgsRectangle(sx0, sy0 - 300 * 5.0, sx0 + 250 * 5.0, sy0), src_crs, 5.0)
result["source_window"] = [100, 200, 250, 300]

wgs = QgsCoordinateReferenceSystem("EPSG:4326")
geo_ext = QgsCoordinateTransform(src_crs, wgs, QgsProject.instance()).transformBoundingBox(
    QgsRectangle(sx0, sy0 - 300 * 5.0, sx0 + 250 * 5.0, sy0))
run("geographic", geo_ext, wgs, 5.0)
result["geographic_extent"] = [geo_ext.xMinimum(), geo_ext.yMinimum(), geo_ext.xMaximum(), geo_ext.yMaximum()]
result["metres_per_degree"] = runtime.submodule("raster.view").metres_per_degree(geo_ext.center().y())

run("too_big", ext, merc, RES, max_pixels=100_000)
run("bad_extent", QgsRectangle(), merc, RES)

# the same render from a background task (as Processing runs algorithms from the toolbox): same pixels
from qgis.core import QgsTask  # noqa: E402

task = QgsTask.fromFunction("render", lambda task: run("thread", ext, merc, RES))
QgsApplication.taskManager().addTask(task)
t0 = time.time()
while "thread" not in result and time.time() - t0 < 120:
    app.processEvents()
    time.sleep(0.02)

render.CHUNK = 128                       # many windows, so that the run is cancelled between two of them
cancel_feedback = QgsProcessingFeedback()
progress = []


def on_progress(p):
    progress.append(p)
    cancel_feedback.cancel()


cancel_feedback.progressChanged.connect(on_progress)
run("cancel", ext, merc, RES, feedback=cancel_feedback)
result["cancel"]["progress"] = progress

# ---- over HTTP (a local server: QGIS's network stack, as for an online service), and from a server that is down
class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=tiles))
threading.Thread(target=server.serve_forever, daemon=True).start()
render.CHUNK = 1024
for name, port in (("http", server.server_address[1]), ("unreachable", 9)):
    url = f"http://127.0.0.1:{port}/{{z}}/{{x}}/{{y}}.png"
    layer = QgsRasterLayer(f"type=xyz&url={url}&zmax={ZOOM}&zmin={ZOOM}", name, "wms")
    assert layer.isValid(), layer.error().summary()
    run(name, ext, merc, RES)
server.shutdown()

# ---- a WMS (1.3.0, GetCapabilities and GetMap: the mosaic cut and warped by GDAL to the requested box and size)
CAPABILITIES = """<?xml version="1.0" encoding="UTF-8"?>
<WMS_Capabilities version="1.3.0" xmlns="http://www.opengis.net/wms" xmlns:xlink="http://www.w3.org/1999/xlink">
<Service><Name>WMS</Name><Title>local</Title><OnlineResource xlink:href="{url}"/></Service>
<Capability><Request>
<GetCapabilities><Format>text/xml</Format><DCPType><HTTP><Get><OnlineResource xlink:href="{url}?"/></Get></HTTP>
</DCPType></GetCapabilities>
<GetMap><Format>image/png</Format><DCPType><HTTP><Get><OnlineResource xlink:href="{url}?"/></Get></HTTP></DCPType>
</GetMap></Request>
<Exception><Format>XML</Format></Exception>
<Layer><Title>root</Title><CRS>EPSG:3857</CRS>
<Layer queryable="0"><Name>aerial</Name><Title>aerial</Title><CRS>EPSG:3857</CRS>
<EX_GeographicBoundingBox><westBoundLongitude>{w}</westBoundLongitude><eastBoundLongitude>{e}</eastBoundLongitude>
<southBoundLatitude>{s}</southBoundLatitude><northBoundLatitude>{n}</northBoundLatitude></EX_GeographicBoundingBox>
<BoundingBox CRS="EPSG:3857" minx="{b[0]}" miny="{b[1]}" maxx="{b[2]}" maxy="{b[3]}"/>
</Layer></Layer></Capability></WMS_Capabilities>"""
geo_box = QgsCoordinateTransform(merc, wgs, QgsProject.instance()).transformBoundingBox(QgsRectangle(*bounds))
get_maps = []


class Wms(Quiet):
    def do_GET(self):
        q = {k.upper(): v[0] for k, v in urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query).items()}
        if q.get("REQUEST", "").lower() == "getcapabilities":
            body, kind = CAPABILITIES.format(url=f"http://127.0.0.1:{self.server.server_address[1]}/wms",
                                             w=geo_box.xMinimum(), e=geo_box.xMaximum(), s=geo_box.yMinimum(),
                                             n=geo_box.yMaximum(), b=bounds).encode(), "text/xml"
        else:
            box = [float(v) for v in q["BBOX"].split(",")]
            width, height = int(q["WIDTH"]), int(q["HEIGHT"])
            get_maps.append([q.get("CRS"), width, height])
            name = f"/vsimem/getmap_{threading.get_ident()}"
            gdal.Warp(name + ".tif", mosaic_path, outputBounds=box, width=width, height=height,
                      dstSRS=q.get("CRS", "EPSG:3857"), resampleAlg="near")
            gdal.GetDriverByName("PNG").CreateCopy(name + ".png", gdal.Open(name + ".tif"))
            f = gdal.VSIFOpenL(name + ".png", "rb")
            gdal.VSIFSeekL(f, 0, 2)
            size = gdal.VSIFTellL(f)
            gdal.VSIFSeekL(f, 0, 0)
            body, kind = gdal.VSIFReadL(1, size, f), "image/png"
            gdal.VSIFCloseL(f)
            gdal.Unlink(name + ".tif")
            gdal.Unlink(name + ".png")
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Wms)
threading.Thread(target=server.serve_forever, daemon=True).start()
layer = QgsRasterLayer(f"crs=EPSG:3857&format=image/png&layers=aerial&styles=&"
                       f"url=http://127.0.0.1:{server.server_address[1]}/wms", "wms", "wms")
result["wms_valid"] = layer.isValid()
if layer.isValid():
    run("wms", ext, merc, RES)
result["wms_get_maps"] = get_maps
server.shutdown()

# ---- cancelled while the tiles download: a server that answers after 3 s; cancelled 0.3 s into the render
class Slow(Quiet):
    def do_GET(self):
        time.sleep(3)
        super().do_GET()


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Slow, directory=tiles))
threading.Thread(target=server.serve_forever, daemon=True).start()
layer = QgsRasterLayer(f"type=xyz&url=http://127.0.0.1:{server.server_address[1]}/{{z}}/{{x}}/{{y}}.png"
                       f"&zmax={ZOOM}&zmin={ZOOM}", "slow", "wms")
slow_feedback = QgsProcessingFeedback()
QTimer.singleShot(300, slow_feedback.cancel)
t0 = time.time()
run("cancel_download", ext, merc, RES, feedback=slow_feedback)
result["cancel_download"]["seconds"] = time.time() - t0
server.shutdown()

# ---- a rendered block, premultiplied or not, to RGB and mask
block = QgsRasterBlock(Qgis.ARGB32_Premultiplied, 3, 1)
for i, argb in enumerate((qRgba(100, 50, 25, 128), qRgba(0, 0, 0, 0), qRgba(10, 20, 30, 255))):
    block.setColor(0, i, argb)
rgb, valid = render._argb_to_rgb(block, 3, 1)
plain = QgsRasterBlock(Qgis.ARGB32, 2, 1)
plain.setColor(0, 0, qRgba(200, 100, 50, 127))
plain.setColor(0, 1, qRgba(200, 100, 50, 128))
rgb2, valid2 = render._argb_to_rgb(plain, 2, 1)
result["argb"] = {"premultiplied": [rgb[:, 0].tolist(), valid[0].tolist()],
                  "plain": [rgb2[:, 0].tolist(), valid2[0].tolist()]}

# ---- mapseg on the rendered raster, through the plugin's runtime (as the algorithm will call it)
segment = runtime.submodule("segment")
features = runtime.submodule("features")
labels = os.path.join(work, "labels.tif")
options = segment.SegmentOptions(k=4, model=features.load_features("kmeans", "numpy"), tile=256)
report = segment.segment_raster(os.path.join(work, "mercator.tif"), labels, options, progress=False,
                                log=lambda m: None)
result["segment"] = {"k": report["k"], "exists": os.path.exists(labels)}

# ---- the whole algorithm (mapseg:segment) with the XYZ layer as its input: rendered over EXTENT at RESOLUTION
from qgis.core import QgsProcessingContext, QgsProcessingFeedback as Feedback  # noqa: E402

from map_segmenter.algorithm import SegmentRasterAlgorithm  # noqa: E402

xyz = QgsRasterLayer(uri, "xyz input", "wms")
QgsProject.instance().addMapLayer(xyz)
alg = SegmentRasterAlgorithm()
alg.initAlgorithm({})
context = QgsProcessingContext()
context.setProject(QgsProject.instance())
inner = QgsRectangle(bounds[0] + 64 * RES, bounds[1] + 64 * RES, bounds[0] + 320 * RES, bounds[1] + 256 * RES)
algorithm_out = os.path.join(work, "algorithm_labels.tif")
params = {"INPUT": xyz.id(), "K": 4, "MODEL": 2, "RESOLUTION": 2 * RES, "OUTPUT": algorithm_out,
          "EXTENT": f"{inner.xMinimum()},{inner.xMaximum()},{inner.yMinimum()},{inner.yMaximum()} [EPSG:3857]"}
got, ok = alg.run(params, context, Feedback())
result["algorithm"] = {"ok": ok, "k": got.get("K") if ok else None, "exists": os.path.exists(algorithm_out),
                       "extent": [inner.xMinimum(), inner.yMinimum(), inner.xMaximum(), inner.yMaximum()],
                       "res": 2 * RES, "temp_left": sorted(n for n in os.listdir(os.path.dirname(
                           QgsProcessingUtils.generateTempFilename("x.tif"))) if n.startswith("online_layer"))}
params_no_extent = {k: v for k, v in params.items() if k != "EXTENT"}
try:
    alg.run(params_no_extent, context, Feedback())[1]
    result["algorithm"]["no_extent"] = "ran"
except QgsProcessingException as exc:
    result["algorithm"]["no_extent"] = str(exc)
_, ok2 = alg.run(params_no_extent, context, Feedback())
result["algorithm"]["no_extent_ok"] = ok2
result["imported"] = [m for m in ("torch", "rasterio", "onnxruntime") if m in sys.modules]
print(json.dumps(result), flush=True)
# QGIS 3.22 may crash while tearing down a headless application: leave without the teardown.
os._exit(0)
