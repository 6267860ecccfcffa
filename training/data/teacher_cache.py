"""Teacher features computed once per shard item and stored beside the shard (``teacher.cache=true``).

On a CPU the frozen teacher is a large share of every distillation step (it
runs on every crop, every step). With the cache it runs once per tile, on the
whole tile, before training; each crop then reads its window of the stored
map (memory-mapped, only the rows it needs) and samples it bilinearly at the
centres of the crop's stride-4 cells, so the targets line up with the
student's grid; the crop's flips and quarter turns are applied to them as to
the image, and the view-2 half is warped with the views' grid as always
(``losses.distill.teacher_targets``).

Layout: ``<shard>/teacher-<digest>/<item_id>.npy``, (h, w, C) float16 at the
teacher's stride, and ``teacher.json`` (what the teacher was). ``digest`` is
the sha256 of the teacher's description (name, variant, patch mode, stages,
weights and their sha256, normalisation) and ``CACHE_VERSION``: a different
teacher or setting reads (and builds) another folder, never a stale one. Every
file is written under a temporary name and renamed, so an interrupted build
leaves whole files only, and the next build completes it.

The cache changes what the teacher sees (the whole tile, not the crop) and so
the targets, a little: it is an explicit setting, recorded in the run's config.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

CACHE_VERSION = 1
STUDENT_STRIDE = 4


def cache_name(teacher) -> str:
    """The folder name of this teacher's cache in every shard: a digest of its description, without where its
    weights lie when their sha256 says what they are (moving a venv does not rebuild the cache)."""
    described = dict(teacher.describe())
    weights = described.get("weights")
    if isinstance(weights, dict) and weights.get("sha256"):
        described["weights"] = {k: v for k, v in weights.items() if k != "path"}
    desc = json.dumps({"version": CACHE_VERSION, "teacher": described}, sort_keys=True, default=str)
    return "teacher-" + hashlib.sha256(desc.encode()).hexdigest()[:16]


def cache_path(shard: str | Path, name: str, entry: dict) -> Path:
    return Path(shard) / name / f"{entry['item_id']}.npy"


@torch.no_grad()
def build(items: list[tuple[Path, dict]], teacher, device, read_image, show_progress: bool = True, rank: int = 0,
          world: int = 1) -> str:
    """Compute and store the features of every shard item of ``items`` ((shard folder, index entry)) that has
    none yet, this ``rank``'s share of them (every ``world``-th); ``read_image(shard, entry)`` gives its
    (3, H, W) uint8 pixels. Returns the cache's folder name."""
    name = cache_name(teacher)
    for shard in sorted({Path(s) for s, _ in items}):
        folder = shard / name
        folder.mkdir(exist_ok=True)
        info = folder / "teacher.json"
        if not info.is_file() and rank == 0:
            tmp = info.with_name(f".teacher.json.{os.getpid()}")
            tmp.write_text(json.dumps(teacher.describe(), indent=1, sort_keys=True, default=str) + "\n")
            os.replace(tmp, info)
    todo = [(s, e) for s, e in items if not cache_path(s, name, e).is_file()][rank::world]
    for shard, entry in tqdm(todo, desc="teacher cache", unit="tile", disable=not show_progress or not todo,
                             file=sys.stderr):
        image = torch.from_numpy(np.ascontiguousarray(read_image(shard, entry))).float().div_(255.0)
        feats = teacher(image[None].to(device)).features[0]
        array = feats.permute(1, 2, 0).to(torch.float16).cpu().numpy()
        path = cache_path(shard, name, entry)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.npy")
        np.save(tmp, array)
        os.replace(tmp, path)
    return name


def _axis(start: int, length: int, cells: int, extent: int, stride: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear sampling along one axis: (lower index, upper index, upper weight) of the feature cells under the
    centres of ``cells`` stride-4 cells of a crop that starts at pixel ``start`` and holds ``length`` pixels of
    the tile (past them, ``crops.pad_to`` mirrors the crop: so are the centres), on a map of ``extent`` cells
    of ``stride`` pixels."""
    q = STUDENT_STRIDE * np.arange(cells) + (STUDENT_STRIDE - 1) / 2
    q = np.where(q >= length, 2 * length - 1 - q, q)
    u = np.clip((start + q + 0.5) / stride - 0.5, 0, extent - 1)
    lo = np.floor(u).astype(np.int64)
    hi = np.minimum(lo + 1, extent - 1)
    return lo, hi, (u - lo).astype(np.float32)


def read_window(path: Path, tile_hw: tuple[int, int], window: tuple, size: int) -> np.ndarray:
    """(C, size/4, size/4) float16 teacher targets of the ``size`` x ``size`` crop whose window in the tile is
    ``window`` = (row, col, height, width); a crop padded past a small tile's edge gets mirrored targets there,
    as its pixels are."""
    feats = np.load(path, mmap_mode="r")
    fh, fw = feats.shape[:2]
    n = size // STUDENT_STRIDE
    r0, r1, wr = _axis(window[0], window[2], n, fh, tile_hw[0] / fh)      # the map's stride on each axis:
    c0, c1, wc = _axis(window[1], window[3], n, fw, tile_hw[1] / fw)      # grids of ceil(H / s) x ceil(W / s)
    rows = np.unique(np.concatenate([r0, r1]))
    block = np.asarray(feats[rows[0]:rows[-1] + 1], dtype=np.float32)     # only the rows the window needs
    r0, r1 = r0 - rows[0], r1 - rows[0]
    top = block[r0][:, c0] * (1 - wc)[None, :, None] + block[r0][:, c1] * wc[None, :, None]
    bottom = block[r1][:, c0] * (1 - wc)[None, :, None] + block[r1][:, c1] * wc[None, :, None]
    out = top * (1 - wr)[:, None, None] + bottom * wr[:, None, None]
    return np.ascontiguousarray(out.transpose(2, 0, 1)).astype(np.float16)
