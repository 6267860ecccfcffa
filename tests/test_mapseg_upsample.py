"""Cell scores -> pixel labels (mapseg/upsample.py): guided edges follow the image, labels do not depend on the
window, the method is the model's (meta.json) unless asked, and it is recorded."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")

from mapseg.artifact import load_artifact  # noqa: E402
from mapseg.cli import main  # noqa: E402
from mapseg.errors import ArtifactError  # noqa: E402
from mapseg.raster import ArrayReader  # noqa: E402
from mapseg.segment import (SegmentError, SegmentOptions, fit_reader_centers, label_reader,  # noqa: E402
                            scaling_for, segment_raster)
from mapseg.cluster import cell_scores  # noqa: E402
from mapseg.upsample import LUMA, NEAREST, Upsample, guided_labels  # noqa: E402

from test_mapseg_segment import labels_of, scene, write  # noqa: E402

pytest.importorskip("torch")


def luma(image: np.ndarray) -> np.ndarray:
    """The guide: (h, w) float32 luma of an (h, w, 3) float32 image: one fixed sum per pixel."""
    out = image[..., 0] * np.float32(LUMA[0])
    out += image[..., 1] * np.float32(LUMA[1])
    out += image[..., 2] * np.float32(LUMA[2])
    return out


@pytest.fixture(scope="module")
def model(export_tiny_student):
    return str(export_tiny_student(max_k=6, random_var=True))


def with_upsample(model: str, dst, upsample) -> str:
    """A copy of the artifact whose meta.json says ``upsample`` (None: the key removed)."""
    shutil.copytree(model, dst)
    meta = json.loads((dst / "meta.json").read_text())
    meta.pop("upsample", None)
    if upsample is not None:
        meta["upsample"] = upsample
    (dst / "meta.json").write_text(json.dumps(meta))
    return str(dst)


def test_guided_edges_follow_the_image_inside_a_cell():
    """Two centres: one scores each cell's mean luma, the other a constant 0.5. Nearest draws the boundary on
    the 4-pixel grid; the guided filter puts it where the image's brightness changes, at column 13."""
    h, w = 32, 40
    image = np.full((h, w, 3), 0.2, np.float32)
    image[:, 13:] = 0.8
    g = luma(image)
    cell = g.reshape(h // 4, 4, w // 4, 4).mean(axis=(1, 3))
    scores = np.stack([np.full_like(cell, 0.5), cell], -1).astype(np.float32)
    labels = guided_labels(scores, image, np.ones((h, w), bool), 4, Upsample("guided"), (0, 0), (0, h, 0, w))
    np.testing.assert_array_equal(labels, (g > 0.5).astype(np.uint8))
    nearest = np.repeat(np.repeat(scores.argmax(-1), 4, 0), 4, 1)
    assert (nearest != labels).any()  # the cell 12..15 is half dark: nearest cannot draw column 13


def reference_guided(scores, image, valid, up: Upsample):
    """An independent whole-image computation in float64 (cumulative sums, index arithmetic)."""
    s = 4
    hc, wc, k = scores.shape
    g = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    cell = lambda x: x.reshape(hc, s, wc, s).sum(axis=(1, 3))  # noqa: E731
    count = cell(valid.astype(np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):  # means over the pixels that hold data
        g1 = np.nan_to_num(cell(g * valid) / count)
        g2 = np.nan_to_num(cell(g * g * valid) / count)
    wgt = count / s ** 2

    def box(x, r):
        c = np.zeros((hc + 1, wc + 1) + x.shape[2:])
        c[1:, 1:] = x.cumsum(0).cumsum(1)
        y0, y1 = np.clip(np.arange(hc) - r, 0, hc), np.clip(np.arange(hc) + r + 1, 0, hc)
        x0, x1 = np.clip(np.arange(wc) - r, 0, wc), np.clip(np.arange(wc) + r + 1, 0, wc)
        return c[y1][:, x1] - c[y0][:, x1] - c[y1][:, x0] + c[y0][:, x0]

    den = box(wgt, up.radius)
    mean = lambda x: box(x * (wgt[..., None] if x.ndim == 3 else wgt), up.radius) / (  # noqa: E731
        den[..., None] if x.ndim == 3 else den)
    sc = scores.astype(np.float64)
    m_i, m_ii, m_p, m_ip = mean(g1), mean(g2), mean(sc), mean(g1[..., None] * sc)
    a = (m_ip - m_i[..., None] * m_p) / (np.maximum(m_ii - m_i ** 2, 0) + up.eps)[..., None]
    b = m_p - a * m_i[..., None]
    pos = lambda n: (np.arange(n * s) + 0.5) / s - 0.5  # noqa: E731
    py, px = pos(hc), pos(wc)
    y0 = np.clip(np.floor(py), 0, hc - 1).astype(int)
    x0 = np.clip(np.floor(px), 0, wc - 1).astype(int)
    y1, x1 = np.clip(y0 + 1, 0, hc - 1), np.clip(x0 + 1, 0, wc - 1)
    ty = np.where(py < 0, 0, np.clip(py - y0, 0, 1))[:, None, None]
    tx = np.where(px < 0, 0, np.clip(px - x0, 0, 1))[None, :, None]

    def up2(c):
        rows = c[y0] * (1 - ty) + c[y1] * ty
        return rows[:, x0] * (1 - tx) + rows[:, x1] * tx

    return (up2(a) * g[..., None] + up2(b)).argmax(-1)


def test_guided_pipeline_matches_an_independent_reference(model):
    """The windowed float32 pipeline against a float64 whole-image computation: the same labels but for
    near-ties (float32 rounding)."""
    img = scene(7, 96, 124).transpose(1, 2, 0)
    valid = np.ones(img.shape[:2], bool)
    valid[10:30, 40:90] = False
    features = SegmentOptions(model=model, backend="numpy").feature_model()
    reader = ArrayReader(img, valid, "scene")
    centers = fit_reader_centers([reader], 4, features, 0)
    scaling = scaling_for(reader, features, None, 0)
    up = Upsample("guided")
    got = label_reader(reader, features, scaling, centers, 48, 0, up)
    image = img.astype(np.float32) / 255
    image[~valid] = features.fill
    scores = cell_scores(features(image), centers.scorer())
    ref = reference_guided(scores, image, valid, up)
    agree = (got == ref)[valid].mean()
    assert agree > 0.999, agree
    assert (got[~valid] == 255).all()
    near = label_reader(reader, features, scaling, centers, 48, 0, NEAREST)
    assert (near != got)[valid].mean() > 0.01  # the guided method changed something (the test can fail)


@pytest.mark.parametrize("smooth", [0, 1])
def test_guided_labels_do_not_depend_on_the_tile(model, tmp_path, smooth):
    """Odd size (stride padding), nodata in the middle and at an edge, the majority filter on top."""
    data = scene(8, 150, 203)
    mask = np.ones(data.shape[1:], bool)
    mask[60:90, 20:120] = False
    mask[:, 195:] = False
    src = write(tmp_path / "in.tif", data, mask=mask)
    ref = None
    for tile in (48, 100, 4096):
        out = tmp_path / f"t{tile}.tif"
        report = segment_raster(src, out, SegmentOptions(k=5, model=model, tile=tile, backend="numpy",
                                                         smooth=smooth, upsample="guided"),
                                progress=False, log=lambda m: None)
        assert report["upsample"]["method"] == "guided"
        got = labels_of(out)
        assert (got[~mask] == 255).all() and (got[mask] != 255).all()
        if ref is None:
            ref = got
        np.testing.assert_array_equal(got, ref, err_msg=f"tile {tile}")


def test_the_model_says_which_and_the_flag_overrides(model, tmp_path):
    src = write(tmp_path / "in.tif", scene(9))
    guided = with_upsample(model, tmp_path / "guided", Upsample("guided").to_json())
    plain = with_upsample(model, tmp_path / "plain", None)  # an artifact from before: nearest
    logs = []
    r1 = segment_raster(src, tmp_path / "g.tif", SegmentOptions(k=4, model=guided, backend="numpy"),
                        progress=False, log=logs.append)
    assert r1["upsample"] == Upsample("guided").to_json()
    assert any(m.startswith("upsampling: guided") for m in logs)
    r2 = segment_raster(src, tmp_path / "p.tif", SegmentOptions(k=4, model=plain, backend="numpy"),
                        progress=False, log=lambda m: None)
    assert r2["upsample"] == {"method": "nearest"}
    blocks = labels_of(tmp_path / "p.tif")[:148, :200].reshape(37, 4, 50, 4)
    assert (blocks == blocks[:, :1, :, :1]).all()  # nearest: 4 x 4 blocks
    assert main(["segment", src, str(tmp_path / "n.tif"), "-k", "4", "--model", guided, "--backend", "numpy",
                 "--upsample", "nearest", "--no-progress", "--report", str(tmp_path / "n.json")]) == 0
    assert json.loads((tmp_path / "n.json").read_text())["upsample"] == {"method": "nearest"}
    np.testing.assert_array_equal(labels_of(tmp_path / "n.tif"), labels_of(tmp_path / "p.tif"))
    assert (labels_of(tmp_path / "g.tif") != labels_of(tmp_path / "p.tif")).any()


def test_bad_settings_are_refused(model, tmp_path):
    with pytest.raises(ArtifactError, match="upsample"):
        load_artifact(with_upsample(model, tmp_path / "bad", {"method": "bicubic"}))
    with pytest.raises(ArtifactError, match="radius"):
        load_artifact(with_upsample(model, tmp_path / "bad2", {"method": "guided", "radius_cells": 0}))
    src = write(tmp_path / "in.tif", scene(10))
    with pytest.raises(SegmentError, match="labels every pixel itself"):
        segment_raster(src, tmp_path / "o.tif", SegmentOptions(k=3, model="kmeans", upsample="guided"),
                       progress=False, log=lambda m: None)
    with pytest.raises(SegmentError, match="choose from"):
        segment_raster(src, tmp_path / "o.tif", SegmentOptions(k=3, model=model, upsample="cubic"),
                       progress=False, log=lambda m: None)


def test_nodata_pixels_do_not_shape_the_labels_of_valid_ones():
    """Whatever a nodata pixel holds (the fill colour, garbage), the valid pixels' labels stay the same."""
    rng = np.random.default_rng(3)
    h, w, k = 16, 24, 4
    image = rng.random((h, w, 3), dtype=np.float32)
    valid = np.ones((h, w), bool)
    valid[:, 9:14] = False
    valid[3:6, :] = False
    scores = rng.random((h // 4, w // 4, k), dtype=np.float32)
    up = Upsample("guided", radius=1)
    first = guided_labels(scores, image, valid, 4, up, (0, 0), (0, h, 0, w))
    other = image.copy()
    other[~valid] = rng.random((int((~valid).sum()), 3), dtype=np.float32)
    second = guided_labels(scores, other, valid, 4, up, (0, 0), (0, h, 0, w))
    np.testing.assert_array_equal(first[valid], second[valid])


@pytest.mark.parametrize("method", ["nearest", "guided"])
def test_one_cell_windows(model, method):
    """Windows whose core is a single 4 x 4 cell (a raster one cell larger than the tile, --tile 4) work and
    give the labels of one big window."""
    img = scene(11, 20, 20).transpose(1, 2, 0)
    features = SegmentOptions(model=model, backend="numpy").feature_model()
    reader = ArrayReader(img, None, "scene")
    centers = fit_reader_centers([reader], 3, features, 0)
    scaling = scaling_for(reader, features, None, 0)
    up = Upsample(method)
    ref = label_reader(reader, features, scaling, centers, 4096, 0, up)
    for tile in (4, 16):
        np.testing.assert_array_equal(label_reader(reader, features, scaling, centers, tile, 0, up), ref)


def test_batch_workers_draw_what_the_client_resolved(model, tmp_path):
    """mapseg batch resolves the upsampling once: a block task draws the client's method even where the
    worker's copy of the model (same weights) says another."""
    from mapseg.batch import TaskSettings, model_digest, segment_block
    from mapseg.cluster import Centers

    src = write(tmp_path / "in.tif", scene(12, 96, 96))
    guided = with_upsample(model, tmp_path / "guided", Upsample("guided").to_json())
    stale = with_upsample(model, tmp_path / "stale", None)  # the worker's copy: nearest
    report = segment_raster(src, tmp_path / "ref.tif", SegmentOptions(k=3, model=guided, backend="numpy"),
                            progress=False, log=lambda m: None)
    centers = Centers.from_json(report["centers"])
    client = SegmentOptions(model=guided, backend="numpy").feature_model()
    options = SegmentOptions(backend="auto", threads=1, workers=1, upsample=client.artifact.upsample)
    settings = TaskSettings(stale, "numpy", model_digest(client), options, "", str(tmp_path))
    worker = SegmentOptions(model=stale, backend="numpy").feature_model()
    assert worker.artifact.upsample.method == "nearest"
    segment_block(src, str(tmp_path / "block.tif"), settings, centers, worker, (0, 96, 0, 96), lambda m: None)
    np.testing.assert_array_equal(labels_of(tmp_path / "block.tif"), labels_of(tmp_path / "ref.tif"))


def test_the_shipped_model_draws_guided():
    assert load_artifact("model/best").upsample == Upsample("guided")
