"""Build training shards from dataset headers: ``python -m training.datasets.build_shards``.

For each header: find the input (and target) rasters, pair them by stem or
regex, assign every item a split deterministically from the seed
(``discovery``), process every tile (``tiles``), and write::

    <processed_root>/<dataset_id>/
        summary.json  header.yaml  .build_shards.json
        <split>/shard-00000/index.jsonl  timing.jsonl
        <split>/shard-00000/inputs/<item_id>.tif    uncompressed 3-band uint8 GeoTIFF (CRS + transform kept)
        <split>/shard-00000/targets/<item_id>.tif   single-band class map (labeled items)
        <split>/shard-00000/slic/<item_id>.npz      SLICO superpixels at 3 scales + boundary masks
        previews/<split>/<item_id>.png              with --viz-interval N

Safety: the build happens in ``<processed_root>/.<dataset_id>.building`` and is
moved into place only when complete, so an interrupted build leaves the
previous output untouched; ``--resume`` continues an interrupted build,
skipping the tiles already written. An existing output is replaced only with
``--overwrite``, and only a folder this tool wrote (it holds
``.build_shards.json``) is ever deleted. Invalid tiles (unreadable, not RGB,
wrong dtype, missing georeference when required, too small) are listed with
the reason in ``summary.json`` and skipped (``--on-invalid error`` stops the
build instead).

Determinism: the same header, seed and shard size give byte-identical
``index.jsonl`` files and split assignments for any ``--threads``; wall-clock
timings are kept out of the index (``timing.jsonl``, ``summary.json``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Optional

import cv2
from tqdm import tqdm

from .discovery import BuildError, assign_splits, discover
from .header_schema import DatasetHeader, HeaderError, dump_header_yaml, load_header, load_headers
from .superpixels import SuperpixelError, require_ximgproc
from .tiles import Task, process_tile

TOOL = "training.datasets.build_shards"
MARKER = ".build_shards.json"
DEFAULT_PROCESSED_ROOT = "training/datasets/processed"


# --------------------------------------------------------------------------- output folders

def _is_ours(path: Path) -> bool:
    marker = path / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("tool") == TOOL
    except (OSError, ValueError):
        return False


def _remove_ours(path: Path) -> None:
    if not _is_ours(path):
        raise BuildError(f"refusing to delete {path}: it was not written by {TOOL} (no {MARKER})")
    shutil.rmtree(path)


def _recover_swap(final: Path, old: Path) -> None:
    """Finish or undo a swap that was interrupted between its two renames."""
    if old.exists():
        if not _is_ours(old):
            raise BuildError(f"{old} exists and was not written by {TOOL}; move it away")
        if final.exists():
            _remove_ours(old)
        else:
            os.replace(old, final)


def _plan_digest(header: DatasetHeader, seed: int, shard_size: int, allow_grid: bool, plan) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"header": header.digest(), "seed": seed, "shard_size": shard_size,
                         "allow_grid": allow_grid}, sort_keys=True).encode())
    for t in plan:
        h.update(json.dumps([t.split, t.shard_dir.name, t.item.item_id, str(t.item.input_path),
                             str(t.item.target_path)]).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- build

def build_dataset(header: DatasetHeader, processed_root: str | Path, *, seed: Optional[int] = None,
                  shard_size: Optional[int] = None, threads: int = 4, overwrite: bool = False,
                  resume: bool = False, viz_interval: int = 0, allow_grid: bool = False,
                  on_invalid: str = "skip", progress: bool = True) -> dict:
    """Build the shards of one dataset; returns the summary (also written to ``summary.json``)."""
    if on_invalid not in ("skip", "error"):
        raise ValueError(f"on_invalid must be skip or error, got {on_invalid!r}")
    if not allow_grid:
        require_ximgproc()  # fail before any work, with the install hint
    t_start = time.perf_counter()
    seed = header.splits.seed if seed is None else int(seed)
    shard_size = header.sharding.shard_size if shard_size is None else int(shard_size)
    if shard_size < 1:
        raise BuildError(f"--shard-size must be >= 1, got {shard_size}")
    threads = max(1, int(threads))
    root = header.source_root_path()
    processed_root = Path(processed_root)
    final = processed_root / header.dataset_id
    building = processed_root / f".{header.dataset_id}.building"
    old = processed_root / f".{header.dataset_id}.replaced"
    _recover_swap(final, old)
    if final.exists() and not _is_ours(final):
        raise BuildError(f"{final} exists and was not written by {TOOL} (no {MARKER}); "
                         "choose another --processed-root or move it away")
    if building.exists() and not _is_ours(building):
        raise BuildError(f"{building} exists and was not written by {TOOL}; move it away")
    if building.exists() and not (resume or overwrite):
        raise BuildError(f"an interrupted build of {header.dataset_id!r} is in {building}; "
                         "pass --resume to continue it or --overwrite to start again")
    if final.exists() and not overwrite and not resume:
        raise BuildError(f"{final} already exists; pass --overwrite to rebuild it "
                         "(the current shards stay in place until the new build is complete)")
    if resume and final.exists() and not building.exists() and not overwrite:
        raise BuildError(f"{final} is complete and there is no interrupted build to resume; "
                         "pass --overwrite to rebuild it")

    disc = discover(header, root)
    assignments = assign_splits(disc, header, seed, root)
    plan: list[Task] = []
    order = 0
    for split, items in assignments.items():
        for i, item in enumerate(items):
            shard_dir = building / split / f"shard-{i // shard_size:05d}"
            preview = None
            if viz_interval and order % viz_interval == 0:
                preview = building / "previews" / split / f"{item.item_id}.png"
            plan.append(Task(item, split, shard_dir, preview))
            order += 1
    digest = _plan_digest(header, seed, shard_size, allow_grid, plan)

    done: dict = {}
    if building.exists():
        state = json.loads((building / MARKER).read_text())
        if resume and state.get("plan_digest") == digest:
            for t in plan:
                f = t.shard_dir / ".done" / f"{t.item.item_id}.json"
                if f.is_file():
                    done[t.item.item_id] = json.loads(f.read_text())
        elif resume:
            raise BuildError(f"cannot resume {building}: the header, seed, shard size or the files found changed "
                             "since it started; rebuild with --overwrite")
        else:  # --overwrite: start again
            _remove_ours(building)
    if not building.exists():
        building.mkdir(parents=True)
        (building / MARKER).write_text(json.dumps({"tool": TOOL, "state": "building", "plan_digest": digest,
                                                   "dataset_id": header.dataset_id}, sort_keys=True) + "\n")

    results = {k: r for k, r in done.items() if "invalid" not in r}
    invalid = [r["invalid"] for r in done.values() if "invalid" in r]
    todo = [t for t in plan if t.item.item_id not in done]
    bar = None
    if progress:
        bar = tqdm(total=len(plan), initial=len(done), desc=f"shards {header.dataset_id}", unit="tile",
                   dynamic_ncols=True, file=sys.stderr)
    cv2_threads = cv2.getNumThreads()
    if threads > 1:
        cv2.setNumThreads(1)  # our workers already use the cores
    pool = ThreadPoolExecutor(max_workers=threads)
    try:
        pending = {pool.submit(process_tile, header, root, t, allow_grid): t for t in todo}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                t = pending.pop(fut)
                try:
                    rec = fut.result()
                except SuperpixelError as exc:
                    raise BuildError(str(exc)) from None
                if "invalid" in rec:
                    invalid.append(rec["invalid"])
                    if on_invalid == "error":
                        raise BuildError(f"{header.path}: invalid tile {rec['invalid']['input']}: "
                                         f"{rec['invalid']['reason']} (--on-invalid error; the partial build "
                                         "can be continued with --resume once the tile is fixed or removed)")
                else:
                    results[t.item.item_id] = rec
                if bar is not None:
                    bar.update(1)
    except BaseException:
        # Interrupted (error, Ctrl-C): drop the queued tiles, let running ones finish, keep the partial build.
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    else:
        pool.shutdown(wait=True)
    finally:
        if bar is not None:
            bar.close()
        cv2.setNumThreads(cv2_threads)

    summary = _finalize(header, building, plan, results, invalid, disc, assignments, seed, shard_size, threads,
                        len(done), allow_grid, t_start)
    # Swap into place: the old output (if any) is moved aside, the new one renamed in, then the old removed.
    if final.exists():
        os.replace(final, old)
    os.replace(building, final)
    if old.exists():
        _remove_ours(old)
    return summary


def _finalize(header, building: Path, plan, results, invalid, disc, assignments, seed, shard_size, threads,
              resumed, allow_grid, t_start) -> dict:
    shards: dict = {}
    for t in plan:
        shards.setdefault(t.shard_dir, []).append(t)
    split_stats: dict = {}
    target_problems, algos = [], {}
    mp = slic_s = 0.0
    for shard_dir, tasks in shards.items():
        split = tasks[0].split
        st = split_stats.setdefault(split, {"items": 0, "labeled": 0, "shards": 0})
        recs = [results[t.item.item_id] for t in tasks if t.item.item_id in results]
        if not recs:
            if shard_dir.exists():
                shutil.rmtree(shard_dir)  # every tile of this shard was invalid; inside our build folder
            continue
        st["shards"] += 1
        st["items"] += len(recs)
        st["labeled"] += sum(r["entry"]["has_target"] for r in recs)
        with (shard_dir / "index.jsonl").open("w", encoding="utf-8") as fh:
            for r in recs:
                fh.write(json.dumps(r["entry"], sort_keys=True) + "\n")
        with (shard_dir / "timing.jsonl").open("w", encoding="utf-8") as fh:
            for r in recs:
                fh.write(json.dumps(r["timing"], sort_keys=True) + "\n")
        shutil.rmtree(shard_dir / ".done", ignore_errors=True)
        for r in recs:
            if r.get("target_problem"):
                target_problems.append(r["target_problem"])
            a = r["entry"]["slic_meta"]["algorithm"]
            algos[a] = algos.get(a, 0) + 1
            mp += r["timing"]["megapixels"]
            slic_s += r["timing"]["slic_s"]
    for stray in building.rglob("*.partial"):  # half-written files of an interrupted earlier run
        stray.unlink()
    wall = time.perf_counter() - t_start
    invalid = sorted(invalid, key=lambda r: r["item_id"])
    rule_counts: dict = {}
    for items in assignments.values():
        for it in items:
            rule_counts[it.rule] = rule_counts.get(it.rule, 0) + 1
    summary = {
        "tool": TOOL, "layout_version": header.sharding.layout_version, "dataset_id": header.dataset_id,
        "header": str(header.path), "header_digest": header.digest(), "source_root": str(header.source_root_path()),
        "seed": seed, "shard_size": shard_size, "threads": threads,
        "splits": dict(sorted(split_stats.items())),
        "split_rules": dict(sorted(rule_counts.items())),
        "items_found": len(plan), "items_written": sum(s["items"] for s in split_stats.values()),
        "invalid": {"count": len(invalid), "policy": "skip", "items": invalid},
        "invalid_targets": {"count": len(target_problems), "items": sorted(target_problems, key=lambda r: r["item_id"])},
        "missing_input": {"action": header.pairing.on_missing_input, **_listing(disc.missing_input)},
        "missing_target": {"action": header.pairing.on_missing_target, **_listing(disc.missing_target)},
        "unmatched_files": _listing(disc.unmatched),
        "manifest_unmatched": _listing(disc.manifest_unmatched),
        "slic": {"algorithms": algos, "grid_fallback_allowed": allow_grid, "seconds": round(slic_s, 3)},
        "timing": {"wall_seconds": round(wall, 3), "megapixels": round(mp, 4), "resumed_items": resumed,
                   "megapixels_per_second": round(mp / wall, 4) if wall > 0 else None},
        "validation_metrics": header.to_dict()["validation_metrics"],
    }
    (building / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    (building / "header.yaml").write_text(dump_header_yaml(header, f"Copy of {header.path} used for this build"))
    (building / MARKER).write_text(json.dumps({"tool": TOOL, "state": "complete", "dataset_id": header.dataset_id,
                                               "layout_version": header.sharding.layout_version},
                                              sort_keys=True) + "\n")
    return summary


def _listing(items: list, limit: int = 1000) -> dict:
    """Count and names; long lists of expected conditions (e.g. unlabeled tiles) keep the first ``limit``."""
    out = {"count": len(items), "items": items[:limit]}
    if len(items) > limit:
        out["items_truncated_to"] = limit
    return out


# --------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.datasets.build_shards",
                                description="Build training shards (GeoTIFF tiles + SLIC superpixels) from dataset "
                                            "headers. See docs/dataset/HEADERS.md.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--header", help="one dataset header (YAML)")
    src.add_argument("--headers-dir", help="build every header (*.yaml) in this folder")
    p.add_argument("--dataset-id", help="with --headers-dir: only the header with this dataset_id")
    p.add_argument("--processed-root", default=DEFAULT_PROCESSED_ROOT, help=f"where <dataset_id>/ is written (default: {DEFAULT_PROCESSED_ROOT})")
    p.add_argument("--seed", type=int, help="split/shard seed (default: the header's splits.seed)")
    p.add_argument("--shard-size", type=int, help="tiles per shard (default: the header's sharding.shard_size)")
    p.add_argument("--threads", type=int, default=4, help="parallel workers (default: 4)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (swapped in when complete)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted build, skipping finished tiles")
    p.add_argument("--viz-interval", type=int, default=0, metavar="N",
                   help="write a preview PNG (RGB | mean-colour superpixels | boundaries) for every Nth tile; 0 = none")
    p.add_argument("--allow-grid-superpixels", action="store_true",
                   help="if OpenCV contrib (cv2.ximgproc) is missing, use square grid cells (recorded in slic_meta)")
    p.add_argument("--on-invalid", choices=["skip", "error"], default="skip",
                   help="invalid tiles (unreadable, not RGB, wrong dtype...): skip and report them (default), or stop")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.dataset_id and not args.headers_dir:
        print("error: --dataset-id goes with --headers-dir", file=sys.stderr)
        return 2
    try:
        headers = [load_header(args.header)] if args.header else load_headers(args.headers_dir, args.dataset_id)
    except (HeaderError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    status = 0
    for header in headers:
        try:
            s = build_dataset(header, args.processed_root, seed=args.seed, shard_size=args.shard_size,
                              threads=args.threads, overwrite=args.overwrite, resume=args.resume,
                              viz_interval=args.viz_interval, allow_grid=args.allow_grid_superpixels,
                              on_invalid=args.on_invalid, progress=not args.no_progress)
        except (BuildError, SuperpixelError, HeaderError, FileNotFoundError) as exc:
            print(f"error: {header.dataset_id}: {exc}", file=sys.stderr)
            status = 2
            continue
        splits = ", ".join(f"{k}={v['items']} ({v['shards']} shards)" for k, v in s["splits"].items())
        print(f"{header.dataset_id}: {s['items_written']}/{s['items_found']} tiles -> {Path(args.processed_root) / header.dataset_id} "
              f"[{splits}]; invalid {s['invalid']['count']}; {s['timing']['megapixels']:.1f} MP in "
              f"{s['timing']['wall_seconds']:.1f} s ({s['timing']['megapixels_per_second']} MP/s)")
        for rec in s["invalid"]["items"]:
            print(f"  invalid: {rec['input']}: {rec['reason']}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
