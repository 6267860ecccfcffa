"""Segmentation quality against reference labels, and label-free proxy metrics.

The unsupervised protocol of the literature (STEGO and successors): accumulate
one confusion matrix (clusters x classes) over the whole evaluation set, match
clusters to classes once with the Hungarian algorithm, then report pixel
accuracy and mean IoU under that match. Variants: per-image matching (each
image matched on its own, scores averaged over images) and over-clustering
(K > classes; every cluster goes to its majority class).

IoU follows the dataset headers' ``validation_metrics``: target labels
``<= iou_ignore_label_leq`` are ignored, and the mean is
``macro_over_present_labels`` (classes with no reference pixel are left out).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

IOU_AVERAGES = ("macro_over_present_labels",)


def confusion_matrix(pred: np.ndarray, target: np.ndarray, n_pred: int, n_target: int,
                     ignore_leq: int | None = None) -> np.ndarray:
    """(n_pred, n_target) pixel counts; targets <= ``ignore_leq`` (or outside range) are ignored."""
    pred = np.asarray(pred).ravel().astype(np.int64)
    target = np.asarray(target).ravel().astype(np.int64)
    keep = (target >= 0) & (target < n_target) & (pred >= 0) & (pred < n_pred)
    if ignore_leq is not None:
        keep &= target > ignore_leq
    return np.bincount(pred[keep] * n_target + target[keep], minlength=n_pred * n_target).reshape(n_pred, n_target)


def class_ious(conf: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    """Per-class IoU (NaN for classes with no reference pixel) when cluster r is read as class mapping[r]."""
    conf = np.asarray(conf, dtype=np.float64)
    n_classes = conf.shape[1]
    merged = np.zeros((n_classes, n_classes))
    for r, c in mapping.items():
        merged[c] += conf[r]
    tp = np.diag(merged)
    gt = conf.sum(0)  # reference pixels count whether or not their cluster was matched
    pred = merged.sum(1)
    union = gt + pred - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        ious = np.where(gt > 0, tp / np.where(union > 0, union, 1), np.nan)
    return ious


def _scores(conf: np.ndarray, mapping: dict[int, int], class_names=None) -> dict:
    conf = np.asarray(conf, dtype=np.float64)
    total = conf.sum()
    correct = sum(conf[r, c] for r, c in mapping.items())
    ious = class_ious(conf, mapping)
    out = {
        "accuracy": float(correct / total) if total else float("nan"),
        "miou": float(np.nanmean(ious)) if np.isfinite(ious).any() else float("nan"),
        "per_class_iou": [None if np.isnan(v) else float(v) for v in ious],
        "mapping": {int(r): int(c) for r, c in mapping.items()},
        "pixels": int(total),
    }
    if class_names is not None:
        out["per_class_iou"] = dict(zip(class_names, out["per_class_iou"]))
    return out


def hungarian_scores(conf: np.ndarray, class_names=None) -> dict:
    """Accuracy and mIoU after a one-to-one cluster->class matching maximising matched pixels.

    Clusters left unmatched (K > classes) count as wrong; classes left unmatched (K < classes) get IoU 0.
    """
    rows, cols = linear_sum_assignment(np.asarray(conf, dtype=np.float64), maximize=True)
    return _scores(conf, dict(zip(rows.tolist(), cols.tolist())), class_names)


def overcluster_scores(conf: np.ndarray, class_names=None) -> dict:
    """Many-to-one: every cluster read as its majority class (for K > classes)."""
    conf = np.asarray(conf)
    mapping = {r: int(np.argmax(conf[r])) for r in range(conf.shape[0]) if conf[r].sum() > 0}
    return _scores(conf, mapping, class_names)


def per_image_scores(confs: list[np.ndarray]) -> dict:
    """Hungarian matching per image; accuracy and mIoU averaged over images (images with no labeled pixel skipped)."""
    accs, mious = [], []
    for conf in confs:
        if np.asarray(conf).sum() == 0:
            continue
        s = hungarian_scores(conf)
        accs.append(s["accuracy"])
        mious.append(s["miou"])
    return {"accuracy": float(np.mean(accs)) if accs else float("nan"),
            "miou": float(np.mean(mious)) if mious else float("nan"), "images": len(accs)}


def scored_classes(n_target: int, ignore_leq: int | None) -> np.ndarray:
    """Target values that are classes (not ignored)."""
    lo = -1 if ignore_leq is None else ignore_leq
    return np.arange(max(lo + 1, 0), n_target)


# --------------------------------------------------------------------------- proxies (no labels)

def cluster_utilisation(counts: np.ndarray) -> dict:
    """Usage of the K clusters: the share holding at least 1 % of the pixels, and the usage entropy / log K."""
    counts = np.asarray(counts, np.float64)
    k = counts.size
    p = counts / max(counts.sum(), 1.0)
    nz = p[p > 0]
    return {"used_fraction": float((p >= 0.01).sum() / k),
            "usage_entropy": float(-(nz * np.log(nz)).sum() / np.log(k)) if k > 1 else 0.0}


def speckle(labels: np.ndarray, k: int, min_area: int = 64, ignore: int | None = 255) -> dict:
    """Connected components (4-connected, per label): how many, and the fraction smaller than ``min_area`` px."""
    n_all, n_tiny = 0, 0
    for c in range(k):
        comp, n = ndimage.label(labels == c)
        if n == 0:
            continue
        sizes = np.bincount(comp.ravel())[1:]
        n_all += n
        n_tiny += int((sizes < min_area).sum())
    return {"components": n_all, "tiny_fraction": n_tiny / n_all if n_all else 0.0}


def boundary_density(labels: np.ndarray, ignore: int | None = 255) -> float:
    """Fraction of 4-neighbour pixel pairs (both valid) whose labels differ."""
    diff = pairs = 0
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1], labels[1:])):
        ok = np.ones(a.shape, bool) if ignore is None else (a != ignore) & (b != ignore)
        diff += int(((a != b) & ok).sum())
        pairs += int(ok.sum())
    return diff / pairs if pairs else 0.0


def agreement(a: np.ndarray, b: np.ndarray, ignore: int | None = 255) -> float:
    """Fraction of valid pixels where two label maps of the same scene agree."""
    ok = np.ones(a.shape, bool) if ignore is None else (a != ignore) & (b != ignore)
    return float((a[ok] == b[ok]).mean()) if ok.any() else float("nan")
