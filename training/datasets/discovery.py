"""Find a dataset's rasters, pair inputs with targets, and assign every item its split.

Used by ``python -m training.datasets.build_shards``: pairing follows the
header's ``pairing`` (by stem or regex; ``on_missing_input`` /
``on_missing_target``), and splits are a pure function of the header, the seed
and the file names (``splits``: raw splits kept or not, manifests, labeled
policy, ratios by largest remainder), never of the order files are found in.
"""
from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .header_schema import DatasetHeader


class BuildError(RuntimeError):
    """The build cannot go on; the message says why and what to do."""


@dataclass
class Item:
    key: tuple                      # (raw_split, stem)
    raw_split: str
    stem: str
    input_path: Optional[Path]
    target_path: Optional[Path]
    item_id: str = ""
    split: str = ""
    rule: str = ""                  # which split rule placed it


@dataclass
class Discovery:
    items: list
    missing_input: list = field(default_factory=list)     # targets without an input
    missing_target: list = field(default_factory=list)    # inputs without a target
    unmatched: list = field(default_factory=list)         # files the stem regex did not match
    manifest_unmatched: list = field(default_factory=list)


# --------------------------------------------------------------------------- discovery & pairing

def relative_path(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _glob(root: Path, pattern: str) -> list[Path]:
    return sorted(p for p in root.glob(pattern) if p.is_file())


def _files_by_key(header: DatasetHeader, modality, root: Path, unmatched: list) -> dict:
    """{(raw_split, stem): path} for one modality over every raw split."""
    regex = re.compile(header.pairing.stem_regex) if header.pairing.strategy == "regex" else None
    out: dict = {}
    raws = header.splits.raw if "{split}" in modality.pattern else header.splits.raw[:1]
    for raw in raws:
        for path in _glob(root, modality.pattern.replace("{split}", raw)):
            rel = relative_path(path, root)
            if regex is not None:
                m = regex.search(rel)
                if m is None or not m.group("stem"):
                    unmatched.append({"modality": modality.name, "file": rel})
                    continue
                stem = m.group("stem")
            else:
                stem = path.stem
            key = (raw, stem)
            if key in out:
                raise BuildError(f"{header.path}: modality {modality.name!r}: two files have the stem {stem!r} "
                                 f"in raw split {raw!r}: {relative_path(out[key], root)} and {rel}; make stems unique "
                                 "or use pairing.strategy: regex")
            out[key] = path
    return out


def _safe_id(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", stem).strip(".") or "item"


def discover(header: DatasetHeader, root: Path) -> Discovery:
    """Pair inputs and targets and apply ``on_missing_input`` / ``on_missing_target``."""
    if not root.is_dir():
        raise BuildError(f"{header.path}: source_root {root} is not a folder")
    unmatched: list = []
    inputs = _files_by_key(header, header.input, root, unmatched)
    targets = _files_by_key(header, header.target, root, unmatched) if header.target else {}
    if not inputs:
        raise BuildError(f"{header.path}: no input files match {header.input.pattern!r} under {root} "
                         f"(raw splits: {', '.join(header.splits.raw)})")
    disc = Discovery(items=[], unmatched=unmatched)
    p = header.pairing
    for key in sorted(set(inputs) | set(targets)):
        raw, stem = key
        inp, tgt = inputs.get(key), targets.get(key)
        if inp is None:
            rec = {"raw_split": raw, "stem": stem, "target": relative_path(tgt, root), "action": p.on_missing_input}
            if p.on_missing_input == "error":
                raise BuildError(f"{header.path}: target {rec['target']} has no input "
                                 f"(pairing.on_missing_input: error)")
            disc.missing_input.append(rec)
            continue
        if header.target is not None and tgt is None:
            rec = {"raw_split": raw, "stem": stem, "input": relative_path(inp, root), "action": p.on_missing_target}
            if p.on_missing_target == "error":
                raise BuildError(f"{header.path}: input {rec['input']} has no target "
                                 f"(pairing.on_missing_target: error)")
            disc.missing_target.append(rec)
            if p.on_missing_target == "drop_item":
                continue
        disc.items.append(Item(key=key, raw_split=raw, stem=stem, input_path=inp, target_path=tgt))
    # Item ids are the (file-safe) stems; stems repeated across raw splits get the raw split as a prefix.
    by_id: dict = {}
    for it in disc.items:
        by_id.setdefault(_safe_id(it.stem), []).append(it)
    for sid, group in by_id.items():
        for it in group:
            it.item_id = sid if len(group) == 1 else _safe_id(f"{it.raw_split}__{it.stem}")
    ids = [it.item_id for it in disc.items]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise BuildError(f"{header.path}: item ids collide after making them file-safe: {', '.join(dup[:5])}")
    return disc


# --------------------------------------------------------------------------- splits

def _read_manifest(path: Path) -> list[str]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def _permutation(n: int, seed: int, *tags: int) -> np.ndarray:
    return np.random.default_rng([seed, *tags]).permutation(n)


def _tag(name: str) -> int:
    return zlib.crc32(name.encode())


def assign_splits(disc: Discovery, header: DatasetHeader, seed: int, root: Path) -> dict:
    """Give every item its output split; returns {split: [items in shard order]}.

    Rules, in order: ``preserve_raw_split`` (split = raw split); items listed in
    ``manifest_files``; unlabeled items -> ``train``; labeled items -> a
    ``train_metric_fraction_of_labeled`` share to ``metrics_train`` and the rest
    to ``val`` (or by ``ratios`` with ``labeled_policy: ratios``). Shares are
    exact counts (rounded half up) over a seeded permutation of the items sorted
    by id, so the result depends only on the item ids and the seed.
    """
    s = header.splits
    items = sorted(disc.items, key=lambda it: it.item_id)
    if s.preserve_raw_split:
        for it in items:
            it.split, it.rule = it.raw_split, "preserve_raw_split"
    else:
        # A manifest line names an item by file name or stem ("tokyo_1.tif" or "tokyo_1").
        listed: dict = {}
        entries: list = []
        for split, rel in (s.manifest_files or {}).items():
            mpath = Path(rel) if Path(rel).is_absolute() else root / rel
            if not mpath.is_file():
                raise BuildError(f"{header.path}: splits.manifest_files.{split}: file not found: {mpath}")
            for entry in _read_manifest(mpath):
                name = Path(entry).name
                entries.append(name)
                for cand in {name, Path(name).stem}:
                    listed.setdefault(cand, set()).add(split)
        for it in items:
            splits = listed.get(it.stem)
            if splits:
                if len(splits) > 1:
                    raise BuildError(f"{header.path}: item {it.stem!r} is listed in several manifests: "
                                     f"{', '.join(sorted(splits))}")
                it.split, it.rule = next(iter(splits)), "manifest"
        stems = {it.stem for it in items}
        disc.manifest_unmatched = sorted({e for e in entries if e not in stems and Path(e).stem not in stems})
        rest = [it for it in items if not it.split]
        for it in rest:
            if it.target_path is None:
                it.split, it.rule = "train", "unlabeled"
        labeled = [it for it in rest if it.target_path is not None]
        perm = _permutation(len(labeled), seed, 0x5B117)
        shuffled = [labeled[i] for i in perm]
        if s.labeled_policy == "ratios":
            counts = _largest_remainder(len(shuffled), s.ratios)
            pos = 0
            for name in sorted(s.ratios):
                for it in shuffled[pos:pos + counts[name]]:
                    it.split, it.rule = name, "labeled_ratios"
                pos += counts[name]
        else:
            k = int(math.floor(s.train_metric_fraction_of_labeled * len(shuffled) + 0.5))
            for i, it in enumerate(shuffled):
                it.split, it.rule = ("metrics_train", "labeled_metrics_fraction") if i < k else \
                                    ("val", "labeled_metrics_fraction")
    out: dict = {}
    for it in items:
        out.setdefault(it.split, []).append(it)
    # Shard order: a seeded shuffle per split, so neighbouring tiles spread over shards.
    for split in out:
        group = out[split]
        out[split] = [group[i] for i in _permutation(len(group), seed, 0x5A4D, _tag(split))]
    return dict(sorted(out.items()))


def _largest_remainder(n: int, ratios: dict) -> dict:
    names = sorted(ratios)
    total = sum(ratios.values())
    exact = {k: n * ratios[k] / total for k in names}
    counts = {k: int(math.floor(exact[k])) for k in names}
    left = n - sum(counts.values())
    for k in sorted(names, key=lambda k: (-(exact[k] - counts[k]), k))[:left]:
        counts[k] += 1
    return counts
