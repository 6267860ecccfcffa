"""Score segmentations against reference labels the way the field does, through the product's own pipeline.

    python -m training.eval --synthetic --seed 7                                   # a run's synthetic val set
    python -m training.eval --data-source shards --processed-root P --dataset-id D --split val
    python -m training.eval --images DIR --masks DIR --mask-colors colors.json    # a folder of images + masks
    python -m training.eval --images DIR --masks DIR --mask-classes training/datasets/classes/geonrw_5.json
        [--model model/best | --checkpoint runs/x/best.pt] [--teacher efficientnet_lite0] [-k K] [--out r.json]

Every method labels the evaluation set exactly as ``mapseg`` labels rasters: K
centres fitted once on a sample drawn from all the evaluation images (the
``mapseg fit`` sampler), then every image assigned window by window against
them (``mapseg.segment.label_reader``). So the score is the score of the
product. Methods side by side: the model (an artifact folder, or a training
checkpoint exported on the fly), colour k-means (``--model kmeans``), and,
with ``--teacher``, k-means on the teacher's own features (resized to the
stride-4 grid, each image embedded whole).

Scores: the dataset-level Hungarian protocol (one confusion matrix over the
set, one matching; accuracy, mIoU, per-class IoU), per-image matching, and
over-clustering (K_over = 2 x classes by default, clusters mapped to their
majority class). Label-free proxies: cluster utilisation, speckle (fraction of
connected components under 64 px), boundary density, and two-view consistency
(agreement between the labels of an image and those of its flipped and
rotated copy, mapped back). Prints a table; ``--out`` writes everything as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from mapseg.cluster import check_k
from mapseg.errors import SegmentError
from mapseg.features import FeatureModel, load_features
from mapseg.fileio import write_text_atomic
from mapseg.parallel import SERIAL
from mapseg.raster import OUTPUT_NODATA, PALETTE, ArrayReader, write_png
from mapseg.scaling import make_scaling
from mapseg.segment import fit_reader_centers, label_reader, run_upsample
from mapseg.upsample import METHODS as UPSAMPLE_METHODS
from mapseg.windows import DEFAULT_TILE, padded_size

from .artifact import ExportError, export_artifact
from .checkpoints import CheckpointError, load_checkpoint_student
from .config import TeacherConfig
from .data.sharded_tif_dataset import eval_items, eval_settings
from .datasets.convert_masks import convert, load_colors, load_value_classes, remap_values
from .teachers import build_teacher
from .teachers.base import TeacherLoadError
from .metrics import (agreement, boundary_density, cluster_utilisation, confusion_matrix, hungarian_scores,
                      overcluster_scores, per_image_scores, scored_classes, speckle)

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


class EvalError(ValueError):
    """A user-facing problem with the evaluation inputs; the message says what to do."""


# --------------------------------------------------------------------------- evaluation sets

class EvalSet:
    """Images (H, W, 3) uint8 with reference labels (H, W) int, the ignore threshold and class names."""

    def __init__(self, name: str, images: list, labels: list, ignore_leq: int | None, class_names=None,
                 ids: list[str] | None = None):
        if not images:
            raise EvalError(f"{name}: no images to evaluate")
        for i, (im, lab) in enumerate(zip(images, labels)):
            if im.shape[:2] != lab.shape:
                raise EvalError(f"{name}: image {i} is {im.shape[:2]} but its labels are {lab.shape}")
        self.name, self.images, self.labels, self.ignore_leq = name, images, labels, ignore_leq
        self.ids = ids or [str(i) for i in range(len(images))]
        n_target = int(max(int(lab.max()) for lab in labels)) + 1
        self.n_target = max(n_target, (ignore_leq if ignore_leq is not None else -1) + 2)
        self.classes = scored_classes(self.n_target, ignore_leq)
        if class_names is not None:
            self.class_names = [class_names.get(int(c), str(int(c))) for c in self.classes]
        else:
            self.class_names = [str(int(c)) for c in self.classes]

    @property
    def megapixels(self) -> float:
        return sum(im.shape[0] * im.shape[1] for im in self.images) / 1e6


def synthetic_set(seed: int, samples: int = 8, size: int = 256, classes: int = 5, cells: int = 24) -> EvalSet:
    """The validation set a synthetic training run with ``train.seed = seed`` scores itself on."""
    from .data.synthetic import validation_images  # cv2: only for --synthetic

    items = validation_images(seed, samples, size, classes, cells)
    images = [np.rint(np.transpose(it["image"], (1, 2, 0)) * 255).astype(np.uint8) for it in items]
    return EvalSet(f"synthetic (seed {seed}, {samples} x {size} px)", images, [it["labels"] for it in items], None)


def shard_set(processed_root: str, dataset_id: str, split: str) -> EvalSet:
    cfg = SimpleNamespace(data=SimpleNamespace(processed_root=processed_root, dataset_id=dataset_id))
    try:
        settings = eval_settings(cfg)
        items = eval_items(cfg, split)
    except (FileNotFoundError, ValueError) as exc:
        raise EvalError(str(exc)) from exc
    images = [np.rint(img.numpy().transpose(1, 2, 0) * 255).astype(np.uint8) for img, _ in items]
    labels = [np.asarray(lab) for _, lab in items]
    return EvalSet(f"shards {dataset_id}/{split}", images, labels, settings["iou_ignore_label_leq"])


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _read_mask(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("P", "RGB", "RGBA"):
            return np.asarray(im.convert("RGB"))
        return np.asarray(im)


def folder_set(images_dirs, masks_dirs, mask_colors: str | None = None, ignore_leq: int | None = 0,
               unknown: str = "error", mask_classes: str | None = None) -> EvalSet:
    """Images paired with masks by file stem (``image_part_001.jpg`` with ``image_part_001.png``), from one or
    more image folders, each with its mask folder (paired in order).

    With ``mask_colors`` (a colour map JSON, see training/datasets/colors/) colour masks become class
    values and ``ignore_leq`` is the map's ``ignore_value``; without it masks must hold class values, which
    ``mask_classes`` (a class map JSON, see training/datasets/classes/) names and may group.
    """
    if mask_colors and mask_classes:
        raise EvalError("--mask-colors (colour masks) and --mask-classes (value masks) exclude each other")
    images_dirs = [images_dirs] if isinstance(images_dirs, (str, Path)) else list(images_dirs)
    masks_dirs = [masks_dirs] if isinstance(masks_dirs, (str, Path)) else list(masks_dirs)
    if len(images_dirs) != len(masks_dirs):
        raise EvalError(f"{len(images_dirs)} --images folder(s) but {len(masks_dirs)} --masks folder(s): "
                        "give one mask folder per image folder, in the same order")
    pairs = []
    for idir, mdir in zip(map(Path, images_dirs), map(Path, masks_dirs)):
        for d, what in ((idir, "--images"), (mdir, "--masks")):
            if not d.is_dir():
                raise EvalError(f"{what} {d} is not a folder")
        masks = {p.stem: p for p in sorted(mdir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
        here = [(p, masks.get(p.stem)) for p in sorted(idir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
        missing = [p.name for p, m in here if m is None]
        if missing:
            raise EvalError(f"{len(missing)} image(s) in {idir} have no mask of the same stem in {mdir}, "
                            f"e.g. {missing[0]}")
        if not here:
            raise EvalError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {idir}")
        pairs += here
    colors = load_colors(mask_colors) if mask_colors else None
    names, classes = None, None
    if mask_classes:
        try:
            classes = load_value_classes(mask_classes)
        except (OSError, ValueError) as exc:
            raise EvalError(str(exc)) from exc
        ignore_leq, names = classes["ignore_value"], classes["names"]
    if colors is not None:
        ignore_leq = colors["ignore_value"]
        if any(v <= ignore_leq for _, v in colors["classes"].values()):
            raise EvalError(f"{mask_colors}: class values must exceed ignore_value {ignore_leq} "
                            "(IoU ignores labels <= it)")
        names = {v: n for n, (_, v) in colors["classes"].items()}
    images, labels = [], []
    for ip, mp in pairs:
        img = _read_image(ip)
        raw = _read_mask(mp)
        if colors is not None:
            if raw.ndim != 3:
                raise EvalError(f"{mp}: --mask-colors expects colour masks, this one has a single band")
            lab, _ = convert(raw, colors, unknown, str(mp))
        else:
            if raw.ndim != 2:
                raise EvalError(f"{mp} is a colour mask: pass --mask-colors FILE to map its colours to classes")
            lab = raw
            if classes is not None:
                try:
                    lab = remap_values(raw, classes, str(mp))
                except ValueError as exc:
                    raise EvalError(str(exc)) from exc
        if lab.shape != img.shape[:2]:
            raise EvalError(f"{mp} is {lab.shape[1]}x{lab.shape[0]}, its image {ip} {img.shape[1]}x{img.shape[0]}")
        images.append(img)
        labels.append(lab.astype(np.int64))
    where = ", ".join(map(str, images_dirs)) if len(images_dirs) < 3 else f"{len(images_dirs)} folders"
    return EvalSet(f"folder {where}", images, labels, ignore_leq, names, [str(p) for p, _ in pairs])


# --------------------------------------------------------------------------- teacher features

class TeacherKMeansFeatures:
    """A pretrained teacher as a mapseg ``FeatureModel``: its features bilinearly resized to the stride-4
    grid, L2-normalised, cosine metric. ``label_set`` embeds each image whole (one window): the teacher's
    receptive field is global, so it gets the same context the student's training targets had."""
    kind, metric, stride, halo, max_k = "teacher", "cosine", 4, 0, 16
    backend_name, plan = "torch", SERIAL

    def __init__(self, name: str, weights: str = "", patch_mode: str = "match"):
        self.teacher = build_teacher(TeacherConfig(name=name, weights=weights, patch_mode=patch_mode), "cpu")
        self.dim = int(self.teacher.feature_dim)
        self.fill = np.zeros(3, np.float32)
        self.name = f"teacher {name} ({patch_mode})"
        self.backend_message = "torch (teacher)"
        self.model_id = {"kind": "teacher", **{k: v for k, v in self.teacher.describe().items()
                                               if isinstance(v, (str, int, float))}}

    def __call__(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[0] // self.stride, image.shape[1] // self.stride
        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None].float()
            f = self.teacher(x).features
            f = F.interpolate(f, size=(h, w), mode="bilinear", align_corners=False)
            f = F.normalize(f, dim=1)
        return f[0].permute(1, 2, 0).numpy().astype(np.float32)


# --------------------------------------------------------------------------- scoring one method

def _geo(image: np.ndarray) -> np.ndarray:
    """The second view: horizontal flip, then a quarter turn."""
    return np.ascontiguousarray(np.rot90(image[:, ::-1], 1))


def _geo_inverse(labels: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.rot90(labels, -1)[:, ::-1])


def label_set(features: FeatureModel, evalset: EvalSet, k: int, seed: int = 0, smooth: int = 0, views: bool = True,
              log=None, upsample: str | None = None) -> tuple[list[np.ndarray], list[np.ndarray] | None, object, float]:
    """(labels per image, second-view labels mapped back or None, centres, seconds): the mapseg pipeline.
    ``upsample``: as ``mapseg segment --upsample`` (default: the model's own; pixel methods ignore it)."""
    up = run_upsample(features, upsample if features.stride > 1 else None)
    log = log or (lambda msg: None)
    t0 = time.perf_counter()
    readers = [ArrayReader(im, name=i) for im, i in zip(evalset.images, evalset.ids)]
    centers = fit_reader_centers(readers, k, features, seed)
    scaling = make_scaling("uint8", None, None)
    whole = isinstance(features, TeacherKMeansFeatures)

    def tile_for(reader):
        return padded_size(max(reader.height, reader.width), features.stride) if whole else DEFAULT_TILE

    labels, second = [], [] if views else None
    for n, reader in enumerate(readers):
        labels.append(label_reader(reader, features, scaling, centers, tile_for(reader), smooth, up))
        if views:
            r2 = ArrayReader(_geo(reader.image), name=reader.path)
            second.append(_geo_inverse(label_reader(r2, features, scaling, centers, tile_for(r2), smooth, up)))
        log(f"  {n + 1}/{len(readers)}")
    return labels, second, centers, time.perf_counter() - t0


def score_labels(evalset: EvalSet, labels: list[np.ndarray], k: int) -> dict:
    cols = evalset.classes
    confs = []
    for lab, ref in zip(labels, evalset.labels):
        pred = np.where(lab == OUTPUT_NODATA, -1, lab.astype(np.int64))
        confs.append(confusion_matrix(pred, ref, k, evalset.n_target, evalset.ignore_leq)[:, cols])
    conf = np.sum(confs, axis=0)
    return {"dataset": hungarian_scores(conf, evalset.class_names), "per_image": per_image_scores(confs),
            "confusion": conf.tolist()}


def proxy_scores(labels: list[np.ndarray], second: list[np.ndarray] | None, k: int) -> dict:
    counts = np.zeros(k, np.int64)
    comps = tiny = 0
    bd = []
    for lab in labels:
        counts += np.bincount(lab[lab != OUTPUT_NODATA].ravel(), minlength=k)[:k]
        s = speckle(lab, k)
        comps += s["components"]
        tiny += round(s["tiny_fraction"] * s["components"])
        bd.append(boundary_density(lab))
    out = {**cluster_utilisation(counts), "speckle_tiny_fraction": tiny / comps if comps else 0.0,
           "components_per_image": comps / len(labels), "boundary_density": float(np.mean(bd))}
    if second is not None:
        out["two_view_consistency"] = float(np.mean([agreement(a, b) for a, b in zip(labels, second)]))
    return out


def evaluate_method(name: str, features: FeatureModel, evalset: EvalSet, k: int, k_over: int | None, seed: int = 0,
                    smooth: int = 0, views: bool = True, log=None, upsample: str | None = None) -> dict:
    log = log or (lambda msg: None)
    k = check_k(k, features.max_k)
    log(f"{name}: K={k} over {len(evalset.images)} images ({evalset.megapixels:.1f} MP)")
    labels, second, centers, secs = label_set(features, evalset, k, seed, smooth, views, upsample=upsample)
    up = run_upsample(features, upsample if features.stride > 1 else None)
    res = {"method": name, "model": features.name, "k": k, "upsample": up.to_json(), **score_labels(evalset, labels, k),
           "proxies": proxy_scores(labels, second, k), "seconds": secs, "centers_sample": centers.sample}
    if k_over and k_over != k:
        ko = min(k_over, features.max_k)
        over_labels, _, _, _ = label_set(features, evalset, ko, seed, smooth, views=False, upsample=upsample)
        cols = evalset.classes
        conf = np.sum([confusion_matrix(np.where(lab == OUTPUT_NODATA, -1, lab.astype(np.int64)), ref, ko,
                                        evalset.n_target, evalset.ignore_leq)[:, cols]
                       for lab, ref in zip(over_labels, evalset.labels)], axis=0)
        res["overcluster"] = {"k": ko, **overcluster_scores(conf, evalset.class_names)}
    res["labels"] = labels
    return res


# --------------------------------------------------------------------------- report

def format_table(evalset: EvalSet, results: list[dict]) -> str:
    lines = [f"evaluation set: {evalset.name}: {len(evalset.images)} images, {evalset.megapixels:.2f} MP, "
             f"{len(evalset.classes)} classes; centres fitted once over the set; Hungarian matching",
             ""]
    head = f"{'method':<40} {'K':>3} {'acc':>6} {'mIoU':>6} {'img acc':>7} {'img mIoU':>8} {'over K':>6} {'over mIoU':>9}"
    lines += [head, "-" * len(head)]
    for r in results:
        d, p = r["dataset"], r["per_image"]
        o = r.get("overcluster")
        over = f"{o['k']:>6} {o['miou']:>9.3f}" if o else f"{'-':>6} {'-':>9}"
        lines.append(f"{r['method']:<40} {r['k']:>3} {d['accuracy']:>6.3f} {d['miou']:>6.3f} "
                     f"{p['accuracy']:>7.3f} {p['miou']:>8.3f} {over}")
    lines += ["", "per-class IoU (dataset-level matching)"]
    names = evalset.class_names
    head = f"{'method':<40} " + " ".join(f"{n[:10]:>10}" for n in names)
    lines += [head, "-" * len(head)]
    for r in results:
        ious = r["dataset"]["per_class_iou"]
        vals = [ious[n] if isinstance(ious, dict) else ious[i] for i, n in enumerate(names)]
        lines.append(f"{r['method']:<40} " + " ".join(f"{'-' if v is None else f'{v:.3f}':>10}" for v in vals))
    lines += ["", "label-free proxies"]
    head = (f"{'method':<40} {'used':>6} {'usage H':>7} {'speckle':>7} {'comp/img':>8} {'boundary':>8} "
            f"{'2-view':>6} {'seconds':>7}")
    lines += [head, "-" * len(head)]
    for r in results:
        q = r["proxies"]
        tv = q.get("two_view_consistency")
        lines.append(f"{r['method']:<40} {q['used_fraction']:>6.2f} {q['usage_entropy']:>7.3f} "
                     f"{q['speckle_tiny_fraction']:>7.3f} {q['components_per_image']:>8.1f} "
                     f"{q['boundary_density']:>8.4f} {'-' if tv is None else f'{tv:.3f}':>6} {r['seconds']:>7.1f}")
    return "\n".join(lines)


def write_figure(path, evalset: EvalSet, results: list[dict], index: int = 0, mask_colors: str | None = None,
                 max_width: int = 480) -> None:
    """One evaluation image as a PNG row: input | reference | each method's labels, every cluster drawn in the
    colour of the class the dataset-level Hungarian matching gave it (unmatched clusters grey)."""
    if not 0 <= index < len(evalset.images):
        raise EvalError(f"--figure-image {index}: the set has {len(evalset.images)} images")
    n_cls = len(evalset.classes)
    if mask_colors:
        by_value = {v: rgb for rgb, v in load_colors(mask_colors)["classes"].values()}
        class_rgb = np.array([by_value.get(int(c), (128, 128, 128)) for c in evalset.classes], np.uint8)
    else:
        class_rgb = np.array([PALETTE[i % len(PALETTE)] for i in range(n_cls)], np.uint8)
    img = evalset.images[index]
    step = max(1, -(-img.shape[1] // max_width))
    ref = evalset.labels[index]
    col_of = {int(c): i for i, c in enumerate(evalset.classes)}
    ref_rgb = np.full(ref.shape + (3,), 255, np.uint8)
    for c, i in col_of.items():
        ref_rgb[ref == c] = class_rgb[i]
    panels = [img, ref_rgb]
    for r in results:
        lab = r["labels"][index]
        out = np.full(lab.shape + (3,), 160, np.uint8)
        for cluster, cls in r["dataset"]["mapping"].items():
            out[lab == int(cluster)] = class_rgb[int(cls)]
        out[lab == OUTPUT_NODATA] = 255
        panels.append(out)
    panels = [p[::step, ::step] for p in panels]
    gap = np.full((panels[0].shape[0], 6, 3), 255, np.uint8)
    row = np.concatenate([x for p in panels for x in (p, gap)][:-1], axis=1)
    write_png(row, Path(path))


def _model_features(args, tmp: Path, log):
    """(method name, features, provenance) of the model under test."""
    if args.checkpoint:
        try:
            student, cfg, ckpt = load_checkpoint_student(args.checkpoint)
            out = export_artifact(student, cfg, tmp / "artifact",
                                  {"score": ckpt.get("score"), "step": ckpt.get("step")})
        except (ExportError, CheckpointError) as exc:
            raise EvalError(str(exc)) from exc
        log(f"exported {args.checkpoint} to a temporary artifact")
        return f"student ({Path(args.checkpoint).name})", load_features(out, args.backend, args.threads), \
            {"checkpoint": str(args.checkpoint)}
    features = load_features(args.model, args.backend, args.threads)
    return "student (" + Path(features.name).name + ")", features, {"artifact": features.name}


def run(args, log=None) -> dict:
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if args.synthetic:
        evalset = synthetic_set(args.seed, args.samples, args.size)
    elif args.data_source == "shards":
        if not args.processed_root or not args.dataset_id:
            raise EvalError("--data-source shards needs --processed-root and --dataset-id")
        evalset = shard_set(args.processed_root, args.dataset_id, args.split)
    elif args.images or args.masks:
        if not (args.images and args.masks):
            raise EvalError("--images and --masks go together")
        evalset = folder_set(args.images, args.masks, args.mask_colors, args.ignore_leq,
                             mask_classes=args.mask_classes)
    else:
        raise EvalError("choose an evaluation set: --synthetic, --data-source shards ..., or --images/--masks")
    n_classes = len(evalset.classes)
    k = args.k or n_classes
    k_over = None if args.no_overcluster else (args.k_over or 2 * n_classes)
    with tempfile.TemporaryDirectory(prefix="mapseg-eval-") as tmp:
        methods = []
        if args.model != "kmeans":
            name, feats, prov = _model_features(args, Path(tmp), log)
            methods.append((name, feats))
        else:
            prov = {}
        methods.append(("colour k-means", load_features("kmeans")))
        if args.teacher:
            methods.append((f"k-means on {args.teacher} features", TeacherKMeansFeatures(
                args.teacher, args.teacher_weights or "", args.teacher_patch_mode)))
        results = []
        for name, feats in methods:
            results.append(evaluate_method(name, feats, evalset, k, k_over, args.seed, args.smooth,
                                           views=not args.no_views, log=log, upsample=args.upsample))
    if args.figure:
        write_figure(args.figure, evalset, results, args.figure_image, args.mask_colors)
        log(f"wrote {args.figure}")
    for r in results:
        r.pop("labels")
    table = format_table(evalset, results)
    return {"evaluation_set": {"name": evalset.name, "images": len(evalset.images),
                               "megapixels": evalset.megapixels, "classes": evalset.class_names,
                               "ignore_leq": evalset.ignore_leq},
            "k": k, "seed": args.seed, "smooth": args.smooth, "upsample": args.upsample, "model": prov,
            "results": results, "table": table}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("evaluation set (one of)")
    src.add_argument("--synthetic", action="store_true", help="the synthetic validation set of a run with --seed")
    src.add_argument("--data-source", choices=["shards"], help="labeled shards (with --processed-root, --dataset-id)")
    src.add_argument("--processed-root")
    src.add_argument("--dataset-id")
    src.add_argument("--split", default="val")
    src.add_argument("--images", nargs="+", metavar="DIR", help="folder(s) of images (paired with --masks by stem)")
    src.add_argument("--masks", nargs="+", metavar="DIR",
                     help="mask folder(s), one per --images folder: class values, or colours with --mask-colors")
    src.add_argument("--mask-colors", help="colour map JSON (e.g. training/datasets/colors/dubai_dev.json)")
    src.add_argument("--mask-classes", help="class map JSON for value masks: names and groups classes "
                                            "(e.g. training/datasets/classes/geonrw_5.json)")
    src.add_argument("--ignore-leq", type=int, default=0,
                     help="value masks: labels <= this are ignored (default 0; colour maps set their own)")
    src.add_argument("--samples", type=int, default=8, help="--synthetic: images (default 8, as in training)")
    src.add_argument("--size", type=int, default=256, help="--synthetic: image side (default 256)")
    m = p.add_argument_group("what to evaluate")
    m.add_argument("--model", default=None, help="artifact folder (default $MAPSEG_MODEL or model/best); "
                                                 "'kmeans' scores colour k-means alone")
    m.add_argument("--checkpoint", help="a training checkpoint (best.pt, student.pt, last.pt) instead of --model")
    m.add_argument("--teacher", help="also score k-means on this teacher's features (efficientnet_lite0, dinov2)")
    m.add_argument("--teacher-weights", default="")
    m.add_argument("--teacher-patch-mode", default="match")
    m.add_argument("-k", type=int, default=0, help="clusters (default: the number of classes)")
    m.add_argument("--k-over", type=int, default=0, help="over-clustering K (default 2 x classes)")
    m.add_argument("--no-overcluster", action="store_true")
    m.add_argument("--no-views", action="store_true", help="skip the two-view consistency pass")
    m.add_argument("--smooth", type=int, default=0, help="majority filter radius in cells, as mapseg --smooth")
    m.add_argument("--upsample", choices=UPSAMPLE_METHODS, default=None,
                   help="cell scores -> pixel labels, as mapseg --upsample (default: each model's own)")
    m.add_argument("--backend", default="auto", help="mapseg backend for the model (auto|numpy|onnx|torch)")
    m.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="sampling / k-means seed; --synthetic: the run's train.seed")
    p.add_argument("--out", help="write the full report as JSON here")
    p.add_argument("--figure", metavar="PNG", help="also draw one image: input | reference | each method (clusters in "
                                                   "their matched class's colour)")
    p.add_argument("--figure-image", type=int, default=0, help="which image --figure draws (index, default 0)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = run(args)
    except (EvalError, SegmentError, TeacherLoadError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report["table"])
    if args.out:
        write_text_atomic(args.out, json.dumps({k: v for k, v in report.items() if k != "table"}, indent=1) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
