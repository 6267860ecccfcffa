"""Precision variants against float32: label agreement, dev-set mIoU, and megapixels per CPU-second, A/B.

    python bench/bench_precision.py                              # int8 (onnx) and bf16 (torch), everything
    python bench/bench_precision.py --variants onnx:int8 --no-eval
    python bench/bench_precision.py --model /tmp/m              # an artifact folder with model.int8.onnx

For each variant (a backend spec, ``BACKEND:PRECISION``) against float32 on the SAME backend:

1. Agreement: on several real rasters (``--rasters``; by default none of them used by
   ``mapseg quantize``'s default calibration below), the share of valid pixels whose variant label
   equals the float32 one, K centres fitted once on the raster's float32 sample and applied to both
   (``mapseg.quantize.label_agreement``), for each K in ``-k``.
2. mIoU (``--no-eval`` skips): dubai_dev (36 tiles, 5 colour classes) and geonrw_dev (53 tiles,
   5 appearance groups) through the mapseg pipeline as ``python -m training.eval`` scores them (K = 5,
   one Hungarian matching over the set): float32, the variant fitting its own centres (how it is used),
   and the variant with float32's centres (the labels' share alone; a fit of its own may also settle
   in another k-means optimum, which moves mIoU by ~0.01 between seeds of one model, README).
3. Speed, interleaved in one run (``--repeat`` rounds of float32 then the variant; a variant on
   another backend than onnx is also timed against onnx float32, the yardstick of the speed target
   ">= 1.5x float32 onnx MP per CPU-second"):
   the network alone on a real 1024 x 1024 image at 1 thread (megapixels per CPU-second), and
   ``segment_raster`` end to end on a ``--size`` square mosaic of real imagery (wall MP/s, CPU
   seconds of the process, MP per CPU-second). CPU seconds are the process's user + system time
   (os.times), which a shared host's other load does not inflate as it does wall time.

The rule (docs/runtime.md): a variant could become more than opt-in only where its labels agree with
float32's on >= 99.5 % of the pixels of every raster and both dev-set mIoUs are within 0.005. The
last lines say whether each variant meets it here. Needs the artifact's model.int8.onnx for int8
(``mapseg quantize``, the command is printed when it is missing).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench_runtime import mosaic_vrt  # noqa: E402
from mapseg.artifact import load_artifact  # noqa: E402
from mapseg.backends import BackendUnavailable, make_backend, split_backend  # noqa: E402
from mapseg.features import load_features  # noqa: E402
from mapseg.quantize import label_agreement  # noqa: E402
from mapseg.segment import SegmentOptions, fit_reader_centers, label_reader, segment_raster  # noqa: E402

DATA = ROOT.parent / "shared" / "datasets"
# check rasters: five domains; none is among CALIBRATION (below, the command mapseg quantize was run with)
RASTERS = [DATA / "swissimage" / "big_img" / "1091-322_00.tif", ROOT / "examples" / "naip_nd_2020_rgb.tif",
           DATA / "ngi_aerial" / "ngi_rgb_byte_1.tif", DATA / "dubai_dev" / "tile_2" / "images" / "image_part_003.jpg",
           DATA / "geonrw_dev" / "images" / "aachen_296_5625.tif", DATA / "geonrw_dev" / "images" / "bielefeld_460_5755.tif"]
CALIBRATION = [DATA / "swissimage" / "lidar" / "ref-img.tif", DATA / "ngi_aerial" / "ngi_rgb_byte_3.tif",
               DATA / "neon" / "OSBS_029.tif", DATA / "neon" / "2018_SJER_3_252000_4107000_image_477.tif",
               DATA / "naip_rgbn" / "m_4709963_se_14_1_20100629.tif"]
THROUGHPUT_SOURCE = DATA / "swissimage" / "big_img" / "1091-322_00.tif"
AGREEMENT_MIN, MIOU_MAX_DIFF = 0.995, 0.005
YARDSTICK, SPEED_TARGET = "onnx", 1.5  # a variant's end-to-end MP per CPU-second against float32 on onnx


def ratios(figures: dict, specs: list[str], variant: str) -> str:
    """'1.68x torch float32, 1.52x onnx float32': the variant's MP per CPU-second against each float32."""
    return ", ".join(f"{figures[variant]['mp_per_cpu_s'] / figures[s]['mp_per_cpu_s']:.2f}x {s} float32"
                     for s in reversed(specs) if s != variant)


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def quantize_command(model) -> str:
    return (f"mapseg quantize --model {model} --calibration {' '.join(str(p) for p in CALIBRATION)} --bands 1,2,3 "
            f"--check {' '.join(str(p) for p in RASTERS[:3])}")


def real_image(side: int = 1024) -> np.ndarray:
    """A side x side image of real pixels in [0, 1] (the SWISSIMAGE tile, mirrored to size)."""
    import rasterio

    with rasterio.open(THROUGHPUT_SOURCE) as ds:
        data = ds.read([1, 2, 3]).transpose(1, 2, 0)
    reps = (-(-side // data.shape[0]), -(-side // data.shape[1]), 1)
    return np.ascontiguousarray(np.tile(data, reps)[:side, :side], dtype=np.float32) / 255


def network_ab(artifact, specs: list[str], repeat: int) -> dict:
    image = real_image()
    mp = image.shape[0] * image.shape[1] / 1e6
    backends = {spec: make_backend(spec, artifact, threads=1)[0] for spec in specs}
    torch_threads = None
    if "torch" in [spec.split(":")[0] for spec in specs]:
        import torch
        torch_threads = torch.get_num_threads()
        torch.set_num_threads(1)
    try:
        for b in backends.values():
            b.embed(image[:256, :256])
        got = {spec: [] for spec in backends}
        for _ in range(repeat):
            for spec, b in backends.items():
                c, t = cpu_seconds(), time.perf_counter()
                b.embed(image)
                got[spec].append((time.perf_counter() - t, cpu_seconds() - c))
    finally:
        if torch_threads:
            import torch
            torch.set_num_threads(torch_threads)
    return {spec: {"mp_per_cpu_s": mp / float(np.median([g[1] for g in v])),
                   "mp_per_s": mp / float(np.median([g[0] for g in v]))} for spec, v in got.items()}


def end_to_end_ab(model, specs: list[str], size: int, repeat: int, k: int, work: Path) -> dict:
    src = mosaic_vrt(THROUGHPUT_SOURCE, size, work / f"mosaic_{size}.vrt")
    mp = size * size / 1e6
    got = {spec: [] for spec in specs}
    for _ in range(repeat):
        for spec in specs:
            c = cpu_seconds()
            r = segment_raster(src, work / "ab.tif", SegmentOptions(k=k, model=str(model), backend=spec),
                               progress=False, log=lambda m: None)
            cpu = cpu_seconds() - c
            got[spec].append((r["megapixels_per_s"], cpu, r["timings"]["fit_s"]))
            print(f"  {spec:<12} {r['megapixels_per_s']:6.2f} MP/s  {cpu:6.1f} CPU s  {mp / cpu:5.2f} MP/CPU-s  "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
    return {spec: {"mp_per_s": float(np.median([g[0] for g in v])), "cpu_s": float(np.median([g[1] for g in v])),
                   "mp_per_cpu_s": mp / float(np.median([g[1] for g in v]))} for spec, v in got.items()}


def dev_sets():
    from training.eval import folder_set

    d, g = DATA / "dubai_dev", DATA / "geonrw_dev"
    return [("dubai_dev", lambda: folder_set([d / f"tile_{i}" / "images" for i in range(1, 5)],
                                             [d / f"tile_{i}" / "masks" for i in range(1, 5)],
                                             str(ROOT / "training" / "datasets" / "colors" / "dubai_dev.json"))),
            ("geonrw_dev", lambda: folder_set([g / "images"], [g / "masks"],
                                              mask_classes=str(ROOT / "training" / "datasets" / "classes" /
                                                               "geonrw_5.json")))]


def miou_ab(model, reference: str, variant: str, k: int, seed: int) -> dict:
    """name -> {float32, variant (own centres), variant with float32's centres}: mIoU on each dev set."""
    from mapseg.raster import ArrayReader
    from mapseg.scaling import make_scaling
    from training.eval import score_labels

    ref, var = load_features(model, reference), load_features(model, variant)
    scaling = make_scaling("uint8", None, None)
    out = {}
    for name, make in dev_sets():
        evalset = make()
        readers = [ArrayReader(im, name=i) for im, i in zip(evalset.images, evalset.ids)]
        row = {}
        c_ref = fit_reader_centers(readers, k, ref, seed)
        c_var = fit_reader_centers(readers, k, var, seed)
        for what, feats, centers in (("float32", ref, c_ref), ("variant", var, c_var),
                                     ("variant, float32 centres", var, c_ref)):
            labels = [label_reader(r, feats, scaling, centers) for r in readers]
            row[what] = score_labels(evalset, labels, k)["dataset"]["miou"]
        out[name] = row
        print(f"  {name:<11} mIoU float32 {row['float32']:.4f}  {variant} {row['variant']:.4f} "
              f"(with float32's centres {row['variant, float32 centres']:.4f})", flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "model" / "best"), help="artifact folder (with model.int8.onnx)")
    p.add_argument("--variants", default="onnx:int8,torch:bf16", help="backend specs BACKEND:PRECISION")
    p.add_argument("--rasters", nargs="+", default=[str(r) for r in RASTERS], help="agreement rasters")
    p.add_argument("-k", default="5,8", help="K values of the agreement")
    p.add_argument("--eval-k", type=int, default=5, help="K of the dev-set mIoU (5 classes each)")
    p.add_argument("--no-eval", action="store_true", help="skip the dev-set mIoU")
    p.add_argument("--size", type=int, default=2048, help="side of the end-to-end raster ('0' skips)")
    p.add_argument("--repeat", type=int, default=3, help="A/B rounds")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    art = load_artifact(args.model)
    ks = [int(x) for x in args.k.split(",")]
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; model {args.model} "
          f"({art.digest[:12]})")
    verdicts = []
    work = Path(tempfile.mkdtemp(prefix="mapseg-precision-"))
    try:
        for variant in [v for v in args.variants.split(",") if v]:
            backend, precision = split_backend(variant)
            reference = backend
            print(f"\n== {variant} against {reference} (float32)")
            try:
                make_backend(variant, art)
            except BackendUnavailable as exc:
                print(f"unavailable: {exc}")
                if precision == "int8":
                    print(f"make it with: {quantize_command(args.model)}")
                continue
            print(f"agreement (share of valid pixels with the float32 label; K centres fitted on float32, "
                  f"applied to both; K = {args.k})")
            rows = label_agreement(args.rasters, args.model, None, args.seed, ks, reference=reference,
                                   variant=variant)
            for r in rows:
                print(f"  {Path(r['path']).name:<34}" + "".join(f"  K={k} {100 * r[f'k{k}']:6.2f} %" for k in ks))
            worst = min(r[f"k{k}"] for r in rows for k in ks)
            print(f"  lowest {100 * worst:.2f} %")
            mious = {}
            if not args.no_eval:
                print(f"dev-set mIoU (K = {args.eval_k}, seed {args.seed})")
                mious = miou_ab(args.model, reference, variant, args.eval_k, args.seed)
            # the speed target's yardstick is float32 on onnx (the fastest float32 CPU backend), whatever the
            # variant's backend: a variant on another backend is timed against both float32s
            specs = [reference, variant]
            if reference != YARDSTICK:
                try:
                    make_backend(YARDSTICK, art)
                    specs.insert(0, YARDSTICK)
                except BackendUnavailable as exc:
                    print(f"{YARDSTICK} float32 (the speed target's yardstick) unavailable: {exc}")
            yardstick = specs[0]
            print(f"network alone, 1 thread, real 1024 x 1024 image, interleaved ({args.repeat} rounds, medians)")
            net = network_ab(art, specs, args.repeat)
            for spec, v in net.items():
                print(f"  {spec:<12} {v['mp_per_cpu_s']:6.2f} MP per CPU-second ({v['mp_per_s']:.2f} MP/s wall)")
            print("  ratio " + ratios(net, specs, variant))
            speed = ""
            if args.size:
                print(f"end to end ({args.size} x {args.size} mosaic, K={ks[0]}, default workers), interleaved")
                e2e = end_to_end_ab(args.model, specs, args.size, args.repeat, ks[0], work)
                for spec, v in e2e.items():
                    print(f"  {spec:<12} median {v['mp_per_s']:6.2f} MP/s, {v['cpu_s']:6.1f} CPU s, "
                          f"{v['mp_per_cpu_s']:5.2f} MP per CPU-second")
                print(f"  ratio per CPU-second {ratios(e2e, specs, variant)}; wall "
                      f"{e2e[variant]['mp_per_s'] / e2e[yardstick]['mp_per_s']:.2f}x {yardstick} float32")
                gain = e2e[variant]["mp_per_cpu_s"] / e2e[yardstick]["mp_per_cpu_s"]
                speed = (f"; end to end {gain:.2f}x the MP per CPU-second of {yardstick} float32"
                         + (f" (target >= {SPEED_TARGET} against {YARDSTICK})" if yardstick == YARDSTICK else
                            f" ({YARDSTICK}, the target's yardstick, unavailable)"))
            diffs = [abs(m["variant"] - m["float32"]) for m in mious.values()]
            ok = worst >= AGREEMENT_MIN and (not diffs or max(diffs) <= MIOU_MAX_DIFF)
            verdicts.append(f"{variant}: lowest agreement {100 * worst:.2f} % (needs >= {100 * AGREEMENT_MIN:.1f}), "
                            + (f"largest mIoU difference {max(diffs):.4f} (needs <= {MIOU_MAX_DIFF})" if diffs
                               else "mIoU not measured")
                            + (" -> meets the rule" if ok and diffs else " -> stays opt-in") + speed)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    for v in verdicts:
        print(v)
    return 0


if __name__ == "__main__":
    sys.exit(main())
