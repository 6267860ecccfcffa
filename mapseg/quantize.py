"""The int8 variant of an artifact's network: onnxruntime static quantisation, calibrated on real rasters.

    mapseg quantize --model DIR --calibration A.tif B.tif ... [--check C.tif ...]

writes ``DIR/model.int8.onnx`` (what ``--precision int8`` runs, on the onnx backend) and
``DIR/model.int8.json`` (how it was made, the calibration inputs, and the label agreement with
float32 measured on the check rasters). Needs the ``onnx`` package (and onnxruntime's
quantisation tools, part of onnxruntime); without it, a clear error.

How (each choice measured on this project's 2-core AMD EPYC with AVX512-VNNI, bench/REPORT.md):

* QDQ format, which onnxruntime fuses into integer convolutions (QLinearConv) on the CPU;
  activations uint8 (asymmetric, per tensor), weights int8 (symmetric, per output channel),
  no reduced range (VNNI's u8 x s8 products do not saturate; on CPUs without VNNI,
  onnxruntime's AVX2/AVX512 u8s8 kernels may saturate on weights beyond 7 bits).
* Activation ranges: the 99.99th percentile of each tensor's values over the calibration
  windows (min-max, entropy, distribution, and the 99.999th and 99.9th percentiles gave lower
  label agreement with float32).
* The first convolution stays float32: with 3 input channels its int8 kernel was slower than
  the float32 one, and its quantised input (normalised colour) cost agreement.
* Calibration windows: the pipeline's own sampling windows (``sample_window_order``, 256-pixel
  cores read with the halo), scaled and nodata-filled as ``mapseg segment`` does, ``windows`` per
  raster; onnxruntime sees them one at a time (its histograms merge across passes; the activations
  of one window are held at a time, not those of all).

The labels of the int8 network are not those of float32: the sidecar and bench/bench_precision.py
say how far (pixels whose label agrees, K centres fitted once on the float32 features of a raster
and applied to both). Re-run the command after every re-export: a model.int8.onnx of another
export is refused (it records the weights digest it was made from).
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib.util
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .artifact import load_artifact
from .backends import INT8_MODEL, INT8_SIDECAR, build_onnx_model
from .errors import BackendUnavailable, SegmentError
from .features import load_features
from .fileio import remove_if_present, write_bytes_atomic, write_text_atomic
from .raster import OUTPUT_NODATA, io_env, open_reader
from .segment import fit_reader_centers, label_reader, read_window, scaling_for
from .upsample import NEAREST
from .windows import sample_window_order

SIDECAR_FORMAT = "mapseg-int8"
SIDECAR_VERSION = 1
WINDOWS_PER_RASTER = 8
PERCENTILE = 99.99
AGREEMENT_K = (5, 8)


def _need_quantization_tools():
    if importlib.util.find_spec("onnx") is None:
        raise BackendUnavailable("mapseg quantize needs the onnx package (pip install onnx)")
    try:
        from onnxruntime import quantization
    except ImportError as exc:
        raise BackendUnavailable(f"mapseg quantize needs onnxruntime with its quantisation tools ({exc}); "
                                 "pip install onnxruntime") from exc
    return quantization


def calibration_windows(paths, features, bands=None, windows: int = WINDOWS_PER_RASTER, seed: int = 0):
    """(images, per-raster info): ``windows`` sampling windows with valid pixels from every raster, each
    (h, w, 3) float32 in [0, 1] as the pipeline feeds the network (scaled, nodata and padding filled)."""
    images, info = [], []
    with io_env():
        for path in paths:
            with open_reader(path, bands) as reader:
                scaling = scaling_for(reader, features, None, seed)
                order, _ = sample_window_order(reader.height, reader.width, features.stride, features.halo, seed)
                taken = 0
                for win in order:
                    image, valid, _, _ = read_window(reader, win, scaling, features.fill)
                    if not valid[win.core_in_read].any():
                        continue
                    images.append(image)
                    taken += 1
                    if taken == windows:
                        break
                if not taken:
                    raise SegmentError(f"calibration raster {path} has no valid pixels")
                info.append({"path": str(path), "windows": taken, "scaling": scaling.description})
    return images, info


class _Windows:
    """onnxruntime's CalibrationDataReader over calibration windows, one pass per window (``__len__`` and
    ``set_range``: its CalibStridedMinMax option; windows differ in shape, which one pass cannot hold)."""

    def __init__(self, images):
        self.images = images
        self.set_range(0, len(images))

    def __len__(self):
        return len(self.images)

    def set_range(self, start_index: int, end_index: int):
        self.todo = iter(self.images[start_index:end_index])

    def get_next(self):
        image = next(self.todo, None)
        return None if image is None else {"image": image[None]}


def _named(model_bytes: bytes):
    """The float32 graph with every node named (the quantiser excludes nodes by name) and the first conv's name."""
    import onnx

    model = onnx.load_from_string(model_bytes)
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}_{node.output[0]}"
    first = next(n.name for n in model.graph.node if n.op_type == "Conv")
    return model, first


def quantize_graph(model_bytes: bytes, images, digest: str) -> tuple[bytes, dict]:
    """(int8 ONNX model, its settings): the float32 graph statically quantised, calibrated on ``images``."""
    quantization = _need_quantization_tools()
    import onnx

    model, first = _named(model_bytes)
    settings = {"format": "QDQ", "activations": "uint8, asymmetric, per tensor",
                "weights": "int8, symmetric, per output channel", "reduce_range": False,
                "quantized_ops": ["Conv"], "float32_nodes": [first],
                "calibration_method": f"percentile {PERCENTILE}"}
    with tempfile.TemporaryDirectory(prefix="mapseg-quantize-") as tmp:
        src, dst = Path(tmp) / "float32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(model, src)
        with contextlib.redirect_stdout(sys.stderr):  # its progress prints go with the log, not to stdout
            quantization.quantize_static(
                str(src), str(dst), _Windows(images), quant_format=quantization.QuantFormat.QDQ,
                per_channel=True, reduce_range=False, activation_type=quantization.QuantType.QUInt8,
                weight_type=quantization.QuantType.QInt8, op_types_to_quantize=["Conv"], nodes_to_exclude=[first],
                calibrate_method=quantization.CalibrationMethod.Percentile,
                extra_options={"CalibPercentile": PERCENTILE, "CalibStridedMinMax": 1})
        out = onnx.load(dst)
    del out.metadata_props[:]
    onnx.helper.set_model_props(out, {"weights_sha256": digest, "precision": "int8", "made_by": "mapseg quantize"})
    return out.SerializeToString(), settings


def label_agreement(paths, model_dir, bands=None, seed: int = 0, ks=AGREEMENT_K, log=None,
                    reference: str = "onnx", variant: str = "onnx:int8") -> list[dict]:
    """Per raster, the share of valid pixels whose label under ``variant`` (a backend spec, mapseg.backends.
    split_backend) equals the label under ``reference``, with K centres fitted on the raster's ``reference``
    sample and applied to both, for each K in ``ks``; labels drawn ``nearest`` (each cell's own), whatever the
    model's upsampling. Each raster's labels are held in memory whole."""
    ref = load_features(model_dir, reference)
    var = load_features(model_dir, variant)
    rows = []
    with io_env():
        for path in paths:
            with open_reader(path, bands) as reader:
                scaling = scaling_for(reader, ref, None, seed)
                row = {"path": str(path)}
                for k in ks:
                    centers = fit_reader_centers([reader], k, ref, seed)
                    # nearest: each cell's own label, the stricter measure (the guided upsampling averages the scores of
                    # 5 x 5 cells, which hides disagreements of single cells)
                    a = label_reader(reader, ref, scaling, centers, up=NEAREST)
                    b = label_reader(reader, var, scaling, centers, up=NEAREST)
                    valid = a != OUTPUT_NODATA
                    row[f"k{k}"] = round(float((a[valid] == b[valid]).mean()), 5)
                rows.append(row)
                if log:
                    log(f"agreement of {variant} with {reference} on {path}: "
                        + ", ".join(f"K={k} {100 * row[f'k{k}']:.2f} %" for k in ks))
    return rows


def quantize_artifact(model, calibration, check=None, *, bands=None, windows: int = WINDOWS_PER_RASTER,
                      seed: int = 0, log=None) -> dict:
    """Write ``model.int8.onnx`` and ``model.int8.json`` into the artifact folder ``model``; returns the sidecar.

    ``calibration``: rasters whose sampling windows calibrate the activation ranges; ``check``: rasters the
    label agreement with float32 is measured on (default: the calibration rasters, which the sidecar says).
    """
    log = log or (lambda msg: None)
    _need_quantization_tools()
    if not calibration:
        raise SegmentError("give --calibration with at least one raster")
    t0 = time.perf_counter()
    artifact = load_artifact(model)
    folder = Path(artifact.path)
    f32 = load_features(folder, "numpy")  # the window geometry and fill (no network runs here)
    images, rasters = calibration_windows(calibration, f32, bands, windows, seed)
    log(f"calibration: {len(images)} windows from {len(rasters)} raster(s)")
    source = artifact.onnx_path.read_bytes() if artifact.onnx_path is not None else build_onnx_model(artifact)
    data, settings = quantize_graph(source, images, artifact.digest)
    # the old sidecar goes first: a sidecar present always describes the model.int8.onnx beside it
    remove_if_present(folder / INT8_SIDECAR)
    write_bytes_atomic(folder / INT8_MODEL, data)
    log(f"wrote {folder / INT8_MODEL} ({len(data) / 1e6:.2f} MB)")
    checked = list(check) if check else list(calibration)
    agreement = label_agreement(checked, folder, bands, seed, log=log)
    import onnxruntime
    import onnx

    sidecar = {
        "format": SIDECAR_FORMAT, "version": SIDECAR_VERSION, "made_by": "mapseg quantize",
        "made_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {"weights_sha256": artifact.digest,
                  "from": "model.onnx" if artifact.onnx_path is not None else "model.npz (graph built in memory)"},
        "int8_sha256": hashlib.sha256(data).hexdigest(),
        "quantization": settings,
        "calibration": {"rasters": rasters, "windows_per_raster": windows, "seed": seed,
                        "bands": list(bands) if bands else None},
        "agreement": {"what": "share of valid pixels whose int8 label equals the float32 label (onnx backend), "
                              "K centres fitted on the raster's float32 sample, applied to both",
                      "rasters_are": "check rasters" if check else "the calibration rasters (no --check given)",
                      "k": list(AGREEMENT_K), "rasters": agreement,
                      "min": min(r[f"k{k}"] for r in agreement for k in AGREEMENT_K)},
        "software": {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__, "numpy": np.__version__,
                     "python": platform.python_version(), "machine": platform.machine()},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_text_atomic(folder / INT8_SIDECAR, json.dumps(sidecar, indent=1) + "\n")
    log(f"wrote {folder / INT8_SIDECAR}: lowest agreement with float32 "
        f"{100 * sidecar['agreement']['min']:.2f} % ({sidecar['seconds']:.0f} s)")
    return sidecar
