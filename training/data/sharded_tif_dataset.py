"""Training data from shards written by ``python -m training.datasets.build_shards``.

Layout read here: ``<processed_root>/<dataset_id>/<split>/shard-NNNNN/`` with
``index.jsonl``, ``inputs/*.tif``, ``targets/*.tif`` and ``slic/*.npz``
(see docs/dataset/HEADERS.md).

Two ways to draw items, one reader:

* ``ShardedTifDataset``: an ``IterableDataset`` that makes one pass (an
  epoch) over a split. Shard folders are dealt to (DDP rank, DataLoader
  worker) slots, ``shard i -> slot i % (world * workers)``, so in one epoch
  every item is seen exactly once across all ranks and workers.
* ``shard_batches(cfg, rank, world, start_step)``: the trainer's stream, one
  batch per ``training.data.schedule.BatchKey`` (step, micro-step, patch
  size). Shards are dealt to ranks (``shard i -> rank i % world``); each rank
  draws its items in epochs (``schedule.EpochDraws``: a seeded permutation per
  epoch and scale, cycling forever). What a batch holds is a pure function of
  the seed, the rank and its key, so a run resumed at ``start_step`` sees
  exactly the batches of the uninterrupted run, whatever ``data.num_workers``
  is (a resumed run may change it). DataLoader workers only build batches.

A training item is a random crop of exactly the scheduled patch size ``S``
(``training.data.crops``): RGB, the three SLIC scales, the boundary mask and
the target are cropped with the same window and given the same random flip /
quarter turn, then the two views are made (per-pixel extras are in the clean /
view-1 frame, as for the synthetic source). Tiles smaller
than ``S`` follow ``data.small_tiles``: ``skip`` (default; such tiles are not
drawn at that scale, and a scale no tile can serve is an error), ``pad``
(mirror-padded up to ``S``, labels -1 in the padding) or ``error``.

Batch keys: ``view1``, ``view2`` (B, 3, S, S) float32 in [0, 1], ``grid``
(B, S, S, 2), ``geo`` (B, 3), ``image`` (B, 3, S, S), ``slic`` (B, 3, S, S)
int32 (fine, medium, coarse ids), ``slic_boundary`` (B, S, S) uint8 (medium
scale), and ``labels`` (B, S, S) int64 (-1 = no target / nodata) when the
split has labeled items. Targets are for metrics only.
"""
from __future__ import annotations

import json
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch

from ..config import shard_datasets
from ..datasets.superpixels import read_npz
from .crops import NODATA_TRIES, choose_window, collate, eligible_for_size, finish_item, least_nodata_crop, pad_to
from .schedule import BatchKey, EpochDraws, StepSchedule, step_loader
from .teacher_cache import cache_path
from .teacher_cache import read_window as read_cached


# --------------------------------------------------------------------------- shard index

def list_shards(processed_root: str | Path, dataset_id: str, split: str) -> list[Path]:
    """Shard folders of a split, in name order. A missing split is an error that lists the ones present."""
    root = Path(processed_root) / dataset_id
    if not root.is_dir():
        raise FileNotFoundError(f"no shards for dataset {dataset_id!r} under {processed_root} "
                                "(build them with: python -m training.datasets.build_shards)")
    d = root / split
    if not d.is_dir():
        present = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                         and p.name != "previews")
        raise FileNotFoundError(f"dataset {dataset_id!r} has no split {split!r} (splits: {', '.join(present)})")
    shards = sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith("shard-"))
    for s in shards:
        if not (s / "index.jsonl").is_file():
            raise FileNotFoundError(f"{s} has no index.jsonl: an incomplete shard (rebuild with build_shards)")
    if not shards:
        raise FileNotFoundError(f"{d} has no shards")
    return shards


def read_index(shard: Path) -> list[dict]:
    with (Path(shard) / "index.jsonl").open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def shard_has_slic(shard: Path, entries: list[dict]) -> bool:
    return (Path(shard) / "slic").is_dir() and all(e.get("slic") for e in entries)


def check_slic(shard: Path, entries: list[dict]) -> None:
    if not shard_has_slic(shard, entries):
        raise FileNotFoundError(f"shard {shard} has no SLIC superpixels and data.require_slic is true; "
                                "rebuild it with python -m training.datasets.build_shards "
                                "(or set data.require_slic=false)")


def eval_settings(cfg, dataset_id: Optional[str] = None) -> dict:
    """The dataset's ``validation_metrics`` (IoU ignore threshold, averaging) from the built shards
    (``dataset_id``: default ``data.dataset_id``)."""
    path = Path(cfg.data.processed_root) / (dataset_id or cfg.data.dataset_id) / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: build the shards first")
    vm = json.loads(path.read_text())["validation_metrics"]
    return {"iou_ignore_label_leq": int(vm["iou_ignore_label_leq"]), "iou_average": vm["iou_average"]}


# --------------------------------------------------------------------------- reading tiles

def _open_raster(path: Path):
    import rasterio
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # targets without georeference are fine here
        return rasterio.open(path)


class TileReader:
    """Reads a shard item (whole or a window). With ``cache_mode='lru'`` whole tiles are kept in an LRU
    of ``cache_max_items`` (0 = unbounded); each DataLoader worker holds its own copy."""

    def __init__(self, want_slic: bool, cache_mode: str = "none", cache_max_items: int = 0):
        if cache_mode not in ("none", "lru"):
            raise ValueError(f"config key 'data.cache_mode': {cache_mode!r} is not one of none, lru")
        self.want_slic, self.cache_mode, self.cache_max_items = want_slic, cache_mode, int(cache_max_items)
        self._cache: OrderedDict = OrderedDict()
        self.hits = self.misses = 0

    def read(self, shard: Path, entry: dict, window: Optional[tuple] = None) -> dict:
        """{'image' (3,h,w) uint8, 'valid' (h,w) bool, 'slic' (3,h,w) int32, 'boundary' (h,w) uint8,
        'labels' (h,w) int64 or None}. ``window`` = (row, col, height, width)."""
        if self.cache_mode == "lru":
            key = (str(shard), entry["item_id"])
            tile = self._cache.get(key)
            if tile is None:
                self.misses += 1
                tile = self._read(shard, entry, None)
                self._cache[key] = tile
                if self.cache_max_items and len(self._cache) > self.cache_max_items:
                    self._cache.popitem(last=False)
            else:
                self.hits += 1
                self._cache.move_to_end(key)
            return _slice_tile(tile, window)
        return self._read(shard, entry, window)

    def _read(self, shard: Path, entry: dict, window) -> dict:
        from rasterio.windows import Window
        shard = Path(shard)
        win = None if window is None else Window(window[1], window[0], window[3], window[2])
        with _open_raster(shard / entry["input"]) as src:
            image = src.read(window=win)
        valid = np.ones(image.shape[1:], dtype=bool)
        if entry.get("nodata") is not None:
            valid = ~np.all(image == entry["nodata"], axis=0)
        labels = None
        if entry.get("has_target"):
            with _open_raster(shard / entry["target"]) as src:
                t = src.read(1, window=win).astype(np.int64)
            if entry.get("target_nodata") is not None:
                t[t == int(entry["target_nodata"])] = -1
            t[~valid] = -1
            labels = t
        out = {"image": image, "valid": valid, "labels": labels, "slic": None, "boundary": None}
        if self.want_slic:
            path = shard / entry["slic"] if entry.get("slic") else None
            if path is None or not path.is_file():
                raise FileNotFoundError(f"{shard}: item {entry['item_id']!r} has no superpixel file "
                                        f"({entry.get('slic')}); rebuild the shards")
            sp = read_npz(path, window)
            out.update(slic=sp["labels"], boundary=sp["boundary"][1])
        return out


def _slice_tile(tile: dict, window) -> dict:
    if window is None:
        return tile
    r, c, h, w = window
    return {k: (None if v is None else v[..., r:r + h, c:c + w]) for k, v in tile.items()}


# --------------------------------------------------------------------------- the trainer's stream

class ShardStepDataset(torch.utils.data.Dataset):
    """Map-style: ``ds[key]`` is the batch of schedule key ``key`` (a ``BatchKey``) for this rank."""

    def __init__(self, cfg, rank: int, world: int, split: Optional[str] = None, teacher_cache: Optional[str] = None,
                 datasets: Optional[list[tuple[str, float]]] = None):
        d = cfg.data
        self.teacher_cache = teacher_cache  # folder name of cached teacher features (data.teacher_cache), or None
        self.seed, self.rank, self.world, self.aug = cfg.train.seed, rank, world, cfg.aug
        self.schedule = StepSchedule.from_config(cfg, rank)
        self.sizes_and_batches = self.schedule.sizes_and_batches
        self.split = split or d.train_split
        self.max_nodata = float(cfg.data.max_nodata_fraction)
        policy = cfg.data.small_tiles
        self.datasets = datasets if datasets is not None else shard_datasets(cfg)
        self.items: list[tuple[str, dict]] = []
        self.item_dataset: list[int] = []       # index into self.datasets of every item
        has_slic = True
        for di, (dataset_id, _) in enumerate(self.datasets):
            shards = list_shards(d.processed_root, dataset_id, self.split)
            if len(shards) < world:
                raise ValueError(f"split {self.split!r} of {dataset_id!r} has {len(shards)} shard(s), fewer than "
                                 f"the {world} ranks; rebuild with a smaller --shard-size so every rank gets a shard")
            for shard in shards[rank::world]:
                entries = read_index(shard)
                if d.require_slic:
                    check_slic(shard, entries)
                has_slic &= shard_has_slic(shard, entries)
                self.items += [(str(shard), e) for e in entries]
                self.item_dataset += [di] * len(entries)
        if not self.items:
            raise ValueError(f"rank {rank}: the shards of split {self.split!r} hold no items")
        self.with_slic = has_slic
        self.with_labels = any(e.get("has_target") for _, e in self.items)
        sizes = [(e["height"], e["width"]) for _, e in self.items]
        self.eligible = [eligible_for_size(sizes, s, policy, f"tiles of split {self.split!r} (rank {rank})")
                         for s, _ in self.sizes_and_batches]
        if len(self.datasets) == 1:  # epochs: every item once per epoch
            self.draws = [EpochDraws(len(el), self.seed, rank, si) for si, el in enumerate(self.eligible)]
        else:  # a mixture: a dataset by weight, then an item uniformly (of those that can serve the scale)
            self.draw_p = [self._mixture_p(el, s) for el, (s, _) in zip(self.eligible, self.sizes_and_batches)]
        self.reader = TileReader(self.with_slic, d.cache_mode, d.cache_max_items)

    def _mixture_p(self, eligible: list[int], size: int) -> np.ndarray:
        ds = np.array([self.item_dataset[i] for i in eligible])
        weight = np.array([w for _, w in self.datasets])
        count = np.bincount(ds, minlength=len(self.datasets))
        empty = [self.datasets[i][0] for i in range(len(self.datasets)) if count[i] == 0]
        if empty:  # its weight would go to the others without a word
            raise ValueError(f"no tile of dataset {empty[0]!r} ({self.split}) is {size}x{size} or larger, so the "
                             f"mixture cannot draw it at patch size {size} (data.small_tiles=skip); lower "
                             "data.patch_sizes, set data.small_tiles=pad, or leave the dataset out of data.mixture")
        p = weight[ds] / count[ds]
        return p / p.sum()

    def item_index(self, step: int, micro: int, si: int, j: int) -> int:
        """Index into ``self.items`` of slot j of batch (step, micro, scale si)."""
        return self._item_index(self.schedule.key(step, micro, si), j)

    def _item_index(self, key: BatchKey, j: int) -> int:
        if len(self.datasets) == 1:
            return self.eligible[key.scale][self.draws[key.scale][key.first_draw + j]]
        p = self.draw_p[key.scale]
        return self.eligible[key.scale][int(key.item_rng(self.seed, 0x313D, j).choice(len(p), p=p))]

    def __getitem__(self, key: BatchKey) -> dict:
        out = []
        for j in range(key.n):
            shard, entry = self.items[self._item_index(key, j)]
            rng = key.item_rng(self.seed, 0xC209, j)
            crop = self._crop(shard, entry, key.size, rng)
            if self.teacher_cache is not None:
                crop["teacher"] = read_cached(cache_path(shard, self.teacher_cache, entry),
                                              (entry["height"], entry["width"]), crop["window"], key.size)
            out.append(finish_item(crop, rng, self.aug, self.with_labels, self.with_slic))
        return collate(out)

    def _crop(self, shard: str, entry: dict, size: int, rng: np.random.Generator) -> dict:
        h, w = entry["height"], entry["width"]
        tries = NODATA_TRIES if entry.get("nodata_fraction", 0.0) > 0 else 1
        def draw() -> dict:
            window = choose_window(h, w, size, rng)
            return {**self.reader.read(Path(shard), entry, window), "window": window}
        return least_nodata_crop(draw, tries, self.max_nodata, size)


def shard_batches(cfg, rank: int, world: int, start_step: int, teacher_cache: Optional[str] = None) -> Iterable[dict]:
    """Batches of the training split for this rank, in schedule order from ``start_step``."""
    return step_loader(ShardStepDataset(cfg, rank, world, teacher_cache=teacher_cache), cfg, rank, start_step)


def split_items(cfg, split: str, missing_ok: bool = False) -> list[tuple[Path, dict]]:
    """(shard folder, index entry) of every item of ``split`` of every dataset the run draws from (``missing_ok``:
    datasets without that split are left out)."""
    out = []
    for dataset_id, _ in shard_datasets(cfg):
        if missing_ok and not (Path(cfg.data.processed_root) / dataset_id / split).is_dir():
            continue
        out += [(shard, e) for shard in list_shards(cfg.data.processed_root, dataset_id, split)
                for e in read_index(shard)]
    return out


def read_tile_image(shard: Path, entry: dict) -> np.ndarray:
    """(3, H, W) uint8 pixels of a shard item."""
    return TileReader(want_slic=False).read(shard, entry)["image"]


def eval_items(cfg, split: str, dataset_id: Optional[str] = None) -> list[tuple[torch.Tensor, np.ndarray]]:
    """Every labeled item of a split of ``dataset_id`` (default ``data.dataset_id``): ((3, H, W) float32 in
    [0, 1], (H, W) int64 labels, -1 = nodata), sides cropped to multiples of 4. Loads whole tiles: meant for
    validation splits of moderate size."""
    d = cfg.data
    dataset_id = dataset_id or d.dataset_id
    reader = TileReader(want_slic=False)
    out = []
    for shard in list_shards(d.processed_root, dataset_id, split):
        for entry in read_index(shard):
            if not entry.get("has_target"):
                continue
            tile = reader.read(shard, entry)
            h, w = tile["image"].shape[1:]
            h4, w4 = h - h % 4, w - w % 4
            image = torch.from_numpy(np.ascontiguousarray(tile["image"][:, :h4, :w4])).float().div_(255.0)
            out.append((image, np.ascontiguousarray(tile["labels"][:h4, :w4])))
    if not out:
        raise ValueError(f"split {split!r} of dataset {dataset_id!r} has no labeled items to evaluate on")
    return out


# --------------------------------------------------------------------------- epoch iteration

class ShardedTifDataset(torch.utils.data.IterableDataset):
    """One epoch over the items of some shards, shards dealt to (rank, worker) slots.

    Slot ``rank * num_workers + worker`` of ``world * num_workers`` reads shards
    ``i`` with ``i % (world * num_workers) == slot``: every item is yielded
    exactly once per epoch over all ranks and workers (slots beyond the number
    of shards get nothing). Shard order and the order inside a shard are
    shuffled per epoch from ``seed`` (``set_epoch``). Items are whole tiles
    (``patch_size=None``) as ``{'item_id', 'image' (3,H,W) float32, 'slic',
    'slic_boundary', 'labels'}``, or random crops made like the training stream.
    """

    def __init__(self, shards: list, *, rank: int = 0, world: int = 1, seed: int = 0, require_slic: bool = True,
                 cache_mode: str = "none", cache_max_items: int = 0, shuffle: bool = True,
                 patch_size: Optional[int] = None, aug=None, small_tiles: str = "skip",
                 max_nodata_fraction: float = 0.5):
        super().__init__()
        self.shards = [Path(s) for s in shards]
        self.rank, self.world, self.seed, self.shuffle = rank, world, seed, shuffle
        self.patch_size, self.aug, self.small_tiles = patch_size, aug, small_tiles
        self.max_nodata = max_nodata_fraction
        if patch_size is not None and aug is None:
            raise ValueError("patch_size needs aug (the views' augmentation settings)")
        self.index = {str(s): read_index(s) for s in self.shards}
        self.with_slic = True
        for s in self.shards:
            if require_slic:
                check_slic(s, self.index[str(s)])
            self.with_slic &= shard_has_slic(s, self.index[str(s)])
        self.with_labels = any(e.get("has_target") for es in self.index.values() for e in es)
        self.reader = TileReader(self.with_slic, cache_mode, cache_max_items)
        self.epoch = 0

    @classmethod
    def from_config(cls, cfg, split: str, rank: int = 0, world: int = 1, patch_size: Optional[int] = None):
        d = cfg.data
        shards = [s for dataset_id, _ in shard_datasets(cfg) for s in list_shards(d.processed_root, dataset_id, split)]
        return cls(shards, rank=rank, world=world, seed=cfg.train.seed,
                   require_slic=d.require_slic, cache_mode=d.cache_mode, cache_max_items=d.cache_max_items,
                   patch_size=patch_size, aug=cfg.aug, small_tiles=cfg.data.small_tiles,
                   max_nodata_fraction=float(cfg.data.max_nodata_fraction))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def shards_for(self, worker: int, num_workers: int) -> list[Path]:
        slots = self.world * num_workers
        slot = self.rank * num_workers + worker
        return [s for i, s in enumerate(self.shards) if i % slots == slot]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = self.shards_for(worker, num_workers)
        slot = self.rank * num_workers + worker
        rng = np.random.default_rng([self.seed, 0xE70C, self.epoch, slot])
        if self.shuffle:
            mine = [mine[i] for i in rng.permutation(len(mine))]
        for shard in mine:
            entries = self.index[str(shard)]
            order = rng.permutation(len(entries)) if self.shuffle else range(len(entries))
            for i in order:
                entry = entries[i]
                if self.patch_size is None:
                    yield self._whole(shard, entry)
                    continue
                h, w = entry["height"], entry["width"]
                if (h < self.patch_size or w < self.patch_size) and self.small_tiles != "pad":
                    if self.small_tiles == "error":
                        raise ValueError(f"{shard}: {entry['item_id']} is {h}x{w}, smaller than patch size "
                                         f"{self.patch_size} (data.small_tiles=error)")
                    continue
                crop = self.reader.read(shard, entry, choose_window(h, w, self.patch_size, rng))
                item = finish_item(pad_to(crop, self.patch_size), rng, self.aug, self.with_labels, self.with_slic)
                item["item_id"] = entry["item_id"]
                yield item

    def _whole(self, shard: Path, entry: dict) -> dict:
        tile = self.reader.read(shard, entry)
        out = {"item_id": entry["item_id"],
               "image": torch.from_numpy(np.ascontiguousarray(tile["image"])).float().div_(255.0)}
        if self.with_slic:
            out["slic"] = torch.from_numpy(tile["slic"].astype(np.int32))
            out["slic_boundary"] = torch.from_numpy(np.ascontiguousarray(tile["boundary"]))
        if self.with_labels:
            labels = tile["labels"] if tile["labels"] is not None else np.full(tile["image"].shape[1:], -1, np.int64)
            out["labels"] = torch.from_numpy(labels)
        return out
