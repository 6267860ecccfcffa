"""Write dataset headers: ``python -m training.datasets.generate_headers``.

Known layouts found under ``--extracted-root`` (default
``training/datasets/extracted``), each in a folder of that name:

* ``ms_buildings``: ``<split>/sat/*.tif(f)`` with building masks ``<split>/map/*.tif(f)``
* ``whu_building``: ``<split>/image/*`` with ``<split>/label/*``, or images directly in ``<split>/``
* ``openearth``:    ``<region>/images/*.tif`` with ``<region>/labels/*.tif``
* ``inria``:        ``<split>/images/*.tif`` with ``<split>/gt/*.tif`` (test has no gt)

or a generic folder of images with optional masks::

    python -m training.datasets.generate_headers --images DIR [--masks DIR] --dataset-id X [--bands 1,2,3]

Headers go to ``--headers-dir`` as ``<dataset_id>.yaml`` (an existing file is
kept unless ``--overwrite``); ``--dry-run`` prints them instead. One sample
file per modality is opened to fill in bands, dtype and georeference; a
layout that cannot become a valid header (colour-coded masks, 16-bit
imagery, no files) is an error that says what to change. Every header is
validated by parsing it back before it is written.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np

from .header_schema import (DatasetHeader, HeaderError, ModalitySpec, PairingSpec, ShardingSpec, SplitSpec,
                            ValidationMetricsSpec, dump_header_yaml)

RASTER_EXTS = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".jp2", ".img", ".vrt")
MASK_SUFFIXES = ("_mask", "-mask", "_masks", "_label", "_labels", "-label", "_gt", "_seg", "_target")
DEFAULT_EXTRACTED_ROOT = "training/datasets/extracted"
DEFAULT_HEADERS_DIR = "training/datasets/headers"


class LayoutError(RuntimeError):
    """The files do not fit the expected layout; the message says what is missing."""


def _raster_files(folder: Path, recursive: bool = False) -> list[Path]:
    it = folder.rglob("*") if recursive else folder.glob("*")
    return sorted(p for p in it if p.is_file() and p.suffix.lower() in RASTER_EXTS)


def _common_suffix(files: list[Path], where: Path) -> str:
    if not files:
        raise LayoutError(f"no raster files ({', '.join(RASTER_EXTS)}) in {where}")
    return Counter(p.suffix for p in files).most_common(1)[0][0]


def scan_sample(path: Path) -> dict:
    """Bands, dtype, size, georeference and (for small value sets) the values of one raster."""
    import rasterio
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(path) as src:
            info = {"file": str(path), "bands": src.count, "dtype": src.dtypes[0], "height": src.height,
                    "width": src.width, "crs": src.crs.to_string() if src.crs else None,
                    "georeferenced": src.crs is not None and not src.transform.is_identity,
                    "nodata": src.nodata}
            if src.count == 1:
                values = np.unique(src.read(1))
                info["values"] = [int(v) for v in values[:32]] if values.size <= 32 else f"{values.size} values"
    return info


def _input_modality(sample: dict, pattern: str, name: str = "rgb", bands: Optional[list] = None) -> ModalitySpec:
    if sample["dtype"] != "uint8":
        raise LayoutError(f"{sample['file']}: inputs must be 8-bit RGB, this file is {sample['dtype']}; "
                          "convert the imagery to uint8 first")
    if bands is None:
        if sample["bands"] == 3:
            bands = None
        elif sample["bands"] == 4:
            bands = [1, 2, 3]  # RGBN / RGBA: the first three are taken as RGB (check and edit if not)
        else:
            raise LayoutError(f"{sample['file']}: {sample['bands']} band(s); pass --bands R,G,B to pick three")
    elif max(bands) > sample["bands"]:
        raise LayoutError(f"{sample['file']}: has {sample['bands']} band(s), --bands asks for {bands}")
    return ModalitySpec(name=name, role="input", kind="raster", pattern=pattern, channels=3, dtype="uint8",
                        nodata=None, georef_required=bool(sample["georeferenced"]),
                        bands=tuple(bands) if bands else None)


def _target_modality(sample: dict, pattern: str, name: str = "mask") -> ModalitySpec:
    if sample["bands"] != 1:
        raise LayoutError(f"{sample['file']}: masks must be single-band class ids, this one has {sample['bands']} "
                          "bands (colour-coded masks must be converted to class ids first)")
    if np.dtype(sample["dtype"]).kind not in "iu":
        raise LayoutError(f"{sample['file']}: masks must hold integer class ids, this one is {sample['dtype']}")
    return ModalitySpec(name=name, role="target", kind="raster", pattern=pattern, channels=1,
                        dtype=sample["dtype"], nodata=None, georef_required=False)


def _input_from(path: Path, stats: dict, pattern: str, name: str, bands: Optional[list] = None) -> ModalitySpec:
    """The input modality from one sample file, scanned once and recorded as ``stats['input_sample']``."""
    stats["input_sample"] = scan_sample(path)
    return _input_modality(stats["input_sample"], pattern, name, bands)


def _target_from(path: Path, stats: dict, pattern: str, name: str) -> ModalitySpec:
    """The target modality from one sample mask, scanned once and recorded as ``stats['target_sample']``."""
    stats["target_sample"] = scan_sample(path)
    return _target_modality(stats["target_sample"], pattern, name)


def _header(dataset_id: str, description: str, source_root: str, mods: list, raw: tuple, strategy="by_stem",
            stem_regex=None) -> DatasetHeader:
    target = next((m.name for m in mods if m.role == "target"), None)
    return DatasetHeader(
        dataset_id=dataset_id, version="1", description=description, source_root=source_root,
        modalities=tuple(mods),
        pairing=PairingSpec(strategy=strategy, stem_regex=stem_regex, input_modality=mods[0].name,
                            target_modality=target, on_missing_input="drop_item", on_missing_target="allow",
                            has_target_maps=target is not None),
        splits=SplitSpec(raw=raw, seed=123), sharding=ShardingSpec(shard_size=512),
        validation_metrics=ValidationMetricsSpec(iou_ignore_label_leq=0))


def _split_dirs(root: Path, names=None, needs: str = "") -> list[str]:
    dirs = sorted(d.name for d in root.iterdir() if d.is_dir() and (not needs or (d / needs).is_dir()))
    if names:
        dirs = [n for n in names if n in dirs] + [d for d in dirs if d not in names]
    if not dirs:
        raise LayoutError(f"no split folders{f' with {needs}/' if needs else ''} under {root}")
    return dirs


def layout_ms_buildings(root: Path) -> tuple[DatasetHeader, dict]:
    splits = _split_dirs(root, ("train", "val", "test"), needs="sat")
    sat = [f for s in splits for f in _raster_files(root / s / "sat")]
    ext = _common_suffix(sat, root / "*/sat")
    maps = [f for s in splits if (root / s / "map").is_dir() for f in _raster_files(root / s / "map")]
    stats = {"splits": splits, "inputs": len(sat), "targets": len(maps)}
    mods = [_input_from(sat[0], stats, f"{{split}}/sat/*{ext}", "sat")]
    if maps:
        mods.append(_target_from(maps[0], stats, f"{{split}}/map/*{_common_suffix(maps, root)}", "map"))
    return _header("ms_buildings", "Massachusetts buildings: aerial tiles (sat) with building masks (map).",
                   "", mods, tuple(splits)), stats


def layout_whu_building(root: Path) -> tuple[DatasetHeader, dict]:
    splits = _split_dirs(root, ("train", "val", "validation", "test"))
    nested = all((root / s / "image").is_dir() for s in splits)
    img_dir = "{split}/image" if nested else "{split}"
    imgs = [f for s in splits for f in _raster_files(root / img_dir.format(split=s))]
    ext = _common_suffix(imgs, root / img_dir)
    stats = {"splits": splits, "inputs": len(imgs)}
    mods = [_input_from(imgs[0], stats, f"{img_dir}/*{ext}", "image")]
    labels = [f for s in splits if (root / s / "label").is_dir() for f in _raster_files(root / s / "label")]
    if nested and labels:
        mods.append(_target_from(labels[0], stats, f"{{split}}/label/*{_common_suffix(labels, root)}", "label"))
        stats["targets"] = len(labels)
    return _header("whu_building", "WHU building dataset: aerial tiles" + (" with building masks." if len(mods) > 1
                   else " (no labels found)."), "", mods, tuple(splits)), stats


def layout_openearth(root: Path) -> tuple[DatasetHeader, dict]:
    imgs = sorted(root.glob("*/images/*.tif"))
    if not imgs:
        raise LayoutError(f"no <region>/images/*.tif under {root}")
    labels = sorted(root.glob("*/labels/*.tif"))
    stats = {"regions": len({p.parent.parent.name for p in imgs}), "inputs": len(imgs), "targets": len(labels)}
    mods = [_input_from(imgs[0], stats, "*/images/*.tif", "image")]
    if labels:
        mods.append(_target_from(labels[0], stats, "*/labels/*.tif", "label"))
    manifests = [n for n in ("train.txt", "val.txt", "test.txt") if (root / n).is_file()]
    if manifests:
        stats["note"] = (f"found {', '.join(manifests)}: the default split rules are used; to follow them instead "
                         "set splits.manifest_files (e.g. {val: val.txt})")
    return _header("openearth", "OpenEarthMap: regional image tiles with land-cover labels (8 classes, 0 = unknown).",
                   "", mods, ("all",)), stats


def layout_inria(root: Path) -> tuple[DatasetHeader, dict]:
    splits = _split_dirs(root, ("train", "test"), needs="images")
    imgs = [f for s in splits for f in _raster_files(root / s / "images")]
    ext = _common_suffix(imgs, root / "*/images")
    gts = [f for s in splits if (root / s / "gt").is_dir() for f in _raster_files(root / s / "gt")]
    stats = {"splits": splits, "inputs": len(imgs), "targets": len(gts)}
    mods = [_input_from(imgs[0], stats, f"{{split}}/images/*{ext}", "image")]
    if gts:
        # Masks are 0/255: keep both as classes (nothing to ignore).
        mods.append(_target_from(gts[0], stats, f"{{split}}/gt/*{_common_suffix(gts, root)}", "gt"))
    h = _header("inria", "Inria aerial image labeling: 5000x5000 0.3 m tiles, building masks (0/255) for train.",
                "", mods, tuple(splits))
    return _with(h, validation_metrics=ValidationMetricsSpec(iou_ignore_label_leq=-1)), stats


LAYOUTS = {"ms_buildings": layout_ms_buildings, "whu_building": layout_whu_building,
           "openearth": layout_openearth, "inria": layout_inria}


def _with(header: DatasetHeader, **changes) -> DatasetHeader:
    return dataclasses.replace(header, **changes)


def layout_generic(images: Path, masks: Optional[Path], dataset_id: str, bands: Optional[list] = None,
                   description: str = "") -> tuple[DatasetHeader, dict]:
    """A folder of images and (optionally) a folder of masks paired by stem (or stem + a mask suffix)."""
    images = images.resolve()
    if not images.is_dir():
        raise LayoutError(f"--images {images} is not a folder")
    imgs = _raster_files(images)
    ext = _common_suffix(imgs, images)
    imgs = [p for p in imgs if p.suffix == ext]
    if masks is None:
        root = images
        stats = {"inputs": len(imgs)}
        mods = [_input_from(imgs[0], stats, f"*{ext}", "image", bands)]
        return _header(dataset_id, description or f"Images from {images}", str(root), mods, ("all",)), stats
    masks = masks.resolve()
    if not masks.is_dir():
        raise LayoutError(f"--masks {masks} is not a folder")
    if masks == images:
        raise LayoutError("--images and --masks must be different folders")
    mfiles = _raster_files(masks)
    mext = _common_suffix(mfiles, masks)
    mfiles = [p for p in mfiles if p.suffix == mext]
    root = Path(os.path.commonpath([images, masks]))
    img_rel, mask_rel = images.relative_to(root).as_posix(), masks.relative_to(root).as_posix()
    stats = {"inputs": len(imgs), "targets": len(mfiles)}
    mods = [_input_from(imgs[0], stats, f"{img_rel}/*{ext}", "image", bands)]
    img_stems, mask_stems = {p.stem for p in imgs}, {p.stem for p in mfiles}
    strategy, regex, paired = "by_stem", None, len(img_stems & mask_stems)
    if not paired:
        for suffix in MASK_SUFFIXES:
            stripped = {s[: -len(suffix)] for s in mask_stems if s.endswith(suffix)}
            if stripped & img_stems:
                strategy = "regex"
                regex = rf"(?P<stem>[^/]+?)(?:{re.escape(suffix)})?\.[^./]+$"
                paired = len(stripped & img_stems)
                break
    if not paired:
        raise LayoutError(f"no mask in {masks} matches an image in {images} by file stem "
                          f"(also tried the suffixes {', '.join(MASK_SUFFIXES)}); rename them or write the header "
                          "by hand with pairing.strategy: regex")
    mods.append(_target_from(mfiles[0], stats, f"{mask_rel}/*{mext}", "mask"))
    stats["paired"] = paired
    tsample = stats["target_sample"]
    h = _header(dataset_id, description or f"Images from {images} with masks from {masks}", str(root), mods,
                ("all",), strategy, regex)
    if isinstance(tsample.get("values"), list) and set(tsample["values"]) <= {0, 1, 255}:
        # Binary masks: 0 is a real class (not "unlabeled"), so IoU ignores nothing.
        h = _with(h, validation_metrics=ValidationMetricsSpec(iou_ignore_label_leq=-1))
        stats["note"] = "binary masks: validation_metrics.iou_ignore_label_leq set to -1 (0 counts as a class)"
    return h, stats


def _relative_root(source_root: Path, headers_dir: Path) -> str:
    """Relative to the header's folder when both live under the working directory (a project tree that
    moves as one), else absolute."""
    src, hdr, cwd = source_root.resolve(), headers_dir.resolve(), Path.cwd().resolve()
    if src.is_relative_to(cwd) and hdr.is_relative_to(cwd):
        return os.path.relpath(src, hdr)
    return str(src)


def write_header(header: DatasetHeader, headers_dir: Path, stats: dict, dry_run: bool, overwrite: bool) -> Optional[Path]:
    comment = (f"Dataset header v0 for {header.dataset_id}, written by training.datasets.generate_headers.\n"
               "Check modalities (bands, label values) and splits before building shards:\n"
               f"  python -m training.datasets.build_shards --header <this file>")
    text = dump_header_yaml(header, comment)
    print(f"=== {header.dataset_id} ===")
    for k, v in stats.items():
        print(f"  {k}: {v}")
    path = headers_dir / f"{header.dataset_id}.yaml"
    if dry_run:
        print(f"--- {path} (dry run, not written) ---")
        print(text)
        return None
    if path.exists() and not overwrite:
        raise LayoutError(f"{path} exists; pass --overwrite to replace it")
    headers_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    print(f"wrote {path}")
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.datasets.generate_headers",
                                description="Write dataset header YAML files for known layouts or a generic folder. "
                                            "See docs/dataset/HEADERS.md.")
    p.add_argument("--extracted-root", default=DEFAULT_EXTRACTED_ROOT,
                   help=f"folder holding the known layouts ({', '.join(LAYOUTS)}); default: {DEFAULT_EXTRACTED_ROOT}")
    p.add_argument("--dataset", action="append", choices=sorted(LAYOUTS),
                   help="only this known layout (repeatable; default: every one found)")
    p.add_argument("--images", help="generic: folder of input images")
    p.add_argument("--masks", help="generic: folder of single-band masks (paired by file stem)")
    p.add_argument("--dataset-id", help="generic: dataset_id of the header")
    p.add_argument("--bands", help="generic: 1-based bands read as RGB, e.g. 1,2,3 for RGBN files")
    p.add_argument("--description", default="", help="generic: description of the dataset")
    p.add_argument("--headers-dir", default=DEFAULT_HEADERS_DIR, help=f"where <dataset_id>.yaml is written (default: {DEFAULT_HEADERS_DIR})")
    p.add_argument("--dry-run", action="store_true", help="print the headers instead of writing them")
    p.add_argument("--overwrite", action="store_true", help="replace existing header files")
    return p


def main(argv: Optional[list] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    headers_dir = Path(args.headers_dir)
    try:
        if args.images or args.masks or args.dataset_id:
            if not (args.images and args.dataset_id):
                parser.error("the generic mode needs --images DIR and --dataset-id X (--masks DIR optional)")
            bands = [int(b) for b in args.bands.split(",")] if args.bands else None
            header, stats = layout_generic(Path(args.images), Path(args.masks) if args.masks else None,
                                           args.dataset_id, bands, args.description)
            header = _with(header, source_root=_relative_root(Path(header.source_root), headers_dir))
            write_header(header, headers_dir, stats, args.dry_run, args.overwrite)
            return 0
        root = Path(args.extracted_root)
        names = args.dataset or [n for n in LAYOUTS if (root / n).is_dir()]
        if not names:
            print(f"error: none of the known layouts ({', '.join(LAYOUTS)}) is under {root}; "
                  "use --extracted-root, or --images/--masks/--dataset-id for a generic folder", file=sys.stderr)
            return 2
        status = 0
        for name in names:
            src = root / name
            try:
                if not src.is_dir():
                    raise LayoutError(f"{src} not found")
                header, stats = LAYOUTS[name](src)
                header = _with(header, source_root=_relative_root(src, headers_dir))
                write_header(header, headers_dir, stats, args.dry_run, args.overwrite)
            except (LayoutError, HeaderError) as exc:
                print(f"error: {name}: {exc}", file=sys.stderr)
                status = 2
        return status
    except (LayoutError, HeaderError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
