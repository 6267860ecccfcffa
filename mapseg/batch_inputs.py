"""The inputs of ``mapseg batch`` and the names of their outputs.

``expand_inputs``: files, globs, list files (``@list.txt``), URLs (as GDAL reads them: ``/vsicurl/``, ``/vsis3/``,
``/vsigs/``), local paths made absolute, duplicates dropped. ``output_stems``: one output stem per input, with a
``-<8 hex>`` suffix where a stem collides with an earlier input's or with a name the run's own files take.
"""
from __future__ import annotations

import glob
import hashlib
import os
import re
from pathlib import Path

from .errors import SegmentError
from .raster.vrt import MOSAIC_NAME

# the stems of the run's own files (mapseg.batch: batch_report.json, centers.json, mosaic.vrt); and every mosaic_*
# (see _reserved)
RESERVED_STEMS = {"mosaic", "centers", "batch_report"}
_REMOTE = {"http://": "/vsicurl/http://", "https://": "/vsicurl/https://", "s3://": "/vsis3/", "gs://": "/vsigs/"}


def is_remote(path: str) -> bool:
    return path.startswith("/vsi") or "://" in path


def _local_or_remote(item: str, base: Path | None = None) -> str:
    """A URL as GDAL reads it (``https://`` -> ``/vsicurl/https://``, ``s3://`` -> ``/vsis3/``), a local path
    made absolute (workers may run elsewhere; relative paths of a list file are relative to the list)."""
    for scheme, vsi in _REMOTE.items():
        if item.startswith(scheme):
            return vsi + item[len(scheme):]
    if is_remote(item):
        return item
    p = Path(item).expanduser()
    if not p.is_absolute() and base is not None:
        p = base / p
    return os.path.abspath(p)


def _list_file(path: Path) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SegmentError(f"input list {path} cannot be read ({exc})") from exc
    items = [line.strip() for line in lines]
    return [_local_or_remote(i, path.parent) for i in items if i and not i.startswith("#")]


def expand_inputs(items, log=None) -> list[str]:
    """The rasters named by ``items``: files, globs (``tiles/**/*.tif``, sorted), text files of paths (``@list.txt``
    or a ``.txt`` file: one path or URL a line, ``#`` comments; relative paths relative to the list), URLs
    (``https://``, ``s3://``, ``gs://``, ``/vsi...``). Local paths come back absolute; a path named twice is kept
    once (and logged). A glob matching nothing or a missing list is an error; a missing file is left to its task
    (reported as failed, the others go on)."""
    log = log or (lambda msg: None)
    out = []
    for item in [str(i) for i in items]:
        if item.startswith("@"):
            out += _list_file(Path(item[1:]))
        elif item.lower().endswith(".txt") and Path(item).is_file():
            out += _list_file(Path(item))
        elif not is_remote(item) and any(c in item for c in "*?["):
            found = sorted(glob.glob(os.path.expanduser(item), recursive=True))
            if not found:
                raise SegmentError(f"no file matches {item}")
            out += [os.path.abspath(f) for f in found if os.path.isfile(f)]
        else:
            out.append(_local_or_remote(item))
    unique = list(dict.fromkeys(out))
    if len(unique) < len(out):
        log(f"{len(out) - len(unique)} input(s) named more than once: each is segmented once")
    if not unique:
        raise SegmentError("no input rasters given")
    return unique


def _stem(path: str) -> str:
    name = path.split("?")[0].rstrip("/").rsplit("/", 1)[-1]
    stem = name.rsplit(".", 1)[0] if "." in name else name
    stem = re.sub(r"[^A-Za-z0-9._+-]", "_", stem).lstrip(".")
    return stem or "raster"


def _reserved(stem: str) -> bool:
    """A stem the run's own files may take: mosaic, mosaic_* (mosaic_EPSG-<n>, mosaic_<n>), centers,
    batch_report (case-insensitive)."""
    low = stem.lower()
    return low in RESERVED_STEMS or low.startswith(MOSAIC_NAME + "_")


def output_stems(inputs: list[str]) -> list[str]:
    """One output stem per input: its file name without the extension; a stem already taken (an earlier input of
    that name, case-insensitive, or a name the run's own files may take: mosaic, mosaic_*, centers,
    batch_report) gets ``-<8 hex>`` of the input's path. An input's stem depends only on its path and the inputs
    before it: appending inputs renames no output, but an input inserted before another of the same name (a new
    file sorting earlier in a glob) takes the plain name, and the other's output moves to ``-<8 hex>``."""
    taken, stems = set(), []
    for path in inputs:
        stem = _stem(path)
        if stem.lower() in taken or _reserved(stem):
            stem = f"{stem}-{hashlib.sha256(path.encode()).hexdigest()[:8]}"
        taken.add(stem.lower())
        stems.append(stem)
    return stems
