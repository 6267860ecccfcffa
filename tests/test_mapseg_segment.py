"""mapseg segment / fit on small generated rasters: georeference, nodata, tiling invariance, bad inputs."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
from affine import Affine  # noqa: E402

import mapseg.segment as seg  # noqa: E402
from mapseg import raster as mraster  # noqa: E402
from mapseg.cli import main  # noqa: E402
from mapseg.cluster import Centers  # noqa: E402
from mapseg.features import FeatureModel, load_features  # noqa: E402
from mapseg.segment import (SegmentCancelled, SegmentError, SegmentOptions, fit_raster_centers,  # noqa: E402
                            segment_raster)

torch = pytest.importorskip("torch")

H, W = 150, 203          # not multiples of 4: exercises the bottom/right padding
CRS = "EPSG:32633"
TRANSFORM = Affine(0.5, 0, 500000.0, 0, -0.5, 4100000.0)


@pytest.fixture(scope="module")
def model(export_tiny_student):
    return str(export_tiny_student(max_k=6, random_var=True))


def scene(seed: int = 0, h: int = H, w: int = W) -> np.ndarray:
    """(3, h, w) uint8: four colour regions with texture and noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    region = (yy > h * 0.45).astype(int) * 2 + (xx > w * 0.55 + 10 * np.sin(yy / 9)).astype(int)
    colours = np.array([[40, 60, 30], [200, 190, 170], [90, 140, 60], [60, 80, 160]], float)
    img = colours[region] + 25 * np.sin(xx / 3.0)[..., None] * (region == 2)[..., None]
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8).transpose(2, 0, 1)


def write(path, data, dtype=None, nodata=None, crs=CRS, transform=TRANSFORM, driver="GTiff", mask=None):
    data = np.asarray(data)
    dtype = dtype or data.dtype
    profile = {"driver": driver, "width": data.shape[2], "height": data.shape[1], "count": data.shape[0],
               "dtype": str(np.dtype(dtype))}
    if driver == "GTiff":
        profile.update(crs=crs, transform=transform, nodata=nodata)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data.astype(dtype))
        if mask is not None:
            ds.write_mask(mask.astype(np.uint8) * 255)
    return str(path)


def labels_of(path):
    with rasterio.open(path) as ds:
        return ds.read(1)


def run(*argv) -> int:
    return main([str(a) for a in argv])


def test_georeference_roundtrip_and_format(model, tmp_path):
    src = write(tmp_path / "in.tif", scene())
    out = tmp_path / "out.tif"
    assert run("segment", src, out, "-k", 4, "--model", model, "--tile", 64, "--no-progress") == 0
    with rasterio.open(out) as ds, rasterio.open(src) as ref:
        assert (ds.width, ds.height, ds.count, ds.dtypes[0]) == (W, H, 1, "uint8")
        assert ds.crs == ref.crs and ds.transform == ref.transform
        assert ds.profile["tiled"] and ds.block_shapes[0] == (256, 256)
        assert ds.compression.name.lower() == "deflate"
        cmap = ds.colormap(1)
        assert cmap[0][:3] == mraster.PALETTE[0] and cmap[3][:3] == mraster.PALETTE[3]
        assert ds.nodata is None  # the input has no nodata
        labels = ds.read(1)
        assert ds.tags()["MAPSEG_K"] == "4"
    assert set(np.unique(labels)) <= {0, 1, 2, 3} and len(np.unique(labels)) >= 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_gcp_georeference_is_kept(tmp_path):
    """A raster georeferenced by ground control points alone (scanned maps, raw satellite scenes): the labels
    share its pixel grid, so they carry the same points and CRS."""
    from rasterio.control import GroundControlPoint
    from rasterio.crs import CRS as RioCRS

    gcps = [GroundControlPoint(row=0, col=0, x=8.5, y=47.4), GroundControlPoint(row=0, col=W, x=8.51, y=47.4),
            GroundControlPoint(row=H, col=0, x=8.5, y=47.39, z=410.0)]
    src = tmp_path / "gcp.tif"
    with rasterio.open(src, "w", driver="GTiff", width=W, height=H, count=3, dtype="uint8") as ds:
        ds.write(scene(5))
        ds.gcps = (gcps, RioCRS.from_epsg(4326))
    out = tmp_path / "out.tif"
    assert run("segment", src, out, "-k", 3, "--model", "kmeans", "--no-progress") == 0
    with rasterio.open(out) as ds:
        points, crs = ds.gcps
        assert crs == RioCRS.from_epsg(4326)
        assert [(g.row, g.col, g.x, g.y, g.z or 0.0) for g in points] == [(g.row, g.col, g.x, g.y, g.z or 0.0)
                                                                          for g in gcps]
        assert ds.transform.is_identity and ds.crs is None  # no invented geotransform


def test_labels_do_not_depend_on_the_tile(model, tmp_path):
    src = write(tmp_path / "in.tif", scene(1))
    ref = None
    for tile in (48, 100, 4096):  # 4096: one window, i.e. the whole-raster reference pass
        out = tmp_path / f"t{tile}.tif"
        segment_raster(src, out, SegmentOptions(k=5, model=model, tile=tile, backend="numpy"),
                       progress=False, log=lambda m: None)
        got = labels_of(out)
        if ref is None:
            ref = got
        np.testing.assert_array_equal(got, ref, err_msg=f"tile {tile}")


def test_smoothing_is_tiling_invariant_and_smooths(model, tmp_path):
    src = write(tmp_path / "in.tif", scene(2))
    plain = tmp_path / "plain.tif"
    segment_raster(src, plain, SegmentOptions(k=5, model=model, tile=4096, backend="numpy"),
                   progress=False, log=lambda m: None)
    outs = []
    for tile in (40, 4096):
        out = tmp_path / f"s{tile}.tif"
        segment_raster(src, out, SegmentOptions(k=5, model=model, tile=tile, smooth=2, backend="numpy"),
                       progress=False, log=lambda m: None)
        outs.append(labels_of(out))
    np.testing.assert_array_equal(outs[0], outs[1])
    changes = lambda a: (a[:, 1:] != a[:, :-1]).sum() + (a[1:] != a[:-1]).sum()  # noqa: E731
    assert changes(outs[0]) < changes(labels_of(plain))


def test_colour_kmeans_mode(tmp_path):
    src = write(tmp_path / "in.tif", scene(3))
    outs = []
    for tile, seed in ((32, 0), (4096, 0), (64, 11)):
        out = tmp_path / f"c{tile}_{seed}.tif"
        assert run("segment", src, out, "-k", 4, "--model", "kmeans", "--tile", tile, "--seed", seed,
                   "--no-progress") == 0
        outs.append(labels_of(out))
    np.testing.assert_array_equal(outs[0], outs[1])
    # label order: ascending mean luma, so another seed (other sample, other k-means start) finds the
    # same clusters under the same labels (up to pixels on cluster borders)
    assert (outs[0] == outs[2]).mean() > 0.99
    img = scene(3).astype(float)
    luma = 0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]
    means = [luma[outs[0] == j].mean() for j in range(4)]
    assert means == sorted(means)


def test_nodata_value_and_mask(model, tmp_path):
    data = scene(4)
    hole = np.zeros((H, W), bool)
    hole[20:70, 30:90] = True
    hole[:, :5] = True
    with_value = data.copy()
    with_value[:, hole] = 0
    a = write(tmp_path / "a.tif", with_value, nodata=0)
    # same valid pixels, other content under a per-dataset mask: must not change anything
    garbage = data.copy()
    garbage[:, hole] = np.random.default_rng(0).integers(0, 255, (3, int(hole.sum())))
    b = write(tmp_path / "b.tif", garbage, mask=~hole)
    for name, src in (("a", a), ("b", b)):
        segment_raster(src, tmp_path / f"{name}_out.tif", SegmentOptions(k=4, model=model, tile=64),
                       progress=False, log=lambda m: None)
    la, lb = labels_of(tmp_path / "a_out.tif"), labels_of(tmp_path / "b_out.tif")
    assert (la == 255).sum() == hole.sum() and np.array_equal(la == 255, hole)
    assert la[~hole].max() < 4
    np.testing.assert_array_equal(la, lb)
    with rasterio.open(tmp_path / "a_out.tif") as ds:
        assert ds.nodata == 255 and ds.colormap(1)[255] == (0, 0, 0, 0)


def test_nodata_override(model, tmp_path):
    data = scene(5)
    data[:, :10, :] = 7
    src = write(tmp_path / "in.tif", data)
    segment_raster(src, tmp_path / "o.tif", SegmentOptions(k=3, model=model, nodata=7),
                   progress=False, log=lambda m: None)
    labels = labels_of(tmp_path / "o.tif")
    assert (labels[:10] == 255).all() and (labels[10:] < 3).all()


def test_interrupted_run_leaves_no_output(model, tmp_path, monkeypatch):
    src = write(tmp_path / "in.tif", scene())
    out = tmp_path / "out.tif"
    out.write_bytes(b"previous result")
    calls = {"n": 0}
    original = mraster.LabelWriter.write

    def flaky(self, labels, row0, col0):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, labels, row0, col0)

    monkeypatch.setattr(mraster.LabelWriter, "write", flaky)
    with pytest.raises(KeyboardInterrupt):
        segment_raster(src, out, SegmentOptions(k=3, model=model, tile=48), progress=False, log=lambda m: None)
    assert out.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif", "out.tif"]


def test_callback_reports_progress_and_cancels(model, tmp_path):
    """GUIs (the QGIS plugin) follow the run through ``callback`` and stop it by returning False."""
    src = write(tmp_path / "in.tif", scene())
    seen = []
    segment_raster(src, tmp_path / "ok.tif", SegmentOptions(k=3, model=model, tile=48), progress=False,
                   log=lambda m: None, callback=lambda f, stage: seen.append((f, stage)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert {st for _, st in seen} == {"fit", "segment"}
    n = {"calls": 0}

    def stop_after_two(fraction, stage):
        n["calls"] += stage == "segment"
        return n["calls"] < 2

    with pytest.raises(SegmentCancelled):
        segment_raster(src, tmp_path / "out.tif", SegmentOptions(k=3, model=model, tile=48), progress=False,
                       log=lambda m: None, callback=stop_after_two)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif", "ok.qml", "ok.tif", "ok.tif.aux.xml"]
    # the windows in flight were finished and their threads joined before the input was closed
    assert not [t for t in threading.enumerate() if t.name.startswith("mapseg-window")]


def test_read_errors_surface_from_the_window_threads(model, tmp_path, monkeypatch):
    """Windows are read and labelled on worker threads; a failing read still stops the run with its error
    (not a hang, not a partial output), and no worker is left running."""
    src = write(tmp_path / "in.tif", scene())
    real, calls = seg.read_window, {"n": 0}

    def flaky(reader, win, scaling, fill):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk went away")
        return real(reader, win, scaling, fill)

    monkeypatch.setattr(seg, "read_window", flaky)
    with pytest.raises(OSError, match="disk went away"):
        segment_raster(src, tmp_path / "out.tif", SegmentOptions(k=3, model="kmeans", centers=None, tile=48),
                       progress=False, log=lambda m: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif"]
    assert not [t for t in threading.enumerate() if t.name.startswith("mapseg-window")]


def test_terminated_process_leaves_no_output(model, tmp_path):
    """SIGTERM in the middle of writing: no output, no temporary file (the CLI unwinds like Ctrl-C)."""
    src = write(tmp_path / "in.tif", scene())
    out = tmp_path / "out.tif"
    code = ("import sys, time\n"
            "import mapseg.raster as r\n"
            "slow = r.LabelWriter.write\n"
            "r.LabelWriter.write = lambda self, *a: (time.sleep(0.3), slow(self, *a))\n"
            "from mapseg.cli import main\n"
            f"sys.exit(main(['segment', {src!r}, {str(out)!r}, '-k', '3', '--model', {model!r}, '--tile', '48',"
            " '--no-progress']))\n")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=root, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".out.tif.part-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert list(tmp_path.glob(".out.tif.part-*")), "the run never started writing"
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, err
    assert "interrupted: no output written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif"]


def test_fit_then_apply_centres(model, tmp_path):
    a = write(tmp_path / "a.tif", scene(6))
    b = write(tmp_path / "b.tif", scene(7))
    centres = tmp_path / "c.json"
    assert run("fit", a, b, "-k", 4, "-o", centres, "--model", model) == 0
    data = json.loads(centres.read_text())
    assert data["k"] == 4 and data["features"] == "embedding" and len(data["sample"]["rasters"]) == 2
    for src in (a, b):
        assert run("segment", src, tmp_path / "x.tif", "--centers", centres, "--model", model, "--no-progress") == 0
        assert set(np.unique(labels_of(tmp_path / "x.tif"))) <= {0, 1, 2, 3}
    # centres fitted on one raster alone equal those a plain run fits: same labels
    single = fit_raster_centers([a], SegmentOptions(k=4, model=model), log=lambda m: None)
    single.save(tmp_path / "single.json")
    segment_raster(a, tmp_path / "p.tif", SegmentOptions(k=4, model=model), progress=False, log=lambda m: None)
    segment_raster(a, tmp_path / "q.tif", SegmentOptions(centers=tmp_path / "single.json", model=model),
                   progress=False, log=lambda m: None)
    np.testing.assert_array_equal(labels_of(tmp_path / "p.tif"), labels_of(tmp_path / "q.tif"))
    np.testing.assert_array_equal(Centers.load(tmp_path / "single.json").centers, single.centers)
    # wrong K, other model, colour centres on an embedding run: refused
    with pytest.raises(SegmentError, match="disagrees"):
        segment_raster(a, tmp_path / "r.tif", SegmentOptions(k=3, centers=centres, model=model),
                       progress=False, log=print)
    with pytest.raises(SegmentError, match="colour"):
        fit_raster_centers([a], SegmentOptions(k=3, model="kmeans")).save(tmp_path / "colour.json")
        segment_raster(a, tmp_path / "r.tif", SegmentOptions(centers=tmp_path / "colour.json", model=model),
                       progress=False, log=print)


def test_cog_output(model, tmp_path):
    src = write(tmp_path / "in.tif", scene())
    out = tmp_path / "cog.tif"
    assert run("segment", src, out, "-k", 3, "--model", model, "--cog", "--no-progress") == 0
    with rasterio.open(out) as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert ds.crs == CRS and ds.colormap(1)[1][:3] == mraster.PALETTE[1]


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_png_and_vrt_inputs(model, tmp_path):
    png = write(tmp_path / "in.png", scene(8), driver="PNG")
    assert run("segment", png, tmp_path / "png.tif", "-k", 3, "--model", model, "--no-progress") == 0
    with rasterio.open(tmp_path / "png.tif") as ds:
        assert ds.crs is None and ds.shape == (H, W)
    tif = write(tmp_path / "in.tif", scene(8))
    vrt = tmp_path / "in.vrt"
    bands = "".join(f"""<VRTRasterBand dataType="Byte" band="{b}"><SimpleSource>
<SourceFilename relativeToVRT="1">in.tif</SourceFilename><SourceBand>{b}</SourceBand>
<SrcRect xOff="0" yOff="0" xSize="{W}" ySize="{H}"/><DstRect xOff="0" yOff="0" xSize="{W}" ySize="{H}"/>
</SimpleSource></VRTRasterBand>""" for b in (1, 2, 3))
    vrt.write_text(f'<VRTDataset rasterXSize="{W}" rasterYSize="{H}"><SRS>{CRS}</SRS>'
                   f'<GeoTransform>{TRANSFORM.c}, {TRANSFORM.a}, 0, {TRANSFORM.f}, 0, {TRANSFORM.e}</GeoTransform>'
                   f'{bands}</VRTDataset>')
    assert run("segment", vrt, tmp_path / "v.tif", "-k", 3, "--model", model, "--no-progress") == 0
    assert run("segment", tif, tmp_path / "t.tif", "-k", 3, "--model", model, "--no-progress") == 0
    np.testing.assert_array_equal(labels_of(tmp_path / "v.tif"), labels_of(tmp_path / "t.tif"))
    np.testing.assert_array_equal(labels_of(tmp_path / "png.tif"), labels_of(tmp_path / "t.tif"))


def test_sixteen_bit_inputs(model, tmp_path):
    data8 = scene(9)
    src8 = write(tmp_path / "u8.tif", data8)
    src16 = write(tmp_path / "u16.tif", data8.astype(np.uint16) * 257)
    segment_raster(src8, tmp_path / "a.tif", SegmentOptions(k=4, model=model), progress=False, log=lambda m: None)
    report = segment_raster(src16, tmp_path / "b.tif", SegmentOptions(k=4, model=model),
                            progress=False, log=lambda m: None)
    assert "65535" in report["scaling"]
    assert (labels_of(tmp_path / "a.tif") == labels_of(tmp_path / "b.tif")).mean() > 0.999
    dim = (data8.astype(np.uint16) * 16).astype(np.uint16)  # 12-bit-like data: stretch it
    src12 = write(tmp_path / "u12.tif", dim)
    report = segment_raster(src12, tmp_path / "c.tif", SegmentOptions(k=4, model=model, stretch=(1, 99)),
                            progress=False, log=lambda m: None)
    assert report["scaling"].startswith("percentile stretch 1-99")
    assert len(np.unique(labels_of(tmp_path / "c.tif"))) == 4


@pytest.mark.parametrize("case, argv_extra, message", [
    ("four_bands", [], "4 band"),
    ("one_band", [], "--bands 1,1,1"),
    ("k_low", ["-k", "1"], r"K=1 is outside the supported range \[2, 6\]"),
    ("k_high", ["-k", "7"], r"K=7 is outside the supported range \[2, 6\]"),
    ("no_model", ["--model", "/nonexistent/model"], "does not exist"),
    ("empty", [], "no valid pixels"),
    ("float", [], "--stretch"),
    ("tile", ["--tile", "30"], "multiple of 4"),
    ("workers", ["--workers", "0"], "--workers 0: must be a positive integer"),
    ("threads", ["--threads", "0"], "--threads 0: must be a positive integer"),
    ("bad_bands", ["--bands", "1,2,5"], "has bands 1..3"),
    ("no_input", [], "does not exist"),
    ("out_dir", [], "output folder"),
])
def test_bad_inputs_are_clear_errors(model, tmp_path, capsys, case, argv_extra, message):
    data = scene(10)
    out = tmp_path / "out.tif"
    src = tmp_path / "in.tif"
    if case == "four_bands":
        write(src, np.concatenate([data, data[:1]]))
    elif case == "one_band":
        write(src, data[:1])
    elif case == "empty":
        write(src, np.zeros_like(data), nodata=0)
    elif case == "float":
        write(src, data.astype(np.float32) / 255)
    elif case == "no_input":
        src = tmp_path / "missing.tif"
    elif case == "out_dir":
        write(src, data)
        out = tmp_path / "no" / "such" / "out.tif"
    else:
        write(src, data)
    argv = ["segment", src, out, "--model", model, "--no-progress"]
    if not any(a == "-k" for a in argv_extra):
        argv += ["-k", "3"]
    argv += argv_extra
    if "--model" in argv_extra:
        argv = [a for a in argv if a != model]
        argv.remove("--model")
    assert run(*argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and __import__("re").search(message, err), err
    assert not out.exists()


def test_band_choice_makes_odd_band_counts_work(model, tmp_path):
    data = scene(11)
    four = write(tmp_path / "four.tif", np.concatenate([data, data[:1]]))
    one = write(tmp_path / "one.tif", data[1:2])
    assert run("segment", four, tmp_path / "a.tif", "-k", 3, "--model", model, "--bands", "1,2,3", "--no-progress") == 0
    assert run("segment", one, tmp_path / "b.tif", "-k", 3, "--model", model, "--bands", "1,1,1", "--no-progress") == 0
    src = write(tmp_path / "three.tif", data)
    assert run("segment", src, tmp_path / "c.tif", "-k", 3, "--model", model, "--no-progress") == 0
    np.testing.assert_array_equal(labels_of(tmp_path / "a.tif"), labels_of(tmp_path / "c.tif"))


def test_progress_and_info(model, tmp_path, capsys):
    src = write(tmp_path / "in.tif", scene())
    assert run("segment", src, tmp_path / "o.tif", "-k", 3, "--model", model, "--tile", 64) == 0
    err = capsys.readouterr().err
    assert "segment [" in err and "MP/s" in err and "backend auto ->" in err
    assert run("info", "--model", model) == 0
    out = capsys.readouterr().out
    assert "embed_dim       8" in out and "max_k           6" in out and "backend numpy   available" in out


def test_preview_png_shows_input_and_segments(model, tmp_path):
    from PIL import Image

    src = write(tmp_path / "in.tif", scene())
    assert main(["segment", str(src), str(tmp_path / "out.tif"), "-k", "3", "--model", model, "--no-progress",
                 "--preview", str(tmp_path / "p.png")]) == 0
    with Image.open(tmp_path / "p.png") as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (2 * W + 8, H)
        arr = np.asarray(im)
    with rasterio.open(src) as ds:
        assert np.array_equal(arr[:, :W], ds.read().transpose(1, 2, 0))     # the input, as is
    with rasterio.open(tmp_path / "out.tif") as ds:
        labels = ds.read(1)
    palette = np.array([mraster.PALETTE[i] for i in range(3)], np.uint8)
    assert np.array_equal(arr[:, W + 8:], palette[labels])                   # the segments, colour-coded
    assert main(["segment", str(src), str(tmp_path / "o2.tif"), "-k", "3", "--model", model, "--no-progress",
                 "--preview", str(tmp_path / "p.jpg")]) == 2
    assert not (tmp_path / "o2.tif").exists()       # refused before any work


@pytest.mark.parametrize("backend", ["numpy", "onnx", "torch"])
def test_labels_do_not_depend_on_the_workers(model, tmp_path, backend):
    """Several windows at once (--workers), with any threads each: the same labels and centres as one
    window at a time, for every backend."""
    if backend == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnx")
    src = write(tmp_path / "in.tif", scene(3, 160, 230), nodata=None)
    outs = []
    for workers, threads in ((1, 2), (3, 1), (2, 2)):
        out = tmp_path / f"w{workers}t{threads}.tif"
        options = SegmentOptions(k=4, model=model, tile=48, smooth=1, backend=backend, workers=workers,
                                 threads=threads)
        report = segment_raster(src, out, options, progress=False, log=lambda m: None)
        assert report["workers"] == workers and report["threads_per_worker"] == threads
        outs.append((labels_of(out), report["centers"]["centers"]))
    for labels, centers in outs[1:]:
        assert np.array_equal(labels, outs[0][0])
        assert centers == outs[0][1]
    assert not [t for t in threading.enumerate() if t.name.startswith("mapseg-window")]


def test_feature_models_meet_the_protocol_and_options_name_the_model_once(model):
    """Both feature models the runtime ships are FeatureModels; SegmentOptions loads a folder or takes a loaded
    model as it is, and refuses loading settings for a model that is loaded already."""
    colour, student = load_features("kmeans"), load_features(model, "numpy")
    assert isinstance(colour, FeatureModel) and isinstance(student, FeatureModel)
    assert SegmentOptions(model=student).feature_model() is student
    assert SegmentOptions(model=model, backend="numpy").feature_model().backend_name == "numpy"
    with pytest.raises(SegmentError, match="loaded already"):
        SegmentOptions(model=student, backend="onnx").feature_model()
