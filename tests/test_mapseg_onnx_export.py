"""mapseg export-onnx: the artifact's network with centres baked in, run the way the QGIS plugin Deepness runs a
segmentation model (metadata read with onnxruntime, tiles of `tiles_size` overlapping by `tiles_overlap` percent,
x / 255 then standardised as the metadata say, NCHW, argmax of the scores, each tile's centre part kept), gives
the labels of `mapseg segment --centers --upsample nearest` (the graph draws each cell's label 4 x 4: it has no
guided upsampling)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from mapseg import fit_centers, segment_array  # noqa: E402
from mapseg.cli import main  # noqa: E402
from mapseg.errors import OutputError, SegmentError  # noqa: E402
from mapseg.features import default_model_path  # noqa: E402
from mapseg.onnx_export import check_tiling, default_overlap, export_onnx, overlap_px, resolution_cm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAIP = ROOT / "examples" / "naip_nd_2020_rgb.tif"
DATA = ROOT.parent / "shared" / "datasets"
GEONRW = DATA / "geonrw_dev" / "images" / "aachen_296_5625.tif"
HALO = 16  # the default student's (network.required_halo)


def deepness_labels(onnx_path, image: np.ndarray) -> np.ndarray:
    """Labels of a whole (H, W, 3) uint8 raster as Deepness makes them for an 'entire layer' run at the raster's
    own resolution (src/deepness/processing: extent_utils.calculate_extended_processing_extent, map_processor
    tiles_generator, tile_params.TileParams.set_mask_on_full_img, models/model_base.ModelBase.preprocessing,
    map_processor_segmentation._process_tile). The extended extent grows east and north (QGIS's y maximum) to
    N x stride + tile; pixels beyond the raster are rendered black (0)."""
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    meta = {key: json.loads(value) for key, value in sess.get_modelmeta().custom_metadata_map.items()}
    assert str(meta["model_type"]).capitalize() == "Segmentor"
    tile, overlap = int(meta["tiles_size"]), overlap_px(int(meta["tiles_size"]), int(meta["tiles_overlap"]))
    stride = tile - overlap
    mean = np.array(meta["standardization_mean"], np.float32)
    std = np.array(meta["standardization_std"], np.float32)
    threshold = float(meta["seg_thresh"])
    (inp,) = sess.get_inputs()
    assert inp.shape == [1, 3, tile, tile]

    def missing(n):
        return tile - n if n <= tile else (stride - (n - tile) % stride) % stride

    h, w = image.shape[:2]
    mx, my = missing(w), missing(h)
    ext = np.zeros((h + my, w + mx, 3), np.uint8)
    ext[my:, :w] = image  # the rows Deepness adds are north of the raster
    full = np.zeros(ext.shape[:2], np.uint8)
    ny, nx = (ext.shape[0] - tile) // stride + 1, (ext.shape[1] - tile) // stride + 1
    half = overlap // 2
    for by in range(ny):
        for bx in range(nx):
            y0, x0 = by * stride, bx * stride
            batch = ext[None, y0:y0 + tile, x0:x0 + tile]
            x = np.float32(batch * 1. / 255.)
            x = np.transpose((x - mean) / std, (0, 3, 1, 2))
            scores = sess.run(None, {inp.name: x})[0]
            scores[scores < threshold] = 0.0
            result = np.argmax(scores, axis=1)[0].astype(np.uint8) + 1
            ya, yb = y0 + (0 if by == 0 else half), y0 + tile - (0 if by == ny - 1 else half)
            xa, xb = x0 + (0 if bx == 0 else half), x0 + tile - (0 if bx == nx - 1 else half)
            full[ya:yb, xa:xb] = result[ya - y0:yb - y0, xa - x0:xb - x0]
    assert full.min() >= 1
    return full[my:, :w] - 1


def mapseg_labels(raster, centres, tmp_path) -> np.ndarray:
    out = tmp_path / "mapseg.tif"
    assert main(["segment", str(raster), str(out), "--centers", str(centres), "--upsample", "nearest",
                 "--no-progress"]) == 0
    with rasterio.open(out) as ds:
        return ds.read(1)


def read_rgb(path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return np.ascontiguousarray(ds.read([1, 2, 3]).transpose(1, 2, 0))


def agreement(a, b, margin: int = 0) -> float:
    if margin:
        a, b = a[margin:-margin, margin:-margin], b[margin:-margin, margin:-margin]
    return float((a == b).mean())


@pytest.mark.data
@pytest.mark.skipif(not GEONRW.is_file(), reason=f"{GEONRW} not found")
def test_deepness_style_run_agrees_with_mapseg_segment(tmp_path):
    centres, onnx_path = tmp_path / "c.json", tmp_path / "seg.onnx"
    assert main(["fit", str(GEONRW), "-k", "6", "-o", str(centres), "--no-progress"]) == 0
    assert main(["export-onnx", "--centers", str(centres), str(onnx_path)]) == 0
    ours = mapseg_labels(GEONRW, centres, tmp_path)
    theirs = deepness_labels(onnx_path, read_rgb(GEONRW))
    # 1000 x 1000 at tile 512 / 40 px overlap: Deepness pads 456 rows north and 456 columns east (multiples of 4,
    # so the stride-4 cells stay the raster's). Inside, every kept pixel is >= 20 px (half the overlap) from its
    # tile's inner edges: exact. Within the halo (16 px) of the north and east edges the network sees Deepness'
    # black padding where mapseg pads with the mean colour (the conv's own zero padding): those may differ.
    inner = agreement(theirs, ours, HALO)
    total = agreement(theirs, ours)
    print(f"agreement: {100 * total:.3f} % of all pixels, {100 * inner:.4f} % beyond {HALO} px of the border")
    assert inner >= 0.9995
    assert total >= 0.98
    assert (theirs[HALO:-HALO, HALO:-HALO] != ours[HALO:-HALO, HALO:-HALO]).sum() <= 0.0005 * (1000 - 2 * HALO) ** 2


def test_exported_model_on_the_shipped_example(tmp_path):
    """The NAIP quick-start raster (934 x 723) at tile 256: Deepness' grid is not the raster's, and the labels
    are those of mapseg on that grid."""
    centres, onnx_path = tmp_path / "c.json", tmp_path / "seg.onnx"
    assert main(["fit", str(NAIP), "-k", "5", "-o", str(centres), "--no-progress"]) == 0
    assert main(["export-onnx", "--centers", str(centres), str(onnx_path), "--tile", "256"]) == 0
    image = read_rgb(NAIP)
    ours = segment_array(image, centers=centres, upsample="nearest")
    theirs = deepness_labels(onnx_path, image)
    # Deepness pads (216 - (723 - 256) % 216) = 181 rows north, and 181 = 1 (mod 4): its stride-4 cells start
    # one row above the raster's. The network is not invariant to a shift smaller than its stride, so segment
    # edges move (86 % of the pixels agree); mapseg on the same grid (one row added on top) agrees exactly.
    plain = agreement(theirs, ours, HALO)
    shifted_input = np.concatenate([np.zeros((1,) + image.shape[1:], np.uint8), image])
    shifted = segment_array(shifted_input, centers=centres, upsample="nearest")[1:]
    same_grid = agreement(theirs, shifted, HALO)
    print(f"NAIP: {100 * plain:.2f} % agree with mapseg's grid, {100 * same_grid:.4f} % with mapseg on Deepness' "
          f"grid (beyond {HALO} px of the border)")
    assert same_grid >= 0.9995
    assert plain >= 0.8


def test_metadata_is_what_deepness_reads(tmp_path):
    centres, onnx_path = tmp_path / "c.json", tmp_path / "seg.onnx"
    assert main(["fit", str(NAIP), "-k", "4", "-o", str(centres), "--no-progress"]) == 0
    assert main(["export-onnx", "--centers", str(centres), str(onnx_path), "--tile", "320", "--overlap", "15"]) == 0
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    # every value is JSON, as Deepness parses each with json.loads (strings too)
    meta = {key: json.loads(value) for key, value in sess.get_modelmeta().custom_metadata_map.items()}
    art = json.loads((Path(default_model_path()) / "meta.json").read_text())
    assert meta["weights_sha256"] == art["weights_sha256"] == meta["mapseg"]["weights_sha256"]
    assert meta["format_version"] == art["format_version"]
    assert meta["model_type"] == "Segmentor"
    assert meta["class_names"] == {str(i): f"segment {i}" for i in range(4)}
    assert (meta["tiles_size"], meta["tile_size"], meta["tiles_overlap"]) == (320, 320, 15)
    assert all(type(meta[key]) is int for key in ("tiles_size", "tile_size", "tiles_overlap"))
    assert meta["standardization_mean"] == pytest.approx(art["input"]["mean"])
    assert meta["standardization_std"] == pytest.approx(art["input"]["std"])
    assert meta["seg_thresh"] == 0 and meta["seg_small_segment"] == 0
    assert "resolution" not in meta  # the shipped artifact records no ground resolution
    (out,) = sess.get_outputs()
    assert out.shape == [1, 4, 320, 320]
    scores = sess.run(None, {"input": np.zeros((1, 3, 320, 320), np.float32)})[0]
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)  # probabilities over the K segments


def test_class_names_from_a_legend_or_the_centres_file(tmp_path):
    legend = tmp_path / "legend.json"
    legend.write_text(json.dumps({"classes": [{"value": 0, "name": "water"}, {"value": 2, "name": "fields"}]}))
    plain, kept = tmp_path / "plain.json", tmp_path / "kept.json"
    assert main(["fit", str(NAIP), "-k", "3", "-o", str(plain), "--no-progress"]) == 0
    assert main(["fit", str(NAIP), "-k", "3", "-o", str(kept), "--no-progress", "--legend", str(legend)]) == 0

    def names(*args):
        out = tmp_path / "n.onnx"
        assert main(["export-onnx", str(out), *args]) == 0
        meta = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).get_modelmeta()
        return json.loads(meta.custom_metadata_map["class_names"])

    named = {"0": "water", "1": "segment 1", "2": "fields"}
    assert names("--centers", str(plain), "--legend", str(legend)) == named
    assert names("--centers", str(kept)) == named  # the legend mapseg fit kept in the centres file
    assert names("--centers", str(plain)) == {"0": "segment 0", "1": "segment 1", "2": "segment 2"}
    legend.write_text(json.dumps({"classes": [{"value": 5, "name": "roofs"}]}))
    assert main(["export-onnx", str(tmp_path / "x.onnx"), "--centers", str(plain), "--legend", str(legend)]) == 2
    assert not (tmp_path / "x.onnx").exists()


def test_tiling_rules():
    assert overlap_px(512, 8) == 40 and default_overlap(512, HALO) == 8
    assert default_overlap(256, HALO) == 16 and overlap_px(256, 16) == 40  # 13 % is 33 px, 14 % 35, 15 % 38
    for tile in (128, 256, 320, 512, 1024):
        px = overlap_px(tile, default_overlap(tile, HALO))
        assert px >= 2 * HALO and px % 4 == 0
    check_tiling(512, 8, HALO)
    with pytest.raises(SegmentError, match=r"--overlap 10 % of a 512-pixel tile is 51 pixels.*--overlap 8 works"):
        check_tiling(512, 10, HALO)
    with pytest.raises(SegmentError, match="multiple of 4"):
        check_tiling(510, 8, HALO)
    # Deepness reads tiles_overlap with int(json.loads(v)): 7.9 % would be 7 % = 35 px, not the 40 px checked
    assert overlap_px(512, 7.9) == 40 and overlap_px(512, int(7.9)) == 35
    for bad in (7.9, 8.5, float("nan"), "8", True):
        with pytest.raises(SegmentError, match="--overlap .*whole number"):
            check_tiling(512, bad, HALO)
    with pytest.raises(SegmentError, match=r"--overlap 7.9: give a whole number.*makes it 7"):
        check_tiling(512, 7.9, HALO)
    with pytest.raises(SegmentError, match="--tile 512.5: give a whole number"):
        check_tiling(512.5, 8, HALO)
    check_tiling(512, 8.0, HALO)  # a whole float is the same percentage
    assert resolution_cm({"resolution": {"m_per_px": 0.5}}) == 50 and resolution_cm({}) is None
    assert resolution_cm({"resolution": {"m_per_px": None}}) is None


def test_resolution_from_the_artifact_and_refusals(tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(default_model_path(), model)
    meta = json.loads((model / "meta.json").read_text())
    meta["resolution"] = {"m_per_px": 0.3}
    (model / "meta.json").write_text(json.dumps(meta))
    centres = tmp_path / "c.json"
    assert main(["fit", str(NAIP), "-k", "3", "-o", str(centres), "--no-progress", "--model", str(model)]) == 0
    out = tmp_path / "seg.onnx"
    assert main(["export-onnx", "--centers", str(centres), str(out), "--model", str(model)]) == 0
    meta_map = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    assert json.loads(meta_map["resolution"]) == pytest.approx(30.0)
    before = (model / "model.onnx").read_bytes()
    # an output that is a file of the model is refused before any work
    assert main(["export-onnx", "--centers", str(centres), str(model / "model.onnx"), "--model", str(model)]) == 2
    assert (model / "model.onnx").read_bytes() == before
    # ... and so is any output inside the artifact folder: files there that are not the artifact's own (mapseg
    # quantize's model.int8.onnx), a new name, a subfolder; by the folder's name or a link to it
    (model / "model.int8.onnx").write_bytes(b"int8 model")
    (model / "sub").mkdir()
    link = tmp_path / "link"
    link.symlink_to(model, target_is_directory=True)
    listing = sorted(p.name for p in model.rglob("*"))
    for target in (model / "model.int8.onnx", model / "new.onnx", model / "sub" / "x.onnx", link / "new.onnx"):
        capsys.readouterr()
        assert main(["export-onnx", "--centers", str(centres), str(target), "--model", str(model)]) == 2
        assert "inside the model's artifact folder" in capsys.readouterr().err
    assert (model / "model.int8.onnx").read_bytes() == b"int8 model"
    assert sorted(p.name for p in model.rglob("*")) == listing
    with pytest.raises(OutputError, match="inside the model's artifact folder"):
        export_onnx(str(centres), str(model / "model.int8.onnx"), str(model))
    # the Python API refuses a fractional overlap that the CLI's int flag cannot give
    with pytest.raises(SegmentError, match="--overlap 7.9: give a whole number"):
        export_onnx(str(centres), str(tmp_path / "x.onnx"), str(model), overlap=7.9)
    assert not (tmp_path / "x.onnx").exists()
    written = export_onnx(str(centres), str(tmp_path / "whole.onnx"), str(model), tile=256.0, overlap=16.0)
    assert (written["tile"], written["overlap"]) == (256, 16) and type(written["overlap"]) is int
    meta_map = ort.InferenceSession(str(tmp_path / "whole.onnx"),
                                    providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    assert (meta_map["tiles_size"], meta_map["tiles_overlap"]) == ("256", "16")
    # centres of colour k-means, a bad overlap, no network: clear errors, nothing written
    kmeans = tmp_path / "km.json"
    assert main(["fit", str(NAIP), "-k", "3", "-o", str(kmeans), "--no-progress", "--model", "kmeans"]) == 0
    for args in (["--centers", str(kmeans)],
                 ["--centers", str(centres), "--model", str(model), "--overlap", "10"],
                 ["--centers", str(centres), "--model", "kmeans"]):
        assert main(["export-onnx", str(tmp_path / "x.onnx"), *args]) == 2
        assert not (tmp_path / "x.onnx").exists()


def test_artifact_without_model_onnx_and_centres_of_another_model(export_tiny_student, tmp_path):
    """An artifact without model.onnx: its graph is built from model.npz; the segmenter's labels are mapseg's."""
    pytest.importorskip("torch")
    tiny = export_tiny_student(max_k=6)
    assert not (tiny / "model.onnx").exists()
    with rasterio.open(NAIP) as src:
        image = np.ascontiguousarray(src.read([1, 2, 3], window=rasterio.windows.Window(0, 0, 128, 128))
                                     .transpose(1, 2, 0))
    centres = fit_centers(image, 4, model=str(tiny))
    centres.save(tmp_path / "c.json")
    out = tmp_path / "tiny.onnx"
    assert main(["export-onnx", "--centers", str(tmp_path / "c.json"), str(out), "--model", str(tiny),
                 "--tile", "128"]) == 0
    meta = json.loads((tiny / "meta.json").read_text())
    x = (image / 255.0).astype(np.float32)
    x = (x - np.array(meta["input"]["mean"], np.float32)) / np.array(meta["input"]["std"], np.float32)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    theirs = sess.run(None, {"input": x.transpose(2, 0, 1)[None]})[0][0].argmax(axis=0)
    # one tile, the whole image: its border is the image's, the conv's zero padding is mapseg's fill
    assert agreement(theirs, segment_array(image, centers=centres, model=str(tiny), upsample="nearest")) >= 0.999
    # centres of the default model do not apply to this one
    other = tmp_path / "other.json"
    assert main(["fit", str(NAIP), "-k", "3", "-o", str(other), "--no-progress"]) == 0
    assert main(["export-onnx", "--centers", str(other), str(tmp_path / "x.onnx"), "--model", str(tiny)]) == 2
    assert not (tmp_path / "x.onnx").exists()


def test_without_the_onnx_package_the_error_says_what_to_install(tmp_path):
    centres = tmp_path / "c.json"
    assert main(["fit", str(NAIP), "-k", "3", "-o", str(centres), "--no-progress"]) == 0
    code = ("import sys; sys.modules['onnx'] = None\n"
            "from mapseg.cli import main\n"
            f"sys.exit(main(['export-onnx', '--centers', {str(centres)!r}, {str(tmp_path / 'x.onnx')!r}]))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 2, res.stderr
    assert "pip install 'map-segmenter[onnx]'" in res.stderr
    assert not (tmp_path / "x.onnx").exists()
