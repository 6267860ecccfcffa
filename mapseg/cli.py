"""mapseg: segment rasters with an exported student (or colour k-means).

    mapseg segment IN.tif OUT.tif -k 6 [--model model/best] [--tile 1024] [--backend auto]
                   [--bands 1,2,3] [--nodata V] [--smooth N] [--centers centers.json] [--cog]
                   [--stretch 2,98] [--seed 0]
    mapseg fit A.tif B.tif ... -k 6 -o centers.json [--model DIR]
    mapseg info [--model DIR]
    mapseg bench [--model DIR] [--size 1024]

Exit status 0 on success, 2 on a usage or input problem (the message says what
to do), 130 when interrupted (no partial output is left behind).
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time

import numpy as np

from . import __version__
from .artifact import describe, load_artifact
from .backends import AUTO_ORDER, BackendUnavailable, available_backends, make_backend
from .errors import USER_ERRORS, RasterError
from .features import default_model_path
from .fileio import write_text_atomic
from .raster import parse_bands, write_preview
from .scaling import parse_input_max, parse_stretch
from .segment import SegmentOptions, fit_raster_centers, segment_raster
from .windows import DEFAULT_TILE

EPILOG = ("--model takes an artifact folder (default: $MAPSEG_MODEL, else ./model/best, else the shipped model) or 'kmeans' for colour "
          "k-means without a network. See docs/runtime.md.")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="artifact folder, or 'kmeans' (default: $MAPSEG_MODEL, else ./model/best, else the shipped model)")
    p.add_argument("--backend", default="auto", choices=["auto", "numpy", "onnx", "torch"],
                   help="embedding backend; auto picks the fastest available and says which")
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
                   help="majority filter of radius N label cells (stride-4 cells; pixels for kmeans)")
    s.add_argument("--centers", default=None, help="apply centres from 'mapseg fit' instead of fitting")
    s.add_argument("--cog", action="store_true", help="write a Cloud Optimized GeoTIFF")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--report", default=None, metavar="JSON", help="also write the run report (timings, centres)")
    s.add_argument("--preview", default=None, metavar="PNG",
                   help="also write a PNG of the input beside its colour-coded segments (at most 1600 px wide)")
    _common(s)

    f = sub.add_parser("fit", help="fit cluster centres on a sample of one or more rasters", epilog=EPILOG)
    f.add_argument("inputs", nargs="+", help="rasters to sample")
    f.add_argument("-k", type=int, required=True, help="number of clusters")
    f.add_argument("-o", "--output", required=True, help="centres file to write (JSON)")
    f.add_argument("--no-progress", action="store_true", help="no progress bar")
    _common(f)

    i = sub.add_parser("info", help="print an artifact's metadata")
    i.add_argument("--model", default=None, help="artifact folder (default: $MAPSEG_MODEL, else ./model/best, else the shipped model)")
    i.add_argument("--json", action="store_true", help="print meta.json and metrics.json as JSON")

    b = sub.add_parser("bench", help="embedding throughput of every available backend on a random image")
    b.add_argument("--model", default=None, help="artifact folder (default: $MAPSEG_MODEL, else ./model/best, else the shipped model)")
    b.add_argument("--size", type=int, default=1024, help="image side in pixels (multiple of 4)")
    b.add_argument("--repeat", type=int, default=3)
    return p


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


def _options(args, **settings) -> SegmentOptions:
    """A run's SegmentOptions: the flags every command shares (``_common``) and this command's ``settings``."""
    return SegmentOptions(model=args.model, backend=args.backend, threads=args.threads, workers=args.workers,
                          bands=parse_bands(args.bands), nodata=args.nodata, stretch=parse_stretch(args.stretch),
                          input_max=parse_input_max(args.input_max, args.bits), seed=args.seed, **settings)


def cmd_segment(args) -> int:
    if args.preview and not args.preview.lower().endswith(".png"):
        raise RasterError(f"--preview {args.preview}: give a .png name")
    options = _options(args, k=args.k, tile=args.tile, smooth=args.smooth, centers=args.centers, cog=args.cog)
    report = segment_raster(args.input, args.output, options, progress=not args.no_progress, log=_log,
                            other_outputs={"--report": args.report, "--preview": args.preview})
    if args.report:
        write_text_atomic(args.report, json.dumps(report, indent=1) + "\n")
    if args.preview:
        _log(f"wrote {write_preview(args.input, args.output, args.preview, options.bands, options.nodata)}")
    return 0


def cmd_fit(args) -> int:
    centers = fit_raster_centers(args.inputs, _options(args, k=args.k), log=_log, progress=not args.no_progress,
                                 output=args.output)
    centers.save(args.output)
    _log(f"wrote {args.output}: K={centers.k} {centers.features} centres from {len(args.inputs)} raster(s)")
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
    handler = {"segment": cmd_segment, "fit": cmd_fit, "info": cmd_info, "bench": cmd_bench}[args.command]
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
