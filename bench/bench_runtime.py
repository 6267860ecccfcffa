"""Runtime benchmark: end-to-end throughput per backend, fraction of the matmul rate, peak RSS vs raster size.

    python bench/bench_runtime.py                       # everything (the 20000 x 20000 run takes minutes)
    python bench/bench_runtime.py --rss-sizes 1000,5000 # quicker
    python bench/bench_runtime.py --model model/best    # a given artifact (default: see below)

What it does, printing figures as it goes:

1. Measures this machine's float32 matmul rate (2048^3 products; numpy, and
   torch when installed): the yardstick for "fraction of the matmul rate",
   measured again right before each throughput run (the machine may be
   shared; the fraction compares figures taken under the same load); and the
   per-core rate (the same product on one thread), the yardstick of the
   work done per CPU-second.
2. Builds test rasters by tiling real imagery (``../shared/datasets``, the
   SWISSIMAGE 875 x 600 tile by default) into georeferenced VRT mosaics in a
   temporary folder outside the repository (nothing is copied).
3. Segments the throughput raster (``--size``, default 4096 x 4096) end to
   end -- read, embed, fit, assign, write a compressed GeoTIFF -- with each
   backend (numpy, onnx, torch: whatever is installed) and the SAME artifact,
   and in colour k-means mode; prints MP/s, effective GFLOP/s and the
   fraction of the matmul rate measured just before that run; and, because
   wall time on a shared host swings with other people's load while CPU time
   much less, the CPU seconds of the run (this process's user + system time:
   every thread of it), megapixels per CPU-second, the share of the per-core
   float32 peak that this work is (effective GFLOP per CPU-second / the
   per-core matmul rate measured just before), and the CPU seconds of the
   run's setup (loading the model: the backend's session, and its library the
   first time), of the fit stage (from the log line of the run's upsampling,
   just before the raster is opened and its outputs checked, to the log line
   of the fitted centres: scaling, sampling windows through the network,
   k-means; the wall-clock "fit s" starts a little later, after those
   checks) and of the label pass,
   with the fit's share of the run's CPU. ``--repeat N``
   (default 3) runs the backends in turn N times and ends with each one's
   median MP/s and median fraction: one run on a shared host can land on a
   burst of someone else's load, in the run or in its yardstick. ``--backends``
   takes backend specs with a precision too (``onnx:int8,torch:bf16``: the
   artifact needs model.int8.onnx for int8, see ``mapseg quantize``); the
   A/B of a variant against float32 with agreement and mIoU is
   bench/bench_precision.py.
4. Runs ``mapseg segment`` in a fresh process per raster size (``--rss-sizes``,
   default 1000, 5000, 20000 pixels square) and prints each run's peak RSS.

The artifact: ``--model DIR`` if given (re-exported with model.onnx into the
temporary folder when it has none and the onnx package is installed);
otherwise a default-architecture student (embed 96, width 96, depth 3)
trained for one step by the smoke exporter, which needs torch. Throughput does
not depend on the weights, only on the architecture.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mapseg.artifact import load_artifact  # noqa: E402 - after the repository is on the path
from mapseg.backends import build_onnx_model  # noqa: E402
from mapseg.segment import SegmentOptions, segment_raster  # noqa: E402
from mapseg.windows import DEFAULT_TILE  # noqa: E402
DATA = ROOT.parent / "shared" / "datasets"
SOURCE = DATA / "swissimage" / "big_img" / "1091-322_00.tif"


def matmul_rate(lib: str, n: int = 2048, repeat: int = 5, threads: int | None = None, clock=time.perf_counter) -> float:
    """Best-of float32 GFLOP/s of an n^3 product (``threads``: on that many threads, default all; ``clock``:
    wall time, or ``time.thread_time`` for GFLOP per CPU-second of a one-thread product)."""
    if lib == "numpy":
        a = np.random.default_rng(0).random((n, n), dtype=np.float32)
        f = lambda: a @ a  # noqa: E731
        with threadpool_limits(limits=threads, user_api="blas"):
            f()
            best = min(_timed(f, clock) for _ in range(repeat))
        return 2 * n ** 3 / best / 1e9
    import torch
    t = torch.rand(n, n)
    f = lambda: t @ t  # noqa: E731
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        f()
        best = min(_timed(f, clock) for _ in range(repeat))
    finally:
        torch.set_num_threads(before)
    return 2 * n ** 3 / best / 1e9


def core_rate(libs) -> float:
    """The per-core float32 peak in GFLOP per CPU-second: the best one-thread product of ``libs``, timed by the
    thread's CPU clock (a one-thread product runs on the calling thread), so other load on a shared host
    does not lower it as it lowers the wall-clock rate."""
    return max(matmul_rate(lib, repeat=3, threads=1, clock=time.thread_time) for lib in libs)


def cpu_seconds() -> float:
    """This process's CPU time (user + system, all its threads; to the microsecond, where os.times counts clock
    ticks of 10 ms)."""
    return time.process_time()


def _timed(fn, clock=time.perf_counter) -> float:
    t = clock()
    fn()
    return clock() - t


def mosaic_vrt(source: Path, side: int, path: Path) -> Path:
    """A side x side georeferenced VRT made of copies of ``source`` (cropped at the right/bottom edge)."""
    import rasterio

    with rasterio.open(source) as ds:
        w, h, count, dtype, crs, t = ds.width, ds.height, ds.count, ds.dtypes[0], ds.crs, ds.transform
    vtype = {"uint8": "Byte", "uint16": "UInt16"}[dtype]
    bands = []
    for b in range(1, min(count, 3) + 1):
        sources = []
        for y0 in range(0, side, h):
            for x0 in range(0, side, w):
                cw, ch = min(w, side - x0), min(h, side - y0)
                sources.append(f'<SimpleSource><SourceFilename relativeToVRT="0">{source}</SourceFilename>'
                               f'<SourceBand>{b}</SourceBand><SrcRect xOff="0" yOff="0" xSize="{cw}" ySize="{ch}"/>'
                               f'<DstRect xOff="{x0}" yOff="{y0}" xSize="{cw}" ySize="{ch}"/></SimpleSource>')
        bands.append(f'<VRTRasterBand dataType="{vtype}" band="{b}">{"".join(sources)}</VRTRasterBand>')
    geo = f"{t.c}, {t.a}, {t.b}, {t.f}, {t.d}, {t.e}"
    srs = f"<SRS>{crs.to_wkt()}</SRS>" if crs else ""
    path.write_text(f'<VRTDataset rasterXSize="{side}" rasterYSize="{side}">{srs}<GeoTransform>{geo}</GeoTransform>'
                    f'{"".join(bands)}</VRTDataset>')
    return path


def default_artifact(work: Path, model: str | None) -> Path:
    if model:
        art = load_artifact(model)
        if art.onnx_path is not None:
            return Path(model)
        try:
            dst = work / "model"
            shutil.copytree(model, dst)
            (dst / "model.onnx").write_bytes(build_onnx_model(art))
            return dst
        except Exception as exc:  # noqa: BLE001
            print(f"note: no model.onnx for the onnx backend ({exc})")
            return Path(model)
    from training.export import smoke_export  # torch, needed only here

    onnx = importlib.util.find_spec("onnx") is not None
    print("artifact: default architecture (embed 96, width 96, depth 3), one smoke training step "
          "(throughput does not depend on the weights)")
    out, _ = smoke_export(work / "model", seed=7, steps=1, embed_dim=96, max_k=16, patch_size=32, onnx=onnx)
    return out


def run_segment(src: Path, out: Path, model: str, backend: str, k: int, tile: int, upsample: str | None = None) -> dict:
    """segment_raster's report, with ``cpu_s`` (the run's CPU seconds), ``setup_cpu_s`` (up to the log line of the
    upsampling, which follows the model's loading), ``fit_cpu_s`` (from there to the log line of the fitted centres)
    and ``windows_cpu_s`` (after it)."""
    marks = {}

    def log(msg: str) -> None:
        if msg.startswith("upsampling: "):
            marks["loaded"] = cpu_seconds()
        if msg.startswith("centres: "):
            marks["fitted"] = cpu_seconds()

    c0 = cpu_seconds()
    r = segment_raster(src, out, SegmentOptions(k=k, model=model, tile=tile, backend=backend, upsample=upsample),
                       progress=False, log=log)
    c1 = cpu_seconds()
    loaded = marks.get("loaded", c0)
    fitted = marks.get("fitted", loaded)
    r["cpu_s"] = c1 - c0
    r["setup_cpu_s"] = loaded - c0
    r["fit_cpu_s"] = fitted - loaded
    r["windows_cpu_s"] = c1 - fitted
    return r


def peak_rss_run(src: Path, out: Path, model: str, backend: str, k: int, tile: int) -> tuple[float, float, float]:
    """(peak RSS MB, seconds, MP/s) of ``mapseg segment`` in a fresh process.

    The peak is the child's VmHWM (Linux): ru_maxrss would also count the
    pages of this (large) benchmark process that the child held between fork
    and exec.
    """
    code = ("import json, resource, sys, time\n"
            "from mapseg.segment import SegmentOptions, segment_raster\n"
            f"r = segment_raster({str(src)!r}, {str(out)!r}, SegmentOptions(k={k}, model={model!r}, tile={tile}, "
            f"backend={backend!r}), progress=False, log=lambda m: None)\n"
            "try:\n"
            "    hwm = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
            "except OSError:\n"
            "    hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "print(json.dumps({'rss_kb': hwm, 'seconds': r['seconds'], 'mps': r['megapixels_per_s']}))\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if res.returncode:
        raise RuntimeError(res.stderr)
    data = json.loads(res.stdout.strip().splitlines()[-1])
    return data["rss_kb"] / 1024, data["seconds"], data["mps"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="artifact folder (default: smoke-exported default architecture)")
    p.add_argument("--source", default=str(SOURCE), help="real raster tiled into the test mosaics")
    p.add_argument("--size", type=int, default=4096, help="side of the throughput raster")
    p.add_argument("--rss-sizes", default="1000,5000,20000", help="sides of the peak-RSS rasters ('' = skip)")
    p.add_argument("--rss-backend", default="numpy", help="backend of the peak-RSS runs")
    p.add_argument("--backends", default="numpy,onnx,torch",
                   help="throughput runs ('' = none); backend specs, a precision too: onnx:int8,torch:bf16; "
                        "/METHOD for an upsampling other than the model's: onnx/nearest")
    p.add_argument("--no-kmeans", action="store_true", help="skip the colour k-means throughput run")
    p.add_argument("-k", type=int, default=8)
    p.add_argument("--tile", type=int, default=DEFAULT_TILE)
    p.add_argument("--repeat", type=int, default=3, help="rounds of throughput runs (medians at the end)")
    p.add_argument("--workdir", default=None, help="temporary folder (default: a new one under $TMPDIR)")
    args = p.parse_args()

    source = Path(args.source)
    if not source.is_file():
        print(f"error: {source} not found (the benchmark tiles real imagery from ../shared/datasets)")
        return 2
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="mapseg-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} (1 min); work folder {work}")

    rates = {"numpy": matmul_rate("numpy")}
    try:
        rates["torch"] = matmul_rate("torch")
    except ImportError:
        pass
    for lib, rate in rates.items():
        print(f"float32 matmul rate ({lib}, 2048^3): {rate:.0f} GFLOP/s")
    yardstick = max(rates.values())
    core = core_rate(rates)
    print(f"per-core float32 peak (best one-thread 2048^3 product of {', '.join(rates)}): {core:.0f} GFLOP "
          "per CPU-second")

    model = str(default_artifact(work, args.model))
    art = load_artifact(model)
    flops = art.meta["architecture"]["flops_per_megapixel"]
    print(f"artifact {model}: embed {art.embed_dim}, {flops / 1e9:.1f} GFLOP per megapixel, halo {art.halo}")

    backends = [b for b in args.backends.split(",") if b]
    if backends or not args.no_kmeans:
        src = mosaic_vrt(source, args.size, work / f"mosaic_{args.size}.vrt")
        mp = args.size ** 2 / 1e6
        print(f"\nthroughput raster: {args.size} x {args.size} ({mp:.1f} MP) tiled from {source.name}; K={args.k}, "
              f"tile {args.tile}; end to end (read, embed, fit, assign, write)")
        print(f"{'mode':<14}{'MP/s':>8}{'s':>8}{'GFLOP/s':>9}{'of matmul':>11}{'matmul now':>12}"
              f"{'CPU s':>8}{'MP/CPU-s':>10}{'of core':>9}{'core now':>10}{'load':>6}  fit s / windows s "
              "(CPU s: setup + fit / windows), fit share of the CPU")
        # backend -> [(MP/s, fraction of matmul, MP per CPU-second, fraction of the per-core peak, fit share of the CPU)]
        runs = {}
        for round_ in range(max(1, args.repeat)):
            for backend in backends:
                if backend in runs and not runs[backend]:
                    continue  # unavailable
                # the machine may be shared: measure the yardstick right before each run, under the same load
                now = max(matmul_rate(lib, repeat=3) for lib in rates)
                core_now = core_rate(rates)
                load = os.getloadavg()[0]
                spec, _, upsample = backend.partition("/")
                try:
                    r = run_segment(src, work / f"out_{backend.replace('/', '_')}.tif", model, spec, args.k,
                                    args.tile, upsample or None)
                except Exception as exc:  # noqa: BLE001 - report and go on with the other backends
                    print(f"{backend:<14} unavailable: {exc}")
                    runs[backend] = []
                    continue
                gf = r["megapixels_per_s"] * flops / 1e9
                per_cpu = mp / r["cpu_s"]
                of_core = per_cpu * flops / 1e9 / core_now
                runs.setdefault(backend, []).append((r["megapixels_per_s"], gf / now, per_cpu, of_core,
                                                     r["fit_cpu_s"] / r["cpu_s"]))
                print(f"{backend:<14}{r['megapixels_per_s']:8.2f}{r['seconds']:8.1f}{gf:9.1f}{gf / now:10.0%}"
                      f"{now:12.0f}{r['cpu_s']:8.1f}{per_cpu:10.2f}{of_core:8.0%}{core_now:10.0f}{load:6.1f}  "
                      f"{r['timings']['fit_s']:.2f} / {r['timings']['windows_s']:.1f} "
                      f"({r['setup_cpu_s']:.2f} + {r['fit_cpu_s']:.2f} / {r['windows_cpu_s']:.1f}), "
                      f"{r['fit_cpu_s'] / r['cpu_s']:.1%}")
            if not args.no_kmeans:
                r = run_segment(src, work / "out_kmeans.tif", "kmeans", "auto", args.k, args.tile)
                runs.setdefault("colour kmeans", []).append((r["megapixels_per_s"], None, mp / r["cpu_s"], None,
                                                             r["fit_cpu_s"] / r["cpu_s"]))
                print(f"{'colour kmeans':<14}{r['megapixels_per_s']:8.2f}{r['seconds']:8.1f}{'-':>9}{'-':>11}"
                      f"{'-':>12}{r['cpu_s']:8.1f}{mp / r['cpu_s']:10.2f}{'-':>9}{'-':>10}{os.getloadavg()[0]:6.1f}  "
                      f"{r['timings']['fit_s']:.2f} / {r['timings']['windows_s']:.1f} "
                      f"({r['setup_cpu_s']:.2f} + {r['fit_cpu_s']:.2f} / {r['windows_cpu_s']:.1f}), "
                      f"{r['fit_cpu_s'] / r['cpu_s']:.1%}")
        print(f"(of matmul = effective GFLOP/s / the float32 matmul rate (best of 3) measured just before the "
              f"run; at the start: {yardstick:.0f} GFLOP/s. CPU s = the process's user + system seconds over the "
              f"run; of core = effective GFLOP per CPU-second / the per-core float32 peak (one-thread 2048^3 "
              f"product, best of 3, GFLOP per CPU-second of its thread) measured just before; at the start: "
              f"{core:.0f}. setup = loading the model; fit = opening the raster, scaling, sampling windows through "
              f"the network, k-means, up to the log line of the fitted centres; fit share = fit CPU s / the run's)")
        if args.repeat > 1:
            print(f"\nmedians over {args.repeat} rounds")
            for name, got in runs.items():
                if got:
                    def spread(i, fmt):
                        if got[0][i] is None:
                            return "-"
                        v = [g[i] for g in got]
                        return f"{format(float(np.median(v)), fmt)} ({format(min(v), fmt)}-{format(max(v), fmt)})"
                    print(f"{name:<14}{spread(0, '.2f')} MP/s, of matmul {spread(1, '.0%')}; "
                          f"{spread(2, '.2f')} MP per CPU-second, of the per-core peak {spread(3, '.0%')}; "
                          f"fit share of the CPU {spread(4, '.1%')}")

    sizes = [int(s) for s in args.rss_sizes.split(",") if s]
    if sizes:
        print(f"\npeak RSS of 'mapseg segment' (fresh process, backend {args.rss_backend}, tile {args.tile})")
        print(f"{'raster':>14}{'MP':>8}{'peak RSS MB':>13}{'s':>8}{'MP/s':>7}")
        for side in sizes:
            vrt = mosaic_vrt(source, side, work / f"mosaic_{side}.vrt")
            rss, secs, mps = peak_rss_run(vrt, work / f"rss_{side}.tif", model, args.rss_backend, args.k, args.tile)
            print(f"{side:>6} x {side:<6}{side * side / 1e6:8.0f}{rss:13.0f}{secs:8.0f}{mps:7.2f}")
            (work / f"rss_{side}.tif").unlink()
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
