"""Training benchmark: images (and megapixels) per second of full training steps on CPU, and on a GPU
when one is present.

    python bench/bench_train.py [--sizes 256,512] [--steps 6] [--devices cpu,cuda] [--json out.json]
    python bench/bench_train.py --shards processed/dubai --sizes 256     # the teacher live vs cached (teacher.cache)
    python bench/bench_train.py --sizes 256 --amp                        # float32 and bfloat16 autocast (--amp)

Runs the real trainer (``python -m training.train``) on the synthetic maps for a few steps
per patch size, with and without the EfficientNet-Lite0 teacher (distillation recipe of the
default model), and reads the trainer's own throughput records from ``log.jsonl``
(the first record, which includes start-up and the first step, is dropped).
Batch: ``--batch`` images per step at each size (default 4).

``--shards ROOT/ID`` trains on those shards instead, with the teacher run on every crop (live) and
read from its cache beside the shards (``teacher.cache=true``; the cache is built first, and its
build time printed). Beside images/s (first step dropped) it prints the CPU seconds per step: user + system time
of the whole run (start-up and the first step included) divided by the steps, which holds on a shared host when
wall time does not.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(size: int, steps: int, batch: int, device: str, teacher: str, work: Path, shards: str | None = None,
        amp: bool = False) -> dict:
    """``teacher``: none | live | cached; ``amp``: the trainer's --amp (bfloat16 autocast on the CPU)."""
    run_dir = work / f"{device}_{size}_{teacher}{'_amp' if amp else ''}"
    source = ["--synthetic"] if shards is None else ["--data-source", "shards", "--processed-root",
                                                     str(Path(shards).parent), "--dataset-id", Path(shards).name]
    cmd = [sys.executable, "-m", "training.train", *source, "--steps", str(steps), "--patch-sizes", str(size),
           "--device", device, "--checkpoint_dir", str(run_dir), "--overwrite", "--no-progress",
           "--set", f"data.patch_size={size}", "--set", f"train.batch_size={batch}", "--set", "train.log_every=1",
           "--set", "train.eval_every=0", "--set", "train.image_every=0", "--set", f"train.checkpoint_every={steps}"]
    if teacher != "none":
        cmd += ["--teacher", "efficientnet_lite0", "--set", f"teacher.cache={teacher == 'cached'}"]
    if amp:
        cmd += ["--amp"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    recs = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "throughput/images_per_s" in r][1:]
    ips = sum(r["throughput/images_per_s"] for r in recs) / len(recs)
    mps = sum(r["throughput/megapixels_per_s"] for r in recs) / len(recs)
    return {"device": device, "size": size, "teacher": teacher, "amp": amp, "batch": batch, "steps_timed": len(recs),
            "images_per_s": ips, "megapixels_per_s": mps, "seconds_per_step": batch / ips,
            "cpu_seconds_per_step": cpu / steps}


def build_cache(shards: str, device: str) -> float:
    """Build the EfficientNet-Lite0 cache of ``shards`` (if missing); returns the seconds it took."""
    sys.path.insert(0, str(ROOT))
    from training.config import build_config
    from training.data.sources import build_teacher_cache
    from training.teachers import build_teacher

    cfg = build_config(None, ["data.source=shards", f"data.processed_root={Path(shards).parent}",
                              f"data.dataset_id={Path(shards).name}", "distill.enabled=true",
                              "teacher.name=efficientnet_lite0", "teacher.cache=true"])
    t0 = time.perf_counter()
    build_teacher_cache(cfg, build_teacher(cfg.teacher, device), device, show_progress=False)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="256,512")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--devices", default=None, help="default: cpu, plus cuda when available")
    p.add_argument("--shards", metavar="ROOT/ID", help="train on these shards, teacher live vs cached")
    p.add_argument("--amp", action="store_true", help="each CPU run also with the trainer's --amp (bfloat16 "
                                                        "autocast), interleaved with float32")
    p.add_argument("--json")
    args = p.parse_args(argv)
    import torch

    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    data = "synthetic maps" if args.shards is None else f"shards {args.shards}"
    print(f"training throughput ({data}, batch {args.batch} per step, two views each, full step: "
          f"forward, losses, backward, optimizer); torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    if "cuda" not in devices:
        print("no GPU here: CPU figures only")
    teachers = ("none", "live") if args.shards is None else ("live", "cached")
    if args.shards is not None:
        print(f"teacher cache of {args.shards}: built in {build_cache(args.shards, devices[0]):.1f} s "
              "(0 when it was there already)")
    print(f"{'device':<7}{'patch':>6}{'teacher':>28}{'precision':>10}{'images/s':>10}{'MP/s':>7}{'s/step':>8}"
          f"{'CPU s/step':>11}")
    work = Path(tempfile.mkdtemp(prefix="mapseg-bench-train-"))
    out = []
    try:
        for device in devices:
            for size in (int(s) for s in args.sizes.split(",")):
                for teacher in teachers:
                    for amp in (False, True) if args.amp and device == "cpu" else (False,):
                        r = run(size, args.steps, args.batch, device, teacher, work, args.shards, amp)
                        out.append(r)
                        name = "none" if teacher == "none" else f"efficientnet_lite0 ({teacher})"
                        print(f"{device:<7}{size:>6}{name:>28}{'bf16 amp' if amp else 'float32':>10}"
                              f"{r['images_per_s']:10.2f}{r['megapixels_per_s']:7.3f}{r['seconds_per_step']:8.2f}"
                              f"{r['cpu_seconds_per_step']:11.2f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": out, "load_avg_1min": os.getloadavg()[0]}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
