"""GPU benchmark of the cuda backend: end to end on a >= 1 gigapixel VRT mosaic, the network alone, where the
time goes, and fp16's label agreement with float32.

    python bench/bench_gpu.py                  # the full run: a 32768 x 32768 mosaic (1.07 GP), float32 and fp16
    python bench/bench_gpu.py --quick          # an 8192 x 8192 mosaic (67 MP), fewer rasters and repeats
    python bench/bench_gpu.py --device cpu     # CPU DRY RUN: the same code on torch's CPU device, a 1024^2
                                               # mosaic; checks the script, measures no GPU (labelled as such)

Without a CUDA device it prints ``no CUDA device: nothing measured`` with the reason (torch missing, a CPU-only
torch build, no device visible) and exits 2; it never prints a GPU figure it did not measure.

What it prints, as plain lines to paste into bench/REPORT.md:

1. The machine: GPU (name, memory, CUDA, cuDNN), torch, CPUs, the model.
2. Network alone: batches of real windows (``--tile`` + the halo, cut from the source tile) already on the
   device, ``backend.forward`` timed with CUDA events over ``--repeat`` calls after warm-up, per precision and
   batch size: MP/s of window cores (the halo's extra pixels are computed but not counted) and effective
   TFLOP/s.
3. End to end: ``segment_raster`` on the mosaic (read and decode a VRT of a real tile, scale, sample, fit K
   centres, embed on the GPU in batches, assign, write a DEFLATE GeoTIFF, count the classes) per precision,
   through ``load_features(model, "cuda:PRECISION,batch=N")`` as ``mapseg segment --backend cuda`` loads it:
   MP/s wall and of the label pass, CPU seconds, and where the label pass's time went, measured: the
   reads (GDAL, serial under the reader's lock) and the scaling done under it, staging into pinned memory,
   host-to-device copies, network and device-to-host copies (CUDA events), waiting for the GPU, the
   assignment, the rest of each window's work, and the writes (main thread, serial). Thread times are
   summed over the threads; the serial ones (reads under the lock, writes, the GPU) bound the wall time
   from below, and the largest is named.
4. Agreement: on real rasters (``--rasters``), the share of valid pixels whose fp16 label equals float32's
   (K centres fitted once on float32's sample, applied to both; K = 5 and 8), and cuda float32 against the
   CPU default backend (``auto``); the rule for fp16 (docs/runtime.md): >= 99.5 % on every raster.
5. mIoU (``--no-eval`` skips; needs the dev sets and the training stack): dubai_dev and geonrw_dev as
   ``python -m training.eval`` scores them (K = 5), float32 and fp16; the rule: within 0.005.
6. Verdicts: fp16 against its rule, and the end-to-end target (>= 500 MP/s on >= 1 GP, issue #20).

The mosaic repeats one tile, so its few blocks stay in GDAL's cache after the first reads: decoding is
counted once, reading is the VRT's copying. Real imagery decodes every block (the read line says how long
the reads took; a JPEG tile decodes at roughly 50-150 MP/s per core).

On the device machine of this workplace (an image whose ``python3`` holds a CUDA build of torch, numpy,
onnxruntime and threadpoolctl, no rasterio and no GDAL, no network; the .venv made here does not run there):
carry rasterio as wheels and the agreement rasters in ``shared/`` (docs/runtime.md, "GPU", says how) and run
``python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
PYTHONPATH=/tmp/site python3 bench/bench_gpu.py --no-eval``; the dev sets do not fit beside rasterio's wheel
in one call's 64 MB, and need no rasterio: a second call with them in ``shared/datasets`` runs
``python3 bench/bench_gpu.py --eval-only``. About 3-5 minutes in all: CUDA start-up, the network alone
(seconds), two 1.07 GP runs (each likely bounded by the CPU side, see 3.), agreement on six rasters, mIoU
on 89 tiles.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from mapseg import segment as seg  # noqa: E402 - after the repository is on the path
from mapseg.artifact import load_artifact  # noqa: E402
from mapseg.errors import BackendUnavailable  # noqa: E402
from mapseg.features import EmbeddingFeatures, load_features  # noqa: E402
from mapseg.gpu import DEFAULT_BATCH, CudaBackend, cuda_unavailable  # noqa: E402
from mapseg.raster import OUTPUT_NODATA, io_env, open_reader  # noqa: E402

AGREEMENT_MIN, MIOU_MAX_DIFF, TARGET_MPS, TARGET_PIXELS = 0.995, 0.005, 500.0, 1e9
# agreement rasters (relative to the datasets folder; "examples/..." to the repository): bench_precision's five
# domains, so the figures compare with int8's and bf16's in bench/REPORT.md
RASTERS = ["swissimage/big_img/1091-322_00.tif", "examples/naip_nd_2020_rgb.tif", "ngi_aerial/ngi_rgb_byte_1.tif",
           "dubai_dev/tile_2/images/image_part_003.jpg", "geonrw_dev/images/aachen_296_5625.tif",
           "geonrw_dev/images/bielefeld_460_5755.tif"]
SOURCES = ["swissimage/big_img/1091-322_00.tif", "examples/naip_nd_2020_rgb.tif"]  # the mosaic's tile: first found


def datasets_folder() -> Path:
    """../shared/datasets beside the checkout, else shared/datasets inside it (what travels to a device machine)."""
    for d in (ROOT.parent / "shared" / "datasets", ROOT / "shared" / "datasets"):
        if d.is_dir():
            return d
    return ROOT.parent / "shared" / "datasets"


def resolve(rel: str, data: Path) -> Path:
    return ROOT / rel if rel.startswith("examples/") else data / rel


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def say(line: str = "") -> None:
    print(line, flush=True)


# --------------------------------------------------------------------------- is there a GPU?

def no_cuda(device: str) -> str | None:
    """Why the benchmark cannot measure on ``device`` (None: it can)."""
    try:
        import torch
    except ImportError as exc:
        return f"torch is not installed ({exc})"
    if device == "cpu":
        return None
    return cuda_unavailable(torch)


def gpu_diagnostics() -> list[str]:
    """What the machine says about its GPUs, for a run that found none (nvidia-smi, /dev/nvidia*)."""
    lines = []
    smi = shutil.which("nvidia-smi")
    if smi:
        res = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
        lines.append(f"nvidia-smi -L: {(res.stdout or res.stderr).strip() or 'nothing'}")
    else:
        lines.append("nvidia-smi: not on PATH")
    devs = sorted(p.name for p in Path("/dev").glob("nvidia*")) if Path("/dev").is_dir() else []
    lines.append(f"/dev/nvidia*: {', '.join(devs) or 'none'}")
    lines.append(f"python: {sys.executable} {platform.python_version()}")
    return lines


def machine_lines(torch, device: str, art) -> list[str]:
    lines = [f"date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, "
             f"Python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}"]
    if device == "cuda":
        p = torch.cuda.get_device_properties(torch.cuda.current_device())
        lines.append(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
                     f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
                     + (f", {torch.cuda.device_count()} visible (the first is used)" if torch.cuda.device_count() > 1
                        else ""))
        smi = shutil.which("nvidia-smi")
        if smi:
            res = subprocess.run([smi, "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            if res.returncode == 0:
                lines.append(f"driver, max SM clock, power limit: {res.stdout.strip().splitlines()[0]}")
    else:
        lines.append("CPU DRY RUN on torch's CPU device: no figure below is a GPU figure")
    lines.append(f"model {art.path} ({art.digest[:12]}): embed {art.embed_dim}, "
                 f"{art.meta['architecture']['flops_per_megapixel'] / 1e9:.1f} GFLOP per megapixel, halo {art.halo}")
    return lines


# --------------------------------------------------------------------------- the network alone

def real_windows(source: Path, n: int, side: int) -> np.ndarray:
    """n windows (side x side x 3, float32 in [0, 1]) cut at different offsets from the source tile tiled."""
    import rasterio

    with rasterio.open(source) as ds:
        data = ds.read([1, 2, 3]).transpose(1, 2, 0)
        top = 255.0 if data.dtype == np.uint8 else float(data.max() or 1)
    reps = (-(-(2 * side) // data.shape[0]), -(-(2 * side) // data.shape[1]), 1)
    big = np.tile(data, reps)
    rng = np.random.default_rng(0)
    out = np.empty((n, side, side, 3), np.float32)
    for i in range(n):
        y, x = rng.integers(0, big.shape[0] - side), rng.integers(0, big.shape[1] - side)
        out[i] = big[y:y + side, x:x + side] / top
    return out


def network_alone(art, source: Path, device: str, precision: str, batch: int, tile: int, repeat: int) -> dict:
    """MP/s of window cores of ``backend.forward`` on ``batch`` windows already on the device."""
    import torch

    backend = CudaBackend(art, precision=precision, batch=batch, device=device)
    side = tile + 2 * art.halo
    x = torch.from_numpy(real_windows(source, batch, side)).to(backend.device).permute(0, 3, 1, 2)
    cuda = device == "cuda"
    with torch.inference_mode():
        for _ in range(2):
            backend.forward(x)
        if cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeat):
                backend.forward(x)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1000
        else:
            t = time.perf_counter()
            for _ in range(repeat):
                backend.forward(x)
            seconds = time.perf_counter() - t
    mp = batch * tile * tile * repeat / 1e6
    flops = art.meta["architecture"]["flops_per_megapixel"] * batch * side * side * repeat / 1e6
    return {"mps": mp / seconds, "tflops": flops / seconds / 1e12, "ms_per_batch": 1000 * seconds / repeat}


# --------------------------------------------------------------------------- end to end, with where the time goes

class Stages:
    """Seconds per stage of the label pass, summed over the threads that ran it (thread-safe)."""

    def __init__(self):
        self.lock, self.s, self.counting = threading.Lock(), {}, False

    def add(self, name: str, seconds: float) -> None:
        if self.counting:
            with self.lock:
                self.s[name] = self.s.get(name, 0.0) + seconds

    def timed(self, name: str, fn):
        def run(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.add(name, time.perf_counter() - t)
        return run


class _TimedReader:
    """A reader whose ``read`` (GDAL: the file read and decode) is timed; everything else is the reader's."""

    def __init__(self, reader, stages: Stages):
        self._reader, self._stages = reader, stages

    def read(self, *a, **kw):
        t = time.perf_counter()
        try:
            return self._reader.read(*a, **kw)
        finally:
            self._stages.add("read", time.perf_counter() - t)

    def __getattr__(self, name):
        return getattr(self._reader, name)


class _TimedWriter:
    def __init__(self, writer, stages: Stages):
        self._writer, self._stages = writer, stages

    def write(self, *a, **kw):
        t = time.perf_counter()
        try:
            return self._writer.write(*a, **kw)
        finally:
            self._stages.add("write", time.perf_counter() - t)

    def __getattr__(self, name):
        return getattr(self._writer, name)


@contextlib.contextmanager
def instrumented(stages: Stages):
    """mapseg.segment's window steps timed (its module names swapped for the run, restored after)."""
    names = ("read_window", "window_labels", "open_writer")
    stage_of = {"assign_labels": "assign", "cell_scores": "assign", "guided_labels": "upsample"}  # the upsampling's
    saved = {n: getattr(seg, n) for n in names + tuple(stage_of) if hasattr(seg, n)}
    if any(n not in saved for n in names):  # mapseg.segment changed: measure what is still there, say what is not
        say(f"  (not timed: mapseg.segment has no {', '.join(n for n in names if n not in saved)})")

    def read_window(reader, *a, **kw):
        t = time.perf_counter()
        try:
            return saved["read_window"](_TimedReader(reader, stages), *a, **kw)
        finally:
            stages.add("read_window", time.perf_counter() - t)

    for n, fn in saved.items():
        if n == "read_window":
            setattr(seg, n, read_window)
        elif n == "open_writer":
            setattr(seg, n, lambda *a, **kw: _TimedWriter(saved["open_writer"](*a, **kw), stages))
        else:
            setattr(seg, n, stages.timed("window" if n == "window_labels" else stage_of[n], fn))
    try:
        yield stages
    finally:
        for n, fn in saved.items():
            setattr(seg, n, fn)


def end_to_end(vrt: Path, out: Path, features, k: int, tile: int) -> dict:
    from mapseg.segment import SegmentOptions, segment_raster

    stages, backend = Stages(), features.backend
    marks = {}

    def log(msg: str) -> None:
        if msg.startswith("centres: "):  # the fit is done: the label pass starts (its stages counted from here)
            marks["fitted"] = cpu_seconds()
            backend.reset_stats()
            stages.counting = True

    c0 = cpu_seconds()
    with instrumented(stages):
        report = segment_raster(vrt, out, SegmentOptions(k=k, model=features, tile=tile), progress=False, log=log)
    c1 = cpu_seconds()
    report.update(cpu_s=c1 - c0, fit_cpu_s=marks.get("fitted", c0) - c0, label_cpu_s=c1 - marks.get("fitted", c0),
                  stages=dict(stages.s), gpu=backend.stats())
    return report


def time_lines(r: dict, plan) -> list[str]:
    """Where the label pass's time went (measured), and which serial part bounds it."""
    s, g, t = r["stages"], r["gpu"], r["timings"]
    wall = t["windows_s"]
    mp = r["megapixels"]
    read, locked, write = s.get("read", 0.0), s.get("read_window", 0.0), s.get("write", 0.0)
    window, assign, upsample = s.get("window", 0.0), s.get("assign", 0.0), s.get("upsample", 0.0)
    rest = max(0.0, window - g["wait_s"] - g["stage_s"] - assign - upsample)
    sizes = g["sizes"]
    mean = g["windows"] / g["batches"] if g["batches"] else 0.0
    lines = [
        f"  label pass {wall:.2f} s ({mp / wall:.1f} MP/s) of {r['seconds']:.2f} s; fit {t['fit_s']:.2f} s, "
        f"closing the file {t['finish_s']:.2f} s, class counts and sidecars {t.get('classes_s', 0.0):.2f} s",
        f"  plan: {plan.note}",
        f"  batches {g['batches']} of {g['windows']} windows (mean {mean:.2f}; sizes {sizes})",
        "  per stage, seconds (threads summed; 'serial' ones add up on one thread or device, bounding the wall "
        "time from below):"
    ] + [f"    {label:<58}{value:8.2f}" for label, value in (
        ("read (GDAL read + decode, serial under the reader's lock)", read),
        ("scale + fill, also under the lock", max(0.0, locked - read)),
        ("stage into pinned memory (caller threads)", g["stage_s"]),
        ("host -> device copies (device, per batch)", g["h2d_s"]),
        ("network (device, per batch)", g["network_s"]),
        ("device -> host copies (device, per batch)", g["d2h_s"]),
        ("waiting for the GPU's result (caller threads)", g["wait_s"]),
        ("assign: scores x . A + b (caller threads)", assign),
        ("guided upsampling of the scores (caller threads)", upsample),
        ("rest of the window: cut, smooth, nearest, nodata (callers)", rest),
        ("write (main thread, serial)", write),
        ("main thread waiting for the next window", max(0.0, wall - write)))]
    gpu = g["h2d_s"] + g["network_s"] + g["d2h_s"]
    floors = {"the reads under the lock (read + scale)": locked, "the writer (main thread)": write,
              "the GPU (copies + network, batches summed)": gpu}
    name, floor = max(floors.items(), key=lambda kv: kv[1])
    lines.append(f"  bound by {name}: {floor:.2f} s of the {wall:.2f} s label pass ({100 * floor / wall:.0f} %)"
                 f"; GPU time {100 * gpu / wall:.0f} % of it (batches summed: two may overlap)")
    return lines


# --------------------------------------------------------------------------- agreement and mIoU

def agreement(paths, ref, var, ks, seed: int = 0) -> list[dict]:
    """Per raster, the share of valid pixels whose label under ``var`` equals ``ref``'s, with K centres fitted
    once on the raster's ``ref`` sample and applied to both (as mapseg.quantize.label_agreement, on feature
    models already loaded)."""
    from mapseg.segment import fit_reader_centers, label_reader, scaling_for
    from mapseg.upsample import NEAREST

    rows = []
    with io_env():
        for path in paths:
            with open_reader(str(path), (1, 2, 3)) as reader:
                scaling = scaling_for(reader, ref, None, seed)
                row = {"path": Path(path).name}
                for k in ks:
                    centers = fit_reader_centers([reader], k, ref, seed)
                    # nearest: each cell's own label, the stricter measure (the guided upsampling averages the scores of
                    # 7 x 7 cells, which hides disagreements of single cells)
                    a = label_reader(reader, ref, scaling, centers, up=NEAREST)
                    b = label_reader(reader, var, scaling, centers, up=NEAREST)
                    valid = a != OUTPUT_NODATA
                    row[k] = float((a[valid] == b[valid]).mean())
                rows.append(row)
    return rows


def dev_miou(data: Path, feats: dict, k: int, seed: int = 0) -> dict:
    """name -> {label: mIoU}: dubai_dev and geonrw_dev as training.eval scores them, each feature model fitting
    its own centres (as it is used)."""
    from mapseg.raster import ArrayReader
    from mapseg.scaling import make_scaling
    from mapseg.segment import fit_reader_centers, label_reader
    from training.eval import folder_set, score_labels

    d, g = data / "dubai_dev", data / "geonrw_dev"
    sets = [("dubai_dev", lambda: folder_set([d / f"tile_{i}" / "images" for i in range(1, 5)],
                                             [d / f"tile_{i}" / "masks" for i in range(1, 5)],
                                             str(ROOT / "training" / "datasets" / "colors" / "dubai_dev.json"))),
            ("geonrw_dev", lambda: folder_set([g / "images"], [g / "masks"], mask_classes=str(
                ROOT / "training" / "datasets" / "classes" / "geonrw_5.json")))]
    scaling = make_scaling("uint8", None, None)
    out = {}
    for name, make in sets:
        if not any((data / name).glob("**/masks")):  # a set carried in part (agreement rasters only): not scored
            continue
        evalset = make()
        readers = [ArrayReader(im, name=i) for im, i in zip(evalset.images, evalset.ids)]
        out[name] = {}
        for label, f in feats.items():
            centers = fit_reader_centers(readers, k, f, seed)
            out[name][label] = score_labels(evalset, [label_reader(r, f, scaling, centers) for r in readers],
                                            k)["dataset"]["miou"]
    return out


def cuda_features(args, art, precision: str, dry: bool):
    """The feature model of the cuda backend as ``mapseg segment --backend cuda --precision P --batch N`` loads
    it; on a dry run, the same backend on torch's CPU device."""
    if dry:
        return EmbeddingFeatures(art, CudaBackend(art, precision=precision, batch=args.batch, device="cpu"))
    return load_features(args.model, f"cuda:{precision},batch={args.batch}")


class Failures:
    """Each part of the run goes on when another fails (the GPU time is not spent twice); the failures are
    said where they happen and counted for the exit status."""

    def __init__(self):
        self.count = 0

    @contextlib.contextmanager
    def part(self, name: str):
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - said, and the run goes on
            import traceback

            self.count += 1
            say(f"FAILED: {name}: {type(exc).__name__}: {exc}")
            for line in traceback.format_exc().rstrip().splitlines()[-6:]:
                say(f"  {line}")


def miou_lines(args, data: Path, precisions: list, dry: bool, art) -> dict:
    """The dev-set mIoU of each precision, printed; {} when not measured (said why)."""
    try:
        mious = dev_miou(data, {p_: cuda_features(args, art, p_, dry) for p_ in precisions}, 5)
    except Exception as exc:  # noqa: BLE001 - the training stack or the dev sets missing: said, not fatal
        say(f"\ndev-set mIoU not measured: {type(exc).__name__}: {exc}")
        return {}
    if not mious:
        say(f"\ndev-set mIoU not measured: no dubai_dev or geonrw_dev with masks under {data}")
        return {}
    say("\ndev-set mIoU (K = 5, each precision fitting its own centres, Hungarian matching over the set)")
    for name, row in mious.items():
        say(f"  {name:<11}" + "".join(f"  {p_} {v:.4f}" for p_, v in row.items()))
    for v in precisions:
        diffs = [abs(row[v] - row["float32"]) for row in mious.values() if "float32" in row and v != "float32"]
        if diffs:
            say(f"  {v}: largest mIoU difference from float32 {max(diffs):.4f} (the rule: <= {MIOU_MAX_DIFF})")
    return mious


# --------------------------------------------------------------------------- the run

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cuda (the benchmark); cpu: a dry run of this script on torch's CPU device, no GPU figure")
    p.add_argument("--quick", action="store_true", help="an 8192^2 mosaic, three agreement rasters, K=8, fewer repeats")
    p.add_argument("--model", default=str(ROOT / "model" / "best"), help="artifact folder")
    p.add_argument("--datasets", default=None, help="the real imagery (default: ../shared/datasets, else "
                                                    "shared/datasets in the checkout)")
    p.add_argument("--source", default=None, help="the tile of the mosaic (default: SWISSIMAGE 875 x 600, else the "
                                                  "NAIP example in the repository)")
    p.add_argument("--side", type=int, default=None, help="mosaic side (default 32768: 1.07 GP; --quick 8192; "
                                                          "--device cpu 1024)")
    p.add_argument("--precisions", default="float32,fp16")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="windows per network call end to end")
    p.add_argument("--batches", default=None, help="batch sizes of the network-alone runs (default 1,8,16)")
    p.add_argument("--tile", type=int, default=1024)
    p.add_argument("-k", type=int, default=8, help="K of the end-to-end runs")
    p.add_argument("--repeat", type=int, default=None, help="timed network calls per figure (default 20)")
    p.add_argument("--rasters", nargs="*", default=None, help="agreement rasters (default: six real ones)")
    p.add_argument("--no-eval", action="store_true", help="skip the dev-set mIoU")
    p.add_argument("--eval-only", action="store_true",
                   help="the dev-set mIoU alone (no raster I/O library needed: the dev sets are read with PIL)")
    p.add_argument("--workdir", default=None, help="for the mosaic and the outputs (default: a temporary folder)")
    args = p.parse_args(argv)
    dry = args.device == "cpu"

    why = no_cuda(args.device)
    if why:
        say(f"no CUDA device: nothing measured ({why})")
        for line in gpu_diagnostics():
            say(f"  {line}")
        say("  (the benchmark needs a CUDA build of torch and a visible GPU; python bench/bench_gpu.py --device cpu "
            "dry-runs this script on the CPU without measuring any GPU)")
        return 2
    import torch

    data = Path(args.datasets) if args.datasets else datasets_folder()
    art = load_artifact(args.model)
    precisions = [x for x in args.precisions.split(",") if x]
    side = args.side or (1024 if dry else 8192 if args.quick else 32768)
    repeat = args.repeat or (2 if dry else 10 if args.quick else 20)
    batches = [int(b) for b in (args.batches or ("2" if dry else "1,8,16")).split(",")]
    net_tile = 256 if dry else args.tile
    tile = 256 if dry and args.tile == 1024 else args.tile
    found = [resolve(s, data) for s in SOURCES if resolve(s, data).is_file()]
    source = Path(args.source) if args.source else (found[0] if found else None)
    if not args.eval_only and (source is None or not source.is_file()):
        say(f"error: no source tile for the mosaic ({args.source or ', '.join(SOURCES)} under {data})")
        return 2
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="mapseg-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    failed = Failures()
    try:
        for line in machine_lines(torch, args.device, art):
            say(line)

        if args.eval_only:
            miou_lines(args, data, precisions, dry, art)
            return 0
        net, e2e, worst, mp = {}, {}, {}, side * side / 1e6
        with failed.part("network alone"):
            say(f"\nnetwork alone: batches of real windows already on the device ({net_tile} + 2 x {art.halo} halo "
                f"pixels a side, from {source.name}), {repeat} calls after 2 warm-up; MP/s of window cores")
            say(f"  {'precision':<10}{'batch':>6}{'MP/s':>10}{'TFLOP/s':>9}{'ms/batch':>10}")
            for prec in precisions:
                for b in batches:
                    r = network_alone(art, source, args.device, prec, b, net_tile, repeat)
                    net[(prec, b)] = r
                    say(f"  {prec:<10}{b:>6}{r['mps']:10.1f}{r['tflops']:9.1f}{r['ms_per_batch']:10.2f}")

        with failed.part("end to end"):
            from bench_runtime import mosaic_vrt

            vrt = mosaic_vrt(source, side, work / f"mosaic_{side}.vrt")
            say(f"\nend to end: segment_raster on a {side} x {side} VRT mosaic ({mp:,.1f} MP) of {source.name}, "
                f"K={args.k}, tile {tile}, batch {args.batch}: read, decode, scale, sample, fit, embed, assign, write "
                "(DEFLATE GeoTIFF), class counts")
            for prec in precisions:
                with failed.part(f"end to end, {prec}"):
                    features = cuda_features(args, art, prec, dry)
                    out = work / f"labels_{prec}.tif"
                    r = end_to_end(vrt, out, features, args.k, tile)
                    e2e[prec] = r
                    size = out.stat().st_size / 1e6
                    say(f"- {prec}: {r['megapixels_per_s']:.1f} MP/s end to end ({r['seconds']:.1f} s), "
                        f"{mp / r['cpu_s']:.1f} MP per CPU-second ({r['cpu_s']:.1f} CPU s: fit {r['fit_cpu_s']:.1f}, "
                        f"label pass {r['label_cpu_s']:.1f}); output {size:.0f} MB")
                    for line in time_lines(r, features.plan):
                        say(line)
                for f in work.glob(f"labels_{prec}*"):
                    f.unlink()

        with failed.part("agreement"):
            ks = [8] if args.quick or dry else [5, 8]
            names = args.rasters if args.rasters is not None else (RASTERS[:1] if dry else RASTERS[:3] if args.quick
                                                                  else RASTERS)
            rasters = [Path(r) if Path(r).is_file() else resolve(r, data) for r in names]
            missing = [str(r) for r in rasters if not r.is_file()]
            rasters = [r for r in rasters if r.is_file()]
            if missing:
                say(f"\n(agreement rasters not found, left out: {', '.join(missing)})")
            if rasters:
                f32 = cuda_features(args, art, "float32", dry)
                pairs = [(f"{v} vs float32", f32, cuda_features(args, art, v, dry)) for v in precisions
                         if v != "float32"]
                try:
                    cpu = load_features(args.model, "auto")
                    pairs.append((f"{f32.backend.name} float32 vs CPU {cpu.backend.name}", cpu, f32))
                except BackendUnavailable as exc:
                    say(f"(no CPU backend to compare with: {exc})")
                say(f"\nagreement: share of valid pixels with the same label, K centres fitted once on the first's "
                    f"sample and applied to both (K = {', '.join(map(str, ks))})")
                for what, ref, var in pairs:
                    rows = agreement(rasters, ref, var, ks)
                    worst[what] = min(r[k] for r in rows for k in ks)
                    say(f"  {what}: lowest {100 * worst[what]:.3f} %")
                    for r in rows:
                        say(f"    {r['path']:<34}" + "".join(f"  K={k} {100 * r[k]:7.3f} %" for k in ks))

        mious = {}
        if not args.no_eval and not dry:
            with failed.part("dev-set mIoU"):
                mious = miou_lines(args, data, precisions, dry, art)

        say("")
        verdicts = []
        for v in precisions:
            if v == "float32":
                continue
            key = f"{v} vs float32"
            diffs = [abs(row[v] - row["float32"]) for row in mious.values() if v in row and "float32" in row]
            ok = key in worst and worst[key] >= AGREEMENT_MIN and diffs and max(diffs) <= MIOU_MAX_DIFF
            verdicts.append(f"{v}: lowest agreement " + (f"{100 * worst[key]:.2f} %" if key in worst else "not measured")
                            + f" (needs >= {100 * AGREEMENT_MIN:.1f}), "
                            + (f"largest mIoU difference {max(diffs):.4f}" if diffs else "mIoU not measured")
                            + f" (needs <= {MIOU_MAX_DIFF}) -> " + ("meets the rule" if ok else "does not meet the rule"
                                                                   if diffs and key in worst else "rule not decided"))
        if e2e:
            best = max(e2e.items(), key=lambda kv: kv[1]["megapixels_per_s"])
            text = (f"target >= {TARGET_MPS:.0f} MP/s end to end on >= 1 GP: best {best[1]['megapixels_per_s']:.1f} "
                    f"MP/s ({best[0]}) on {mp:,.1f} MP -> " + ("not decided (smaller than 1 GP)"
                                                              if side * side < TARGET_PIXELS else
                                                              "met" if best[1]["megapixels_per_s"] >= TARGET_MPS
                                                              else "not met"))
        else:
            text = f"target >= {TARGET_MPS:.0f} MP/s end to end: not measured (the end-to-end runs failed)"
        if net:
            (prec, b), r = max(net.items(), key=lambda kv: kv[1]["mps"])
            text += f"; network alone {r['mps']:.0f} MP/s ({prec}, batch {b})"
        verdicts.append(text)
        for v in verdicts:
            say(("CPU DRY RUN, not a GPU figure: " if dry else "") + v)
        if failed.count:
            say(f"{failed.count} part(s) FAILED (above)")
        say(f"(bench_gpu.py ran {time.perf_counter() - t_start:.0f} s)")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failed.count else 0


if __name__ == "__main__":
    sys.exit(main())
