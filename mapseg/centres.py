"""A run with centres fitted before (``mapseg fit``; ``segment --centers``): the file read and checked against
the run's features, and the scaling it records, so that every raster labelled with one centres file is scaled
into [0, 1] as the rasters it was fitted on were.

``mapseg fit`` records each raster's scaling and, where they were all of one data type and divided by one
input maximum, that value (``record_scaling``: ``sample.scaling`` = ``{"input_max", "dtype", "how"}``).
``segment --centers`` divides by it (``centres_scaling``) unless ``--input-max``/``--bits`` or ``--stretch``
is given; files without it (older ones, a percentile stretch, rasters of different ranges) leave each raster
its own range, and the log says so. A raster whose file states another bit depth (NBITS) is refused: its
pixels would be scaled unlike those the centres were fitted on.
"""
from __future__ import annotations

import math
import os

from .cluster import Centers, ClusterError, check_k
from .errors import SegmentError
from .features import FeatureModel


def load_centers(centers: str | os.PathLike | Centers) -> Centers:
    """A centres file (``mapseg fit``) read, or ``centers`` itself; a file that cannot be read is a ClusterError."""
    if isinstance(centers, Centers):
        return centers
    try:
        return Centers.load(centers)
    except OSError as exc:
        raise ClusterError(f"centres file {centers} cannot be read ({exc.strerror or exc})") from exc


def _where(source) -> str:
    return "the centres" if source is None or isinstance(source, Centers) else f"the centres file {source}"


def check_centers(centers: Centers, features: FeatureModel, k: int | None, source=None) -> Centers:
    """``centers`` apply to this run's features (same kind, model, dimensions) and K; ``source`` names the file."""
    where = _where(source)
    if centers.features != features.kind:
        raise SegmentError(f"{where} was fitted on {centers.features} features but this run uses "
                           f"{features.kind} ({features.name}); fit them with the same --model")
    if centers.features == "embedding" and centers.model.get("weights_sha256") != features.model_id["weights_sha256"]:
        raise SegmentError(f"{where} was fitted with another model (weights_sha256 differs from {features.name}'s); "
                           "run mapseg fit with this --model, or use the model it was fitted with")
    if centers.centers.shape[1] != features.dim:
        raise SegmentError(f"{where} has {centers.centers.shape[1]} dimensions, the features {features.dim}")
    check_k(centers.k, features.max_k)
    if k is not None and int(k) != centers.k:
        raise SegmentError(f"-k {k} disagrees with {where} (K={centers.k}); drop -k or refit")
    return centers


def record_scaling(rasters: list[dict], log) -> dict:
    """``{"scaling": {"input_max", "dtype", "how"}}`` for a centres file's sample where every fitted raster
    (``rasters``: ``path``, ``dtype``, ``input_max``, ``scaling`` each) is of one data type and was divided by
    one input maximum; else ``{}`` (a percentile stretch; rasters of different ranges: logged)."""
    kinds = {(r["dtype"], r["input_max"]) for r in rasters}
    if len(kinds) == 1:
        dtype, top = kinds.pop()
        return {} if top is None else {"scaling": {"input_max": top, "dtype": dtype, "how": rasters[0]["scaling"]}}
    log("the rasters were scaled by different ranges (" + "; ".join(f"{r['path']}: {r['scaling']}" for r in rasters)
        + "): the centres record no input maximum, so segment --centers scales each raster by its own; "
          "--input-max N (or --bits N) scales them alike")
    return {}


def centres_scaling(centers: Centers, info, source, input_max: float | None, stretch) -> tuple[float | None, str, str]:
    """(input maximum, how it is known, a note for the log or "") of a raster (``info``: a reader's) labelled
    with ``centers``: ``input_max`` where given; else the one the centres record where the raster is of the
    data type they were fitted on; else None (the raster's own range, or ``stretch``)."""
    where = _where(source)
    record = centers.sample.get("scaling")
    if record is not None:
        top = record.get("input_max") if isinstance(record, dict) else None
        if isinstance(top, bool) or not isinstance(top, (int, float)) or not (math.isfinite(top) and top > 0):
            raise SegmentError(f"{where}: sample.scaling must be an object with a positive input_max "
                               f"(got {record!r}); refit with mapseg fit")
        top, dtype = float(top), record.get("dtype")
    if input_max is not None or stretch is not None:
        differs = record is not None and (stretch is not None or float(input_max) != top)
        said = f"{'--stretch' if stretch is not None else 'input maximum'} given"
        note = f"{said}, not the x / {top:g} {where} was fitted with" if differs else ""
        return input_max, said, note
    if record is None:
        note = "" if info.dtype == "uint8" else (
            f"{where} records no input maximum (fitted with --stretch, on rasters of different ranges, or by an "
            "older mapseg): this raster is scaled by its own range")
        return None, "", note
    if dtype != info.dtype:
        return None, "", f"{where} was fitted on {dtype} rasters, {info.path} is {info.dtype}: scaled by its own range"
    nbits = getattr(info, "nbits", None)
    if nbits and float(2 ** int(nbits) - 1) != top:
        raise SegmentError(f"{info.path} holds {int(nbits)}-bit values (NBITS={int(nbits)} in the file) but {where} "
                           f"was fitted on x / {top:g}: its pixels would be scaled unlike the rasters the centres "
                           f"were fitted on; pass --input-max {top:g} to scale it as they were, --bits {int(nbits)} "
                           "for its own range, or fit centres on rasters like it")
    if dtype == "uint8" and top == 255:
        return None, "", ""  # uint8's own range
    return top, f"input maximum of {where}", ""
