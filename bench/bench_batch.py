"""Batch benchmark: ``mapseg batch`` (mapseg/batch.py) on a local Dask cluster of 1 and of 2 worker processes.

    python bench/bench_batch.py [--tiles 6] [--k 6] [--workers 1,2] [--model DIR] [--tile 1024] [--backend auto]
                                [--json out.json]

Segments the first ``--tiles`` GeoNRW tiles (1000 x 1000 px each, ../shared/datasets/geonrw_dev/images) end to
end (the centres fitted over all of them, then every tile labelled, mosaic and report written) into a fresh
folder per cluster size, and prints per size:

* wall time of ``segment_batch`` (the cluster started before, not counted; its start-up printed apart),
* CPU seconds of every worker process (user + system, psutil) and of this client process over the run,
* megapixels per CPU second and per wall second,
* the peak resident memory of a worker process (sampled every 0.1 s).

On a shared, loaded host wall time moves with the neighbours; CPU seconds are the steadier figure. Each worker is
one process with one thread (as ``mapseg batch`` starts them), each task one window at a time.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "datasets" / "geonrw_dev" / "images"


def worker_pids(client) -> list[int]:
    return list(client.run(os.getpid).values())


def cpu_seconds(pids: list[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        t = psutil.Process(pid).cpu_times()
        total += t.user + t.system
    return total


class PeakRSS:
    """The largest resident set of any of ``pids``, sampled every ``every`` seconds on a thread."""

    def __init__(self, pids: list[int], every: float = 0.1):
        import psutil

        self.procs = [psutil.Process(p) for p in pids]
        self.peak = 0
        self.every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import psutil

        while not self._stop.is_set():
            for p in self.procs:
                try:
                    self.peak = max(self.peak, p.memory_info().rss)
                except psutil.Error:  # a worker gone (restarted): the run is refused after, see run()
                    continue
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run(n_workers: int, tiles: list[str], k: int, tile: int, model, backend: str, work: Path) -> dict:
    import psutil
    from distributed import Client, LocalCluster

    from mapseg.batch import segment_batch
    from mapseg.segment import SegmentOptions

    t0 = time.perf_counter()
    cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None,
                           scheduler_kwargs={"dashboard_address": ":0"})
    client = Client(cluster)
    try:
        startup = time.perf_counter() - t0
        pids = worker_pids(client)
        me = psutil.Process()
        cpu0, mine0 = cpu_seconds(pids), sum(me.cpu_times()[:2])
        with PeakRSS(pids) as rss:
            t1 = time.perf_counter()
            report = segment_batch(tiles, work / f"out_{n_workers}", SegmentOptions(k=k, tile=tile, model=model,
                                                                                     backend=backend),
                                   scheduler=client, log=lambda m: None)
            wall = time.perf_counter() - t1
        if sorted(worker_pids(client)) != sorted(pids):
            raise SystemExit("a worker restarted during the run: its CPU time is lost; rerun")
        cpu, mine = cpu_seconds(pids) - cpu0, sum(me.cpu_times()[:2]) - mine0
    finally:
        client.close()
        cluster.close()
    if report["failed"]:
        raise SystemExit(f"{report['failed']} raster(s) failed: see {work / f'out_{n_workers}' / 'batch_report.json'}")
    mp = report["megapixels"]
    return {"workers": n_workers, "rasters": len(tiles), "megapixels": mp, "startup_s": startup, "wall_s": wall,
            "worker_cpu_s": cpu, "client_cpu_s": mine, "task_cpu_s": report["cpu_s"],
            "fit_s": report["centers"].get("seconds"), "mp_per_cpu_s": mp / (cpu + mine), "mp_per_wall_s": mp / wall,
            "peak_worker_rss_mb": rss.peak / 1e6, "backend": report["model"]["backend"],
            "centers_digest": report["centers"]["digest"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiles", type=int, default=6, help="GeoNRW tiles to segment (1 MP each)")
    ap.add_argument("--k", type=int, default=6)
    ap.add_argument("--workers", default="1,2", help="cluster sizes to run, in turn")
    ap.add_argument("--model", default=None, help="artifact folder (default: the shipped model)")
    ap.add_argument("--tile", type=int, default=1024, help="window core side (mapseg --tile)")
    ap.add_argument("--backend", default="auto", help="auto | numpy | onnx | torch (mapseg --backend)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    tiles = sorted(str(p) for p in DATA.glob("*.tif"))[:args.tiles]
    if len(tiles) < args.tiles:
        raise SystemExit(f"{DATA}: {len(tiles)} tiles found, {args.tiles} wanted")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(v) for v in args.workers.split(",")):
            rows.append(run(n, tiles, args.k, args.tile, args.model, args.backend, Path(tmp)))
            r = rows[-1]
            print(f"{n} worker(s): {r['megapixels']:.1f} MP in {r['wall_s']:.1f} s wall (cluster start "
                  f"{r['startup_s']:.1f} s apart, fit {r['fit_s']:.1f} s of it); CPU {r['worker_cpu_s']:.1f} s workers"
                  f" + {r['client_cpu_s']:.1f} s client (tasks {r['task_cpu_s']:.1f} s); "
                  f"{r['mp_per_cpu_s']:.3f} MP per CPU-s, {r['mp_per_wall_s']:.3f} MP/s wall; "
                  f"peak worker RSS {r['peak_worker_rss_mb']:.0f} MB; "
                  f"backend {r['backend']}", flush=True)
    if len({r["centers_digest"] for r in rows}) != 1:
        raise SystemExit("the centres differ between cluster sizes")
    print(f"centres identical across {', '.join(str(r['workers']) for r in rows)} worker(s): "
          f"{rows[0]['centers_digest'][:16]}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
