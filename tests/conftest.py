import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = ROOT.parent / "shared" / "datasets"
QGIS_PY = "/usr/bin/python3"                        # Debian's QGIS runs on the system Python
QGIS_PROCESS = shutil.which("qgis_process.bin")      # the wrapper script qgis_process is broken on Debian 3.22


@functools.lru_cache(maxsize=None)
def has_pyqgis() -> bool:
    """QGIS's Python with qgis.core and qgis.gui, headless."""
    if not os.path.exists(QGIS_PY):
        return False
    return subprocess.run([QGIS_PY, "-c", "import qgis.core, qgis.gui"], capture_output=True,
                          env={**os.environ, "QT_QPA_PLATFORM": "offscreen"}).returncode == 0


def needs_qgis(process: bool = True) -> list:
    """Marks of a test of real, headless QGIS: ``qgis``, and skipped with the reason where QGIS's Python (and,
    with ``process``, qgis_process.bin) is absent. ``.ci/run`` installs QGIS."""
    missing = not has_pyqgis() or (process and QGIS_PROCESS is None)
    return [pytest.mark.qgis, pytest.mark.skipif(
        missing, reason="QGIS is not installed (apt-get install -y --no-install-recommends qgis python3-qgis)")]


def need_data(rel: str) -> Path:
    """``SHARED_DATASETS / rel``, or the test is skipped when that file is absent."""
    path = SHARED_DATASETS / rel
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


def crop_raster(src, dst, window, bands=None) -> Path:
    """A georeferenced window ``(col, row, width, height)`` of a real raster written to ``dst`` as a plain
    GeoTIFF (CRS, transform, nodata kept; ``bands``: which, default all)."""
    import rasterio
    from rasterio.windows import Window

    with rasterio.open(src) as ds:
        win = Window(*window)
        data = ds.read(bands, window=win)
        profile = {**ds.profile, "width": win.width, "height": win.height, "transform": ds.window_transform(win),
                   "driver": "GTiff", "count": data.shape[0], "tiled": False}
    profile.pop("blockxsize", None), profile.pop("blockysize", None)
    with rasterio.open(dst, "w", **profile) as out:
        out.write(data)
    return Path(dst)


_BLOCKER = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            raise ImportError(name + ' is blocked for this test')
sys.meta_path.insert(0, _Block())
"""


def run_python(code: str, cwd, blocked=()) -> subprocess.CompletedProcess:
    """``code`` run by a fresh interpreter on this checkout, with the top-level packages in ``blocked``
    unimportable (as on a machine without them: QGIS's Python has numpy and GDAL only)."""
    script = f"BLOCKED = {sorted(blocked)!r}\n" + _BLOCKER + code
    return subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})

# Tiny, fast settings for trainer tests: the architecture and loop are the real ones.
TINY = [
    "student.width=16", "student.embed_dim=8", "student.norm_groups=4",
    "data.patch_sizes=32,64", "data.patch_size=64", "train.batch_size=2", "data.val_size=64",
    "data.val_samples=2", "model.kmeans_sample=512", "train.warmup_steps=2", "train.log_every=1",
    "train.eval_every=0", "train.image_every=0", "autoencoder.hidden=8",
]


@pytest.fixture
def tiny_overrides():
    return list(TINY)


@pytest.fixture(scope="session")
def export_tiny_student(tmp_path_factory):
    """``make(max_k=None, seed=0, random_var=False)`` -> the folder of a freshly exported tiny student
    (embed 8, width 16, depth 2, 4 norm groups, torch seeded with ``seed``; ``random_var``: running
    variances drawn from U(0.5, 2) so that folding the norms is exercised). Needs torch."""
    def make(max_k=None, seed: int = 0, random_var: bool = False) -> Path:
        import torch

        from training.artifact import export_artifact
        from training.models.student_cnn import StudentEmbeddingNet

        torch.manual_seed(seed)
        student = StudentEmbeddingNet(embed_dim=8, width=16, depth=2, norm_groups=4)
        if random_var:
            with torch.no_grad():
                for m in student.modules():
                    if hasattr(m, "running_var"):
                        m.running_var.uniform_(0.5, 2.0)
        out = tmp_path_factory.mktemp("m") / "best"
        export_artifact(student, {"model": {"max_k": max_k}} if max_k else {}, out, {"score": 0.0, "step": 0})
        return out

    return make


def pytest_configure(config):
    os.environ.setdefault("PYTHONHASHSEED", "0")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def at_torch_threads(fn, counts=(1, 2)) -> dict:
    """``{n: fn()}`` with torch's process-wide thread count at each ``n`` in turn, restored afterwards."""
    import torch

    before = torch.get_num_threads()
    try:
        got = {}
        for n in counts:
            torch.set_num_threads(n)
            got[n] = fn()
        return got
    finally:
        torch.set_num_threads(before)
