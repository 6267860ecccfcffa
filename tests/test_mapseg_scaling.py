"""What the sampling stage says and keeps (the data-safety review): the partial-cell fallback is reported and
reads each window once; a sampled range sees the brightest pixel however rare, and the label pass counts the
pixels it clips; centres files carry the input maximum they were fitted with; ``fit`` checks its outputs once.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")

import mapseg.segment as seg  # noqa: E402
from mapseg.errors import SegmentError  # noqa: E402
from mapseg.raster import ArrayReader  # noqa: E402
from mapseg.segment import SegmentOptions, fit_raster_centers, scaling_for, segment_raster  # noqa: E402
from mapseg.windows import sample_window_order  # noqa: E402
from test_mapseg_safety import QUIET, run, scene, write  # noqa: E402


@pytest.fixture(scope="module")
def model(export_tiny_student):
    return str(export_tiny_student(max_k=6))


def twelve_bit(h: int = 96, w: int = 120, seed: int = 3) -> np.ndarray:
    return (scene(h, w, seed).astype(np.int64) * 4095 // 255).astype(np.uint16)


# --------------------------------------------------------------------------- partial cells

def test_cells_never_wholly_valid_are_said_and_each_window_is_read_once(model, tmp_path, capsys, monkeypatch):
    data = scene()
    data[:, :, 2::4] = 0  # nodata in every 4th column: no 4 x 4 cell is wholly valid
    src = write(tmp_path / "in.tif", data, nodata=0)
    code, err = run(capsys, "segment", src, tmp_path / "o.tif", "-k", 3, "--model", model, "--no-progress",
                    "--report", tmp_path / "r.json")
    assert code == 0, err
    assert "centres fitted on cells that are partly nodata" in err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["partial_cells"] is True and report["centers"]["sample"]["rasters"][0]["partial_cells"] is True

    reads, real = [], seg.read_window

    def counted(reader, win, scaling, fill):
        reads.append(win.read.bounds)
        return real(reader, win, scaling, fill)

    monkeypatch.setattr(seg, "read_window", counted)
    lines = []
    centres = fit_raster_centers([src], SegmentOptions(k=3, model=model), log=lines.append)
    assert reads and len(reads) == len(set(reads))  # one pass: no window read twice
    assert centres.sample["rasters"][0]["partial_cells"] is True
    assert any("partly nodata" in line for line in lines)
    reads.clear()
    whole = write(tmp_path / "whole.tif", scene(), nodata=0)
    centres = fit_raster_centers([whole], SegmentOptions(k=3, model=model), log=lines.append)
    assert centres.sample["rasters"][0]["partial_cells"] is False and len(reads) == len(set(reads))


# --------------------------------------------------------------------------- ranges and clipping

class RareBright(ArrayReader):
    """A 16384² uint16 raster of value 500 (no memory: a broadcast) with one pixel of 3000."""

    def __init__(self, at: tuple[int, int]):
        super().__init__(np.broadcast_to(np.uint16(500), (16384, 16384, 3)), name="rare.tif")
        self.at = at

    def read(self, row0, row1, col0, col1):
        data, ok = super().read(row0, row1, col0, col1)
        r, c = self.at
        if row0 <= r < row1 and col0 <= c < col1:
            data = data.copy()
            data[r - row0, c - col0] = 3000
        return data, ok


def test_a_sampled_range_sees_the_brightest_pixel_however_rare():
    features = SegmentOptions(model="kmeans").feature_model()
    wins, n = sample_window_order(16384, 16384, features.stride, features.halo, 0)
    assert n * 256 * 256 > 2_000_000  # more values than a cut to 2M would keep
    for i in range(0, n, 9):  # a bright pixel in one window of the sample, wherever it is
        core = wins[i].core
        scaling = scaling_for(RareBright((core.row1 - 1, core.col1 - 1)), features, None, 0)
        assert scaling.input_max == 4095 and "sampled values 3000" in scaling.description, (i, scaling.description)


def test_pixels_above_the_input_maximum_are_counted(model, tmp_path, capsys):
    data = twelve_bit() // 4  # at most 1023
    data[:, 10:13, 20:25] = 4000  # 15 pixels above 2047
    src = write(tmp_path / "in.tif", data)
    counts = set()
    for tile in (48, 64):
        code, err = run(capsys, "segment", src, tmp_path / "o.tif", "-k", 3, "--model", model, "--no-progress",
                        "--bits", 11, "--tile", tile, "--report", tmp_path / "r.json")
        assert code == 0, err
        counts.add(json.loads((tmp_path / "r.json").read_text())["clipped_pixels"])
        assert "15 pixels" in err and "clipped to full brightness" in err, err
    assert counts == {15}
    code, err = run(capsys, "segment", src, tmp_path / "o.tif", "-k", 3, "--model", model, "--no-progress",
                    "--report", tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["clipped_pixels"] == 0 and "clipped" not in err


def test_stretch_and_input_max_fail_before_sampling(tmp_path, monkeypatch):
    src = write(tmp_path / "in.tif", twelve_bit())

    def no_sampling(*a, **k):
        raise AssertionError("sampled before the options were checked")

    monkeypatch.setattr(seg, "_raw_sample", no_sampling)
    monkeypatch.setattr(seg, "collect_sample", no_sampling)
    for run_it in (lambda o: segment_raster(src, tmp_path / "o.tif", o, **QUIET),
                   lambda o: fit_raster_centers([src], o)):
        with pytest.raises(SegmentError, match="--stretch and --input-max"):
            run_it(SegmentOptions(k=3, model="kmeans", stretch=(2, 98), input_max=4095))


# --------------------------------------------------------------------------- centres carry their scaling

def test_centres_carry_the_input_maximum_they_were_fitted_with(model, tmp_path, capsys):
    fitted_on = write(tmp_path / "a.tif", twelve_bit(), nbits=12)
    centres = tmp_path / "c.json"
    code, err = run(capsys, "fit", fitted_on, "-k", 3, "--model", model, "-o", centres, "--no-progress")
    assert code == 0, err
    recorded = json.loads(centres.read_text())["sample"]["scaling"]
    assert recorded["input_max"] == 4095 and recorded["dtype"] == "uint16" and "NBITS=12" in recorded["how"]
    dim = (twelve_bit(seed=5) // 5).astype(np.uint16)  # no NBITS, largest value < 1024: on its own, x / 1023
    src = write(tmp_path / "b.tif", dim)

    def segment(*extra, centres_file=centres):
        code, err = run(capsys, "segment", src, tmp_path / "o.tif", "--centers", centres_file, "--model", model,
                        "--no-progress", "--report", tmp_path / "r.json", *extra)
        assert code == 0, err
        return json.loads((tmp_path / "r.json").read_text()), err

    report, err = segment()
    assert report["input_max"] == 4095 and f"input maximum of the centres file {centres}" in report["scaling"], err
    report, err = segment("--input-max", 1023)  # given: it wins, and the log says over what
    assert report["input_max"] == 1023 and f"not the x / 4095 the centres file {centres} was fitted with" in err
    old = tmp_path / "old.json"  # a file from before: loads, and the raster takes its own range (said)
    data = json.loads(centres.read_text())
    del data["sample"]["scaling"]
    old.write_text(json.dumps(data))
    report, err = segment(centres_file=old)
    assert report["input_max"] == 1023 and "records no input maximum" in err
    ten_bit = write(tmp_path / "t.tif", dim, nbits=10)  # states another bit depth: refused
    code, err = run(capsys, "segment", ten_bit, tmp_path / "o2.tif", "--centers", centres, "--model", model,
                    "--no-progress")
    assert code == 2 and "NBITS=10" in err and "--input-max 4095" in err and "Traceback" not in err, err
    assert not (tmp_path / "o2.tif").exists()


def test_fit_over_rasters_of_different_ranges_records_none(model, tmp_path, capsys):
    a = write(tmp_path / "a.tif", twelve_bit(), nbits=12)
    b = write(tmp_path / "b.tif", scene())
    code, err = run(capsys, "fit", a, b, "-k", 3, "--model", model, "-o", tmp_path / "c.json", "--no-progress")
    assert code == 0 and "scaled by different ranges" in err, err
    sample = json.loads((tmp_path / "c.json").read_text())["sample"]
    assert "scaling" not in sample and [r["input_max"] for r in sample["rasters"]] == [4095, 255]


# --------------------------------------------------------------------------- fit checks its outputs once

def test_fit_checks_its_outputs_once(model, tmp_path, capsys, monkeypatch):
    inputs = [write(tmp_path / f"{i}.tif", scene(seed=i)) for i in range(3)]
    calls, real = [], seg.check_outputs
    monkeypatch.setattr(seg, "check_outputs", lambda *a, **k: calls.append(a) or real(*a, **k))
    code, err = run(capsys, "fit", *inputs, "-k", 3, "--model", model, "-o", tmp_path / "c.json", "--no-progress")
    assert code == 0 and len(calls) == 1, err
    assert {str(p) for _, p in calls[0][1]} >= {str(p) for p in inputs}  # every input among what it protects
    code, err = run(capsys, "fit", *inputs, "-k", 3, "--model", model, "-o", inputs[2], "--no-progress")
    assert code == 2 and f"is the input raster ({inputs[2]})" in err, err
    assert Path(tmp_path / "c.json").exists()
