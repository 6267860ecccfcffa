"""The whole-raster pipeline: plan windows -> embed -> fit centres once -> assign -> write.

    from mapseg.segment import SegmentOptions, segment_raster, fit_raster_centers
    segment_raster("in.tif", "out.tif", SegmentOptions(k=6, model="model/best"))

Reference result (what every window reproduces exactly): the network run once
on the whole raster after (a) scaling to [0, 1], (b) replacing nodata pixels
by the fill colour (the artifact's input mean, i.e. 0 after normalisation) and
(c) padding at the bottom and right to a multiple of the stride (4) with the
same fill colour. Windows have cores on the stride grid and are read with a
halo of ``required_halo`` pixels (16 for the default student), clipped to the
padded raster; where a window is clipped, the network's own zero padding
falls exactly where the whole-raster pass has it, and elsewhere the halo
absorbs the difference (network.edge_contamination). The numpy backend's
products, and the assignment's, stay on the BLAS's general path
(network.matmul_rows; colours: elementwise arithmetic), so the kept
embeddings, and with them the labels, are bit-identical for any ``tile``.

Cluster centres are fitted once per run on features sampled from the whole
raster (``sample_window_order``: fixed 256-pixel windows drawn with a seeded RNG,
independent of ``tile``; nodata cells excluded), or loaded from a centres
file written by ``mapseg fit``. Every window is then assigned against them.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

from .artifact import ARTIFACT_FILES, resolution_text
from .backends import INT8_MODEL, INT8_SIDECAR
from .centres import centres_scaling, check_centers, load_centers, record_scaling
from .cluster import (SAMPLE_COLOURS, SAMPLE_FEATURES, Centers, ClusterError, assign_labels, cell_scores, check_k,
                      fit_centers)
from .errors import SegmentCancelled, SegmentError  # noqa: F401 - SegmentCancelled: re-exported for callers
from .features import FeatureModel, default_model_path, load_features
from .fileio import check_outputs
from .legend import Legend, load_legend, run_legend, sidecar_paths, write_class_files
from .parallel import ordered_map
from .progress import Progress, SampleProgress, tell
from .raster import OUTPUT_NODATA, RasterView, Region, ground_resolution, io_env, open_reader, open_writer
from .raster.polygons import mask_files
from .scaling import SampledRange, Scaling, check_one_scaling, input_range, make_scaling
from .upsample import NEAREST, Upsample, guided_labels, resolve
from .windows import DEFAULT_TILE, Window, plan_windows, sample_window_order

MIN_SAMPLE_CELLS = 1000      # keep drawing windows until this many valid cells (or none left)
MIN_RAW_VALUES = 10_000      # ... and this many valid pixels for a range or a stretch


# --------------------------------------------------------------------------- options

@dataclass(frozen=True)
class SegmentOptions:
    """The settings of a run (``mapseg segment`` / ``mapseg fit`` flags), one object for every caller.

    ``model`` is the one way to name the feature model: an artifact folder, ``"kmeans"``, ``None``
    (the default model, see ``default_model_path``), or a ``FeatureModel`` already loaded (reused
    across runs). ``backend``, ``threads`` and ``workers`` say how a folder is loaded.
    """
    k: int | None = None                   # clusters (2..max_k); not needed with ``centers``
    centers: str | os.PathLike | Centers | None = None  # apply these (``mapseg fit``) instead of fitting
    model: str | os.PathLike | FeatureModel | None = None
    backend: str = "auto"                  # auto | numpy | onnx | torch
    threads: int | None = None             # threads per window (default: see mapseg.parallel)
    workers: int | None = None             # windows in flight (default: see mapseg.parallel)
    tile: int = DEFAULT_TILE               # window core side: memory, not labels
    bands: tuple[int, ...] | None = None   # three 1-based bands as R, G, B
    nodata: float | None = None            # input nodata (default: the raster's own)
    stretch: tuple[float, float] | None = None  # percentile stretch into [0, 1] (default: x / input_max)
    input_max: float | None = None         # raw value of full brightness (default: what the file says, see scaling)
    smooth: int = 0                        # majority filter radius in label cells
    upsample: str | Upsample | None = None  # nearest | guided: cell scores -> pixel labels (default: the model's)
    seed: int = 0                          # sampling and k-means
    cog: bool = False                      # write a Cloud Optimized GeoTIFF
    extent: tuple[float, float, float, float] | None = None  # xmin, ymin, xmax, ymax: the area to segment
    extent_crs: str | None = None          # the CRS ``extent`` is in (default: the raster's)
    mask: str | os.PathLike | None = None  # vector file of polygons: pixels outside them are nodata
    resolution: float | None = None        # metres per output pixel: resample on read (mapseg.raster.view)
    legend: str | os.PathLike | Legend | None = None  # class names and colours (legend.json); default: the
    #                                        centres file's legend, else "segment 0..K-1" (mapseg.legend.run_legend)

    def region(self) -> Region:
        """``extent``, ``extent_crs``, ``mask`` and ``resolution`` as a ``mapseg.raster.Region`` (checked)."""
        return Region(self.extent, self.extent_crs, None if self.mask is None else str(self.mask), self.resolution)

    def feature_model(self) -> FeatureModel:
        """``model`` loaded (``load_features``), or ``model`` itself when it is loaded already."""
        if self.model is None or isinstance(self.model, (str, os.PathLike)):
            return load_features(self.model, self.backend, self.threads, self.workers)
        if (self.backend, self.threads, self.workers) != ("auto", None, None):
            raise SegmentError("backend, threads and workers say how a model folder is loaded; "
                               f"{self.model.name} is loaded already")
        return self.model

    def upsampling(self, features: FeatureModel) -> Upsample:
        """``upsample`` for ``features``: the method asked, else the model's own (``meta.json["upsample"]``;
        nearest for colour k-means, which labels pixels already, and for artifacts that do not say)."""
        return run_upsample(features, self.upsample)


# --------------------------------------------------------------------------- reading a window

def read_window(reader, win: Window, scaling: Scaling, fill: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(image (rh, rw, 3) float32 in [0, 1], valid (rh, rw): the pixels to label, seen (rh, rw): the pixels that
    hold data, valid pixels of the core clipped to full brightness: above the scaling's ``input_max``) of a window's
    read region. ``seen`` is ``valid`` but where a ``--mask`` hides pixels: the network and the guided upsampling
    still see them, so labels inside a mask are those of the same area without it.

    Rows/cols past the raster (stride padding) and nodata pixels hold ``fill``.
    """
    rh, rw = win.read.shape
    inside = win.read.in_raster(reader.height, reader.width)
    dh, dw = inside.shape
    image = np.empty((rh, rw, 3), np.float32)
    valid = np.zeros((rh, rw), bool)
    data, ok = reader.read(*inside.bounds)
    scaling.apply(data, image[:dh, :dw])
    aoi = reader.inside(*inside.bounds)  # --mask: outside it nodata, but the network still sees the pixels
    kept = ok if aoi is None else ok & aoi
    valid[:dh, :dw] = kept
    seen = valid
    if aoi is not None:
        seen = np.zeros((rh, rw), bool)
        seen[:dh, :dw] = ok
    if dh < rh:
        image[dh:] = fill
    if dw < rw:
        image[:dh, dw:] = fill
    if not ok.all():
        image[:dh, :dw][~ok] = fill
    return image, valid, seen, scaling.clipped(data[win.core_in_read], kept[win.core_in_read])


# --------------------------------------------------------------------------- labels

def majority_filter(labels: np.ndarray, voters: np.ndarray, k: int, radius: int) -> np.ndarray:
    """Each cell takes the most frequent label among the voting cells of its (2r+1)^2 box.

    Ties keep the cell's own label if it is among the most frequent, else the
    lowest. Cells outside the array do not vote. Integer counts: exact, so the
    result does not depend on where the array was cut.
    """
    if radius <= 0:
        return labels
    h, w = labels.shape
    best = np.full((h, w), -1, np.int32)
    out = labels.copy()
    for j in range(k):
        votes = ((labels == j) & voters).astype(np.int32)
        c = np.zeros((h + 1, w + 1), np.int32)
        np.cumsum(np.cumsum(votes, 0), 1, out=c[1:, 1:])
        y0 = np.clip(np.arange(h) - radius, 0, h)
        y1 = np.clip(np.arange(h) + radius + 1, 0, h)
        x0 = np.clip(np.arange(w) - radius, 0, w)
        x1 = np.clip(np.arange(w) + radius + 1, 0, w)
        box = c[y1][:, x1] - c[y0][:, x1] - c[y1][:, x0] + c[y0][:, x0]
        score = 2 * box + (labels == j)
        better = score > best
        out[better] = j
        best = np.maximum(best, score)
    return out


def cell_any(mask: np.ndarray, s: int) -> np.ndarray:
    if s == 1:
        return mask
    h, w = mask.shape
    return mask.reshape(h // s, s, w // s, s).any(axis=(1, 3))


def cell_all(mask: np.ndarray, s: int) -> np.ndarray:
    if s == 1:
        return mask
    h, w = mask.shape
    return mask.reshape(h // s, s, w // s, s).all(axis=(1, 3))


def window_labels(features: FeatureModel, image: np.ndarray, valid: np.ndarray, win: Window, scorer, k: int,
                  smooth: int, up: Upsample = NEAREST, seen: np.ndarray | None = None) -> np.ndarray:
    """uint8 labels (the core's shape) of a window's core, full resolution, 255 where not ``valid``. ``up``: how
    cell scores become pixel labels (mapseg.upsample; it weighs the pixels that are ``seen``, default ``valid``,
    see ``read_window``); the window's halo must hold ``window_halo``'s cells."""
    s = features.stride
    feats = features(image)
    data = valid if seen is None else seen  # what counts and votes: pixels that hold data (a --mask hides them)
    if up.method == "nearest" or s == 1:
        # Labels are needed on the core plus `smooth` cells around it (available: the halo covers them).
        kept = win.core.grown(smooth * s, win.read)
        # every cell of the window is assigned (a contiguous block: no copy of the kept part; a cell's label
        # does not depend on which cells share its product, see assign_labels), then the kept part is cut
        labels = assign_labels(feats, scorer)[kept.within(win.read, s)]
        if smooth:
            voters = cell_any(data[kept.within(win.read)], s)
            labels = majority_filter(labels, voters, k, smooth)
        core = labels[win.core.within(kept, s)]
        if s > 1:  # each cell's label over its s x s pixels, written once (also for a one-cell core)
            h, w = core.shape
            cells = core
            core = np.empty((h * s, w * s), np.uint8)
            core.reshape(h, s, w, s)[...] = cells[:, None, :, None]
        else:
            core = np.array(core)
    else:
        # pixel labels on the core plus `smooth` cells (the majority filter's reach), from scores on
        # `margin_cells` more around them (the guided filter's reach)
        drawn = win.core.grown(smooth * s, win.read)
        scored = drawn.grown(up.margin_cells * s, win.read)
        # every cell scored (a contiguous block, no copy of the embeddings), then the scored part cut
        scores = cell_scores(feats, scorer)[scored.within(win.read, s)]
        inside = scored.within(win.read)
        labels = guided_labels(scores, image[inside], data[inside], s, up, (scored.row0 // s, scored.col0 // s),
                               drawn.bounds)
        if smooth:  # the same reach in pixels: a box of (2 smooth s + 1)^2 pixels
            labels = majority_filter(labels, data[drawn.within(win.read)], k, smooth * s)
        core = np.array(labels[win.core.within(drawn)])
    core[~valid[win.core_in_read]] = OUTPUT_NODATA
    return core


def model_upsample(features: FeatureModel) -> Upsample:
    """The model's own upsampling (``meta.json["upsample"]``); nearest where there is no artifact."""
    artifact = getattr(features, "artifact", None)
    return NEAREST if artifact is None or features.stride == 1 else artifact.upsample


def run_upsample(features: FeatureModel, asked: str | Upsample | None) -> Upsample:
    """The upsampling a run uses: ``asked`` (a method name or an ``Upsample``) or the model's own; refused for
    colour k-means."""
    method = asked.method if isinstance(asked, Upsample) else asked
    if method is not None and method != "nearest" and features.stride == 1:
        raise SegmentError(f"--upsample {method}: {features.name} labels every pixel itself (no cells to upsample)")
    return resolve(asked, model_upsample(features))


def window_halo(features: FeatureModel, smooth: int, up: Upsample) -> int:
    """The halo in pixels a run's windows are read with: the network's, plus the cells the majority filter
    (``smooth``) and the upsampling (``up.margin_cells``) reach, so labels do not depend on the window."""
    margin = 0 if features.stride == 1 else up.margin_cells  # nearest: 0; colour k-means labels pixels
    return features.halo + (smooth + margin) * features.stride


def iter_labels(reader, features: FeatureModel, scaling: Scaling, scorer, k: int, wins: list[Window],
                smooth: int = 0, clipped: list | None = None, up: Upsample = NEAREST):
    """(window, uint8 labels of its core clipped to the raster) for every window, in order.

    ``features.plan`` (mapseg.parallel) says how many windows are in flight at once: each worker
    thread reads its window (one read at a time: a raster handle serves one read at a time; GDAL
    decodes without the GIL), embeds and assigns it, while the caller writes the previous ones.
    The labels are those of one window at a time, in the same order. Closing the generator (an
    error, a cancel) lets the windows in flight finish before it returns, so no thread touches
    ``reader`` after that. ``clipped`` (a list) is given each window's count of pixels clipped to full
    brightness (``read_window``).
    """
    def one(win: Window, image: np.ndarray, valid: np.ndarray, seen: np.ndarray):
        labels = window_labels(features, image, valid, win, scorer, k, smooth, up, seen)
        h, w = win.core.in_raster(reader.height, reader.width).shape
        return win, np.ascontiguousarray(labels[:h, :w])

    yield from map_windows(reader, features, scaling, wins, one, clipped)


def map_windows(reader, features: FeatureModel, scaling: Scaling, wins: list[Window], work,
                clipped: list | None = None):
    """``work(win, image, valid, seen)`` (``read_window``) of every window, in window order, as ``features.plan``
    says: each of its worker threads reads a window (one read at a time, under a lock, unless the reader serialises its
    file reads itself: ``locks_its_reads``, a resampling RasterView, whose resampling then runs in parallel),
    then works on it. Closing the generator lets the windows in flight finish first
    (mapseg.parallel.ordered_map). ``clipped``: a list given each window's count of pixels clipped to full
    brightness."""
    lock = contextlib.nullcontext() if reader.locks_its_reads else threading.Lock()

    def one(win: Window):
        with lock:
            image, valid, seen, above = read_window(reader, win, scaling, features.fill)
            if clipped is not None and above:
                clipped.append(above)
        return work(win, image, valid, seen)

    with features.plan.context():
        yield from ordered_map(one, wins, features.plan.workers)


def label_reader(reader, features: FeatureModel, scaling: Scaling, centers: Centers, tile: int = DEFAULT_TILE,
                 smooth: int = 0, up: Upsample | None = None) -> np.ndarray:
    """The whole (H, W) uint8 label map of a reader in memory (``segment_raster`` without the file):
    for evaluation and small images. 255 (OUTPUT_NODATA) where the input is nodata. ``up``: the upsampling
    (default: the model's own, ``model_upsample``)."""
    up = model_upsample(features) if up is None else up
    wins = plan_windows(reader.height, reader.width, tile, features.stride, window_halo(features, smooth, up))
    out = np.empty((reader.height, reader.width), np.uint8)
    windows = iter_labels(reader, features, scaling, centers.scorer(), centers.k, wins, smooth, up=up)
    try:
        for win, labels in windows:
            h, w = labels.shape
            out[win.core.row0:win.core.row0 + h, win.core.col0:win.core.col0 + w] = labels
    finally:
        windows.close()
    return out


# --------------------------------------------------------------------------- sampling and fitting

def _raw_sample(reader, wins: list[Window], n: int, progress=None, values: bool = False,
                max_values: int = 2_000_000) -> tuple[np.ndarray | None, SampledRange]:
    """(raw values (N, 3) of valid pixels, or None unless ``values``; their ``SampledRange``) from the cores of
    the first n sampling windows, and of further ones until MIN_RAW_VALUES pixels are in. The maximum is a
    running one over every window read (no value dropped, no float copy); the values (for --stretch
    percentiles) stay in the raster's dtype, a seeded subset of ``max_values`` where there are more."""
    chunks, found, count, top = [], 0, 0, 0.0
    if progress is not None:
        progress.start(n, len(wins))
    for i, win in enumerate(wins):
        if i >= n and found >= MIN_RAW_VALUES:
            break
        box = win.core.in_raster(reader.height, reader.width).bounds
        data, ok = reader.read(*box)
        aoi = reader.inside(*box)
        chunk = data[ok if aoi is None else ok & aoi]  # one window's valid pixels
        if chunk.size:
            top = max(top, float(chunk.max()))
        if values:
            chunks.append(chunk)
        found += chunk.shape[0]
        count += chunk.size
        if progress is not None:
            progress.window(chunk.shape[0])
    sample = None
    if values:
        sample = np.concatenate(chunks) if chunks else np.zeros((0, 3))
        if sample.shape[0] > max_values:
            sample = sample[np.random.default_rng(0).choice(sample.shape[0], max_values, replace=False)]
    return sample, SampledRange(top, count)


class Sample(NamedTuple):
    features: np.ndarray   # (N, D) float32
    colours: np.ndarray    # (N, 3) float32 mean RGB in [0, 1]
    windows: int           # sampling windows that gave cells
    partial: bool          # no cell was wholly valid: cells with some valid pixel were sampled


def collect_sample(reader, features: FeatureModel, scaling: Scaling, seed: int,
                   progress: SampleProgress | None = None) -> Sample:
    """Features and mean colours of valid cells of the sampling windows (``Sample``), in one pass.

    A window contributes at most ``keep`` cells (a subset drawn with the seed), which keeps the
    sample small however large the raster; k-means sees at most SAMPLE_FEATURES of them anyway.
    The first ``n`` windows are always taken, further ones only until MIN_SAMPLE_CELLS valid cells
    are in; windows run as ``features.plan`` says and are taken in order, so the sample is the same.
    A cell is valid when all its pixels are. Where no cell of the raster is (a raster narrower than a
    cell, nodata in every cell), the sample is the cells with any valid pixel, taken by the same rule
    from the same pass (``partial``: the caller says so); none is kept once enough are in or a wholly
    valid cell was met. ``progress`` hears of every window drawn (and may cancel the run).
    """
    wins, n = sample_window_order(reader.height, reader.width, features.stride, features.halo, seed)
    s = features.stride
    keep = -(-2 * (SAMPLE_COLOURS if features.dim <= 4 else SAMPLE_FEATURES) // n)
    partial_done = threading.Event()  # set (in window order, by the caller's loop) once partial cells are not wanted

    def one(win: Window, image: np.ndarray, valid: np.ndarray, seen: np.ndarray):
        core_valid = valid[win.core_in_read]
        core_ok, whole = cell_all(core_valid, s), True
        if not core_ok.any():
            if partial_done.is_set() or not core_valid.any():  # all nodata: nothing to sample, skip the network
                return None
            core_ok, whole = cell_any(core_valid, s), False
        f = features(image)
        core_img = image[win.core_in_read]
        h, w = core_ok.shape
        mean_rgb = core_img.reshape(h, s, w, s, 3).mean(axis=(1, 3)) if s > 1 else core_img
        f_ok, c_ok = f[win.core_cells(s)][core_ok], mean_rgb[core_ok]
        if f_ok.shape[0] > keep:  # bounded memory: a seeded subset per window (k-means sees <= 30000 anyway)
            rng = np.random.default_rng([seed, win.core.row0, win.core.col0])
            pick = np.sort(rng.choice(f_ok.shape[0], keep, replace=False))
            f_ok, c_ok = f_ok[pick], c_ok[pick]
        return whole, f_ok.astype(np.float32, copy=False), c_ok.astype(np.float32, copy=False), int(core_ok.sum())

    def windows():
        # the first n windows are always taken; further ones only while cells are missing, so they are not
        # started ahead of the caller's loop (running ahead past the n-th window computed one or two windows per
        # worker that were then dropped: a fifth of the sample's network time on 2 workers)
        yield from map_windows(reader, features, scaling, wins[:n], one)
        yield from map_windows(reader, features, scaling, wins[n:], one)

    taken = {True: ([], [], [0]), False: ([], [], [0])}  # whole / partial cells: features, colours, [cells]
    if progress is not None:
        progress.start(n, len(wins))
    results = windows()
    try:
        for i, got in enumerate(results):
            found = 0
            if got is not None and (got[0] or not partial_done.is_set()):
                feats, colours, cells = taken[got[0]]
                feats.append(got[1])
                colours.append(got[2])
                cells[0] += got[3]
                # the bar counts partial cells until a whole one is found
                found = got[3] if got[0] or not taken[True][2][0] else 0
            if progress is not None:
                progress.window(found)
            whole_cells, partial_cells = taken[True][2][0], taken[False][2][0]
            if i + 1 >= n and (whole_cells or partial_cells >= MIN_SAMPLE_CELLS):
                partial_done.set()  # a wholly valid cell, or enough partial ones (the partial sample is complete)
            if i + 1 >= n and whole_cells >= MIN_SAMPLE_CELLS:
                break
    finally:
        results.close()
    for whole in (True, False):
        feats, colours, cells = taken[whole]
        if cells[0]:
            return Sample(np.concatenate(feats), np.concatenate(colours), len(feats), not whole)
    raise SegmentError(f"{reader.path} has no valid pixels (every pixel is nodata): nothing to segment")


def scaling_for(reader, features: FeatureModel, stretch, seed: int, input_max: float | None = None,
                progress: SampleProgress | None = None, how: str = "input maximum given") -> Scaling:
    """The run's scaling into [0, 1]: ``--stretch`` (percentiles of a sample), ``input_max`` (given; ``how``
    says by whom), or the range the raster states or a sample shows (``mapseg.scaling.input_range``; the
    description says which). Both ``stretch`` and ``input_max`` is an error, before any sampling."""
    check_one_scaling(stretch, input_max)

    def sample(values: bool):
        wins, n = sample_window_order(reader.height, reader.width, features.stride, features.halo, seed)
        try:
            return _raw_sample(reader, wins, n, progress, values)
        finally:
            if progress is not None:
                progress.close()

    if stretch is not None:
        return make_scaling(reader.info.dtype, stretch, sample(True)[0])
    if input_max is not None:
        return make_scaling(reader.info.dtype, None, None, input_max, f"{reader.info.dtype}; {how}")
    return make_scaling(reader.info.dtype, None, None, *input_range(reader.info, lambda: sample(False)[1]))


def sample_log(log, path, sample: Sample) -> None:
    """Log what a raster's sample holds (and that its cells are partly nodata, where they are)."""
    log(f"sampled {sample.features.shape[0]} cells from {sample.windows} windows of {path}")
    if sample.partial:
        log(f"centres fitted on cells that are partly nodata: no cell of {path} is wholly valid (the raster is "
            "narrower than a cell, or every cell holds nodata), so cells with any valid pixel were sampled")


def sample_reader(reader, features: FeatureModel, scaling: Scaling, seed: int, *, log=None,
                  progress: SampleProgress | None = None, area: dict | None = None, path=None) -> tuple[Sample, dict]:
    """(the ``Sample`` of an open reader scaled by ``scaling``, its entry of the centres' sample: ``path`` (default:
    the reader's), cells, windows, partial cells, scaling, input maximum, dtype and ``area``, the region where one
    was asked for). ``log`` hears what the sample holds; ``progress`` of every window drawn (closed here)."""
    path = reader.path if path is None else path
    try:
        sample = collect_sample(reader, features, scaling, seed, progress)
    finally:
        if progress is not None:
            progress.close()
    if log is not None:
        sample_log(log, path, sample)
    return sample, {"path": str(path), "cells": int(sample.features.shape[0]), "windows": sample.windows,
                    "partial_cells": sample.partial, "scaling": scaling.description,
                    "input_max": scaling.input_max, "dtype": reader.info.dtype, **({"region": area} if area else {})}


def sample_raster(source, features: FeatureModel, options: SegmentOptions, *, log=None, progress: bool = False,
                  said: set | None = None) -> tuple[Sample, dict]:
    """What ``mapseg fit`` draws from one raster: (``Sample``, its entry of the centres' sample, see
    ``sample_reader``). ``source``: a path (opened here with ``options``' bands, nodata and region) or an open
    reader. Logs the region, the ground resolution (a warning where it is far from the model's) and the scaling
    (``options.stretch`` / ``input_max``, else what the raster says); ``progress``: bars on stderr; ``said``: the
    notes said once per run (``check_resolution``)."""
    log = log or (lambda msg: None)
    if isinstance(source, (str, os.PathLike)):
        with io_env(), open_reader(source, options.bands, options.nodata, options.region()) as reader:
            return _sample_open_raster(reader, source, features, options, log, progress, said)
    return _sample_open_raster(source, source.path, features, options, log, progress, said)


def _sample_open_raster(reader, path, features: FeatureModel, options: SegmentOptions, log, progress: bool,
                        said: set | None) -> tuple[Sample, dict]:
    area = region_log(reader, log)
    check_resolution(features, reader, log, set() if said is None else said)
    scaling = scaling_for(reader, features, options.stretch, options.seed, options.input_max,
                          SampleProgress("range", "pixels", MIN_RAW_VALUES, progress))
    log(f"scaling of {path}: {scaling.description}")
    return sample_reader(reader, features, scaling, options.seed, log=log, area=area, path=path,
                         progress=SampleProgress("sample", "cells", MIN_SAMPLE_CELLS, progress))


def region_log(reader, log) -> dict | None:
    """Log what ``--extent``/``--mask``/``--resolution`` made of a raster (a ``RasterView``); its entry of the run
    report (None for a raster read as it is)."""
    if not isinstance(reader, RasterView):
        return None
    for note in reader.notes:
        log(note)
    d = reader.describe()
    r0, r1, c0, c1 = (d["source_window"][k] for k in ("row0", "row1", "col0", "col1"))
    log(f"area of {reader.path}: {d['width']} x {d['height']} pixels of {d['pixel_size'][0]:.6g} x "
        f"{d['pixel_size'][1]:.6g} ({d['crs']}), bounds {','.join(f'{v:.10g}' for v in d['bounds'])}, from source "
        f"rows {r0}-{r1}, columns {c0}-{c1}; resampling: {d['resampling']}"
        + (f"; pixels outside the {d['mask_polygons']} polygon(s) of {d['mask']} are nodata" if d["mask"] else ""))
    return d


def check_resolution(features: FeatureModel, reader, log, said: set) -> float | None:
    """Log the ground resolution of a reader's grid (the input's, or the one --resolution asked for) and warn
    when it is more than 2x from the one the model was trained at (``meta.json["resolution"]``); a model whose
    resolution is unknown is said once per run (``said``). Returns metres per pixel, or None when unknown."""
    m, text = ground_resolution(reader)
    log(text)
    artifact = getattr(features, "artifact", None)
    if artifact is None:  # colour k-means: no training resolution to compare with
        return m
    trained = artifact.resolution
    if trained is None:
        if "unknown" not in said:
            said.add("unknown")
            log(f"the model's training resolution is {resolution_text(artifact.meta.get('resolution'))}: whether "
                "the input's suits it cannot be checked")
        return m
    lo, hi = trained.get("range_m_per_px") or (trained["m_per_px"], trained["m_per_px"])
    if m is None:
        log(f"the model was trained at {resolution_text(trained)}; the input's cannot be compared with it")
    elif m < lo / 2 or m > 2 * hi:
        best = trained["m_per_px"] or math.sqrt(lo * hi)
        log(f"warning: {reader.path} is at {m:.3g} m/px, more than 2x from the {resolution_text(trained)} the model "
            f"was trained at: labels may be poor; --resolution {best:.3g} resamples it on read")
    return m


def fit_raster_centers(inputs: list[str | os.PathLike], options: SegmentOptions, *, log=None, progress: bool = False,
                       output=None) -> Centers:
    """Fit ``options.k`` centres on a sample drawn from all ``inputs`` (``mapseg fit``). ``output``: the
    centres file the caller writes, checked once before any work (``check_run_outputs``, against every
    input and every file they read). The centres record each raster's scaling, and the one input maximum
    they share (``mapseg.centres.record_scaling``) for ``segment --centers``."""
    log = log or (lambda msg: None)
    if options.k is None:
        raise SegmentError("give -k K (number of clusters) to fit")
    features = options.feature_model()
    log(f"model: {features.name}; {features.backend_message}")
    k = check_k(options.k, features.max_k)
    seed, bands = options.seed, options.bands
    check_one_scaling(options.stretch, options.input_max)
    region, said = options.region(), set()
    all_f, all_c, info = [], [], []
    with io_env():
        if output is not None:  # each input opened (its header read) for the files it reads; checked once
            rasters = []
            for path in inputs:
                with open_reader(path, bands, options.nodata, region) as reader:
                    rasters.append((path, reader.info))
            check_run_outputs({"-o": output}, rasters, options, log)
        for path in inputs:  # opened again, one at a time: thousands of tiles do not hold thousands of handles
            sample, raster = sample_raster(path, features, options, log=log, progress=progress, said=said)
            all_f.append(sample.features)
            all_c.append(sample.colours)
            info.append(raster)
    return fit_samples(all_f, all_c, k, features, seed, {"rasters": info, "bands": list(bands) if bands else None,
                                                         **record_scaling(info, log)})


def fit_samples(all_f: list, all_c: list, k: int, features: FeatureModel, seed: int, info: dict,
                where="the rasters", sampled: int | None = None) -> Centers:
    """K centres on the samples' features and colours (lists of arrays, in input order), as ``mapseg fit`` fits
    them (``mapseg.cluster.fit_centers``); ``info``: the centres' sample record. ``sampled``: the size of the
    whole sample where the arrays hold only the rows k-means draws from it (``mapseg.cluster.kmeans_rows``,
    drawn already: ``mapseg.batch``), recorded as the sample's size."""
    # one raster's sample as it is (a copy of it is as large as the sample)
    feats, cols = ((np.asarray(all_f[0]), np.asarray(all_c[0])) if len(all_f) == 1
                   else (np.concatenate(all_f), np.concatenate(all_c)))
    n = feats.shape[0] if sampled is None else sampled
    if n < k:  # a raster of a few pixels
        unit = "pixel" if features.stride == 1 else "cell"
        size = "" if features.stride == 1 else f" of {features.stride} x {features.stride} pixels"
        raise SegmentError(f"{where} has a single {unit}{size} to cluster, fewer than K={k}: a raster this small "
                           "cannot be segmented" if n == 1 else
                           f"{where} has only {n} {unit}s{size} to cluster, fewer than K={k}: choose K <= {n}")
    try:
        return fit_centers(feats, cols, k, features.metric, features.kind, features.model_id, seed,
                           {**info, "features": int(n), "seed": seed})
    except ClusterError as exc:
        raise SegmentError(str(exc)) from exc


def fit_reader_centers(readers, k: int, features: FeatureModel, seed: int = 0, stretch=None) -> Centers:
    """Fit K centres on a sample drawn from every reader (``mapseg fit`` over open readers, e.g. ArrayReader)."""
    k = check_k(k, features.max_k)
    all_f, all_c, info = [], [], []
    for reader in readers:
        sample = collect_sample(reader, features, scaling_for(reader, features, stretch, seed), seed)
        all_f.append(sample.features)
        all_c.append(sample.colours)
        info.append({"path": str(reader.path), "cells": int(sample.features.shape[0]), "windows": sample.windows,
                     "partial_cells": sample.partial})
    return fit_samples(all_f, all_c, k, features, seed, {"rasters": info})


# --------------------------------------------------------------------------- outputs

OUTPUT_BYTES_PER_PIXEL = 0.02  # labels after DEFLATE: a rough low estimate of the output's size, for the space check


def check_run_outputs(outputs: dict, rasters: list, options: SegmentOptions, log=None) -> None:
    """Before any work, once for a run: no output may be an input raster (or a file it reads: a VRT's sources,
    sidecars), the centres file, a file of the model, or another output; their folders must exist and take
    them (the label raster's rough size included). Leftovers of killed runs beside them are removed (and
    logged). ``rasters``: (path, its reader's ``info``) of every input raster."""
    inputs = []
    for path, info in rasters:
        inputs += [("the input raster", path)] + [(f"a file the input raster {path} reads", f) for f in info.files]
    if isinstance(options.centers, (str, os.PathLike)):
        inputs.append(("the centres file", options.centers))
    if options.mask is not None:
        inputs += [("the --mask file", f) for f in mask_files(options.mask)]
    if options.model is None or (isinstance(options.model, (str, os.PathLike)) and str(options.model) != "kmeans"):
        folder = options.model or default_model_path()
        inputs += [(f"{name} of the model {folder}", os.path.join(folder, name))
                   for name in ARTIFACT_FILES + (INT8_MODEL, INT8_SIDECAR)]
    if isinstance(options.legend, (str, os.PathLike)):
        inputs.append(("the legend file", options.legend))
    need = {}
    if "output" in outputs:
        pixels = sum(info.width * info.height for _, info in rasters)
        need["output"] = int(pixels * OUTPUT_BYTES_PER_PIXEL * (2 if options.cog else 1))
    removed = check_outputs(outputs, inputs, need)
    if removed and log is not None:
        log(f"removed {len(removed)} temporary file(s) that killed runs left: {', '.join(removed)}")


# --------------------------------------------------------------------------- segment

def label_tags(features: FeatureModel, k: int) -> dict:
    """The GeoTIFF tags of a label raster: K, the model's weights digest, the feature kind."""
    return {"MAPSEG_K": k, "MAPSEG_MODEL": features.model_id.get("weights_sha256", "kmeans"),
            "MAPSEG_FEATURES": features.kind, "MAPSEG_TILE_INVARIANT_REFERENCE": "whole-raster pass"}


def shift_transform(transform, row0: int, col0: int):
    """A raster's transform moved to the pixel (row0, col0): an Affine (rasterio) or a GDAL 6-tuple (osgeo)."""
    g = transform.to_gdal() if hasattr(transform, "to_gdal") else tuple(transform)
    moved = (g[0] + col0 * g[1] + row0 * g[2], g[1], g[2], g[3] + col0 * g[4] + row0 * g[5], g[4], g[5])
    return type(transform).from_gdal(*moved) if hasattr(transform, "to_gdal") else moved


def write_windows(reader, output_path, features: FeatureModel, scaling: Scaling, centers: Centers,
                  wins: list[Window], *, smooth: int = 0, cog: bool = False, box=None, tags: dict | None = None,
                  progress: bool = False, callback=None, span=(0.0, 1.0), cmap: dict | None = None,
                  up: Upsample = NEAREST, counts: np.ndarray | None = None) -> tuple[str, int, dict]:
    """Write the labels of the windows ``wins`` (planned for the whole raster, ``plan_windows``) of an open
    reader to the label GeoTIFF ``output_path``: the whole raster, or the pixel box ``box`` = (row0, row1, col0,
    col1) of it (a GeoTIFF of that box, georeferenced there; ``wins`` are then those whose cores lie in it).
    ``tags`` are added to ``label_tags``; ``cmap`` (value -> (r, g, b, a), ``Legend.colormap``): the colour
    table (default: mapseg's palette). Written to a temporary name, renamed when complete; on an error or a
    cancel nothing is left. ``up``: the upsampling (the windows' halo must hold its cells: ``window_halo``).
    ``progress``: a bar on stderr; ``callback(fraction, "segment")`` after each window,
    the fraction running over ``span``. ``counts``: an int64 array of 256 to which the pixels written of each
    value are added (the attribute table's counts, without reading the output back). Returns (the output's
    path, pixels clipped to full brightness, {"windows_s", "finish_s"})."""
    info, r0, c0 = reader.info, 0, 0
    if box is not None:
        r0, r1, c0, c1 = box
        info = replace(info, width=c1 - c0, height=r1 - r0, transform=shift_transform(info.transform, r0, c0),
                       gcps=tuple((r - r0, c - c0, x, y, z) for r, c, x, y, z in info.gcps))
    writer, clipped = None, []
    try:
        writer = open_writer(output_path, info, centers.k, OUTPUT_NODATA if info.has_nodata else None, cog,
                             {**label_tags(features, centers.k), **(tags or {})}, cmap)
        bar = Progress(len(wins), "segment", progress)
        t0 = time.perf_counter()
        windows = iter_labels(reader, features, scaling, centers.scorer(), centers.k, wins, smooth, clipped, up)
        try:
            for i, (win, labels) in enumerate(windows):
                writer.write(labels, win.core.row0 - r0, win.core.col0 - c0)
                if counts is not None:
                    counts += np.bincount(labels.ravel(), minlength=256)
                bar.update(1, labels.size)
                if callback is not None:
                    tell(callback, span[0] + (span[1] - span[0]) * (i + 1) / len(wins), "segment")
        finally:
            windows.close()  # the windows in flight finish before the reader is closed
            bar.close()
        t1 = time.perf_counter()
        out = writer.commit()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return out, sum(clipped), {"windows_s": t1 - t0, "finish_s": time.perf_counter() - t1}



def segment_raster(input_path, output_path, options: SegmentOptions | None = None, *, progress: bool = True,
                   log=None, callback=None, other_outputs: dict | None = None) -> dict:
    """Segment one raster into a uint8 label GeoTIFF as ``options`` say; returns a report (timings, centres,
    backend). ``progress``: a progress bar on stderr; ``log(message)``: the run's messages (default: stderr).

    ``callback(fraction, stage)``, if given, is called as the run advances (``stage`` is ``"fit"`` or
    ``"segment"``, ``fraction`` of the whole run in [0, 1]); returning False cancels the run:
    ``SegmentCancelled`` is raised and no output file is left behind (QGIS, GUIs).

    Beside the labels ``OUT.tif`` go ``OUT.qml`` (QGIS style) and ``OUT.tif.aux.xml`` (attribute table) with
    the run's class names and colours (``options.legend``, else the centres file's legend, else
    ``segment 0..K-1``; ``mapseg.legend.run_legend``); the GeoTIFF's colour table has the same colours.

    Before any work the legend is read and checked against K, and the output, its two sidecars and
    ``other_outputs`` (what -> path: files the caller writes after the run, such as the CLI's --report and
    --preview) are checked (``check_run_outputs``): none may be an input, and their folders must take them.
    """
    o = options or SegmentOptions()
    k, centers, smooth, seed = o.k, o.centers, o.smooth, o.seed
    log = log or (lambda msg: print(msg, file=sys.stderr))
    t_start = time.perf_counter()
    if smooth < 0:
        raise SegmentError(f"--smooth {smooth}: must be >= 0")
    legend = load_legend(o.legend)  # read (and refused) before the model is loaded
    where = f"legend {o.legend}" if isinstance(o.legend, (str, os.PathLike)) else "the legend"
    if legend is not None and centers is None and k is not None:
        legend.check_k(k, where)
    features = o.feature_model()
    log(f"model: {features.name}; {features.backend_message}")
    if centers is None and k is None:
        raise SegmentError("give -k K (number of clusters) or --centers FILE")
    if centers is None:
        k = check_k(k, features.max_k)
    up = o.upsampling(features)
    log(f"upsampling: {up.describe()}")
    halo = window_halo(features, smooth, up)
    timings = {}
    with io_env(), open_reader(input_path, o.bands, o.nodata, o.region()) as reader:
        check_run_outputs({"output": output_path, **sidecar_paths(output_path), **(other_outputs or {})},
                          [(input_path, reader.info)], o, log)
        area = region_log(reader, log)
        m_per_px = check_resolution(features, reader, log, set())
        t0 = time.perf_counter()
        top, how, partial = o.input_max, "input maximum given", False
        if centers is not None:
            fitted = check_centers(load_centers(centers), features, k, centers)
            k = fitted.k
            log(f"centres: {k} from {centers if not isinstance(centers, Centers) else 'the caller'}")
            classes = run_legend(k, legend, fitted.legend, where)  # before any work: a legend K does not take
            top, how, note = centres_scaling(fitted, reader.info, centers, o.input_max, o.stretch)
            if note:
                log(note)
        scaling = scaling_for(reader, features, o.stretch, seed, top,
                              SampleProgress("range", "pixels", MIN_RAW_VALUES, progress, callback, (0.0, 0.03)), how)
        log(f"scaling: {scaling.description}")
        if centers is None:
            log(f"fitting K={k} centres on a sample of {input_path} ...")
            sample, raster = sample_reader(reader, features, scaling, seed, log=log, area=area, path=input_path,
                                           progress=SampleProgress("sample", "cells", MIN_SAMPLE_CELLS, progress,
                                                                   callback, (0.03, 0.1)))
            partial = sample.partial
            fitted = fit_samples([sample.features], [sample.colours], k, features, seed,
                                 {"rasters": [raster], **record_scaling([raster], log)}, input_path)
            log(f"centres: K={k} from {sample.features.shape[0]} sampled cells of {sample.windows} sampling windows")
        timings["fit_s"] = time.perf_counter() - t0
        if centers is None:
            classes = run_legend(k, legend, None, where)
        wins = plan_windows(reader.height, reader.width, o.tile, features.stride, halo)
        counts = np.zeros(256, np.int64)
        out, n_clipped, written = write_windows(reader, output_path, features, scaling, fitted, wins, smooth=smooth,
                                                cog=o.cog, progress=progress, callback=callback, span=(0.1, 1.0),
                                                cmap=classes.colormap(), up=up, counts=counts)
        timings.update(written)
        info = reader.info
    t1 = time.perf_counter()
    sidecars = write_class_files(out, classes, {v: int(counts[v]) for v in classes.values})
    timings["classes_s"] = time.perf_counter() - t1
    log(f"wrote {', '.join(os.path.basename(f) for f in sidecars)} (class names, colours)")
    if n_clipped:
        log(f"{n_clipped:,} pixels ({100 * n_clipped / (info.width * info.height):.3g} %) are brighter than the "
            f"input maximum {scaling.input_max:g} and were clipped to full brightness; --input-max N or --bits N "
            "to scale by a wider range")
    total = time.perf_counter() - t_start
    mp = info.width * info.height / 1e6
    report = {
        "input": str(input_path), "output": str(out), "k": k, "model": features.name, "io": reader.library,
        "features": features.kind, "backend": features.backend_name,
        "workers": features.plan.workers, "threads_per_worker": features.plan.threads,
        "batch": getattr(features.plan, "batch", None),  # windows per network call on a batched backend (cuda)
        "tile": o.tile, "halo": halo, "upsample": up.to_json(), "windows": len(wins), "width": info.width, "height": info.height,
        "megapixels": mp, "seconds": total, "megapixels_per_s": mp / total if total > 0 else float("inf"),
        "timings": timings, "scaling": scaling.description, "input_max": scaling.input_max,
        "clipped_pixels": n_clipped, "partial_cells": partial, "nodata": info.has_nodata,
        "region": area, "ground_resolution_m": m_per_px, "centers": fitted.to_json(),
        # the precision the network ran at (mapseg.backends: --precision, "onnx:int8"); None: no network
        "precision": getattr(getattr(features, "backend", None), "precision", None),
        "classes": [{"value": v, "name": classes.names[v]} for v in classes.values],
        "class_files": sidecars,
    }
    log(f"wrote {out}: {info.width} x {info.height}, K={k}, {len(wins)} windows, {total:.1f} s "
        f"({report['megapixels_per_s']:.2f} MP/s)")
    return report
