"""mapseg on the real imagery in ../shared/datasets (skipped when it is absent)."""
from __future__ import annotations


import numpy as np
import pytest
from conftest import SHARED_DATASETS
from conftest import need_data as need

rasterio = pytest.importorskip("rasterio")
torch = pytest.importorskip("torch")

from mapseg.cli import main  # noqa: E402
from mapseg.segment import SegmentOptions, segment_raster  # noqa: E402
from training.export import smoke_export  # noqa: E402

DATA = SHARED_DATASETS
pytestmark = [pytest.mark.data,
              pytest.mark.skipif(not DATA.is_dir(), reason=f"real imagery not found at {DATA}")]
QUIET = {"progress": False, "log": lambda msg: None}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The documented smoke export: a default-architecture student trained by the real trainer."""
    out, _ = smoke_export(tmp_path_factory.mktemp("smoke") / "model", seed=7, steps=1, embed_dim=8, max_k=4,
                          patch_size=32)
    return str(out)


@pytest.fixture(scope="module")
def tiny(export_tiny_student):
    return str(export_tiny_student(max_k=6))


def read(path):
    with rasterio.open(path) as ds:
        return ds.read(1), ds.profile, ds.crs, ds.transform


def test_labels_identical_for_two_tile_sizes_on_real_imagery(trained, tmp_path):
    src = need("swissimage/big_img/1091-322_00.tif")  # 875 x 600, JPEG-compressed GeoTIFF
    ref = None
    for tile in (256, 384, 2048):  # 2048: a single window, the whole-raster pass
        segment_raster(src, tmp_path / f"{tile}.tif", SegmentOptions(k=4, model=trained, tile=tile, backend="numpy"),
                       **QUIET)
        labels = read(tmp_path / f"{tile}.tif")[0]
        if ref is None:
            ref = labels
            assert len(np.unique(labels)) == 4
        np.testing.assert_array_equal(labels, ref, err_msg=f"tile {tile}")


def test_onnx_backend_is_tiling_invariant_too(trained, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    src = need("swissimage/big_img/1091-322_00.tif")
    outs = []
    for tile in (256, 384):
        segment_raster(src, tmp_path / f"{tile}.tif", SegmentOptions(k=4, model=trained, tile=tile, backend="onnx"),
                       **QUIET)
        outs.append(read(tmp_path / f"{tile}.tif")[0])
    np.testing.assert_array_equal(outs[0], outs[1])


def test_georeference_and_nodata_round_trip(tiny, tmp_path):
    src = need("landsat/RGB.byte.tif")  # nodata 0 around the scene, EPSG:32618
    segment_raster(src, tmp_path / "out.tif", SegmentOptions(k=5, model=tiny, tile=256), **QUIET)
    labels, profile, crs, transform = read(tmp_path / "out.tif")
    with rasterio.open(src) as ds:
        assert crs == ds.crs and transform == ds.transform and labels.shape == (ds.height, ds.width)
        nodata = (ds.read() == 0).all(axis=0)
    assert profile["nodata"] == 255
    np.testing.assert_array_equal(labels == 255, nodata)
    assert nodata.any() and labels[~nodata].max() < 5


def test_four_band_naip_needs_a_band_choice_and_dates_share_centres(tiny, tmp_path, capsys):
    dates = sorted((DATA / "naip_rgbn").glob("*.tif"))
    if len(dates) < 2:
        pytest.skip("NAIP dates not found")
    assert main(["segment", str(dates[0]), str(tmp_path / "x.tif"), "-k", "3", "--model", tiny]) == 2
    assert "4 band(s)" in capsys.readouterr().err
    assert main(["fit", *map(str, dates), "-k", "4", "-o", str(tmp_path / "c.json"), "--model", tiny,
                 "--bands", "1,2,3"]) == 0
    for i, date in enumerate(dates):
        assert main(["segment", str(date), str(tmp_path / f"d{i}.tif"), "--centers", str(tmp_path / "c.json"),
                     "--model", tiny, "--bands", "1,2,3", "--no-progress"]) == 0
    first = read(tmp_path / "d0.tif")[0]
    assert set(np.unique(first)) - {255} <= {0, 1, 2, 3}


def test_ngi_nodata_edges(tiny, tmp_path):
    src = need("ngi_aerial/ngi_rgb_byte_1.tif")
    segment_raster(src, tmp_path / "out.tif", SegmentOptions(k=4, model=tiny, tile=512), **QUIET)
    labels = read(tmp_path / "out.tif")[0]
    with rasterio.open(src) as ds:
        nodata = (ds.read() == 0).all(axis=0)
    np.testing.assert_array_equal(labels == 255, nodata)


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_png_and_jpg_inputs_in_colour_mode(tmp_path):
    png = need("neon/2019_YELL_2_541000_4977000_image_crop.png")
    jpgs = sorted((DATA / "dubai_dev").glob("tile_1/images/*.jpg"))
    for i, src in enumerate([png] + jpgs[:1]):
        assert main(["segment", str(src), str(tmp_path / f"{i}.tif"), "-k", "5", "--model", "kmeans",
                     "--no-progress"]) == 0
        labels, _, crs, _ = read(tmp_path / f"{i}.tif")
        assert crs is None and labels.max() == 4
