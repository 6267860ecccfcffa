"""Many rasters, one set of labels, on a Dask cluster (``mapseg batch``).

    mapseg batch tiles/*.tif OUT_DIR -k 6 [--workers N | --scheduler tcp://host:8786]

    from mapseg.batch import segment_batch
    report = segment_batch(["tiles/*.tif"], "out", SegmentOptions(k=6), n_workers=2)

1. **Centres, once.** Each raster's sample (``mapseg.segment.sample_raster``, what ``mapseg fit`` draws) is a
   Dask task; the samples stay on the workers. The client takes the rows k-means sees
   (``mapseg.cluster.kmeans_rows``: drawn over the concatenation in input order, as ``fit_centers`` draws them)
   and fits (``mapseg.segment.fit_samples``): the centres are those of ``mapseg fit`` on the same inputs, bit
   for bit, for any number of workers (with the onnx backend: workers of one CPU instruction set). They are
   written to ``OUT_DIR/centers.json`` and reused by a rerun on the same inputs. With ``--centers FILE`` there
   is no fit.
2. **Every raster a task**: ``mapseg.segment.segment_raster`` with those centres (the labels of
   ``mapseg segment --centers``), one ``OUT_DIR/<input name>.tif`` per input. A raster of more than
   ``block``² pixels is cut into blocks of ``block`` x ``block`` pixels (a multiple of ``tile``), each a task
   writing ``OUT_DIR/<name>.tiles/<name>_rRRR_cCCC.tif`` from the whole raster's windows
   (``mapseg.segment.write_windows`` with a box: the same labels), and ``OUT_DIR/<name>.vrt`` over them; once
   one form of an output is in place, the other's files (an earlier run's, another ``block``) are removed.
   Then ``OUT_DIR/mosaic.vrt`` over every output (one VRT per CRS: ``mosaic_EPSG-<code>.vrt``; an earlier
   run's mosaics this run does not write are removed) and ``OUT_DIR/batch_report.json``. Every output carries
   the run's legend (``options.legend``, else the centres file's, else ``segment 0..K-1``): its colour table, and
   ``<name>.qml`` with ``<name>.tif.aux.xml`` beside (a VRT: the attribute table inside, the ``.qml`` beside).
3. **Resumable.** A finished output gets a sidecar ``<output>.mapseg.json`` (written after the output) holding a
   digest of what made it: input (path; size and mtime of every file it reads, ``input_stamp``), model weights,
   centres, the options that change labels, the legend (a rerun with other names or colours rewrites the outputs),
   the mapseg version, ``--extent``/``--extent-crs``/``--mask``/``--resolution`` with the size and mtime of the
   mask's files (and for block tiles the backend). A rerun skips an
   output whose sidecar matches and whose size and mtime are the recorded ones; anything else is redone. A rerun on
   another backend than the previous report's is said in the log. A raster that fails is reported (status, error)
   and the others go on; the run then returns failures (CLI exit status 1); on any error or Ctrl-C the run's
   futures are cancelled (a cluster the caller passed in keeps nothing of it). Outputs are renamed into place when
   complete; temporaries of killed workers are removed by the next write in their folder and at the end of the run
   (this host's dead processes only, as ``mapseg.fileio`` does).

What crosses the network: paths, options and centres to the workers; small summaries back; the k-means rows (at
most ``SAMPLE_FEATURES`` x D floats over all rasters) once, through the scheduler to the client. Never pixels:
workers read the rasters themselves (a shared file system, or GDAL's /vsicurl/, /vsis3/ for URLs). Dask is
optional: this module imports it inside the functions that need it, and ``mapseg batch`` without it says what to
install.

``--extent`` (``--extent-crs``), ``--mask`` and ``--resolution`` apply to every input: each raster is opened
through its ``RasterView`` (``mapseg.raster.open_reader`` with ``options.region()``) wherever it is opened (the
stamps, the sample, the segment and block tasks), so each output covers the extent (or the mask's bounds) cut to
that raster, at the resolution: the labels of ``mapseg segment --centers`` with the same flags. A raster the area
misses fails with the view's error; the others finish.

The inputs and their output names: ``mapseg.batch_inputs``; the VRTs (per raster, mosaics): ``mapseg.raster.vrt``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from . import __version__
from .batch_inputs import RESERVED_STEMS, expand_inputs, is_remote, output_stems  # noqa: F401 (RESERVED_STEMS)
from .centres import centres_scaling, check_centers, load_centers, record_scaling
from .cluster import Centers, check_k, kmeans_rows
from .errors import USER_ERRORS, BackendUnavailable, OutputError, RasterError, SegmentError, first_line
from .features import FeatureModel, load_features
from .fileio import remove_dead_leftovers, write_text_atomic
from .legend import Legend, load_legend, run_legend, style_path
from .raster import Region, io_env, open_reader
from .raster.polygons import mask_files
from .raster.vrt import MOSAIC_FILE, MOSAIC_NAME, write_mosaics, write_vrt_classes
from .raster.vrt import write_vrt  # noqa: F401 - importable from here as before
from .scaling import check_one_scaling
from .segment import (SegmentOptions, check_run_outputs, fit_samples, sample_raster, scaling_for, segment_raster,
                      window_halo, write_windows)
from .windows import plan_windows

DASK_HINT = 'pip install "map-segmenter[dask]" (or: pip install "dask[distributed]")'
REPORT_NAME = "batch_report.json"
CENTERS_NAME = "centers.json"
SIDECAR = ".mapseg.json"
DEFAULT_BLOCK = 8192    # a raster of more than 8192² pixels (67 MP, ~1 min of one core) is cut into block tasks
TASK_RETRIES = 2        # an unexpected exception in a task (not a user error) is retried this often
REPORT_FORMAT = "mapseg-batch-report"
SIDECAR_FORMAT = "mapseg-batch-output"


# --------------------------------------------------------------------------- digests

def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def centers_digest(centers: Centers) -> str:
    """sha256 of what labels depend on in a centres set: the centres (exact float32 bits), metric, features,
    model, and the input maximum they record (``segment --centers`` scales by it)."""
    return _digest({"centers": np.ascontiguousarray(centers.centers, np.float32).tobytes().hex(),
                    "metric": centers.metric, "features": centers.features, "model": centers.model,
                    "scaling": centers.sample.get("scaling")})


def model_digest(features: FeatureModel) -> str:
    return features.model_id.get("weights_sha256", features.model_id.get("kind", "unknown"))


def input_stamp(path: str, bands=None, nodata=None, region: Region | None = None):
    """What a rerun compares of a local input: [file, size, mtime_ns] of the input and of every file its reader
    reads (a VRT's sources, ``.aux.xml``, ``.msk``, ``.ovr``: the reader's ``info.files``; only the header is
    read), sorted; a remote file among them by its name alone. None for a remote input (matched by its URL
    alone). A missing input is a RasterError, an unreadable one what opening it raises; with a ``region``
    (``--extent``/``--mask``/``--resolution``) the input is opened through it, so an area that misses the raster
    is the view's RasterError."""
    if is_remote(path):
        return None
    if not os.path.exists(path):
        raise RasterError(f"input raster {path} does not exist")
    with io_env(), open_reader(path, bands, nodata, region) as reader:
        files = reader.info.files
    stamps = []
    for f in sorted({os.path.abspath(path)} | {f if is_remote(f) else os.path.abspath(f) for f in files}):
        try:
            st = None if is_remote(f) else os.stat(f)
        except OSError:
            st = None
        stamps.append([f, st.st_size, st.st_mtime_ns] if st else [f, None, None])
    return stamps


def _input_stamp_or_none(path: str, bands=None, nodata=None, region: Region | None = None):
    """``input_stamp``, or None where the input cannot be read (its task says why)."""
    try:
        return input_stamp(path, bands, nodata, region)
    except Exception:  # noqa: BLE001 - an unreadable input, an area that misses it, a CRS PROJ cannot transform
        return None


# --------------------------------------------------------------------------- what a task gets

@dataclasses.dataclass(frozen=True)
class TaskSettings:
    """Everything a worker needs besides the centres: plain values (they cross the network)."""
    model: str            # artifact folder (absolute) or "kmeans"
    backend: str          # the backend the client resolved (every worker runs the same one)
    model_digest: str     # checked on the worker: the same weights as the client's
    options: SegmentOptions   # model/centers unset; threads/workers per task
    run_key: str          # digest of model, centres and the options that change labels
    out_dir: str


_FEATURES: dict = {}
_FEATURES_LOCK = threading.Lock()


def _worker_features(s: TaskSettings) -> FeatureModel:
    """The feature model of this worker process and thread (loaded once, reused by every task), checked to be
    the client's: a worker with other weights at that path is an error, not another set of labels. A model
    loaded by an earlier run whose digest is not this run's (the model re-exported at that path since) is
    loaded again."""
    key = (s.model, s.backend, s.options.threads, s.options.workers, threading.get_ident())
    with _FEATURES_LOCK:
        features = _FEATURES.get(key)
    if features is None or model_digest(features) != s.model_digest:
        features = load_features(s.model, s.backend, s.options.threads, s.options.workers)
        with _FEATURES_LOCK:
            _FEATURES[key] = features
    if model_digest(features) != s.model_digest:
        raise SegmentError(f"the model at {s.model} on this worker is not the client's (weights digest "
                           f"{model_digest(features)[:12]} vs {s.model_digest[:12]}): install the same model on "
                           "every worker")
    return features


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return f"pid {os.getpid()}"


# --------------------------------------------------------------------------- the fit: one sample per raster

def sample_task(path: str, s: TaskSettings):
    """(Sample, the raster's entry of the centres' sample, log lines), or ("failed", message): what ``mapseg fit``
    draws from one raster (``mapseg.segment.sample_raster`` with the run's options). Runs on a worker."""
    lines = []
    try:
        sample, info = sample_raster(path, _worker_features(s), s.options, log=lines.append)
        return sample, info, lines
    except USER_ERRORS as exc:
        return "failed", str(exc)


def _sample_summary(result):
    """What the client needs of a sample: (cells, entry, log lines) or ("failed", message)."""
    if result[0] == "failed":
        return result
    sample, info, lines = result
    return int(sample.features.shape[0]), info, lines


def _sample_rows(result, rows):
    """The sample's features and colours at ``rows`` (None: all of them)."""
    sample = result[0]
    if rows is None:
        return sample.features, sample.colours
    return sample.features[rows], sample.colours[rows]


def fit_batch_centers(client, inputs: list[str], s: TaskSettings, features: FeatureModel, k: int, log):
    """Centres from a sample of every input, the samples drawn by Dask tasks and combined in input order: the
    centres ``mapseg fit`` gives on the same inputs, for any number of workers. Returns (Centers,
    {input: error} of rasters that could not be sampled: left out of the fit and the run)."""
    from distributed import as_completed

    o = s.options
    samples, summaries, takes = [], [], []
    try:
        samples += [client.submit(sample_task, path, s, key=f"sample-{i}-{_digest([path, s.run_key])[:16]}",
                                  retries=TASK_RETRIES) for i, path in enumerate(inputs)]
        summaries += [client.submit(_sample_summary, f, key=f"summary-{f.key}") for f in samples]
        index = {f.key: i for i, f in enumerate(summaries)}
        got, failed, said = [None] * len(inputs), {}, set()
        for n_done, (fut, result) in enumerate(as_completed(summaries, with_results=True, raise_errors=False), 1):
            i = index[fut.key]
            if fut.status == "error":
                result = ("failed", _task_error(fut))
            if result[0] == "failed":
                failed[inputs[i]] = result[1]
                log(f"[sample {n_done}/{len(inputs)}] failed {inputs[i]}: {result[1]}")
            else:
                got[i] = result
                log(f"[sample {n_done}/{len(inputs)}] {result[0]:,} cells from {result[1]['windows']} windows of "
                    f"{inputs[i]} ({result[1]['scaling']})")
                for line in result[2]:  # the sample's notes (ground resolution, partial cells), each said once
                    if line not in said and not line.startswith(("sampled ", "scaling of ")):
                        said.add(line)
                        log("  " + line)
        ok = [i for i in range(len(inputs)) if got[i] is not None]
        if not ok:
            raise SegmentError("no input raster could be sampled: "
                               + "; ".join(f"{p}: {e}" for p, e in failed.items()))
        counts = [got[i][0] for i in ok]
        n = sum(counts)
        rows = kmeans_rows(n, features.dim, o.seed)
        start = 0
        for i, c in zip(ok, counts):
            part = None if rows is None else rows[(rows >= start) & (rows < start + c)] - start
            start += c
            takes.append(client.submit(_sample_rows, samples[i], part, key=f"rows-{samples[i].key}"))
        parts = client.gather(takes)
    finally:  # done, failed or interrupted: the samples leave the workers
        client.cancel(samples + summaries + takes)
    info = [got[i][1] for i in ok]
    meta = {"rasters": info, "bands": list(o.bands) if o.bands else None, **record_scaling(info, log)}
    # every row: exactly mapseg fit's call; else the rows fit_centers would draw, drawn already (n recorded)
    return fit_samples([p[0] for p in parts], [p[1] for p in parts], k, features, o.seed, meta,
                       sampled=None if rows is None else n), failed


# --------------------------------------------------------------------------- a raster (or a block) as a task

def _sidecar(output: Path) -> Path:
    return output.with_name(output.name + SIDECAR)


def _job_key(s: TaskSettings, path: str, block) -> str:
    """The digest an output's record carries: the run's (model, centres, options, mapseg version), the input
    (path, and every file it reads: ``input_stamp``), the block; for a block also the backend, so that the tiles
    of one raster all come from one backend (backends may differ on near-tie pixels)."""
    o = s.options
    return _digest({"run": s.run_key, "input": path, "files": input_stamp(path, o.bands, o.nodata, o.region()),
                    "block": block,
                    **({"backend": s.backend} if block is not None else {})})


def _finished(output: Path, key: str):
    """The sidecar of ``output`` where it says the output is complete and was made as ``key`` says, else None."""
    try:
        meta = json.loads(_sidecar(output).read_text())
        st = output.stat()
    except (OSError, ValueError):
        return None
    if (not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT or meta.get("key") != key
            or meta.get("size") != st.st_size or meta.get("mtime_ns") != st.st_mtime_ns):
        return None
    return meta


def _mark_finished(output: Path, key: str, path: str, geometry: dict, extra: dict) -> None:
    st = output.stat()
    write_text_atomic(_sidecar(output), json.dumps({
        "format": SIDECAR_FORMAT, "version": 1, "key": key, "input": path, "mapseg": __version__, "size": st.st_size,
        "mtime_ns": st.st_mtime_ns, "geometry": geometry, **extra}, indent=1) + "\n")


def _geometry(info, row0: int = 0, col0: int = 0, height: int | None = None, width: int | None = None) -> dict:
    """Where a raster (or its block at row0, col0) lies: size, GDAL geotransform, CRS as WKT, GCPs."""
    t = info.transform
    gt = tuple(float(v) for v in (t.to_gdal() if hasattr(t, "to_gdal") else t)) if info.georeferenced else None
    if gt is not None and (row0 or col0):
        gt = (gt[0] + col0 * gt[1] + row0 * gt[2], gt[1], gt[2], gt[3] + col0 * gt[4] + row0 * gt[5], gt[4], gt[5])
    crs = info.crs
    wkt = (crs.to_wkt() if hasattr(crs, "to_wkt") else str(crs)) if crs else None
    return {"width": width or info.width, "height": height or info.height, "geotransform": gt,
            "crs": wkt if info.georeferenced and not info.gcps else None,
            "gcps": [list(g) for g in info.gcps] if info.gcps else None, "gcp_crs": info.gcp_crs}


def _blocks(height: int, width: int, block: int):
    return [(r0, min(r0 + block, height), c0, min(c0 + block, width))
            for r0 in range(0, height, block) for c0 in range(0, width, block)]


def segment_task(index: int, path: str, output: str, s: TaskSettings, centers: Centers, block: int):
    """Segment one raster into ``output`` with ``centers`` (``segment_raster``: the labels of ``mapseg segment
    --centers``), unless a finished output made the same way is there. A raster of more than ``block``² pixels is
    not segmented here: the result lists its blocks, each then a ``segment_block_task``. Runs on a worker;
    user errors (an unreadable raster...) come back as ``status: failed``."""
    t0, c0 = time.perf_counter(), time.process_time()
    result = {"index": index, "input": path, "output": output, "worker": _worker_name()}
    out = Path(output)
    try:
        key = _job_key(s, path, None)
        done = _finished(out, key)
        if done is not None:
            return {**result, "status": "skipped", "geometry": done["geometry"], "megapixels": done.get("megapixels")}
        o = s.options
        with io_env(), open_reader(path, o.bands, o.nodata, o.region()) as reader:  # the area's grid
            info = reader.info
        if info.width * info.height > block * block:
            return {**result, "status": "split", "geometry": _geometry(info),
                    "blocks": _blocks(info.height, info.width, block)}
        lines = []
        features = _worker_features(s)
        report = segment_raster(path, output, dataclasses.replace(o, model=features, backend="auto", threads=None,
                                                                  workers=None, centers=centers),
                                progress=False, log=lines.append)
        geometry = _geometry(info)
        mp = info.width * info.height / 1e6
        _mark_finished(out, key, path, geometry, {"megapixels": mp, "k": report["k"], "backend": s.backend})
        return {**result, "status": "done", "geometry": geometry, "megapixels": mp, "log": lines,
                "clipped_pixels": report["clipped_pixels"], "seconds": time.perf_counter() - t0,
                "cpu_s": time.process_time() - c0}
    except USER_ERRORS as exc:
        return {**result, "status": "failed", "error": str(exc), "seconds": time.perf_counter() - t0}


def segment_block(path: str, output: str, s: TaskSettings, centers: Centers, features: FeatureModel,
                  box: tuple[int, int, int, int], log) -> dict:
    """Write the labels of rows box[0]:box[1], columns box[2]:box[3] of ``path`` to the GeoTIFF ``output``, from
    the windows ``segment_raster`` plans for the whole raster (those whose cores start in the box; the box is on
    the ``tile`` grid), scaled as ``segment_raster`` scales with these centres: the whole raster's labels there."""
    o = s.options
    r0, r1, c0, c1 = box
    up = o.upsampling(features)
    halo = window_halo(features, o.smooth, up)
    with io_env(), open_reader(path, o.bands, o.nodata, o.region()) as reader:  # box and windows on the area's grid
        info = reader.info
        check_run_outputs({"output": output}, [(path, info)], dataclasses.replace(o, model=s.model), log)
        fitted = check_centers(load_centers(centers), features, None, centers)
        top, how, note = centres_scaling(fitted, info, centers, o.input_max, o.stretch)
        if note:
            log(note)
        scaling = scaling_for(reader, features, o.stretch, o.seed, top, None, how)
        wins = [w for w in plan_windows(info.height, info.width, o.tile, features.stride, halo)
                if r0 <= w.core.row0 < r1 and c0 <= w.core.col0 < c1]
        classes = run_legend(fitted.k, o.legend, fitted.legend)
        _, clipped, _ = write_windows(reader, output, features, scaling, fitted, wins, smooth=o.smooth, cog=o.cog,
                                      box=box, tags={"MAPSEG_BLOCK": f"{r0},{r1},{c0},{c1}"},
                                      cmap=classes.colormap(), up=up)
    return {"geometry": _geometry(info, r0, c0, r1 - r0, c1 - c0), "clipped_pixels": clipped, "k": fitted.k,
            "scaling": scaling.description}


def segment_block_task(index: int, path: str, output: str, s: TaskSettings, centers: Centers, box):
    """``segment_block`` as a task, skipped where a finished tile made the same way is there (see ``segment_task``)."""
    t0, c0 = time.perf_counter(), time.process_time()
    result = {"index": index, "input": path, "output": output, "block": list(box), "worker": _worker_name()}
    out = Path(output)
    try:
        key = _job_key(s, path, list(box))
        done = _finished(out, key)
        if done is not None:
            return {**result, "status": "skipped", "geometry": done["geometry"], "megapixels": done.get("megapixels")}
        out.parent.mkdir(exist_ok=True)
        lines = []
        made = segment_block(path, output, s, centers, _worker_features(s), tuple(box), lines.append)
        mp = (box[1] - box[0]) * (box[3] - box[2]) / 1e6
        _mark_finished(out, key, path, made["geometry"], {"megapixels": mp, "k": made["k"], "backend": s.backend})
        return {**result, "status": "done", "geometry": made["geometry"], "megapixels": mp, "log": lines,
                "clipped_pixels": made["clipped_pixels"], "seconds": time.perf_counter() - t0,
                "cpu_s": time.process_time() - c0}
    except USER_ERRORS as exc:
        return {**result, "status": "failed", "error": str(exc), "seconds": time.perf_counter() - t0}


def _task_error(fut) -> str:
    """The message of a task that raised (after its retries) or whose workers died."""
    try:
        exc = fut.exception()
    except Exception as err:  # noqa: BLE001 - a cancelled or lost future
        exc = err
    name = type(exc).__name__
    if name == "KilledWorker":
        return (f"the workers running it died {TASK_RETRIES + 1}+ times (out of memory? see --memory-limit): "
                f"{first_line(exc)}")
    return f"{name}: {first_line(exc)}"


# --------------------------------------------------------------------------- outputs replaced

def _remove_files(out_dir: Path, names: list[str], folder: str | None = None) -> None:
    """Remove these files (and the folder ``folder``) of ``out_dir`` where they are: an earlier run's outputs
    that this run replaced with another form."""
    import shutil

    for name in names:
        (out_dir / name).unlink(missing_ok=True)
    if folder is not None and (out_dir / folder).is_dir():
        shutil.rmtree(out_dir / folder, ignore_errors=True)


# --------------------------------------------------------------------------- Dask

def _distributed():
    try:
        import distributed
    except ImportError as exc:
        raise BackendUnavailable(f"mapseg batch runs on Dask, which is not installed: {DASK_HINT}") from exc
    return distributed


@contextmanager
def dask_client(scheduler=None, n_workers: int | None = None, memory_limit="auto", log=None):
    """A Dask client: of the scheduler at ``scheduler`` (an address such as ``tcp://host:8786``, or a
    ``distributed.Client`` already connected, left open), else of a LocalCluster of ``n_workers`` processes
    (default: the CPUs) with one thread each and ``memory_limit`` each (default: the machine's memory shared
    out), closed afterwards."""
    distributed = _distributed()
    log = log or (lambda msg: None)
    if isinstance(scheduler, distributed.Client):
        yield scheduler
        return
    if scheduler:
        try:
            client = distributed.Client(scheduler, timeout="30s")
        except (OSError, TimeoutError) as exc:
            raise SegmentError(f"--scheduler {scheduler}: cannot connect ({first_line(exc)}); start one "
                               "(dask scheduler) or drop --scheduler to run on this machine") from exc
        try:
            log(f"cluster: {scheduler}, {len(client.scheduler_info().get('workers', {}))} workers")
            yield client
        finally:
            client.close()
        return
    from .parallel import available_cpus

    n = n_workers or available_cpus()
    if n < 1:
        raise SegmentError(f"--workers {n}: give at least 1")
    # no dashboard (it needs bokeh); the scheduler's HTTP routes (health, metrics) on a free port, not 8787
    cluster = distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                       memory_limit=memory_limit, dashboard_address=None,
                                       scheduler_kwargs={"dashboard_address": ":0"})
    try:
        client = distributed.Client(cluster)
        try:
            log(f"cluster: local, {n} worker process(es), 1 thread each, memory limit {memory_limit} each")
            yield client
        finally:
            client.close()
    finally:
        cluster.close()


# --------------------------------------------------------------------------- the run

def _backend_spec(features: FeatureModel) -> str:
    """The backend a feature model runs, as a spec every worker loads alike: ``onnx``, or ``onnx:int8`` where its
    precision is not float32 (mapseg.backends.split_backend); ``auto`` for colour k-means (no network)."""
    if features.kind == "colour":
        return "auto"
    precision = getattr(getattr(features, "backend", None), "precision", "float32")
    return features.backend_name if precision == "float32" else f"{features.backend_name}:{precision}"


def _resolved_model(options: SegmentOptions) -> tuple[str, str, FeatureModel]:
    """(model folder (absolute) or "kmeans", backend spec, the feature model loaded here) of a run's options."""
    m = options.model
    if m is not None and not isinstance(m, (str, os.PathLike)):  # a FeatureModel loaded already
        features = m
    else:
        features = load_features(m, options.backend, 1, 1)
    name = "kmeans" if features.kind == "colour" else os.path.abspath(features.name)
    return name, _backend_spec(features), features


def _previous_report(out_dir: Path) -> dict:
    try:
        data = json.loads((out_dir / REPORT_NAME).read_text())
        return data if isinstance(data, dict) and data.get("format") == REPORT_FORMAT else {}
    except (OSError, ValueError):
        return {}


def _region_key(region: Region) -> dict | None:
    """What a run's ``--extent``/``--extent-crs``/``--mask``/``--resolution`` are, for the digests (None where none
    is given): the settings, and [file, size, mtime_ns] of every file of the mask (a remote one by its name)."""
    if not region.given:
        return None
    stamps = None
    if region.mask is not None:
        stamps = []
        for f in mask_files(region.mask):
            try:
                st = None if is_remote(f) else os.stat(f)
            except OSError:
                st = None
            stamps.append([f, st.st_size, st.st_mtime_ns] if st else [f, None, None])
    return {"extent": list(region.extent) if region.extent else None, "extent_crs": region.extent_crs,
            "mask": region.mask, "mask_files": stamps, "resolution": region.resolution}


def _check_outputs_are_not_inputs(out_dir: Path, stems: list[str], inputs: list[str]) -> None:
    local = {os.path.realpath(p) for p in inputs if not is_remote(p)}
    for stem in stems:
        for name in (f"{stem}.tif", f"{stem}.vrt"):
            if os.path.realpath(out_dir / name) in local:
                raise OutputError(f"output {out_dir / name} would replace the input of that name: choose an output "
                                  "folder that does not hold the inputs")


def segment_batch(inputs, out_dir, options: SegmentOptions | None = None, *, scheduler=None,
                  n_workers: int | None = None, memory_limit="auto", block: int = DEFAULT_BLOCK,
                  log=None) -> dict:
    """Segment every raster of ``inputs`` (``expand_inputs``: files, globs, list files, URLs) into ``out_dir``
    with one set of centres, on Dask (``scheduler``: an address or a Client; else a LocalCluster of
    ``n_workers`` processes). ``options``: as ``mapseg segment`` takes them (``k`` or ``centers``, ``model``,
    ``backend``, ``tile``, ``bands``, ``nodata``, ``stretch``/``input_max``, ``smooth``, ``upsample``, ``seed``, ``cog``,
    ``extent``/``extent_crs``, ``mask``, ``resolution`` (every input read through that area and grid);
    ``threads`` and ``workers`` per task, default 1 each). ``block``: rasters of more than block² pixels are
    cut into block tasks. Returns the run report (also written to ``out_dir/batch_report.json``); its
    ``failed`` counts the rasters that failed (the others are done or skipped). See the module doc."""
    o = options or SegmentOptions()
    log = log or (lambda msg: print(msg, file=sys.stderr))
    t_start = time.perf_counter()
    _distributed()  # before any work: without Dask, say what to install
    if o.centers is None and o.k is None:
        raise SegmentError("give -k K (number of clusters) or --centers FILE")
    check_one_scaling(o.stretch, o.input_max)
    given_legend = load_legend(o.legend)  # read (and refused) before any work; checked against K with the centres
    region = o.region()  # checked before any work; every task opens its raster through it
    if o.mask is not None and not is_remote(str(o.mask)):
        if not os.path.exists(o.mask):
            raise RasterError(f"--mask {o.mask} does not exist")
        o = dataclasses.replace(o, mask=os.path.abspath(o.mask))  # the workers may run elsewhere
        region = o.region()
    if o.smooth < 0:
        raise SegmentError(f"--smooth {o.smooth}: must be >= 0")
    if o.tile < 4 or o.tile % 4:
        raise SegmentError(f"--tile {o.tile}: must be a positive multiple of 4")
    if block < o.tile:
        raise SegmentError(f"--block {block}: must be at least --tile ({o.tile})")
    block = block // o.tile * o.tile  # blocks on the window grid: every window lies in one block
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"output folder {out_dir} is a file: give a folder")
    if not out_dir.is_dir() and not out_dir.parent.is_dir():
        raise OutputError(f"output folder {out_dir}: its parent {out_dir.parent} does not exist")
    out_dir = out_dir.resolve()
    paths = expand_inputs(inputs if isinstance(inputs, (list, tuple)) else [inputs], log)
    stems = output_stems(paths)
    _check_outputs_are_not_inputs(out_dir, stems, paths)
    model, backend, features = _resolved_model(o)
    log(f"model: {features.name}; backend {backend}; {len(paths)} input raster(s)")
    # the upsampling resolved here, once: every worker draws what the report and the resume digests say, whatever
    # its own copy of meta.json says (the digest checked on the workers covers the weights only)
    per_task = dataclasses.replace(o, model=None, centers=None, backend="auto", upsample=o.upsampling(features),
                                   threads=o.threads or 1, workers=o.workers or 1)
    # what changes labels (besides model and centres); the precision of the network is part of the backend spec
    precision = backend.partition(":")[2] or "float32"
    label_options = {"bands": o.bands, "nodata": o.nodata, "stretch": o.stretch, "input_max": o.input_max,
                     "smooth": o.smooth, "upsample": per_task.upsample.to_json(), "seed": o.seed,
                     "cog": o.cog, "precision": precision,
                     "region": _region_key(region)}
    sample_options = {key: label_options[key] for key in ("bands", "nodata", "stretch", "input_max", "seed",
                                                          "precision", "region")}
    previous = _previous_report(out_dir)
    before = (previous.get("model") or {}).get("backend")
    if before and before != backend:
        log(f"warning: the earlier run in {out_dir} used the backend {before}, this one {backend}: outputs it "
            "finished are kept (backends may differ on near-tie pixels); a raster cut into blocks is redone whole, "
            f"so that its tiles come from one backend (--backend {before.partition(':')[0]} continues with the "
            "earlier one)")
    failed_inputs: dict[str, str] = {}
    centers_future = None
    with dask_client(scheduler, n_workers, memory_limit, log) as client:
        try:
            out_dir.mkdir(exist_ok=True)  # once the cluster is up: a run that cannot start leaves no folder
            settings = TaskSettings(model, backend, model_digest(features), per_task, "", str(out_dir))
            fit_key = None
            if o.centers is not None:
                centers = check_centers(load_centers(o.centers), features, o.k, o.centers)
                source = {"from": "given",
                          "file": None if isinstance(o.centers, Centers) else os.path.abspath(o.centers)}
            else:
                k = check_k(o.k, features.max_k)
                # what the fit depends on: every input's files (read by the workers, which see the inputs)
                stamps = client.map(_input_stamp_or_none, paths, bands=o.bands, nodata=o.nodata, region=region,
                                    pure=False)
                try:
                    inputs_key = list(zip(paths, client.gather(stamps)))
                finally:
                    client.cancel(stamps)
                fit_key = _digest({"inputs": inputs_key, "k": o.k, "model": model_digest(features),
                                   "options": sample_options, "mapseg": __version__})
                centers = _reusable_centers(out_dir, previous, fit_key, features, k)
                if centers is not None:
                    log(f"centres: reused {out_dir / CENTERS_NAME} (fitted by an earlier run on the same inputs)")
                    source = {"from": "reused", "file": str(out_dir / CENTERS_NAME)}
                else:
                    t0 = time.perf_counter()
                    fit_settings = dataclasses.replace(settings, run_key=fit_key)
                    centers, failed_inputs = fit_batch_centers(client, paths, fit_settings, features, k, log)
                    centers.save(out_dir / CENTERS_NAME)
                    log(f"centres: K={k} from {len(paths) - len(failed_inputs)} raster(s), "
                        f"{time.perf_counter() - t0:.1f} s; wrote {out_dir / CENTERS_NAME}")
                    source = {"from": "fitted", "file": str(out_dir / CENTERS_NAME),
                              "seconds": time.perf_counter() - t0}
                    # recorded now: a run stopped later reuses these centres when resumed (_reusable_centers)
                    write_text_atomic(out_dir / REPORT_NAME, json.dumps({
                        "format": REPORT_FORMAT, "version": 1, "status": "running", "fit_key": fit_key,
                        "model": {"digest": model_digest(features), "backend": backend},
                        "centers": {**source, "digest": centers_digest(centers)}}, indent=1) + "\n")
            digest = centers_digest(centers)
            # the legend (names, colours: the colour table and the class files, not the labels) is in the digest:
            # a rerun with another legend rewrites the outputs
            classes = run_legend(centers.k, given_legend, centers.legend,
                                 f"legend {o.legend}" if isinstance(o.legend, (str, os.PathLike)) else "the legend")
            label_options["legend"] = classes.to_json()
            settings = dataclasses.replace(settings, options=dataclasses.replace(settings.options, legend=classes),
                                           run_key=_digest({"model": model_digest(features), "centers": digest,
                                                            "options": label_options, "mapseg": __version__}))
            slim = dataclasses.replace(centers, sample={k_: v for k_, v in centers.sample.items() if k_ == "scaling"})
            centers_future = client.submit(_identity, slim, key=f"centers-{digest[:16]}")
            results = _segment_all(client, paths, stems, out_dir, settings, centers_future, block, failed_inputs,
                                   log)
        finally:  # done, failed or interrupted (Ctrl-C): nothing of this run stays on a caller's cluster
            if centers_future is not None:
                client.cancel([centers_future])
    rasters, pieces = [], []
    for i, path in enumerate(paths):
        entry, files = _raster_entry(out_dir, stems[i], results[i], classes)
        rasters.append(entry)
        pieces += files
    mosaics, left_out = write_mosaics(out_dir, pieces, classes) if pieces else ([], [])
    # an earlier run's mosaics that this one did not write (its CRSs were others) would show stale outputs
    stale = [f.name for f in out_dir.glob(f"{MOSAIC_NAME}*.vrt") if MOSAIC_FILE.fullmatch(f.name)
             and f.name not in {m["file"] for m in mosaics}]
    _remove_files(out_dir, stale + [style_path(name).name for name in stale])
    if left_out:
        log(f"not in a mosaic: {', '.join(left_out)}")
    for folder in [out_dir] + [out_dir / f"{s}.tiles" for s in stems if (out_dir / f"{s}.tiles").is_dir()]:
        removed = remove_dead_leftovers(folder)
        if removed:
            log(f"removed {len(removed)} temporary file(s) that killed workers left in {folder}")
    counts = {st: sum(r["status"] == st for r in rasters) for st in ("done", "skipped", "failed")}
    report = {
        "format": REPORT_FORMAT, "version": 1, "status": "finished", "out_dir": str(out_dir), "inputs": len(paths),
        **counts,
        "seconds": time.perf_counter() - t_start, "fit_key": fit_key, "mapseg": __version__,
        "model": {"name": features.name, "digest": model_digest(features), "features": features.kind,
                  "backend": backend},
        "centers": {**source, "digest": digest, "k": centers.k, "metric": centers.metric,
                    "centers": [[float(v) for v in row] for row in centers.centers]},
        "options": {**label_options, "tile": o.tile, "block": block, "bands": list(o.bands) if o.bands else None,
                    "stretch": list(o.stretch) if o.stretch else None},
        "mosaics": mosaics, "not_in_mosaic": left_out,
        "cpu_s": sum(r.get("cpu_s") or 0.0 for r in rasters), "megapixels": sum(r.get("megapixels") or 0.0
                                                                                for r in rasters),
        "rasters": rasters,
    }
    write_text_atomic(out_dir / REPORT_NAME, json.dumps(report, indent=1) + "\n")
    log(f"batch: {counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed of {len(paths)} in "
        f"{report['seconds']:.1f} s; wrote {out_dir / REPORT_NAME}"
        + (f" and {', '.join(m['file'] for m in mosaics)}" if mosaics else ""))
    return report


def _identity(x):
    return x


def _reusable_centers(out_dir: Path, previous: dict, fit_key: str, features: FeatureModel, k: int):
    """The centres an earlier run fitted in ``out_dir`` where it fitted them on the same inputs (paths; sizes and
    times of every file each reads), K, model, options and mapseg version, and the file is unchanged since; else
    None."""
    mine = previous.get("centers") or {}
    if previous.get("fit_key") != fit_key or mine.get("from") not in ("fitted", "reused"):
        return None
    try:
        centers = check_centers(load_centers(out_dir / CENTERS_NAME), features, k)
    except USER_ERRORS:
        return None
    return centers if centers_digest(centers) == mine.get("digest") else None


def _segment_all(client, paths, stems, out_dir: Path, s: TaskSettings, centers_future, block: int,
                 failed_inputs: dict, log) -> list[dict]:
    """Submit a task per raster (and per block of a large one) and collect the results as they finish,
    printing a line each. Returns per input: its result (a block-split raster: {"split": ..., "blocks": [...]})."""
    from distributed import as_completed

    results: list = [None] * len(paths)
    futures, live = {}, []  # key -> (input index, block or None); the futures, held until the run ends
    try:
        for i, path in enumerate(paths):
            if path in failed_inputs:
                results[i] = {"index": i, "input": path, "status": "failed", "error": failed_inputs[path]}
                continue
            f = client.submit(segment_task, i, path, str(out_dir / f"{stems[i]}.tif"), s, centers_future, block,
                              key=f"segment-{i}-{_digest([path, s.run_key, block, s.out_dir])[:16]}",
                              retries=TASK_RETRIES)
            futures[f.key] = (i, None)
            live.append(f)
        total = len(futures)
        done_rasters, pending_blocks = 0, {}
        ac = as_completed(live, with_results=True, raise_errors=False)
        for fut, result in ac:
            i, box = futures[fut.key]
            if fut.status == "error":
                result = {"index": i, "input": paths[i], "status": "failed", "error": _task_error(fut)}
                if box is not None:
                    result.update(block=list(box), output=None)
            if box is None and result["status"] == "split":
                tiles = out_dir / f"{stems[i]}.tiles"
                results[i] = {**result, "blocks": []}
                pending_blocks[i] = len(result["blocks"])
                log(f"{paths[i]}: {result['geometry']['width']} x {result['geometry']['height']} px, "
                    f"{len(result['blocks'])} blocks of at most {block} x {block}")
                for b in result["blocks"]:
                    name = f"{stems[i]}_r{b[0] // block:03d}_c{b[2] // block:03d}.tif"
                    bkey = _digest([paths[i], s.run_key, b, s.out_dir])[:16]
                    bf = client.submit(segment_block_task, i, paths[i], str(tiles / name), s, centers_future,
                                       tuple(b), key=f"block-{i}-{b[0]}-{b[2]}-{bkey}", retries=TASK_RETRIES)
                    futures[bf.key] = (i, tuple(b))
                    live.append(bf)
                    ac.add(bf)
                continue
            if box is not None:
                results[i]["blocks"].append(result)
                pending_blocks[i] -= 1
                if pending_blocks[i]:
                    continue
                result = results[i] = _merge_blocks(results[i])
            else:
                results[i] = result
            done_rasters += 1
            line = f"[{done_rasters}/{total}] {result['status']:<7} {paths[i]}"
            if result["status"] == "failed":
                line += f": {result.get('error')}"
            elif result["status"] == "done" and result.get("seconds"):
                line += f" ({result['seconds']:.1f} s)"
            log(line)
    finally:  # done, failed or interrupted (Ctrl-C): nothing of this run stays on a caller's cluster
        client.cancel(live)
    return results


def _merge_blocks(raster: dict) -> dict:
    blocks = sorted(raster["blocks"], key=lambda b: (b["block"][0], b["block"][2]))
    statuses = {b["status"] for b in blocks}
    status = "failed" if "failed" in statuses else "skipped" if statuses == {"skipped"} else "done"
    errors = [f"block {b['block']}: {b['error']}" for b in blocks if b["status"] == "failed"]
    return {**raster, "status": status, "blocks": blocks, "error": "; ".join(errors) or None,
            "seconds": sum(b.get("seconds") or 0.0 for b in blocks),
            "cpu_s": sum(b.get("cpu_s") or 0.0 for b in blocks),
            "megapixels": sum(b.get("megapixels") or 0.0 for b in blocks)}


def _raster_entry(out_dir: Path, stem: str, result: dict, k: int | Legend) -> tuple[dict, list[dict]]:
    """A raster's line of the report, and the files of it a mosaic takes (its output, or its block tiles, whose
    per-raster VRT is written here)."""
    entry = {key: result.get(key) for key in ("input", "status", "error", "seconds", "cpu_s", "megapixels",
                                              "worker", "clipped_pixels", "log") if result.get(key) is not None}
    if result["status"] == "failed" or "geometry" not in result:
        return entry, []
    if "blocks" not in result:
        entry["output"] = f"{stem}.tif"
        # an earlier run's blocks of it (another --block)
        _remove_files(out_dir, [f"{stem}.vrt"], f"{stem}.tiles")
        return entry, [{"file": f"{stem}.tif", "geometry": result["geometry"]}]
    g = result["geometry"]
    tiles = []
    for b in result["blocks"]:
        r0, r1, c0, c1 = b["block"]
        name = f"{stem}.tiles/{Path(b['output']).name}"
        tiles.append({"file": name, "geometry": b["geometry"], "dst": (c0, r0, c1 - c0, r1 - r0)})
    write_vrt_classes(out_dir / f"{stem}.vrt", g["width"], g["height"],
                       [{"file": t["file"], "width": t["dst"][2], "height": t["dst"][3], "dst": t["dst"]}
                        for t in tiles], k,
                       crs=g["crs"], geotransform=g["geotransform"] if g["crs"] or not g["gcps"] else None,
                       gcps=g["gcps"], gcp_crs=g["gcp_crs"])
    # the VRT in place: an earlier run's whole output of it, and tiles of another block grid, are removed
    current = {Path(t["file"]).name for t in tiles}
    folder = out_dir / f"{stem}.tiles"
    stale = [f"{stem}.tiles/{f.name}" for f in folder.iterdir()
             if re.fullmatch(re.escape(stem) + r"_r\d+_c\d+\.tif(" + re.escape(SIDECAR) + ")?", f.name)
             and f.name.removesuffix(SIDECAR) not in current]
    _remove_files(out_dir, [f"{stem}.tif", f"{stem}.tif{SIDECAR}", f"{stem}.tif.aux.xml"] + stale)
    entry.update(output=f"{stem}.vrt", tiles=[t["file"] for t in tiles],
                 blocks=[{k_: b.get(k_) for k_ in ("block", "status", "error", "seconds", "worker")
                          if b.get(k_) is not None} for b in result["blocks"]])
    return entry, [{"file": t["file"], "geometry": t["geometry"], "raster": f"{stem}.vrt"} for t in tiles]
