"""mapseg imports and segments with torch (and onnxruntime) made unimportable."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import run_python

ROOT = Path(__file__).resolve().parents[1]

def _run(code: str, blocked: set, cwd: Path) -> subprocess.CompletedProcess:
    return run_python(code, cwd, blocked)


def test_importing_every_mapseg_module_loads_no_heavy_module(tmp_path):
    """Every module of mapseg (the API, the CLI, batch, vectors, legends, ONNX export, quantisation, raster I/O)
    imports with numpy alone: each optional library is loaded only by the function that needs it."""
    code = """
import importlib, pkgutil, sys
import mapseg
names = sorted(m.name for m in pkgutil.walk_packages(mapseg.__path__, 'mapseg.') if m.name != 'mapseg.__main__')
for name in names:
    importlib.import_module(name)
heavy = ('torch', 'onnxruntime', 'onnx', 'rasterio', 'osgeo', 'shapely', 'pyogrio', 'fiona', 'dask', 'distributed',
         'threadpoolctl', 'training', 'tqdm', 'scipy', 'cv2')
print('MODULES', len(names))
print('HEAVY', sorted(m for m in heavy if m in sys.modules))
"""
    res = _run(code, set(), tmp_path)
    assert res.returncode == 0, res.stderr
    assert "HEAVY []" in res.stdout
    assert int(res.stdout.split("MODULES")[1].split()[0]) >= 25  # the walk found the package's modules


@pytest.fixture(scope="module")
def artifact_dir(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from training.artifact import export_artifact
    from training.models.student_cnn import StudentEmbeddingNet

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tf") / "a"
    export_artifact(StudentEmbeddingNet(embed_dim=8, width=16, depth=2, norm_groups=4), {}, out,
                    {"score": 0, "step": 0})
    return out


def test_segments_without_torch(artifact_dir, tmp_path):
    import rasterio
    from affine import Affine

    rng = np.random.default_rng(0)
    data = (rng.random((3, 70, 90)) * 255).astype(np.uint8)
    src = tmp_path / "in.tif"
    with rasterio.open(src, "w", driver="GTiff", width=90, height=70, count=3, dtype="uint8", crs="EPSG:32633",
                       transform=Affine(2, 0, 500000, 0, -2, 4000000)) as ds:
        ds.write(data)
    code = f"""
import sys
from mapseg.cli import main
rc = main(['segment', {str(src)!r}, {str(tmp_path / 'out.tif')!r}, '-k', '3', '--model', {str(artifact_dir)!r},
           '--tile', '32', '--no-progress', '--report', {str(tmp_path / 'r.json')!r}])
print('LOADED', sorted(m for m in ('torch', 'onnxruntime') if m in sys.modules))
sys.exit(rc)
"""
    res = _run(code, {"torch", "onnxruntime", "onnx"}, tmp_path)
    assert res.returncode == 0, res.stderr
    assert "LOADED []" in res.stdout
    assert "backend auto -> numpy" in res.stderr and "torch" in res.stderr  # says what it skipped and why
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["backend"] == "numpy"
    with rasterio.open(tmp_path / "out.tif") as ds:
        labels = ds.read(1)
    assert labels.shape == (70, 90) and set(np.unique(labels)) <= {0, 1, 2}


def test_asking_for_torch_without_torch_is_a_clear_error(artifact_dir, tmp_path):
    code = f"""
import sys
from mapseg.cli import main
sys.exit(main(['info', '--model', {str(artifact_dir)!r}]) or main(['segment', 'x.tif', 'y.tif', '-k', '2',
         '--model', {str(artifact_dir)!r}, '--backend', 'torch']))
"""
    res = _run(code, {"torch"}, tmp_path)
    assert res.returncode == 2
    assert "torch is not installed" in res.stderr
    assert "backend torch   unavailable" in res.stdout
