"""Training benchmark: images (and megapixels) per second of full training steps on CPU, and on a GPU
when one is present.

    python bench/bench_train.py [--sizes 256,512] [--steps 6] [--devices cpu,cuda] [--json out.json]

Runs the real trainer (``python -m training.train``) on the synthetic maps for a few steps
per patch size, with and without the EfficientNet-Lite0 teacher (distillation recipe of the
default model), and reads the trainer's own throughput records from ``log.jsonl``
(the first record, which includes start-up and the first step, is dropped).
Batch: ``--batch`` images per step at each size (default 4).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(size: int, steps: int, batch: int, device: str, teacher: bool, work: Path) -> dict:
    run_dir = work / f"{device}_{size}_{int(teacher)}"
    cmd = [sys.executable, "-m", "training.train", "--synthetic", "--steps", str(steps), "--patch-sizes", str(size),
           "--device", device, "--checkpoint_dir", str(run_dir), "--overwrite", "--no-progress",
           "--set", f"data.patch_size={size}", "--set", f"train.batch_size={batch}", "--set", "train.log_every=1",
           "--set", "train.eval_every=0", "--set", "train.image_every=0", "--set", f"train.checkpoint_every={steps}"]
    if teacher:
        cmd += ["--teacher", "efficientnet_lite0"]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    recs = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "throughput/images_per_s" in r][1:]
    ips = sum(r["throughput/images_per_s"] for r in recs) / len(recs)
    mps = sum(r["throughput/megapixels_per_s"] for r in recs) / len(recs)
    return {"device": device, "size": size, "teacher": teacher, "batch": batch, "steps_timed": len(recs),
            "images_per_s": ips, "megapixels_per_s": mps, "seconds_per_step": batch / ips}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="256,512")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--devices", default=None, help="default: cpu, plus cuda when available")
    p.add_argument("--json")
    args = p.parse_args(argv)
    import torch

    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"training throughput (synthetic maps, batch {args.batch} per step, two views each, full step: "
          f"forward, losses, backward, optimizer); torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    if "cuda" not in devices:
        print("no GPU here: CPU figures only")
    print(f"{'device':<7}{'patch':>6}{'teacher':>19}{'images/s':>10}{'MP/s':>7}{'s/step':>8}")
    work = Path(tempfile.mkdtemp(prefix="mapseg-bench-train-"))
    out = []
    try:
        for device in devices:
            for size in (int(s) for s in args.sizes.split(",")):
                for teacher in (False, True):
                    r = run(size, args.steps, args.batch, device, teacher, work)
                    out.append(r)
                    print(f"{device:<7}{size:>6}{'efficientnet_lite0' if teacher else 'none':>19}"
                          f"{r['images_per_s']:10.2f}{r['megapixels_per_s']:7.3f}{r['seconds_per_step']:8.2f}",
                          flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": out, "load_avg_1min": os.getloadavg()[0]}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
