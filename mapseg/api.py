"""The Python API: rasters and arrays in, labels out, with the pipeline of ``mapseg segment`` / ``mapseg fit``.

    from mapseg import segment_raster, segment_array, fit_centers, load_model

    segment_raster("scene.tif", "labels.tif", k=6)                  # path in, label GeoTIFF out
    model = load_model("model/best")                                 # loaded once, reused by every call
    centres = fit_centers(["a.tif", "b.tif", image], k=6, model=model)   # rasters and/or arrays
    labels = segment_array(image, centers=centres, model=model)      # (H, W) uint8, 255 at nodata

Settings are ``mapseg.segment.SegmentOptions`` fields, given as keyword arguments (``k=6``,
``centers=...``, ``model=...``, ``tile=1024``, ...) or as a ``SegmentOptions`` (``options=``), the keywords
replacing its fields; a name that is no field is an error listing them. ``segment_raster``, and
``fit_centers`` over raster paths alone, accept every field (a fit uses those ``mapseg fit`` uses). Arrays
(``segment_array``, ``fit_centers`` with an array among its inputs) take only ``ARRAY_SETTINGS`` (k, centers,
model, backend, threads, workers, tile, bands, nodata, stretch, input_max, smooth, upsample, seed): any other field
(``cog``, an extent, a mask, ...) concerns raster files and, set to other than its default, is refused rather
than ignored.

Arrays run the raster pipeline on an in-memory image (``mapseg.raster.ArrayReader`` and
``mapseg.segment.label_reader``): the same windows, sample, centres and assignment, so ``segment_array`` gives
the labels ``mapseg segment`` writes for the same pixels with the same centres. docs/api.md has examples.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Union

import numpy as np

from . import segment as _segment
from .centres import centres_scaling, check_centers, load_centers, record_scaling
from .cluster import Centers, check_k
from .errors import SegmentError
from .features import FeatureModel, load_features
from .raster import ArrayReader, io_env, nodata_valid, open_reader
from .segment import SegmentOptions, fit_samples, label_reader, sample_reader, scaling_for

PathLike = Union[str, os.PathLike]
ImageInput = Union[PathLike, np.ndarray]

FLOAT_MAX = 1.0  # a float image is taken as [0, 1] (matplotlib's and scikit-image's convention) unless told otherwise


def options_with(options: SegmentOptions | None = None, **settings) -> SegmentOptions:
    """``options`` (default: ``SegmentOptions()``) with ``settings`` (SegmentOptions fields by name) replacing
    its fields; an unknown name is a SegmentError listing the valid ones."""
    known = {f.name for f in dataclasses.fields(SegmentOptions)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise SegmentError(f"unknown setting(s) {', '.join(unknown)}: the settings are {', '.join(sorted(known))}")
    if options is not None and not isinstance(options, SegmentOptions):
        raise SegmentError(f"options must be a mapseg.SegmentOptions, not {type(options).__name__}")
    return dataclasses.replace(options or SegmentOptions(), **settings)


def load_model(path: PathLike | None = None, backend: str = "auto", *, threads: int | None = None,
               workers: int | None = None) -> FeatureModel:
    """The feature model of an artifact folder (default: the shipped model, see ``default_model_path``), or
    colour k-means for ``"kmeans"``, loaded once: pass it as ``model=`` to every call that should reuse it
    (no reloading of weights or onnxruntime sessions). ``backend``: auto | numpy | onnx | torch, as ``mapseg
    segment --backend`` takes it (a precision rides on it as the CLI passes it: ``"onnx:int8"``); ``threads`` per
    window and ``workers`` (windows in flight) as ``mapseg segment`` takes them."""
    return load_features(path, backend, threads, workers)


def segment_raster(input_path: PathLike, output_path: PathLike, options: SegmentOptions | None = None, *,
                   progress: bool = True, log: Callable[[str], None] | None = None,
                   callback: Callable[[float, str], object] | None = None, other_outputs: dict | None = None,
                   **settings) -> dict:
    """Segment the raster ``input_path`` into the label GeoTIFF ``output_path`` (``mapseg segment``); returns the
    run report (timings, centres, backend, precision, scaling, class names). Settings: ``options`` and/or keywords
    (``k=6``, ``centers="centers.json"``, ``model=load_model()``, ``tile=1024``, ``legend="legend.json"``, ...;
    see ``SegmentOptions``). Beside the labels go ``OUT.qml`` and ``OUT.tif.aux.xml`` with the class names and
    colours (``legend``, else the centres file's legend, else ``segment 0..K-1``), as ``mapseg segment`` writes.

    ``progress``: a bar on stderr; ``log(message)``: the run's messages (default: stderr);
    ``callback(fraction, stage)``: called as the run advances (stage ``"fit"`` then ``"segment"``); returning
    False raises ``mapseg.errors.SegmentCancelled`` and leaves no output. ``other_outputs``: files the caller
    writes afterwards, checked with the output before any work (see ``mapseg.segment.segment_raster``)."""
    return _segment.segment_raster(input_path, output_path, options_with(options, **settings), progress=progress,
                                   log=log, callback=callback, other_outputs=other_outputs)


# --------------------------------------------------------------------------- arrays

def _array_reader(image, o: SegmentOptions, valid=None, name: str = "<array>") -> tuple[ArrayReader, float | None, str]:
    """(a reader over ``image``, the input maximum to scale by or None, how it is known) for an (H, W, C) array:
    ``o.bands`` picks three of C channels (1-based); nodata where every band equals ``o.nodata``, where
    ``valid`` (H, W) is False, and, for floats, where a band is NaN."""
    image = np.asarray(image)
    if image.ndim == 2 and o.bands is None:
        raise SegmentError(f"{name}: a single-band (H, W) image; give bands=(1, 1, 1) to segment it as grey")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3:
        raise SegmentError(f"{name}: expected an (H, W, 3) image, got shape {image.shape}")
    if o.bands is not None:
        bands = tuple(int(b) for b in o.bands)
        if len(bands) != 3 or not all(1 <= b <= image.shape[2] for b in bands):
            raise SegmentError(f"bands={o.bands}: give three 1-based bands of the image's {image.shape[2]}")
        image = image[:, :, [b - 1 for b in bands]]
    elif image.shape[2] != 3:
        raise SegmentError(f"{name} has {image.shape[2]} bands; mapseg segments three as RGB: "
                           "choose them with bands=(1, 2, 3)")
    kind = image.dtype.kind
    if kind not in "uf" or (kind == "u" and image.dtype.name not in ("uint8", "uint16")):
        raise SegmentError(f"{name}: data type {image.dtype} is not supported: give uint8, uint16 or float "
                           "(floats in [0, 1], or with input_max= or stretch=)")
    ok = None if o.nodata is None else nodata_valid(image, float(o.nodata))
    if valid is not None:
        valid = np.asarray(valid, bool)
        if valid.shape != image.shape[:2]:
            raise SegmentError(f"valid mask of shape {valid.shape} does not match the image {image.shape[:2]}")
        ok = valid if ok is None else ok & valid
    top, how = o.input_max, "input maximum given"
    if kind == "f":
        finite = np.isfinite(image).all(axis=-1)
        if not finite.all():
            ok = finite if ok is None else ok & finite
        if top is None and o.stretch is None:
            values = image[ok] if ok is not None else image
            lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
            if lo < 0 or hi > FLOAT_MAX:
                raise SegmentError(f"{name}: a float image is read as [0, 1] but its values span [{lo:g}, {hi:g}]; "
                                   "give input_max=N (the value of full brightness) or stretch=(2, 98)")
            top, how = FLOAT_MAX, "float image in [0, 1]"
    return ArrayReader(image, ok, name), top, how


# the settings an array honours; any other SegmentOptions field (cog, an extent, ...) concerns raster files and is
# refused when set, rather than ignored
ARRAY_SETTINGS = frozenset({"k", "centers", "model", "backend", "threads", "workers", "tile", "bands", "nodata",
                            "stretch", "input_max", "smooth", "upsample", "seed"})


def _check_array_options(o: SegmentOptions) -> None:
    defaults = SegmentOptions()
    raster_only = [f.name for f in dataclasses.fields(SegmentOptions)
                   if f.name not in ARRAY_SETTINGS and getattr(o, f.name) != getattr(defaults, f.name)]
    if raster_only:
        raise SegmentError(f"{', '.join(raster_only)}: raster settings, which an array in memory does not take "
                           "(crop or mask the array itself; write the labels as you need them)")
    if o.smooth < 0:
        raise SegmentError(f"smooth={o.smooth}: must be >= 0")


def segment_array(image: np.ndarray, k: int | None = None, *, centers: PathLike | Centers | None = None,
                  model: PathLike | FeatureModel | None = None, nodata: float | None = None,
                  valid: np.ndarray | None = None, options: SegmentOptions | None = None,
                  log: Callable[[str], None] | None = None, **settings) -> np.ndarray:
    """Labels of an image in memory: (H, W) uint8, 0..K-1, 255 where the input is nodata.

    ``image``: (H, W, 3) uint8 or uint16 (scaled as ``mapseg segment`` scales rasters of that type), or float
    (taken as [0, 1]; else give ``input_max=`` or ``stretch=``); (H, W, C) with ``bands=(r, g, b)`` (1-based).
    ``k`` clusters fitted on a sample of the image, or ``centers`` (``fit_centers``' result or a centres file)
    applied; ``model``: an artifact folder, ``"kmeans"``, None (the default model) or ``load_model()``'s result
    (faster when reused). Nodata: pixels whose bands all equal ``nodata``, where ``valid`` (H, W) is False, and
    float pixels with a NaN band. Further settings by name, those of ``ARRAY_SETTINGS`` (``seed``, ``tile``,
    ``smooth``, ``upsample``, ``input_max``, ``stretch``, ``backend``, ...; see ``SegmentOptions``): the other fields are raster
    settings, refused when set. ``log(message)``: notes on scaling (default: none).
    """
    given = {key: value for key, value in (("k", k), ("centers", centers), ("model", model), ("nodata", nodata))
             if value is not None}
    o = options_with(options, **given, **settings)
    _check_array_options(o)
    log = log or (lambda msg: None)
    features = o.feature_model()
    if o.centers is None and o.k is None:
        raise SegmentError("give k (number of clusters) or centers (from fit_centers or a centres file)")
    reader, top, how = _array_reader(image, o, valid)
    if o.centers is not None:
        fitted = check_centers(load_centers(o.centers), features, o.k, o.centers)
        if top is None or o.input_max is not None:  # as segment --centers scales (a float image: [0, 1] as said)
            top, how, note = centres_scaling(fitted, reader.info, o.centers, o.input_max, o.stretch)
            if note:
                log(note)
        scaling = scaling_for(reader, features, o.stretch, o.seed, top, how=how)
    else:
        k = check_k(o.k, features.max_k)
        scaling = scaling_for(reader, features, o.stretch, o.seed, top, how=how)
        fitted = _fit_samples([(reader, scaling)], k, features, o.seed, log)
    log(f"scaling: {scaling.description}")
    return label_reader(reader, features, scaling, fitted, o.tile, o.smooth, o.upsampling(features))


# --------------------------------------------------------------------------- centres

def _fit_samples(readers: list, k: int, features: FeatureModel, seed: int, log) -> Centers:
    """K centres on the samples of every (reader, scaling) pair, as ``mapseg fit`` fits them."""
    feats, colours, info = [], [], []
    for reader, scaling in readers:
        sample, raster = sample_reader(reader, features, scaling, seed, log=log)
        feats.append(sample.features)
        colours.append(sample.colours)
        info.append(raster)
    where = readers[0][0].path if len(readers) == 1 else "the inputs"
    return fit_samples(feats, colours, k, features, seed, {"rasters": info, **record_scaling(info, log)}, where)


def fit_centers(inputs: ImageInput | Sequence[ImageInput], k: int | None = None, *,
                model: PathLike | FeatureModel | None = None, options: SegmentOptions | None = None,
                log: Callable[[str], None] | None = None, progress: bool = False, **settings) -> Centers:
    """Fit K centres on a sample of every input (``mapseg fit``): raster paths and/or (H, W, 3) arrays (as
    ``segment_array`` takes them), one or a list. Returns ``Centers``: ``.save("centers.json")`` writes the file
    ``mapseg segment --centers`` reads; pass it as ``centers=`` to ``segment_raster`` / ``segment_array``.
    ``model`` as in ``segment_array`` (the centres apply only to the model they were fitted with). Further
    settings by name (``seed``, ``bands``, ``nodata``, ``input_max``, ``stretch``, ...). Rasters alone run
    ``mapseg.segment.fit_raster_centers`` (``progress``: its bars) and accept every SegmentOptions field; with an
    array among the inputs (sampled in memory) only ``ARRAY_SETTINGS`` are, as in ``segment_array``."""
    if isinstance(inputs, (str, os.PathLike, np.ndarray)):
        inputs = [inputs]
    inputs = list(inputs)
    if not inputs:
        raise SegmentError("fit_centers: give at least one raster path or array")
    o = options_with(options, **({"k": k} if k is not None else {}), **({"model": model} if model is not None else {}),
                     **settings)
    if o.centers is not None:
        raise SegmentError("fit_centers fits centres; centers= is for segment_raster / segment_array")
    if o.k is None:
        raise SegmentError("give k (number of clusters) to fit")
    log_ = log or (lambda msg: None)
    if all(isinstance(x, (str, os.PathLike)) for x in inputs):
        return _segment.fit_raster_centers(inputs, o, log=log_, progress=progress)
    _check_array_options(o)
    features = o.feature_model()
    k_ = check_k(o.k, features.max_k)
    pairs = []
    with io_env():
        try:
            for i, x in enumerate(inputs):
                if isinstance(x, (str, os.PathLike)):  # a raster among arrays: read by windows, like mapseg fit
                    reader = open_reader(x, o.bands, o.nodata)
                    pairs.append((reader, None))
                    top, how = o.input_max, "input maximum given"
                else:
                    reader, top, how = _array_reader(x, o, None, f"<array {i}>")
                    pairs.append((reader, None))
                pairs[-1] = (reader, scaling_for(reader, features, o.stretch, o.seed, top, how=how))
            return _fit_samples(pairs, k_, features, o.seed, log_)
        finally:
            for reader, _ in pairs:
                reader.close()
