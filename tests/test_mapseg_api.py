"""The Python API (mapseg.api): arrays give the labels `mapseg segment` writes for the same pixels and centres,
settings pass as keywords, a loaded model is reused, bad input is a clear error."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")

import mapseg  # noqa: E402
from mapseg import Centers, SegmentOptions, fit_centers, load_model, segment_array, segment_raster  # noqa: E402
from mapseg.cli import main  # noqa: E402
from mapseg.errors import SegmentCancelled, SegmentError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAIP = ROOT / "examples" / "naip_nd_2020_rgb.tif"
QUIET = {"progress": False, "log": lambda msg: None}


@pytest.fixture(scope="module")
def crop(tmp_path_factory):
    """(path of a 204 x 262 GeoTIFF crop of the shipped NAIP example, its pixels (H, W, 3) uint8)."""
    with rasterio.open(NAIP) as src:
        window = rasterio.windows.Window(301, 150, 262, 204)  # odd offsets: not on any grid of the source
        data = src.read([1, 2, 3], window=window)
        profile = {**src.profile, "width": 262, "height": 204, "transform": src.window_transform(window),
                   "tiled": False}
    path = tmp_path_factory.mktemp("api") / "crop.tif"
    profile.pop("blockxsize", None), profile.pop("blockysize", None)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path, np.ascontiguousarray(data.transpose(1, 2, 0))


@pytest.fixture(scope="module")
def model():
    return load_model()


def read_labels(path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read(1)


def test_mapseg_exports_the_api():
    for name in ("segment_raster", "fit_centers", "segment_array", "load_model", "SegmentOptions",
                 "fit_raster_centers", "label_reader", "load_features", "load_artifact", "FeatureModel", "Centers"):
        assert name in mapseg.__all__ and hasattr(mapseg, name), name


def test_array_labels_equal_the_cli_with_the_same_centres(crop, model, tmp_path):
    path, image = crop
    centres = tmp_path / "c.json"
    assert main(["fit", str(path), "-k", "5", "-o", str(centres), "--no-progress"]) == 0
    out = tmp_path / "labels.tif"
    assert main(["segment", str(path), str(out), "--centers", str(centres), "--no-progress", "--tile", "64"]) == 0
    labels = segment_array(image, centers=str(centres), model=model)
    assert labels.dtype == np.uint8 and labels.shape == image.shape[:2]
    np.testing.assert_array_equal(labels, read_labels(out))
    # the centres fitted on the array are those mapseg fit wrote (same sample, same k-means)
    fitted = fit_centers(image, 5, model=model)
    np.testing.assert_array_equal(fitted.centers, Centers.load(centres).centers)
    # ... and k= alone fits them on the image as `mapseg segment -k` does
    out_k = tmp_path / "labels_k.tif"
    assert main(["segment", str(path), str(out_k), "-k", "5", "--no-progress"]) == 0
    np.testing.assert_array_equal(segment_array(image, k=5, model=model), read_labels(out_k))


def test_colour_kmeans_array_equals_the_cli(crop, tmp_path):
    path, image = crop
    out = tmp_path / "km.tif"
    assert main(["segment", str(path), str(out), "-k", "4", "--model", "kmeans", "--no-progress"]) == 0
    np.testing.assert_array_equal(segment_array(image, k=4, model="kmeans"), read_labels(out))


def test_float_image_in_unit_range_labels_like_its_uint8_source(crop, model):
    _, image = crop
    centres = fit_centers(image, 5, model=model)
    as_uint8 = segment_array(image, centers=centres, model=model)
    as_float = segment_array(image.astype(np.float32) / 255, centers=centres, model=model)
    # x / 255 in float64 then float32 vs mapseg's float32 table: equal but for a last-bit tie or two
    assert (as_float == as_uint8).mean() >= 0.999


def test_nodata_value_mask_and_nan_give_255(crop, model):
    _, image = crop
    img = image.copy()
    img[:20, :30] = 0
    labels = segment_array(img, k=4, model=model, nodata=0)
    assert (labels[:20, :30] == 255).all() and (labels[20:] != 255).all()
    valid = np.ones(image.shape[:2], bool)
    valid[-10:, -12:] = False
    labels = segment_array(image, k=4, model=model, valid=valid)
    assert (labels[-10:, -12:] == 255).all() and (labels[valid] < 4).all()
    f = image.astype(np.float64) / 255
    hole = np.ones(image.shape[:2], bool)
    hole[5:9, 7:11] = False
    nan = f.copy()
    nan[5:9, 7:11, 1] = np.nan
    labels = segment_array(nan, k=4, model=model)
    assert (labels[5:9, 7:11] == 255).all() and (labels < 4).sum() == labels.size - 16
    # a NaN band is nodata exactly as a valid= mask says it: no NaN reaches the network or the neighbours' labels
    np.testing.assert_array_equal(labels, segment_array(f, k=4, model=model, valid=hole))


def test_bands_pick_three_of_more(crop, model):
    _, image = crop
    four = np.concatenate([image[..., ::-1], image[..., :1]], axis=-1)  # B G R R
    np.testing.assert_array_equal(segment_array(four, k=4, model=model, bands=(3, 2, 1)),
                                  segment_array(image, k=4, model=model))


def test_keyword_settings_reach_segment_options(crop, tmp_path):
    path, _ = crop
    a, b, c = tmp_path / "a.tif", tmp_path / "b.tif", tmp_path / "c.tif"
    ra = segment_raster(path, a, k=3, model="kmeans", tile=64, seed=2, **QUIET)
    rb = segment_raster(path, b, SegmentOptions(k=3, model="kmeans", seed=2), **QUIET)
    assert ra["tile"] == 64 and rb["tile"] != 64 and ra["k"] == 3
    np.testing.assert_array_equal(read_labels(a), read_labels(b))
    rc = segment_raster(path, c, SegmentOptions(k=5, model="kmeans", seed=2), k=3, **QUIET)  # keywords win
    assert rc["k"] == 3
    with pytest.raises(SegmentError, match="unknown setting.*tiles.*the settings are"):
        segment_raster(path, tmp_path / "d.tif", k=3, tiles=64, **QUIET)
    assert not (tmp_path / "d.tif").exists()


def test_callback_cancels_and_leaves_no_output(crop, tmp_path):
    path, _ = crop
    seen = []

    def stop_in_segment(fraction, stage):
        seen.append(stage)
        return stage != "segment"

    with pytest.raises(SegmentCancelled):
        segment_raster(path, tmp_path / "x.tif", k=3, model="kmeans", callback=stop_in_segment, **QUIET)
    assert "fit" in seen and "segment" in seen
    assert list(tmp_path.iterdir()) == []


def test_loaded_model_is_reused_and_not_reconfigured(crop, model, tmp_path):
    path, image = crop
    assert isinstance(model, mapseg.FeatureModel) and model.kind == "embedding"
    report = segment_raster(path, tmp_path / "m.tif", k=3, model=model, **QUIET)
    assert report["model"] == model.name
    with pytest.raises(SegmentError, match="loaded already"):
        segment_array(image, k=3, model=model, backend="numpy")
    assert load_model("kmeans").kind == "colour"


def test_fit_centers_over_paths_and_arrays_and_save(crop, model, tmp_path):
    path, image = crop
    centres = fit_centers([path, image[::-1]], 4, model=model)
    assert centres.k == 4 and [r["path"] for r in centres.sample["rasters"]] == [str(path), "<array 1>"]
    centres.save(tmp_path / "c.json")
    assert json.loads((tmp_path / "c.json").read_text())["format"] == "mapseg-centers"
    out = tmp_path / "o.tif"
    assert main(["segment", str(path), str(out), "--centers", str(tmp_path / "c.json"), "--no-progress"]) == 0
    np.testing.assert_array_equal(segment_array(image, centers=centres, model=model), read_labels(out))


@pytest.mark.parametrize("image, settings, message", [
    (np.zeros((8, 8, 3), np.float32) + 2, {"k": 2}, r"values span \[2, 2\].*input_max"),
    (np.zeros((8, 8, 4), np.uint8), {"k": 2}, "4 bands.*bands="),
    (np.zeros((8, 8), np.uint8), {"k": 2}, "single-band.*bands=\\(1, 1, 1\\)"),
    (np.zeros((8, 8, 3), np.int32), {"k": 2}, "int32 is not supported"),
    (np.zeros((8, 8, 3), np.uint8), {}, "give k"),
    (np.zeros((8, 8, 3), np.uint8), {"k": 2, "cog": True}, "cog: raster settings"),
    # empty and wrong-shape floats: the checks a uint8 array gets (once a ZeroDivisionError)
    (np.zeros((0, 10, 3), np.float32), {"k": 2}, "<array> is empty"),
    (np.zeros((10, 0, 3), np.float64), {"k": 2}, "<array> is empty"),
    (np.zeros((0, 10, 4), np.float32), {"k": 2, "bands": (1, 2, 3)}, "<array> is empty"),
    (np.zeros((0, 10, 3), np.uint8), {"k": 2}, "<array> is empty"),
    (np.zeros((8, 8, 3, 1), np.float32), {"k": 2}, r"expected an \(H, W, 3\) image"),
    (np.zeros((8, 8, 2), np.float32), {"k": 2}, "2 bands.*bands="),
    (np.zeros((8, 8), np.float32), {"k": 2}, "single-band"),
])
def test_bad_arrays_are_clear_errors(image, settings, message):
    with pytest.raises(SegmentError, match=message):
        segment_array(image, model="kmeans", **settings)


def test_array_reader_takes_float_images_with_its_checks():
    from mapseg.raster import ArrayReader

    image = np.random.default_rng(0).random((6, 5, 3), np.float32)
    reader = ArrayReader(image, None, "<f>")
    assert reader.image is image and reader.info.dtype == "float32"
    assert (reader.height, reader.width) == (6, 5)
    data, ok = reader.read(1, 3, 0, 5)
    np.testing.assert_array_equal(data, image[1:3])
    assert ok.shape == (2, 5) and ok.all()
    for bad, message in ((np.zeros((0, 5, 3), np.float32), "is empty"), (np.zeros((6, 5, 4), np.float32), "float"),
                         (np.zeros((6, 5, 3), np.int32), "float")):
        with pytest.raises(SegmentError, match=message):
            ArrayReader(bad, None, "<f>")


def test_fit_centers_errors(crop):
    _, image = crop
    with pytest.raises(SegmentError, match="<array 0> is empty"):
        fit_centers(np.zeros((0, 4, 3), np.float32), 2, model="kmeans")
    with pytest.raises(SegmentError, match="give k"):
        fit_centers(image, model="kmeans")
    with pytest.raises(SegmentError, match="at least one"):
        fit_centers([], 3, model="kmeans")
