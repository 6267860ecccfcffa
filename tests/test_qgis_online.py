"""Online layers (XYZ, WMS, WCS) as plugin inputs: ``map_segmenter.render`` in real, headless QGIS, offline.

``tests/qgis/online_checks.py`` (QGIS's Python) cuts local Web Mercator XYZ tiles from a real aerial raster,
adds them as an XYZ layer (file:// URL; also over HTTP, and as a WMS, from local servers: no network), renders
extents with ``render_layer_to_geotiff`` and segments one result with mapseg; here the outputs are checked
independently with rasterio: CRS, geotransform, size, mask, and pixels against the tiles (exact on their own
grid; against a GDAL warp in other CRSs). WCS is not served here: it goes through the same raster pipe.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import QGIS_PY, needs_qgis

from conftest import need_data

ROOT = Path(__file__).resolve().parents[1]


pytestmark = needs_qgis() + [pytest.mark.data]

rasterio = pytest.importorskip("rasterio")


@pytest.fixture(scope="module")
def online(tmp_path_factory):
    source = need_data("ngi_aerial/ngi_rgb_byte_1.tif")
    work = tmp_path_factory.mktemp("online")
    env = {**os.environ, "HOME": str(work / "home"), "QT_QPA_PLATFORM": "offscreen"}
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)
    (work / "home").mkdir()
    r = subprocess.run([QGIS_PY, str(ROOT / "tests" / "qgis" / "online_checks.py"), str(ROOT / "qgis_plugin"),
                        str(source), str(work)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    return {"res": res, "work": work, "source": source}


def _warp(src, like, resampling, shift=(0.0, 0.0)):
    """``src`` (a dataset) warped onto ``like``'s grid (moved by ``shift`` pixels): (bands, h, w)."""
    from affine import Affine
    from rasterio.warp import reproject

    out = np.zeros((src.count,) + like.shape, np.uint8)
    reproject(src.read(), out, src_transform=src.transform, src_crs=src.crs,
              dst_transform=like.transform @ Affine.translation(*shift), dst_crs=like.crs, resampling=resampling)
    return out


def test_which_layers_need_rendering(online):
    assert online["res"]["needs_rendering"] == {"xyz": True, "gdal": False, "wms": True, "wcs": True,
                                                "arcgismapserver": True}


def test_on_the_tiles_grid_the_render_is_the_tiles(online):
    res, work = online["res"], online["work"]
    assert res["tiles_written"] > 20 and res["tiles_skipped"] >= 1      # a missing tile is transparent, not an error
    assert res["wms_valid"]
    for name in ("mercator", "faded", "thread", "http", "wms"):
        assert res[name]["error"] is None and res[name]["exists"], (name, res[name])
    c0, r0, w, h = res["mercator_window"]
    with rasterio.open(work / "mosaic_3857.tif") as m, rasterio.open(work / "mercator.tif") as o:
        mosaic = m.read()
        assert o.crs.to_epsg() == 3857 and o.count == 3 and o.dtypes == ("uint8",) * 3
        assert (o.width, o.height) == (w, h)
        assert o.transform.almost_equals(m.transform @ rasterio.Affine.translation(c0, r0), precision=1e-6)
        assert abs(o.transform.a - res["res"]) < 1e-9 and abs(o.transform.e + res["res"]) < 1e-9
        assert all(f == [rasterio.enums.MaskFlags.per_dataset] for f in o.mask_flag_enums)
        pixels, valid = o.read(), o.read_masks(1) > 0
    ref = np.zeros((4, h, w), np.uint8)
    ref[:, :, :mosaic.shape[2] - c0] = mosaic[:, r0:r0 + h, c0:]      # the extent reaches 200 px past the tiles
    assert (valid == (ref[3] > 0)).all()                                # the mask is the tiles' alpha
    assert not valid[:, -200:].any() and valid.mean() > 0.4
    assert (pixels[:, valid] == ref[:3, valid]).all()                   # pixel for pixel the tiles
    assert (pixels[:, ~valid] == 0).all()
    # the WMS got one GetMap per 1024-pixel window, in the requested CRS, at the window's size
    assert sorted(map(tuple, res["wms_get_maps"])) == sorted(
        ("EPSG:3857", min(1024, w - c), min(1024, h - r)) for r in range(0, h, 1024) for c in range(0, w, 1024))
    # 50 % layer opacity: same pixels, no mask; from a worker thread, over HTTP, and from a WMS: the same
    for name in ("faded", "thread", "http", "wms"):
        with rasterio.open(work / f"{name}.tif") as f:
            assert (f.read() == pixels).all() and ((f.read_masks(1) > 0) == valid).all(), name


@pytest.mark.parametrize("name", ["source", "geographic"])
def test_in_another_crs_the_render_is_georeferenced(online, name):
    from rasterio.enums import Resampling

    res, work = online["res"], online["work"]
    assert res[name]["error"] is None, res[name]
    with rasterio.open(work / "mosaic_3857.tif") as m, rasterio.open(work / f"{name}.tif") as o, \
            rasterio.open(online["source"]) as s:
        if name == "source":            # the source's CRS and grid at 5 m: the source's own pixels
            c0, r0, w, h = res["source_window"]
            assert o.crs == s.crs and (o.width, o.height) == (w, h)
            assert o.transform.almost_equals(s.window_transform(((r0, r0 + h), (c0, c0 + w))), precision=1e-6)
            original = s.read(window=((r0, r0 + h), (c0, c0 + w))).astype(int)
            assert np.abs(o.read().astype(int) - original).mean() < 8          # resampled twice (tiles, render)
        else:                           # EPSG:4326: 5 m in degrees at the centre latitude, from the extent's corner
            mx, my = res["metres_per_degree"]
            x0, y0, x1, y1 = res["geographic_extent"]
            assert o.crs.to_epsg() == 4326
            assert math.isclose(o.transform.a, 5 / mx, rel_tol=1e-9) and math.isclose(-o.transform.e, 5 / my,
                                                                                      rel_tol=1e-9)
            assert math.isclose(o.transform.c, x0, abs_tol=1e-9) and math.isclose(o.transform.f, y1, abs_tol=1e-9)
            assert (o.width, o.height) == (round((x1 - x0) * mx / 5), round((y1 - y0) * my / 5))
        pixels = o.read().astype(int)
        assert (o.read_masks(1) > 0).all()                      # inside the tiles' data: nothing masked

        def mad(shift):
            ref = _warp(m, o, Resampling.bilinear, shift)
            ok = ref[3] == 255
            return np.abs(pixels[:, ok] - ref[:3, ok]).mean()

        here = mad((0.0, 0.0))
        assert here < 5, here
        # a grid off by one pixel, or by half a pixel, either way matches worse: the georeference is right to a
        # fraction of a pixel
        for shift in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            assert mad(shift) > 1.3 * here, (shift, mad(shift), here)
        for shift in ((0.5, 0), (0, 0.5)):
            assert mad(shift) > here + 0.3, (shift, mad(shift), here)


def test_limits_errors_and_cancel_leave_no_file(online):
    res = online["res"]
    big = res["too_big"]
    assert not big["exists"] and "limit of 0.1 megapixels" in big["error"] and "1440 x 1988" in big["error"]
    assert "coarser resolution (at least 25.6 m per pixel" in big["error"] and "smaller extent" in big["error"]
    assert not res["bad_extent"]["exists"] and "needs an extent" in res["bad_extent"]["error"]
    down = res["unreachable"]
    assert not down["exists"] and "gave no opaque pixel" in down["error"] and "did not answer" in down["error"]
    cancel = res["cancel"]
    assert cancel["error"] == "Cancelled while rendering: no output was written" and not cancel["exists"]
    assert len(cancel["progress"]) == 1 and cancel["progress"][0] < 100      # stopped after its first window
    assert "192 window(s)" in cancel["log"]
    # cancelled while tiles download (a server answering after 3 s, 4 windows): stops at once, not window by window
    slow = res["cancel_download"]
    assert slow["error"] == "Cancelled while rendering: no output was written" and not slow["exists"]
    assert slow["seconds"] < 2.5, slow


def test_rendered_colours_are_unpremultiplied_and_transparency_is_the_mask(online):
    argb = online["res"]["argb"]
    # premultiplied (100, 50, 25) at alpha 128 is (199, 100, 50); alpha 0 is masked; alpha 255 is itself
    assert argb["premultiplied"] == [[[199, 0, 10], [100, 0, 20], [50, 0, 30]], [True, False, True]]
    # plain ARGB: colours as they are; below half opacity masked (and zeroed)
    assert argb["plain"] == [[[0, 200], [0, 100], [0, 50]], [False, True]]


def test_mapseg_segments_the_rendered_raster(online):
    res, work = online["res"], online["work"]
    assert res["segment"] == {"k": 4, "exists": True}
    with rasterio.open(work / "mercator.tif") as o, rasterio.open(work / "labels.tif") as lab:
        assert lab.crs == o.crs and lab.transform == o.transform and lab.shape == o.shape
        labels, valid = lab.read(1), o.read_masks(1) > 0
    assert (labels[~valid] == 255).all() and set(np.unique(labels[valid])) == {0, 1, 2, 3}
    assert res["imported"] == []        # neither torch nor rasterio nor onnxruntime in QGIS's Python


def test_the_algorithm_segments_an_xyz_layer_over_an_extent(online):
    """mapseg:segment with an online (XYZ) layer as INPUT: QGIS draws it over EXTENT at RESOLUTION into a
    temporary GeoTIFF (removed after), which is segmented; without an extent the run is refused."""
    alg, work = online["res"]["algorithm"], online["work"]
    assert alg["ok"] and alg["k"] == 4 and alg["exists"], alg
    with rasterio.open(work / "algorithm_labels.tif") as lab:
        assert lab.crs.to_epsg() == 3857
        assert lab.res == pytest.approx((alg["res"], alg["res"]))
        assert lab.bounds.left == pytest.approx(alg["extent"][0]) and lab.bounds.top == pytest.approx(alg["extent"][3])
        assert set(np.unique(lab.read(1))) <= {0, 1, 2, 3, 255}
    assert alg["temp_left"] == []                     # the rendered temporary is removed
    assert alg["no_extent_ok"] is False               # an online layer without an extent: refused, no output
