"""Same input, same labels: every backend and thread count on the NAIP quick-start raster, and the torch
backend's embeddings at any thread count and window size (the numpy 1.x / GDAL leg: tests/test_mapseg_gdal.py)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from conftest import at_torch_threads

from mapseg.artifact import load_artifact
from mapseg.segment import SegmentOptions, segment_raster

rasterio = pytest.importorskip("rasterio")
import rasterio.windows  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAIP = ROOT / "examples" / "naip_nd_2020_rgb.tif"
SHIPPED = ROOT / "model" / "best"


@pytest.fixture(scope="module")
def tiny(export_tiny_student):
    pytest.importorskip("torch")
    return export_tiny_student(max_k=6, random_var=True)


@pytest.mark.parametrize("model", ["tiny", "shipped"])
def test_torch_embeddings_do_not_depend_on_threads_or_window_size(request, model):
    """F.conv2d ran the tiny student's 1x1 projection elsewhere than oneDNN on one thread (all 2320 cells of
    this window differed in the last bit from 2 threads), and the shipped model's small windows elsewhere at
    any thread count; the backend now runs every convolution on oneDNN."""
    pytest.importorskip("torch")
    from mapseg.backends import TorchBackend

    backend = TorchBackend(load_artifact(request.getfixturevalue("tiny") if model == "tiny" else SHIPPED))
    image = np.random.default_rng(0).random((160, 232, 3), dtype=np.float32)
    runs = at_torch_threads(lambda: [backend.embed(image), backend.embed(image[:48, :64])])
    assert np.array_equal(runs[1][0], runs[2][0])
    assert np.array_equal(runs[1][1], runs[2][1])
    # a crop's cells away from its cut edges (the halo: 16 pixels, 4 cells) are the whole window's
    assert np.array_equal(runs[2][1][:8, :12], runs[2][0][:8, :12])


def _labels(path):
    with rasterio.open(path) as ds:
        return ds.read(1)


def test_backends_and_threads_agree_on_the_naip_raster(tmp_path):
    """numpy, onnx and torch, one window on two threads or two windows on one: >= 99.9 % of the labels agree
    (the backends' embeddings differ in the last bits, so the centres may too), and each backend's centres are
    the same bits at any thread count. A 512 x 512 crop of the raster keeps it quick."""
    src = tmp_path / "naip_crop.tif"
    with rasterio.open(NAIP) as ds:
        profile = {**ds.profile, "width": 512, "height": 512,
                   "transform": ds.window_transform(rasterio.windows.Window(0, 0, 512, 512))}
        with rasterio.open(src, "w", **profile) as out:
            out.write(ds.read(window=rasterio.windows.Window(0, 0, 512, 512)))
    runs = [("numpy", 2, 1), ("numpy", 1, 2)]
    runs += [("onnx", 2, 1)] if importlib.util.find_spec("onnxruntime") else []
    runs += [("torch", 2, 1), ("torch", 1, 2)] if importlib.util.find_spec("torch") else []
    labels, centres = {}, {}
    for backend, workers, threads in runs:
        out = tmp_path / f"{backend}_{workers}_{threads}.tif"
        report = segment_raster(src, out, SegmentOptions(k=5, model=SHIPPED, backend=backend, workers=workers,
                                                          threads=threads), progress=False, log=lambda m: None)
        labels[backend, threads] = _labels(out)
        centres.setdefault(backend, []).append(report["centers"]["centers"])
    reference = labels["numpy", 1]
    for run, got in labels.items():
        agreement = np.mean(got == reference)
        assert agreement >= 0.999, f"{run}: {100 * agreement:.3f} % of the labels agree with numpy"
    for backend, fitted in centres.items():
        assert all(c == fitted[0] for c in fitted), backend
