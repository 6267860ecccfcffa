"""mapseg imports and segments with torch (and onnxruntime) made unimportable."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

BLOCKER = """
import sys
class _Block:
    def __init__(self, names): self.names = names
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in self.names:
            raise ImportError(name + ' is blocked for this test')
        return None
sys.meta_path.insert(0, _Block(BLOCKED))
"""


def _run(code: str, blocked: set, cwd: Path) -> subprocess.CompletedProcess:
    script = f"BLOCKED = {sorted(blocked)!r}\n" + BLOCKER + code
    return subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_importing_mapseg_loads_no_heavy_module(tmp_path):
    code = """
import sys
import mapseg, mapseg.artifact, mapseg.network, mapseg.cluster, mapseg.segment, mapseg.backends, mapseg.raster, mapseg.cli
heavy = sorted(m for m in ('torch', 'onnxruntime', 'onnx', 'rasterio', 'training', 'tqdm', 'scipy', 'cv2') if m in sys.modules)
print('HEAVY', heavy)
"""
    res = _run(code, set(), tmp_path)
    assert res.returncode == 0, res.stderr
    assert "HEAVY []" in res.stdout


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
