"""Segmentation quality against reference labels.

The unsupervised protocol: accumulate one confusion matrix (clusters x classes)
over the whole evaluation set, match clusters to classes once with the
Hungarian algorithm, then report pixel accuracy and mean IoU under that match.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def confusion_matrix(pred: np.ndarray, target: np.ndarray, n_pred: int, n_target: int,
                     ignore_leq: int | None = None) -> np.ndarray:
    """(n_pred, n_target) pixel counts; targets <= ``ignore_leq`` (or outside range) are ignored."""
    pred = np.asarray(pred).ravel().astype(np.int64)
    target = np.asarray(target).ravel().astype(np.int64)
    keep = (target >= 0) & (target < n_target) & (pred >= 0) & (pred < n_pred)
    if ignore_leq is not None:
        keep &= target > ignore_leq
    return np.bincount(pred[keep] * n_target + target[keep], minlength=n_pred * n_target).reshape(n_pred, n_target)


def hungarian_scores(conf: np.ndarray) -> dict:
    """Accuracy and mIoU after a one-to-one cluster->class matching maximising matched pixels."""
    conf = np.asarray(conf, dtype=np.float64)
    rows, cols = linear_sum_assignment(conf, maximize=True)
    total = conf.sum()
    matched = conf[rows, cols].sum()
    n_classes = conf.shape[1]
    mapping = {int(r): int(c) for r, c in zip(rows, cols)}
    ious = np.full(n_classes, np.nan)
    for c in range(n_classes):
        gt = conf[:, c].sum()
        clusters = [r for r, cc in mapping.items() if cc == c]
        tp = conf[clusters, c].sum() if clusters else 0.0
        pred = conf[clusters, :].sum() if clusters else 0.0
        union = gt + pred - tp
        if gt > 0:
            ious[c] = tp / union if union > 0 else 0.0
    return {
        "accuracy": float(matched / total) if total else float("nan"),
        "miou": float(np.nanmean(ious)) if np.isfinite(ious).any() else float("nan"),
        "per_class_iou": [None if np.isnan(v) else float(v) for v in ious],
        "mapping": mapping,
    }
