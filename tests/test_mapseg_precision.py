"""--precision int8 (onnx, model.int8.onnx from mapseg quantize) and bf16 (torch): what each backend runs,
the clear refusals, the quantize command's files, and the window- and thread-invariance of the variants."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import crop_raster

from mapseg import cli
from mapseg.artifact import load_artifact
from mapseg.backends import INT8_MODEL, INT8_SIDECAR, PRECISIONS, BackendUnavailable, make_backend, split_backend
from mapseg.errors import ArtifactError

ROOT = Path(__file__).resolve().parents[1]
NAIP = ROOT / "examples" / "naip_nd_2020_rgb.tif"
MODEL = ROOT / "model" / "best"
HAS_QUANT = importlib.util.find_spec("onnx") is not None and importlib.util.find_spec("onnxruntime") is not None


@pytest.fixture(scope="module")
def rasters(tmp_path_factory):
    folder = tmp_path_factory.mktemp("precision")
    return (crop_raster(NAIP, folder / "a.tif", (0, 0, 300, 260), [1, 2, 3]),
            crop_raster(NAIP, folder / "b.tif", (520, 400, 320, 300), [1, 2, 3]))


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, rasters):
    """A copy of the shipped model with model.int8.onnx and its sidecar made by ``mapseg quantize``."""
    if not HAS_QUANT:
        pytest.skip("onnx / onnxruntime not installed")
    folder = tmp_path_factory.mktemp("q") / "model"
    shutil.copytree(MODEL, folder)
    for name in (INT8_MODEL, INT8_SIDECAR):  # an int8 file made for the shipped model is remade here
        (folder / name).unlink(missing_ok=True)
    code = cli.main(["quantize", "--model", str(folder), "--calibration", str(rasters[0]), "--windows", "3",
                     "--check", str(rasters[1])])
    assert code == 0
    return folder


def test_split_backend():
    assert split_backend("onnx") == ("onnx", "float32")
    assert split_backend("onnx:int8") == ("onnx", "int8")
    assert split_backend("auto", "bf16") == ("auto", "bf16")
    with pytest.raises(ValueError, match="unknown precision"):
        split_backend("onnx:fp8")
    with pytest.raises(ValueError, match="disagree"):
        split_backend("onnx:int8", "bf16")
    assert PRECISIONS[0] == "float32"


@pytest.mark.parametrize("spec, message", [
    ("numpy:int8", "numpy backend runs float32 only"),
    ("numpy:bf16", "numpy backend runs float32 only"),
    ("torch:int8", "int8 runs on --backend onnx"),
    ("onnx:bf16", "no bfloat16 convolution"),
])
def test_precision_a_backend_does_not_run_is_refused(spec, message):
    with pytest.raises(BackendUnavailable, match=message):
        make_backend(spec, load_artifact(MODEL))


def test_int8_without_its_file_says_how_to_make_it(tmp_path):
    pytest.importorskip("onnxruntime")
    folder = tmp_path / "model"
    shutil.copytree(MODEL, folder)
    (folder / INT8_MODEL).unlink(missing_ok=True)
    for spec in ("onnx:int8", "auto:int8"):
        with pytest.raises(BackendUnavailable, match="mapseg quantize --model"):
            make_backend(spec, load_artifact(folder))


def test_quantize_writes_the_model_and_its_sidecar(quantized, rasters):
    sidecar = json.loads((quantized / INT8_SIDECAR).read_text())
    art = load_artifact(quantized)
    assert sidecar["format"] == "mapseg-int8" and sidecar["model"]["weights_sha256"] == art.digest
    assert [r["path"] for r in sidecar["calibration"]["rasters"]] == [str(rasters[0])]
    assert sidecar["calibration"]["rasters"][0]["windows"] == 3
    assert sidecar["agreement"]["rasters_are"] == "check rasters"
    row = sidecar["agreement"]["rasters"][0]
    assert row["path"] == str(rasters[1]) and 0.8 < row["k5"] <= 1 and 0.8 < row["k8"] <= 1
    import hashlib
    assert sidecar["int8_sha256"] == hashlib.sha256((quantized / INT8_MODEL).read_bytes()).hexdigest()
    assert sidecar["quantization"]["float32_nodes"] and sidecar["quantization"]["format"] == "QDQ"


def _naip(height: int = 400, width: int = 360) -> np.ndarray:
    """Real pixels (the quantised ranges are calibrated on real imagery, not noise), (h, w, 3) in [0, 1]."""
    with rasterio.open(NAIP) as ds:
        data = ds.read([1, 2, 3], window=rasterio.windows.Window(100, 200, width, height))
    return np.ascontiguousarray(data.transpose(1, 2, 0), dtype=np.float32) / 255


def test_int8_embeddings_close_to_float32_and_window_invariant(quantized):
    art = load_artifact(quantized)
    i8, message = make_backend("onnx:int8", art, threads=1)
    assert "model.int8.onnx" in message and "precision int8" in message and i8.precision == "int8"
    f32, _ = make_backend("onnx", art, threads=1)
    image = _naip()
    whole, ref = i8.embed(image), f32.embed(image)
    cos = (whole * ref).sum(-1)
    assert cos.mean() > 0.98 and cos.min() > 0.8  # close, not equal: int8 labels differ near ties
    assert not np.array_equal(whole, ref)
    # the same bits in any window (halo of 4 cells each side past the edge contamination) and at 2 threads
    for y, x, h, w in ((0, 0, 200, 160), (64, 48, 180, 256), (120, 200, 280, 160)):
        part = i8.embed(image[y:y + h, x:x + w])
        cy, cx = y // 4, x // 4
        inner = (slice(4, h // 4 - 3), slice(4, w // 4 - 3))
        np.testing.assert_array_equal(part[inner], whole[cy:cy + h // 4, cx:cx + w // 4][inner])
    two, _ = make_backend("onnx:int8", art, threads=2)
    np.testing.assert_array_equal(two.embed(image), whole)


def test_int8_of_another_export_is_refused(quantized, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(quantized, other)
    torch = pytest.importorskip("torch")
    from training.artifact import export_artifact
    from training.models.student_cnn import StudentEmbeddingNet

    torch.manual_seed(1)
    fresh = tmp_path / "fresh"
    export_artifact(StudentEmbeddingNet(embed_dim=8, width=16, depth=2, norm_groups=4), {}, fresh,
                    {"score": 0, "step": 0})
    shutil.copy(quantized / INT8_MODEL, fresh / INT8_MODEL)
    with pytest.raises(BackendUnavailable, match="another export.*mapseg quantize"):
        make_backend("onnx:int8", load_artifact(fresh))
    (other / INT8_MODEL).write_bytes(b"not a model")
    with pytest.raises(ArtifactError, match="model.int8.onnx cannot be loaded.*mapseg quantize"):
        make_backend("onnx:int8", load_artifact(other))


def test_quantize_without_onnx_is_a_clear_error(monkeypatch, tmp_path, rasters, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    folder = tmp_path / "model"
    shutil.copytree(MODEL, folder)
    (folder / INT8_MODEL).unlink(missing_ok=True)
    assert cli.main(["quantize", "--model", str(folder), "--calibration", str(rasters[0])]) == 2
    assert "needs the onnx package (pip install onnx)" in capsys.readouterr().err
    assert not (folder / INT8_MODEL).exists()


def test_segment_int8_says_so_in_log_and_report(quantized, rasters, tmp_path, capsys):
    report = tmp_path / "r.json"
    code = cli.main(["segment", str(rasters[1]), str(tmp_path / "l.tif"), "-k", "4", "--model", str(quantized),
                     "--precision", "int8", "--report", str(report), "--no-progress", "--tile", "128"])
    assert code == 0
    assert "precision int8" in capsys.readouterr().err
    data = json.loads(report.read_text())
    assert data["precision"] == "int8" and data["backend"] == "onnx"
    # labels do not depend on the window size in int8 either
    cli.main(["segment", str(rasters[1]), str(tmp_path / "m.tif"), "-k", "4", "--model", str(quantized),
              "--precision", "int8", "--no-progress", "--tile", "1024"])
    with rasterio.open(tmp_path / "l.tif") as a, rasterio.open(tmp_path / "m.tif") as b:
        np.testing.assert_array_equal(a.read(1), b.read(1))


def test_segment_int8_on_numpy_is_an_error(tmp_path, rasters, capsys):
    code = cli.main(["segment", str(rasters[0]), str(tmp_path / "l.tif"), "-k", "4", "--backend", "numpy",
                     "--precision", "int8", "--no-progress"])
    assert code == 2
    assert "numpy backend runs float32 only" in capsys.readouterr().err
    assert not (tmp_path / "l.tif").exists()


def test_bf16_close_to_float32_and_invariant():
    torch = pytest.importorskip("torch")
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("no oneDNN bfloat16 here")
    art = load_artifact(MODEL)
    bf, message = make_backend("torch:bf16", art)
    assert "precision bf16" in message and bf.precision == "bf16"
    f32, _ = make_backend("torch", art)
    image = _naip()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        whole, ref = bf.embed(image), f32.embed(image)
        cos = (whole * ref).sum(-1)
        assert cos.mean() > 0.999 and not np.array_equal(whole, ref)
        for y, x, h, w in ((0, 0, 200, 160), (64, 48, 180, 256)):
            part = bf.embed(image[y:y + h, x:x + w])
            cy, cx = y // 4, x // 4
            inner = (slice(4, h // 4 - 3), slice(4, w // 4 - 3))
            np.testing.assert_array_equal(part[inner], whole[cy:cy + h // 4, cx:cx + w // 4][inner])
        torch.set_num_threads(2)
        np.testing.assert_array_equal(bf.embed(image), whole)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("name", [INT8_MODEL, INT8_SIDECAR])
def test_an_output_never_overwrites_the_int8_model_files(tmp_path, rasters, name):
    from mapseg.errors import OutputError
    from mapseg.segment import SegmentOptions, check_run_outputs

    model = tmp_path / "model"
    model.mkdir()
    (model / name).write_bytes(b"int8")
    info = type("Info", (), {"files": (), "width": 8, "height": 8})()
    with pytest.raises(OutputError, match=name):
        check_run_outputs({"output": str(model / name)}, [(str(rasters[0]), info)],
                          SegmentOptions(k=3, model=str(model)))
    assert (model / name).read_bytes() == b"int8"
