"""Run every benchmark and write a markdown report (default bench/REPORT.md).

    python bench/run_all.py                      # all (about 15-25 minutes on 2 cores: the 20000^2 RSS run dominates)
    python bench/run_all.py --quick              # smaller rasters, fewer steps (a few minutes)
    python bench/run_all.py --model model/best --out /tmp/report.md

Runs, each in its own process, printing as it goes:
  bench_runtime.py  MP/s per backend (numpy, onnx, torch) on one artifact and raster, GFLOP per MP,
                    fraction of the measured matmul rate; colour k-means; peak RSS at 1k/5k/20k pixels square
  bench_shards.py   shard build MP/s with SLIC (dubai_dev, 19.5 MP)
  bench_train.py    training images/s on CPU (and GPU when present) at patch 256 and 512
  bench_precision.py  int8 / bf16 against float32: label agreement, dev-set mIoU, MP per CPU-second A/B
                    (int8 needs model.int8.onnx in the model folder: the job prints the command that makes it)
  bench_batch.py    mapseg batch on a local Dask cluster of 1 and 2 workers (the dask extra)
The report records the machine, the date, the commands and their printed figures verbatim.
Figures from one run are comparable with each other; these machines are shared, so compare
across runs only with the load averages in mind.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "bench" / "REPORT.md"))
    p.add_argument("--model", default=None, help="artifact for the runtime benchmark (default: model/best if "
                                                 "present, else a smoke export of the default architecture)")
    p.add_argument("--quick", action="store_true", help="4 MP throughput raster, RSS at 1k/5k, 3 training steps")
    args = p.parse_args(argv)
    py = sys.executable
    model = args.model or (str(ROOT / "model" / "best") if (ROOT / "model" / "best" / "meta.json").is_file() else None)
    # the model's upsampling (guided for model/best) and nearest beside it: what the guided filter costs
    runtime = [py, "bench/bench_runtime.py", "--backends", "numpy,onnx,onnx/nearest,torch"] + (
        ["--model", model] if model else [])
    if args.quick:
        runtime += ["--size", "2048", "--rss-sizes", "1000,5000"]
    jobs = [("Runtime: throughput per backend and peak RSS", runtime),
            ("Shard build", [py, "bench/bench_shards.py"]),
            ("Training throughput", [py, "bench/bench_train.py"] + (["--steps", "3", "--sizes", "256"]
                                                                      if args.quick else [])),
            ("Precision variants", [py, "bench/bench_precision.py"] + (["--model", model] if model else [])
             + (["--repeat", "1", "--size", "1024", "--no-eval"] if args.quick else [])),
            ("Batch on Dask: 1 and 2 workers", [py, "bench/bench_batch.py"] + (["--tiles", "4"] if args.quick else []))]
    lines = ["# Benchmark report", "",
             f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}",
             f"- load average at start (1 min): {os.getloadavg()[0]:.2f}",
             f"- command: `python bench/run_all.py{' --quick' if args.quick else ''}`", ""]
    status = 0
    for title, cmd in jobs:
        print(f"== {title}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        secs = time.perf_counter() - t0
        print(proc.stdout, flush=True)
        lines += [f"## {title}", "", f"`{' '.join(['python'] + cmd[1:])}` ({secs:.0f} s, exit {proc.returncode})", "",
                  "```", proc.stdout.rstrip(), "```", ""]
        status = status or proc.returncode
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
