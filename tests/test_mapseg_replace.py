"""Moving a finished output into place when the old file is held open (Windows: QGIS showing the layer, a
virus scanner, an indexer): ``mapseg.fileio.replace_output`` retries, then says what to do and keeps the old
file."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
from affine import Affine  # noqa: E402

import mapseg.fileio as fileio  # noqa: E402
from mapseg.cli import main  # noqa: E402
from mapseg.errors import OutputError  # noqa: E402

CRS, TRANSFORM = "EPSG:32633", Affine(0.5, 0, 500000.0, 0, -0.5, 4100000.0)
MESSAGE = "is open in another program (close it, or choose another output name); nothing was replaced"


@pytest.fixture(scope="module")
def model(export_tiny_student):
    return str(export_tiny_student(max_k=6))


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch):
    """The back-off (four tries more) without its waits."""
    monkeypatch.setattr(fileio, "REPLACE_BACKOFF_S", (0.0,) * len(fileio.REPLACE_BACKOFF_S))


def scene(path, h: int = 48, w: int = 64) -> Path:
    rng = np.random.default_rng(0)
    region = (np.mgrid[0:h, 0:w][0] > h // 2).astype(int) * 2 + (np.mgrid[0:h, 0:w][1] > w // 2).astype(int)
    colours = np.array([[40, 60, 30], [200, 190, 170], [90, 140, 60], [60, 80, 160]], float)
    data = np.clip(colours[region] + rng.normal(0, 8, (h, w, 3)), 1, 255).astype(np.uint8).transpose(2, 0, 1)
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=3, dtype="uint8", crs=CRS,
                       transform=TRANSFORM) as ds:
        ds.write(data)
    return Path(path)


def digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def refusing(monkeypatch, times: int | None, exc=None):
    """os.replace that fails ``times`` times (None: always) as a file held open does, then replaces."""
    real, calls = os.replace, []

    def fake(src, dst, *a, **kw):
        calls.append(Path(dst).name)
        if times is None or len(calls) <= times:
            raise exc or PermissionError(13, "Permission denied", str(dst))
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", fake)
    return calls


def segment(model, src, out, capsys) -> tuple[int, str]:
    code = main(["segment", str(src), str(out), "-k", "3", "--model", model, "--no-progress"])
    return code, capsys.readouterr().err


def test_a_move_refused_once_is_retried(model, tmp_path, capsys, monkeypatch):
    src, out = scene(tmp_path / "in.tif"), tmp_path / "out.tif"
    calls = refusing(monkeypatch, 1)
    code, err = segment(model, src, out, capsys)
    assert code == 0, err
    assert calls[:2] == ["out.tif", "out.tif"]
    with rasterio.open(out) as ds:
        assert ds.read(1).shape == (48, 64)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_an_output_held_open_is_kept_and_the_user_told(model, tmp_path, capsys, monkeypatch):
    src, out = scene(tmp_path / "in.tif"), tmp_path / "out.tif"
    assert segment(model, src, out, capsys)[0] == 0
    before, names = digest(out), sorted(p.name for p in tmp_path.iterdir())
    calls = refusing(monkeypatch, None)
    code, err = segment(model, src, out, capsys)
    assert code == 2 and f"error: {out} {MESSAGE}" in err, err
    assert digest(out) == before                                   # the old file, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == names     # no temporary left
    assert calls == ["out.tif"] * 5                                # one try and four retries


@pytest.mark.parametrize("winerror", [5, 32])
def test_windows_sharing_errors_are_retried(tmp_path, monkeypatch, winerror):
    exc = OSError(13, "The process cannot access the file")
    exc.winerror = winerror
    calls = refusing(monkeypatch, 2, exc)
    fileio.write_text_atomic(tmp_path / "a.txt", "new")
    assert (tmp_path / "a.txt").read_text() == "new" and len(calls) == 3


def test_the_direct_call_keeps_the_old_file_and_removes_the_temporary(tmp_path, monkeypatch):
    old, tmp = tmp_path / "a.txt", tmp_path / ".a.txt.tmp"
    old.write_text("old")
    tmp.write_text("new")
    refusing(monkeypatch, None)
    with pytest.raises(OutputError, match="nothing was replaced"):
        fileio.replace_output(tmp, old)
    assert old.read_text() == "old" and not tmp.exists()


def test_other_errors_are_not_retried(tmp_path, monkeypatch):
    calls = refusing(monkeypatch, None, FileNotFoundError(2, "No such file or directory"))
    with pytest.raises(FileNotFoundError):
        fileio.replace_output(tmp_path / "missing", tmp_path / "a.txt")
    assert len(calls) == 1
