"""docs/api.md: every ```python block runs, in order, in one session (as a notebook would), in a folder holding
`scene.tif` and `rasters/` (crops of real GeoNRW tiles): an example that breaks fails the suite."""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "api.md"
TILES = ROOT.parent / "shared" / "datasets" / "geonrw_dev" / "images"

pytestmark = [pytest.mark.data, pytest.mark.slow,
              pytest.mark.skipif(not TILES.is_dir(), reason=f"real imagery not found at {TILES}")]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def write_crop(src_path: Path, dst: Path, size: int = 384) -> None:
    """A size x size GeoTIFF crop (georeferenced) of a real raster: small, so the examples run in seconds."""
    with rasterio.open(src_path) as src:
        window = rasterio.windows.Window(0, 0, size, size)
        profile = {**src.profile, "width": size, "height": size, "transform": src.window_transform(window),
                   "tiled": False}
        profile.pop("blockxsize", None), profile.pop("blockysize", None)
        data = src.read(window=window)
    with rasterio.open(dst, "w", **profile) as out:
        out.write(data)


def test_api_examples_run(tmp_path, monkeypatch, capsys):
    tiles = sorted(TILES.glob("*.tif"))[:3]
    if len(tiles) < 3:
        pytest.skip(f"fewer than 3 GeoNRW tiles in {TILES}")
    write_crop(tiles[0], tmp_path / "scene.tif")
    (tmp_path / "rasters").mkdir()
    for tile in tiles[1:]:
        write_crop(tile, tmp_path / "rasters" / tile.name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MAPSEG_MODEL", str(ROOT / "model" / "best"))  # the default model, from any folder
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) >= 6
    session: dict = {"__name__": "__docs__"}
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"{DOC.name} python block {i + 1}", "exec"), session)
        except Exception as exc:  # noqa: BLE001 - name the block that broke
            raise AssertionError(f"{DOC.name} python block {i + 1} failed: {exc!r}\n{code}") from exc
    out = capsys.readouterr().out
    # what the examples say they do
    with rasterio.open("part_labels.tif") as ds, rasterio.open("scene.tif") as src:
        assert ds.shape == (256, 320) and ds.crs == src.crs and ds.transform.c > src.transform.c
        assert (ds.read(1) < 5).all()
    assert "same labels: 1.0" in out or float(re.search(r"same labels: ([0-9.]+)", out).group(1)) >= 0.999
    # one label raster per input (beside each: its .qml style and .tif.aux.xml attribute table)
    assert sorted(p.name for p in Path("labels").glob("*.tif")) == sorted(p.name for p in Path("rasters").iterdir())
    assert all((Path("labels") / p.name).with_suffix(".qml").is_file() for p in Path("rasters").iterdir())
    assert Path("centers.json").is_file()
    assert "output left behind: False" in out and not Path("cancelled.tif").exists()
    assert not any(name.startswith(".") for name in os.listdir("."))  # no temporaries left
    with rasterio.open("a.tif") as a, rasterio.open("b.tif") as b:
        assert int(a.tags()["MAPSEG_K"]) == 6 and int(b.tags()["MAPSEG_K"]) == 4
    assert Path("segmenter.onnx").is_file()
    assert np.asarray(session["labels"]).dtype == np.uint8
