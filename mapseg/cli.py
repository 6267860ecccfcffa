"""mapseg: segment rasters with an exported student (or colour k-means).

    mapseg segment IN.tif OUT.tif -k 6 [--model model/best] [--tile 1024] [--backend auto]
                   [--bands 1,2,3] [--nodata V] [--smooth N] [--upsample M] [--centers centers.json] [--cog]
                   [--stretch 2,98] [--seed 0] [--extent X0,Y0,X1,Y1 [--extent-crs CRS]] [--mask AOI.gpkg]
                   [--resolution METRES]
    mapseg fit A.tif B.tif ... -k 6 -o centers.json [--model DIR]
    mapseg export-onnx --centers centers.json OUT.onnx [--model DIR] [--tile 512] [--overlap PCT] [--legend L.json]
    mapseg batch A.tif B.tif 'tiles/*.tif' @list.txt OUT_DIR -k 6 [--workers N | --scheduler ADDRESS]
    mapseg polygonize LABELS.tif OUT.gpkg [--min-area M2] [--simplify METRES|auto] [--connectivity 4|8]
    mapseg legend LABELS.tif [--legend legend.json] [--merge 3=1,4=1] [-o NEW.tif]
    mapseg info [--model DIR]
    mapseg bench [--model DIR] [--size 1024]
    mapseg quantize --model DIR --calibration A.tif B.tif ... [--check C.tif ...]

Exit status 0 on success, 2 on a usage or input problem (the message says what
to do), 130 when interrupted (no partial output is left behind); batch: 1 when
some rasters failed (the run report says which; the others are written).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import threading
import time

import numpy as np

from . import __version__
from .artifact import describe, load_artifact
from .backends import (AUTO_ORDER, BACKENDS, BATCHED, PRECISIONS, BackendUnavailable, available_backends,
                       make_backend)
from .batch import DEFAULT_BLOCK, segment_batch
from .errors import USER_ERRORS, RasterError, SegmentError
from .features import default_model_path
from .fileio import write_text_atomic
from .gpu import DEFAULT_BATCH
from .legend import Legend, load_legend, pam_path, parse_merge, read_legend, relabel, style_path
from .raster import parse_bands, parse_extent, write_preview
from .scaling import parse_input_max, parse_stretch
from .segment import SegmentOptions, fit_raster_centers, segment_raster
from .upsample import METHODS as UPSAMPLE_METHODS
from .vectors import polygonize_labels, vector_driver
from .windows import DEFAULT_TILE

EPILOG = ("--model takes an artifact folder (default: $MAPSEG_MODEL, else ./model/best, else the shipped model) or 'kmeans' for colour "
          "k-means without a network. See docs/runtime.md.")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="artifact folder, or 'kmeans' (default: $MAPSEG_MODEL, else ./model/best, else the shipped model)")
    p.add_argument("--backend", default="auto", choices=list(BACKENDS),
                   help="embedding backend; auto picks the fastest available CPU backend and says which; cuda: "
                        "torch on a GPU, windows batched (needs a CUDA build of torch, docs/runtime.md)")
    p.add_argument("--precision", default="float32", choices=PRECISIONS,
                   help="network precision: float32 (default, the reference); int8 (onnx backend, model.int8.onnx "
                        "from 'mapseg quantize'); bf16 (torch backend); fp16 (cuda backend). Labels differ from "
                        "float32's on some pixels: see docs/runtime.md")
    p.add_argument("--batch", type=int, default=None, metavar="N",
                   help=f"--backend cuda: windows per network call at most (default {DEFAULT_BATCH}); "
                        "2 x N windows are in flight unless --workers says otherwise")
    p.add_argument("--bands", default=None, help="three 1-based bands as R,G,B (required unless the raster has 3)")
    p.add_argument("--nodata", type=float, default=None, help="input nodata value (default: the raster's own)")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--stretch", default=None, metavar="LOW,HIGH",
                       help="percentile stretch into [0, 1] (e.g. 2,98); default: divide by the value of full "
                            "brightness (255 for 8-bit; for 16-bit what the file says, see --input-max)")
    scale.add_argument("--input-max", type=float, default=None, metavar="N",
                       help="raw value of full brightness (e.g. 4095 for 12-bit imagery stored as uint16); default: "
                            "255 for uint8; for uint16 the file's NBITS, else its statistics, else a sampled range "
                            "(the log and the report say which)")
    scale.add_argument("--bits", type=int, default=None, metavar="N",
                       help="bit depth of the imagery: the same as --input-max 2**N-1 (e.g. --bits 12)")
    p.add_argument("--extent", default=None, metavar="XMIN,YMIN,XMAX,YMAX",
                   help="segment only this area, in the raster's CRS (or --extent-crs); the output covers it. "
                        "Negative numbers: --extent=-120.5,38.1,-120.4,38.2")
    p.add_argument("--extent-crs", default=None, metavar="CRS", help="CRS of --extent, e.g. EPSG:4326")
    p.add_argument("--mask", default=None, metavar="VECTOR",
                   help="polygons (GeoPackage, Shapefile, GeoJSON, ...): pixels outside them are nodata, neither "
                        "sampled nor labelled; without --extent the output covers the polygons' bounds")
    p.add_argument("--resolution", type=float, default=None, metavar="METRES",
                   help="resample on read to this ground resolution (area average when coarsening, bilinear when "
                        "refining) and write the labels on that grid")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling and of k-means")
    p.add_argument("--workers", type=int, default=None,
                   help="windows processed at once, each on its own thread (default: 2 where there are 2+ CPUs)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads per window for the network (default: CPUs / workers)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mapseg", description=__doc__.split("\n")[0], epilog=EPILOG)
    p.add_argument("--version", action="version", version=f"mapseg {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("segment", help="segment a raster into a label GeoTIFF", epilog=EPILOG)
    s.add_argument("input", help="input raster (GeoTIFF, VRT, PNG, JPG, ...)")
    s.add_argument("output", help="output label GeoTIFF (.tif)")
    s.add_argument("-k", type=int, default=None, help="number of clusters (2..max_k); not needed with --centers")
    s.add_argument("--tile", type=int, default=DEFAULT_TILE, help="window core size in pixels (a multiple of 4); "
                   "labels do not depend on it, memory does")
    s.add_argument("--smooth", type=int, default=0, metavar="N",
                   help="majority filter of radius N label cells (stride-4 cells; with guided upsampling over "
                        "the pixels of 4N around each pixel; pixels for kmeans)")
    s.add_argument("--upsample", choices=UPSAMPLE_METHODS, default=None,
                   help="how the stride-4 cell scores become pixel labels: guided (edges follow the image, "
                        "cells smoothed with their surroundings) or nearest (4 x 4 blocks, faster); default: the "
                        "model's own (mapseg info --model M says which)")
    s.add_argument("--centers", default=None, help="apply centres from 'mapseg fit' instead of fitting")
    s.add_argument("--cog", action="store_true", help="write a Cloud Optimized GeoTIFF")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--report", default=None, metavar="JSON", help="also write the run report (timings, centres, class names, precision)")
    s.add_argument("--preview", default=None, metavar="PNG",
                   help="also write a PNG of the input beside its colour-coded segments (at most 1600 px wide)")
    s.add_argument("--legend", default=None, metavar="JSON",
                   help="class names and colours (legend.json, docs/gis.md) for OUT.qml, OUT.tif.aux.xml and the "
                        "colour table (default: the centres file's, else 'segment 0..K-1')")
    s.add_argument("--polygons", default=None, metavar="VECTOR",
                   help="also write the segments as polygons (.gpkg, .shp, .geojson, .fgb, ...; docs/gis.md)")
    _polygon_flags(s)
    _common(s)

    f = sub.add_parser("fit", help="fit cluster centres on a sample of one or more rasters", epilog=EPILOG)
    f.add_argument("inputs", nargs="+", help="rasters to sample")
    f.add_argument("-k", type=int, required=True, help="number of clusters")
    f.add_argument("-o", "--output", required=True, help="centres file to write (JSON)")
    f.add_argument("--legend", default=None, metavar="JSON",
                   help="class names and colours kept in the centres file: segment --centers uses them")
    f.add_argument("--no-progress", action="store_true", help="no progress bar")
    _common(f)

    e = sub.add_parser("export-onnx", help="write the model with fitted centres baked in as one ONNX segmenter "
                       "(tile in, K class scores out; metadata for the QGIS plugin Deepness)", epilog=EPILOG)
    e.add_argument("output", help="ONNX file to write (.onnx)")
    e.add_argument("--centers", required=True, help="centres from 'mapseg fit' with the same --model")
    e.add_argument("--model", default=None, help="artifact folder (default: $MAPSEG_MODEL, else ./model/best, else the shipped model)")
    e.add_argument("--tile", type=int, default=512, help="tile side in pixels the model takes (a multiple of 4)")
    e.add_argument("--overlap", type=int, default=None, metavar="PCT",
                   help="tile overlap in percent of the tile (default: the smallest that keeps labels exact: at least "
                        "twice the network's halo, a multiple of 4 pixels)")
    e.add_argument("--legend", default=None, metavar="JSON",
                   help="class names (legend.json; default: the legend the centres file keeps, else 'segment i')")

    m = sub.add_parser("batch", help="segment many rasters with one set of centres on a Dask cluster "
                       "(docs/cluster.md)", epilog=EPILOG, conflict_handler="resolve")
    m.add_argument("inputs", nargs="+", help="rasters: files, globs ('tiles/*.tif'), URLs, or a text file of paths "
                   "(@list.txt or a .txt file)")
    m.add_argument("out_dir", help="output folder: one label GeoTIFF per input (with its .qml and .tif.aux.xml), "
                   "mosaic.vrt, centers.json, batch_report.json")
    m.add_argument("-k", type=int, default=None, help="number of clusters, fitted once over all inputs; not needed "
                   "with --centers")
    m.add_argument("--centers", default=None, help="apply centres from 'mapseg fit' instead of fitting")
    m.add_argument("--tile", type=int, default=DEFAULT_TILE, help="window core size in pixels (a multiple of 4)")
    m.add_argument("--smooth", type=int, default=0, metavar="N", help="majority filter of radius N label cells")
    m.add_argument("--upsample", choices=UPSAMPLE_METHODS, default=None,
                   help="how the stride-4 cell scores become pixel labels: guided (edges follow the image, "
                        "cells smoothed with their surroundings) or nearest (4 x 4 blocks, faster); default: the "
                        "model's own (mapseg info --model M says which)")
    m.add_argument("--cog", action="store_true", help="write Cloud Optimized GeoTIFFs")
    m.add_argument("--block", type=int, default=DEFAULT_BLOCK, metavar="PIXELS",
                   help="a raster of more than PIXELS^2 pixels is cut into blocks of PIXELS x PIXELS, one task each "
                        f"(default {DEFAULT_BLOCK})")
    m.add_argument("--legend", default=None, metavar="JSON",
                   help="class names and colours (legend.json, docs/gis.md) for every output's .qml, .tif.aux.xml "
                        "and colour table (default: the centres file's, else 'segment 0..K-1')")
    _common(m)  # --extent, --extent-crs, --mask, --resolution: applied to every input
    where = m.add_mutually_exclusive_group()
    where.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="address of a running Dask scheduler (tcp://host:8786); default: a local cluster")
    where.add_argument("--workers", type=int, default=None,
                       help="worker processes of the local cluster, one thread each (default: the CPUs)")
    m.add_argument("--threads", type=int, default=None, help="threads per task for the network (default 1)")
    m.add_argument("--memory-limit", default="auto", metavar="SIZE",
                   help="memory limit per local worker process, e.g. 2GB (default: the machine's memory shared out)")

    v = sub.add_parser("polygonize", help="write a label raster's segments as polygons (docs/gis.md)")
    v.add_argument("labels", help="label raster (mapseg segment's output)")
    v.add_argument("output", help="vector file (.gpkg, .shp, .geojson, .fgb, ...: any OGR format by extension)")
    v.add_argument("--legend", default=None, metavar="JSON",
                   help="class names (default: those in LABELS.tif.aux.xml, as mapseg segment writes them)")
    _polygon_flags(v)

    g = sub.add_parser("legend", help="rename, recolour or merge the classes of a label raster (docs/gis.md)")
    g.add_argument("labels", help="label raster (mapseg segment's output)")
    g.add_argument("--legend", default=None, metavar="JSON", help="class names and colours (legend.json)")
    g.add_argument("--merge", default=None, metavar="FROM=TO,...",
                   help="merge labels, e.g. 3=1,4=1 (3 and 4 become 1); rewrites the labels window by window")
    g.add_argument("-o", "--output", default=None, metavar="NEW.tif",
                   help="write a new label raster (default: LABELS.tif and its sidecars replaced atomically)")

    i = sub.add_parser("info", help="print an artifact's metadata")
    i.add_argument("--model", default=None, help="artifact folder (default: $MAPSEG_MODEL, else ./model/best, else the shipped model)")
    i.add_argument("--json", action="store_true", help="print meta.json and metrics.json as JSON")

    b = sub.add_parser("bench", help="embedding throughput of every available backend on a random image")
    b.add_argument("--model", default=None, help="artifact folder (default: $MAPSEG_MODEL, else ./model/best, else the shipped model)")
    b.add_argument("--size", type=int, default=1024, help="image side in pixels (multiple of 4)")
    b.add_argument("--repeat", type=int, default=3)

    q = sub.add_parser("quantize", help="make the int8 variant of a model (model.int8.onnx) for --precision int8")
    q.add_argument("--model", default=None, help="artifact folder, written into (default: $MAPSEG_MODEL, else "
                   "./model/best, else the shipped model)")
    q.add_argument("--calibration", nargs="+", required=True, metavar="RASTER",
                   help="real rasters whose sampling windows calibrate the activation ranges (several domains)")
    q.add_argument("--check", nargs="+", default=None, metavar="RASTER",
                   help="rasters the label agreement with float32 is measured on (default: the calibration rasters)")
    q.add_argument("--windows", type=int, default=8, help="calibration windows per raster (default 8)")
    q.add_argument("--bands", default=None, help="three 1-based bands as R,G,B (required unless the rasters have 3)")
    q.add_argument("--seed", type=int, default=0, help="seed of the window draw and of the agreement's k-means")
    return p


def _simplify_arg(text: str):
    """--simplify: auto, or metres >= 0."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: give metres (a number >= 0; 0 keeps the staircase) or auto")
    return value


def _polygon_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-area", type=float, default=0.0, metavar="M2",
                   help="merge regions under this many square metres into their largest neighbour first (GDAL sieve)")
    p.add_argument("--simplify", type=_simplify_arg, default=None, metavar="METRES|auto",
                   help="simplify boundaries by this tolerance, neighbours keeping their shared edges (default auto: "
                        "3 pixels, which straightens the 4-pixel staircase; 0 keeps it)")
    p.add_argument("--connectivity", type=int, default=4, choices=(4, 8), help="pixel connectivity of a region")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


def _options(args, **settings) -> SegmentOptions:
    """A run's SegmentOptions: the flags every command shares (``_common``) and this command's ``settings``."""
    # the precision and a batch ride on the backend setting (mapseg.backends.parse_backend: "cuda:fp16,batch=16")
    backend = args.backend if args.precision == "float32" else f"{args.backend}:{args.precision}"
    if args.batch is not None:
        if args.backend not in BATCHED:
            raise SegmentError(f"--batch {args.batch} batches windows on the GPU: it goes with --backend "
                               f"{' or '.join(BATCHED)}")
        if args.batch < 1:
            raise SegmentError(f"--batch {args.batch}: must be a positive integer")
        backend += f",batch={args.batch}"
    return SegmentOptions(model=args.model, backend=backend, threads=args.threads, workers=args.workers,
                          bands=parse_bands(args.bands), nodata=args.nodata, stretch=parse_stretch(args.stretch),
                          input_max=parse_input_max(args.input_max, args.bits), seed=args.seed,
                          extent=parse_extent(args.extent), extent_crs=args.extent_crs, mask=args.mask,
                          resolution=args.resolution, **settings)


def cmd_segment(args) -> int:
    if args.preview and not args.preview.lower().endswith(".png"):
        raise RasterError(f"--preview {args.preview}: give a .png name")
    # the legend: read and checked against K by segment_raster before any work, written beside the labels after
    options = _options(args, k=args.k, tile=args.tile, smooth=args.smooth, centers=args.centers, cog=args.cog,
                       legend=args.legend, upsample=args.upsample)
    if args.polygons:
        vector_driver(args.polygons)  # before the run, as the polygons' format and libraries
    elif args.min_area or args.simplify or args.connectivity != 4:
        raise SegmentError("--min-area, --simplify and --connectivity shape the --polygons: give --polygons OUT.gpkg")
    report = segment_raster(args.input, args.output, options, progress=not args.no_progress, log=_log,
                            other_outputs={"--report": args.report, "--preview": args.preview,
                                           "--polygons": args.polygons})
    if args.polygons:
        names = {c["value"]: c["name"] for c in report["classes"]}
        report["polygons"] = polygonize_labels(args.output, args.polygons, args.min_area, args.simplify,
                                               args.connectivity, names, log=_log, check=False)
    if args.report:
        write_text_atomic(args.report, json.dumps(report, indent=1) + "\n")
    if args.preview:
        png = write_preview(args.input, args.output, args.preview, options.bands, options.nodata,
                            region=options.region())
        _log(f"wrote {png}")
    return 0


def cmd_fit(args) -> int:
    legend = load_legend(args.legend)
    if legend is not None:
        legend.check_k(args.k, f"--legend {args.legend}")
    centers = fit_raster_centers(args.inputs, _options(args, k=args.k), log=_log, progress=not args.no_progress,
                                 output=args.output)
    if legend is not None:
        centers.legend = legend.completed(range(centers.k)).to_json()
    centers.save(args.output)
    _log(f"wrote {args.output}: K={centers.k} {centers.features} centres from {len(args.inputs)} raster(s)")
    return 0


def cmd_polygonize(args) -> int:
    names = (load_legend(args.legend) or read_legend(args.labels) or Legend()).names or None
    polygonize_labels(args.labels, args.output, args.min_area, args.simplify, args.connectivity, names, log=_log)
    return 0


def cmd_legend(args) -> int:
    if args.legend is None and not args.merge:
        raise SegmentError("mapseg legend: give --legend legend.json (names, colours) and/or --merge FROM=TO,...")
    done = relabel(args.labels, args.legend, parse_merge(args.merge), args.output, log=_log)
    _log(f"wrote {done['output']} with {style_path(done['output']).name} and {pam_path(done['output']).name}: "
         + ", ".join(f"{c['value']}={c['name']}" for c in done["legend"]["classes"]))
    return 0


def cmd_export_onnx(args) -> int:
    from .onnx_export import export_onnx

    export_onnx(args.centers, args.output, args.model, tile=args.tile, overlap=args.overlap, legend=args.legend,
                log=_log)
    return 0


def cmd_batch(args) -> int:
    options = dataclasses.replace(_options(args, k=args.k, tile=args.tile, smooth=args.smooth, centers=args.centers,
                                           cog=args.cog, legend=args.legend, upsample=args.upsample), workers=None)
    try:
        report = segment_batch(args.inputs, args.out_dir, options, scheduler=args.scheduler, n_workers=args.workers,
                               memory_limit=args.memory_limit, block=args.block, log=_log)
    except KeyboardInterrupt:
        _log("\ninterrupted: the outputs finished so far are kept, none is half-written; run the same command "
             "again to resume")
        return 130
    return 1 if report["failed"] else 0


def cmd_quantize(args) -> int:
    from .quantize import quantize_artifact  # imports the segment pipeline; onnx and onnxruntime only when run

    quantize_artifact(args.model or default_model_path(), args.calibration, args.check, bands=parse_bands(args.bands),
                      windows=args.windows, seed=args.seed, log=_log)
    return 0


def cmd_info(args) -> int:
    artifact = load_artifact(args.model or default_model_path())
    if args.json:
        print(json.dumps({"meta": artifact.meta, "metrics": artifact.metrics}, indent=1))
        return 0
    print(describe(artifact))
    for name, why in available_backends(artifact).items():
        print(f"backend {name:<7} {'available' if why is None else 'unavailable: ' + why}")
    return 0


def cmd_bench(args) -> int:
    artifact = load_artifact(args.model or default_model_path())
    if args.size % 4:
        raise SystemExit("--size must be a multiple of 4")
    image = np.random.default_rng(0).random((args.size, args.size, 3), dtype=np.float32)
    flops = artifact.meta["architecture"].get("flops_per_megapixel", float("nan"))
    mp = args.size * args.size / 1e6
    for name in AUTO_ORDER:
        try:
            backend, _ = make_backend(name, artifact)
        except BackendUnavailable as exc:
            print(f"{name:<6} unavailable: {exc}")
            continue
        backend.embed(image[:256, :256])
        best = min(_timed(backend.embed, image) for _ in range(args.repeat))
        print(f"{name:<6} {mp / best:6.2f} MP/s  {mp * flops / best / 1e9:6.1f} GFLOP/s  ({backend.describe()})")
    return 0


def _timed(fn, *a) -> float:
    t = time.perf_counter()
    fn(*a)
    return time.perf_counter() - t


def _terminate(signum, frame):  # SIGTERM unwinds like Ctrl-C: temporary outputs are removed
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    handler = {"segment": cmd_segment, "fit": cmd_fit, "batch": cmd_batch, "export-onnx": cmd_export_onnx, "info": cmd_info,
               "bench": cmd_bench, "quantize": cmd_quantize, "polygonize": cmd_polygonize,
               "legend": cmd_legend}[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("\ninterrupted: no output written", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
