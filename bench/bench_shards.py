"""Shard-build benchmark: megapixels per second of ``build_shards`` (tiles + SLIC at three scales).

    python bench/bench_shards.py [--threads 2] [--json out.json]

Links the 36 dubai_dev JPGs (19.5 MP, ../shared/datasets) into a temporary folder (links,
no copies), writes a header with ``generate_headers``, builds the shards with SLIC and
prints the builder's own wall time and MP/s. Nothing is written inside the repository.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "dubai_dev"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    images = sorted(DATA.glob("tile_*/images/*.jpg"))
    if not images:
        print(f"error: no images under {DATA} (the benchmark uses ../shared/datasets/dubai_dev)")
        return 2
    work = Path(tempfile.mkdtemp(prefix="mapseg-bench-shards-"))
    try:
        src = work / "images"
        src.mkdir()
        for im in images:
            (src / f"{im.parts[-3]}_{im.name}").symlink_to(im)
        py = sys.executable
        r = subprocess.run([py, "-m", "training.datasets.generate_headers", "--images", str(src), "--dataset-id",
                            "bench", "--headers-dir", str(work / "headers")], cwd=ROOT, capture_output=True, text=True)
        if r.returncode:
            print(r.stdout + r.stderr)
            return r.returncode
        t0 = time.perf_counter()
        subprocess.run([py, "-m", "training.datasets.build_shards", "--header", str(work / "headers" / "bench.yaml"),
                        "--processed-root", str(work / "processed"), "--threads", str(args.threads),
                        "--no-progress"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        summary = json.loads((work / "processed" / "bench" / "summary.json").read_text())
        t = summary["timing"]
        out = {"images": len(images), "megapixels": t["megapixels"], "threads": args.threads,
               "builder_seconds": t["wall_seconds"], "megapixels_per_s": t["megapixels_per_second"],
               "process_seconds": wall, "load_avg_1min": os.getloadavg()[0]}
        print(f"shard build: {out['images']} images, {out['megapixels']:.1f} MP, {args.threads} threads, SLIC at 3 "
              f"scales: {out['builder_seconds']:.1f} s -> {out['megapixels_per_s']:.2f} MP/s "
              f"(process incl. start-up {wall:.1f} s; load {out['load_avg_1min']:.1f})")
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
