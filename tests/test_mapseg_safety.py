"""Nothing a user does destroys data or ends in a traceback (issue 16, the runtime's rows): each case gives an
``error: ...`` line naming the file and what to do (exit 2, no partial output, nothing existing touched) or the
right result. The QGIS plugin's side is in test_qgis_plugin.py."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
from affine import Affine  # noqa: E402

import mapseg.fileio as fileio  # noqa: E402
from mapseg.cli import main  # noqa: E402
from mapseg.errors import OutputError, RasterError  # noqa: E402
from mapseg.scaling import input_range, make_scaling  # noqa: E402
from mapseg.segment import SegmentCancelled, SegmentError, SegmentOptions, segment_raster  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CRS, TRANSFORM = "EPSG:32633", Affine(0.5, 0, 500000.0, 0, -0.5, 4100000.0)
QUIET = {"progress": False, "log": lambda msg: None}


@pytest.fixture(scope="module")
def model(export_tiny_student):
    return str(export_tiny_student(max_k=6))


def scene(h: int = 96, w: int = 120, seed: int = 0) -> np.ndarray:
    """(3, h, w) uint8: four colour regions with noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    region = (yy > h // 2).astype(int) * 2 + (xx > w // 2).astype(int)
    colours = np.array([[40, 60, 30], [200, 190, 170], [90, 140, 60], [60, 80, 160]], float)
    return np.clip(colours[region] + rng.normal(0, 8, (h, w, 3)), 1, 255).astype(np.uint8).transpose(2, 0, 1)


def write(path, data, nodata=None, **profile) -> Path:
    data = np.asarray(data)
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                       dtype=str(data.dtype), crs=CRS, transform=TRANSFORM, nodata=nodata, **profile) as ds:
        ds.write(data)
    return Path(path)


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def listing(folder) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir())


# --------------------------------------------------------------------------- 1. outputs that would destroy data

@pytest.mark.parametrize("case", ["same", "symlink", "hard_link", "other_spelling", "report_is_input",
                                  "report_is_output", "report_is_preview", "report_is_model", "centres_file",
                                  "vrt_source"])
def test_an_output_that_is_an_input_is_refused_before_any_work(model, tmp_path, capsys, case):
    src = write(tmp_path / "in.tif", scene())
    (tmp_path / "sub").mkdir()
    out, extra = tmp_path / "out.tif", []
    if case == "same":
        out = src
    elif case == "symlink":
        (tmp_path / "link.tif").symlink_to(src)
        out = tmp_path / "link.tif"
    elif case == "hard_link":
        os.link(src, tmp_path / "hard.tif")
        out = tmp_path / "hard.tif"
    elif case == "other_spelling":
        out = tmp_path / "sub" / ".." / "in.tif"
    elif case == "report_is_input":
        extra = ["--report", src]
    elif case == "report_is_output":
        extra = ["--report", out]
    elif case == "report_is_preview":
        extra = ["--report", tmp_path / "p.png", "--preview", tmp_path / "sub" / ".." / "p.png"]
    elif case == "report_is_model":
        extra = ["--report", Path(model) / "meta.json"]
    elif case == "centres_file":
        assert main(["fit", str(src), "-k", "3", "--model", model, "-o", str(tmp_path / "c.json"),
                     "--no-progress"]) == 0
        extra = ["--centers", tmp_path / "c.json", "--report", tmp_path / "c.json"]
    elif case == "vrt_source":  # the VRT reads in.tif: writing in.tif would destroy the input too
        import rasterio.shutil

        rasterio.shutil.copy(src, tmp_path / "in.vrt", driver="VRT")
        src, out = tmp_path / "in.vrt", src
    before = {p: digest(p) for p in [*tmp_path.glob("*.*"), *Path(model).iterdir()] if p.is_file()}
    names = listing(tmp_path)
    code, err = run(capsys, "segment", src, out, "-k", 3, "--model", model, "--no-progress", *extra)
    assert code == 2 and "error:" in err, err
    assert ("would destroy it" in err) or ("are both" in err), err
    assert "fitting" not in err  # refused before any work
    assert listing(tmp_path) == names
    assert {p: digest(p) for p in before} == before


def test_fit_refuses_a_centres_file_that_is_an_input(model, tmp_path, capsys):
    src = write(tmp_path / "in.tif", scene())
    before = digest(src)
    code, err = run(capsys, "fit", src, "-k", 3, "--model", model, "-o", src)
    assert code == 2 and "-o" in err and "is the input raster" in err, err
    assert digest(src) == before


def test_the_output_folder_is_checked_before_any_work(model, tmp_path, capsys, monkeypatch):
    src = write(tmp_path / "in.tif", scene())
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "folder.tif").mkdir()
    cases = {tmp_path / "no" / "out.tif": "output folder .* does not exist",
             tmp_path / "a_file" / "out.tif": "is not a folder",
             tmp_path / "folder.tif": "is a folder"}
    for out, message in cases.items():
        code, err = run(capsys, "segment", src, out, "-k", 3, "--model", model, "--no-progress")
        assert code == 2 and __import__("re").search(message, err) and "fitting" not in err, err

    real_open = os.open

    def read_only(path, flags, *a):  # as a read-only folder or file system answers (root ignores chmod)
        if ".probe-" in str(path):
            raise OSError(30, "Read-only file system", str(path))
        return real_open(path, flags, *a)

    monkeypatch.setattr(fileio.os, "open", read_only)
    code, err = run(capsys, "segment", src, tmp_path / "out.tif", "-k", 3, "--model", model, "--no-progress")
    assert code == 2 and "cannot write in" in err and "Read-only file system" in err, err
    monkeypatch.undo()
    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda p: SimpleNamespace(total=10**9, used=10**9 - 10, free=10))
    code, err = run(capsys, "segment", src, tmp_path / "out.tif", "-k", 3, "--model", model, "--no-progress")
    assert code == 2 and "free in" in err and "needs about" in err and "fitting" not in err, err
    assert listing(tmp_path) == ["a_file", "folder.tif", "in.tif"]


def test_the_python_api_refuses_the_same(model, tmp_path):
    src = write(tmp_path / "in.tif", scene())
    before = digest(src)
    with pytest.raises(OutputError, match="is the input raster"):
        segment_raster(src, src, SegmentOptions(k=3, model=model), **QUIET)
    with pytest.raises(OutputError, match="are both"):
        segment_raster(src, tmp_path / "o.tif", SegmentOptions(k=3, model=model), **QUIET,
                       other_outputs={"report": tmp_path / "o.tif"})
    assert digest(src) == before and listing(tmp_path) == ["in.tif"]


# --------------------------------------------------------------------------- 2. inputs wider than 8 bits

def test_input_range_says_what_it_used():
    assert input_range({"dtype": "uint8"}) == (255.0, "uint8")
    assert input_range({"dtype": "uint16", "nbits": 12})[0] == 4095
    value, how = input_range({"dtype": "uint16", "statistics_max": 3000.0})
    assert value == 4095 and "STATISTICS_MAXIMUM 3000" in how
    value, how = input_range({"dtype": "uint16"}, lambda: np.array([[10, 900, 1023]]))
    assert value == 1023 and "10-bit" in how and "sampled" in how
    assert input_range({"dtype": "uint16"}, np.array([65535]))[0] == 65535
    for info, sample in (({"dtype": "uint16"}, None), ({"dtype": "int16"}, np.array([5])),
                         ({"dtype": "float32"}, None)):
        with pytest.raises(SegmentError, match="--input-max"):
            input_range(info, sample)
    # uint8 stays exactly what it was: x * float32(1 / 255), no clip
    s = make_scaling("uint8", None, None)
    assert (s.offset == 0).all() and s.scale.dtype == np.float32 and (s.scale == np.float32(1 / 255.0)).all()
    assert not s.clip and s.description == "x / 255 (uint8)" and s.input_max == 255


@pytest.mark.parametrize("how", ["nbits", "statistics", "sampled", "input_max", "bits"])
def test_twelve_bit_imagery_is_scaled_by_its_own_range(model, tmp_path, capsys, how):
    data8 = scene(seed=3)
    ref = tmp_path / "ref.tif"
    assert run(capsys, "segment", write(tmp_path / "u8.tif", data8), ref, "-k", 4, "--model", model,
               "--no-progress")[0] == 0
    data12 = (data8.astype(np.int64) * 4095 // 255).astype(np.uint16)
    src = write(tmp_path / "u12.tif", data12, **({"nbits": 12} if how == "nbits" else {}))
    if how == "statistics":
        with rasterio.open(src, "r+") as ds:
            for b in (1, 2, 3):
                ds.update_tags(b, STATISTICS_MAXIMUM=int(data12[b - 1].max()))
    extra = {"input_max": ["--input-max", 4095], "bits": ["--bits", 12]}.get(how, [])
    code, err = run(capsys, "segment", src, tmp_path / "o.tif", "-k", 4, "--model", model, "--no-progress",
                    "--report", tmp_path / "r.json", *extra)
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["input_max"] == 4095 and report["scaling"].startswith("x / 4095 (uint16")
    said = {"nbits": "NBITS=12", "statistics": "STATISTICS_MAXIMUM", "sampled": "sampled values",
            "input_max": "input maximum given", "bits": "input maximum given"}[how]
    assert said in report["scaling"] and f"scaling: {report['scaling']}" in err
    with rasterio.open(ref) as a, rasterio.open(tmp_path / "o.tif") as b:
        assert (a.read(1) == b.read(1)).mean() > 0.99   # as the 8-bit image (65535 gave 39 % before)


def test_scaling_options_exclude_each_other(model, tmp_path, capsys):
    src = write(tmp_path / "in.tif", scene())
    with pytest.raises(SystemExit) as exc:
        main(["segment", str(src), str(tmp_path / "o.tif"), "-k", "3", "--stretch", "2,98", "--bits", "12"])
    assert exc.value.code == 2 and "not allowed with" in capsys.readouterr().err
    code, err = run(capsys, "segment", src, tmp_path / "o.tif", "-k", 3, "--model", model, "--bits", 40)
    assert code == 2 and "--bits 40" in err and not (tmp_path / "o.tif").exists()


# --------------------------------------------------------------------------- 3. a run killed outright

def test_a_killed_run_leaves_nothing_the_next_run_does_not_clean(model, tmp_path, capsys):
    src = write(tmp_path / "in.tif", np.tile(scene(), (1, 4, 4)))
    out = tmp_path / "out.tif"
    code = ("import sys, time\n"
            "import mapseg.raster as r\n"
            "slow = r.LabelWriter.write\n"
            "r.LabelWriter.write = lambda self, *a: (time.sleep(0.2), slow(self, *a))\n"
            "from mapseg.cli import main\n"
            f"sys.exit(main(['segment', {str(src)!r}, {str(out)!r}, '-k', '3', '--model', {model!r}, '--tile', '64',"
            " '--no-progress']))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".out.tif.part-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # mid-write
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    dead = [p.name for p in tmp_path.glob(".out.tif.part-*")]
    assert len(dead) == 1 and f"-{proc.pid}-" in dead[0], listing(tmp_path)
    # live runs' temporaries (this process; another one, asked with os.kill), another host's, and ones from
    # before host tags, fresh and old
    sleeper = subprocess.Popen(["sleep", "120"])
    try:
        live = f".out.tif.part-{os.getpid()}-{fileio.HOST_TAG}-0123abcd.tif"
        live_other = f".out.tif.part-{sleeper.pid}-{fileio.HOST_TAG}-0123abcd.tif"
        other_host = f".out.tif.part-{proc.pid}-{'0' * 6 if fileio.HOST_TAG != '0' * 6 else '1' * 6}-0123abcd.tif"
        legacy_old, legacy_new = f".x.tif.part-{proc.pid}-89abcdef.tif", f".y.tif.part-{proc.pid}-89abcdef.tif"
        for name in (live, live_other, other_host, legacy_old, legacy_new):
            (tmp_path / name).write_bytes(b"partial")
        os.utime(tmp_path / legacy_old, (time.time() - 2 * fileio.LEGACY_AGE_S,) * 2)
        os.utime(tmp_path / live_other, (time.time() - 2 * fileio.LEGACY_AGE_S,) * 2)
        code, err = run(capsys, "segment", src, out, "-k", 3, "--model", model, "--no-progress")
    finally:
        sleeper.kill()
        sleeper.wait()
    assert code == 0, err
    assert "removed 2 temporary file(s) that killed runs left" in err and dead[0] in err
    assert listing(tmp_path) == sorted([live, live_other, other_host, legacy_new, "in.tif", "out.tif", "out.qml",
                                        "out.tif.aux.xml"])


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _age(path: Path, seconds: float = 2 * 3600) -> None:
    os.utime(path, (time.time() - seconds,) * 2)


def test_only_names_mapseg_writes_are_removed(tmp_path):
    pid, host = _dead_pid(), fileio.HOST_TAG
    user = {  # a user's files and folders that look like temporaries (the process is gone, two hours old)
        f".notes.{pid}-deadbeef": "file", f".photos.{pid}-cafebabe": "dir",
        f".a.txt.{pid}-{host}-deadbeef.bak": "file", f".b.tif.part-{pid}-{host}-deadbeef": "file",
        f".c.tif.part-{pid}-{host}-0123abcd.tif": "dir", f".d.gpkg.polygons-{pid}-{host}-0123abcd": "file",
        f".e.tif.probe-{pid}-0123abcd": "file", f".f.json.{pid}-{host}-0123abcd.tmp": "dir",
        f".g.json.{pid}-{host}-0123abcd.tmp.old": "file", f".h.tif.backup-{pid}-{host}-0123abcd.tif": "file",
        f".i.{pid}-cafebabe.tmp.d": "dir",
    }
    ours = {  # what mapseg writes: every kind with its suffixes, and the two legacy shapes
        f".o.tif.part-{pid}-{host}-0123abcd.tif": "file", f".o.tif.part-{pid}-{host}-0123abcd.cog.tif": "file",
        f".o.json.{pid}-{host}-0123abcd.tmp": "file", f".o.tif.probe-{pid}-{host}-0123abcd": "file",
        f".o.gpkg.polygons-{pid}-{host}-0123abcd": "dir", f".p.json.{pid}-0123abcd.tmp": "file",
        f".p.tif.part-{pid}-0123abcd.tif": "file", f".p.tif.part-{pid}-0123abcd.cog.tif": "file",
    }
    for name, kind in {**user, **ours}.items():
        if kind == "dir":
            (tmp_path / name).mkdir()
            (tmp_path / name / "inside.jpg").write_bytes(b"photo")
            _age(tmp_path / name / "inside.jpg")
        else:
            (tmp_path / name).write_bytes(b"data")
        _age(tmp_path / name)
    fileio.write_text_atomic(tmp_path / "report.json", "{}")  # a write scans nothing: check_outputs does
    assert len(listing(tmp_path)) == len(user) + len(ours) + 1
    removed = fileio.remove_dead_leftovers(tmp_path)
    assert sorted(removed) == sorted(ours)
    assert listing(tmp_path) == sorted([*user, "report.json"])
    assert all((tmp_path / n / "inside.jpg").exists() for n, kind in user.items() if kind == "dir")


def test_a_pid_no_process_can_have_keeps_the_file(tmp_path, monkeypatch):
    host = fileio.HOST_TAG
    huge = f".o.tif.part-99999999999999999999-{host}-0123abcd.tif"   # not a name mapseg writes (> 10 digits)
    big = f".o.tif.part-9999999999-{host}-0123abcd.tif"              # os.kill: OverflowError (not OSError)
    for name in (huge, big):
        (tmp_path / name).write_bytes(b"data")
        _age(tmp_path / name)
    assert fileio.pid_alive(9999999999) and fileio.pid_alive(99999999999999999999)
    assert fileio.remove_dead_leftovers(tmp_path) == []
    fileio.check_outputs({"output": tmp_path / "out.tif"}, [])
    assert listing(tmp_path) == sorted([huge, big])

    dead = f".o.tif.part-{_dead_pid()}-{host}-0123abcd.tif"
    (tmp_path / dead).write_bytes(b"data")

    def not_permitted(pid, sig):  # another user's process: alive
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(fileio.os, "kill", not_permitted)
    assert fileio.remove_dead_leftovers(tmp_path) == []
    monkeypatch.undo()
    assert fileio.remove_dead_leftovers(tmp_path) == [dead]


def test_the_host_tag_tells_containers_and_machines_apart(monkeypatch):
    tag = fileio.host_tag()
    assert tag == fileio.HOST_TAG and len(tag) == 6
    if sys.platform.startswith("linux"):  # not the host name alone
        assert fileio._pid_namespace() and fileio._boot_id()
        assert tag != hashlib.sha1(fileio.socket.gethostname().encode()).hexdigest()[:6]
    monkeypatch.setattr(fileio, "_pid_namespace", lambda: "4026532999")   # another container, same host name
    other_namespace = fileio.host_tag()
    monkeypatch.setattr(fileio, "_boot_id", lambda: "0f0f0f0f-1111-2222-3333-444455556666")  # another machine
    other_boot = fileio.host_tag()
    assert len({tag, other_namespace, other_boot}) == 3
    monkeypatch.setattr(fileio.socket, "gethostname", lambda: "elsewhere")
    assert fileio.host_tag() not in {tag, other_namespace, other_boot}


# --------------------------------------------------------------------------- 4. truncated or corrupt rasters

def _tiled(path: Path) -> Path:
    return write(path, np.tile(scene(seed=5), (1, 4, 4)), tiled=True, blockxsize=64, blockysize=64,
                 compress="deflate")


@pytest.mark.parametrize("where", ["header", "first_window", "later_window"])
def test_a_truncated_or_corrupt_raster_is_an_error_without_output(model, tmp_path, capsys, where):
    good = _tiled(tmp_path / "good.tif")
    bad = tmp_path / "bad.tif"
    data = bytearray(good.read_bytes())
    extra = []
    if where == "header":
        bad.write_bytes(data[:200])
    elif where == "first_window":  # the sampling windows already meet missing tiles
        bad.write_bytes(data[:len(data) // 3])
    else:  # only the last tile is broken: the centres come from elsewhere, the label pass meets it at its end
        with rasterio.open(good) as ds:
            last = int(ds.get_tag_item(f"BLOCK_OFFSET_{ds.width // 64 - 1}_{ds.height // 64 - 1}", "TIFF", bidx=1))
        data[last:last + 64] = b"\x13" * 64
        bad.write_bytes(data)
        assert main(["fit", str(good), "-k", "3", "--model", model, "-o", str(tmp_path / "c.json"),
                     "--no-progress"]) == 0
        extra = ["--centers", tmp_path / "c.json"]
    out = tmp_path / "out.tif"
    out.write_bytes(b"previous result")
    names = listing(tmp_path)
    code, err = run(capsys, "segment", bad, out, *(["-k", 3] if not extra else extra), "--model", model,
                    "--tile", 64, "--no-progress")
    assert code == 2 and "error:" in err and str(bad) in err and "Traceback" not in err, err
    assert ("truncated or corrupt" in err) or ("complete raster file" in err), err
    assert out.read_bytes() == b"previous result" and listing(tmp_path) == names


# --------------------------------------------------------------------------- 5. corrupt artifacts, centres of another model

@pytest.mark.parametrize("part", ["model.npz", "meta.json", "model.onnx"])
@pytest.mark.parametrize("command", ["segment", "info"])
def test_a_truncated_artifact_file_is_named(model, tmp_path, capsys, part, command):
    if part == "model.onnx":
        pytest.importorskip("onnxruntime")
    broken = tmp_path / "model"
    shutil.copytree(model, broken)
    path = broken / part
    path.write_bytes((path.read_bytes() if path.exists() else b"\x08\x07\x12\x05mapseg" * 50)[:100])
    src = write(tmp_path / "in.tif", scene())
    argv = (["segment", src, tmp_path / "o.tif", "-k", 3, "--no-progress"] if command == "segment" else ["info"])
    code, err = run(capsys, *argv, "--model", broken)
    assert code == 2 and "error:" in err and str(path) in err and "Traceback" not in err, err
    assert "corrupt" in err and not (tmp_path / "o.tif").exists()


def test_centres_of_another_model_or_broken_are_named(export_tiny_student, model, tmp_path, capsys):
    other = str(export_tiny_student(max_k=6, seed=1))
    src = write(tmp_path / "in.tif", scene())
    centres = tmp_path / "c.json"
    assert main(["fit", str(src), "-k", "3", "--model", other, "-o", str(centres), "--no-progress"]) == 0
    code, err = run(capsys, "segment", src, tmp_path / "o.tif", "--centers", centres, "--model", model)
    assert code == 2 and f"the centres file {centres} was fitted with another model" in err, err
    for text in (centres.read_text()[:50], "[1, 2]"):
        centres.write_text(text)
        code, err = run(capsys, "segment", src, tmp_path / "o.tif", "--centers", centres, "--model", model)
        assert code == 2 and str(centres) in err and "Traceback" not in err, err
    assert not (tmp_path / "o.tif").exists()


MALFORMED = {  # a field of the wrong type or shape -> what the message says
    "model_list": ({"model": [1]}, "'model' must be an object"),
    "counts_text": ({"counts": "abc"}, "'counts' must be a (3,) list"),
    "counts_shape": ({"counts": [1, 2]}, "'counts' must be a finite (3,) list"),
    "counts_huge": ({"counts": [10**30, 1, 1]}, "'counts' must be a (3,) list"),
    "mean_colours_shape": ({"mean_colours": [[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]]},
                           "'mean_colours' must be a finite (3, 3)"),
    "mean_colours_nan": ({"mean_colours": [[0.1, 0.2, None]] * 3}, "'mean_colours' must be"),
    "centers_ragged": ({"centers": [[1.0, 2.0], [3.0]]}, "'centers' must be"),
    "centers_text": ({"centers": "abc"}, "'centers' must be"),
    "features": ({"features": ["embedding"]}, "unknown features"),
    "sample_list": ({"sample": [1]}, "'sample' must be an object"),
    "no_model": ({"model": None}, "'model' must be an object"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_centres_file_is_named(model, tmp_path, capsys, case):
    src = write(tmp_path / "in.tif", scene())
    centres = tmp_path / "c.json"
    assert main(["fit", str(src), "-k", "3", "--model", model, "-o", str(centres), "--no-progress"]) == 0
    change, message = MALFORMED[case]
    data = json.loads(centres.read_text())
    centres.write_text(json.dumps({**data, **change}))
    capsys.readouterr()
    code, err = run(capsys, "segment", src, tmp_path / "o.tif", "--centers", centres, "--model", model,
                    "--no-progress")
    assert code == 2 and "\nerror: " in err and str(centres) in err and message in err, err
    assert "Traceback" not in err and not (tmp_path / "o.tif").exists()


# --------------------------------------------------------------------------- 6. rasters of a few pixels

@pytest.mark.parametrize("features", ["model", "kmeans"])
def test_a_three_by_five_raster_is_segmented(model, tmp_path, features):
    data = np.zeros((3, 3, 5), np.uint8)
    data[:, :, :4] = np.array([200, 30, 30])[:, None, None]
    data[:, :, 4] = np.array([20, 30, 220])[:, None]
    src = write(tmp_path / "in.tif", data)
    # nearest: the guided upsampling smooths a 1-pixel column into its 12 times larger neighbour by design
    segment_raster(src, tmp_path / "o.tif", SegmentOptions(k=2, model=model if features == "model" else "kmeans",
                                                           upsample="nearest"), **QUIET)
    with rasterio.open(tmp_path / "o.tif") as ds:
        labels = ds.read(1)
        assert ds.nodata is None
    assert (labels[:, :4] == labels[0, 0]).all() and (labels[:, 4] == labels[0, 4]).all()
    assert labels[0, 0] != labels[0, 4]
    if features == "model":  # the model's own (guided) upsampling runs on two cells too
        segment_raster(src, tmp_path / "g.tif", SegmentOptions(k=2, model=model, upsample="guided"), **QUIET)
        with rasterio.open(tmp_path / "g.tif") as ds:
            assert ds.read(1).shape == (3, 5) and set(np.unique(ds.read(1))) <= {0, 1}


def test_a_one_pixel_raster_says_why_it_cannot_be_segmented(model, tmp_path, capsys):
    src = write(tmp_path / "in.tif", np.full((3, 1, 1), 90, np.uint8))
    for m, what in ((model, "a single cell of 4 x 4 pixels"), ("kmeans", "a single pixel")):
        code, err = run(capsys, "segment", src, tmp_path / "o.tif", "-k", 2, "--model", m, "--no-progress")
        error = err[err.index("error:"):]
        assert code == 2 and what in error and "nodata" not in error, err
        assert ("centres fitted on cells that are partly nodata" in err) == (m == model)  # said, not silent
    assert listing(tmp_path) == ["in.tif"]


# --------------------------------------------------------------------------- 7. sparse rasters: progress, cancel

@pytest.fixture
def sparse_vrt(tmp_path) -> Path:
    """A 16384² VRT whose only data is one 256² tile far from the origin (nodata 0 elsewhere)."""
    rng = np.random.default_rng(0)
    write(tmp_path / "tile.tif", rng.integers(1, 255, (3, 256, 256)).astype(np.uint8), nodata=0)
    bands = "".join(f'<VRTRasterBand dataType="Byte" band="{b}"><NoDataValue>0</NoDataValue><SimpleSource>'
                    f'<SourceFilename relativeToVRT="1">tile.tif</SourceFilename><SourceBand>{b}</SourceBand>'
                    '<SrcRect xOff="0" yOff="0" xSize="256" ySize="256"/>'
                    '<DstRect xOff="9000" yOff="12000" xSize="256" ySize="256"/></SimpleSource></VRTRasterBand>'
                    for b in (1, 2, 3))
    vrt = tmp_path / "sparse.vrt"
    vrt.write_text(f'<VRTDataset rasterXSize="16384" rasterYSize="16384"><SRS>{CRS}</SRS>'
                   f'<GeoTransform>0, 1, 0, 0, 0, -1</GeoTransform>{bands}</VRTDataset>')
    return vrt


def test_sampling_a_sparse_raster_shows_progress_and_can_be_cancelled(sparse_vrt, tmp_path, capsys):
    code, err = run(capsys, "fit", sparse_vrt, "-k", 3, "--model", "kmeans", "-o", tmp_path / "c.json")
    assert code == 0, err
    assert "sample [" in err and "/4096 windows" in err and "valid cells" in err
    seen = []

    def cancel_during_fit(fraction, stage):
        seen.append((fraction, stage))
        return len(seen) < 40

    with pytest.raises(SegmentCancelled):
        segment_raster(sparse_vrt, tmp_path / "o.tif", SegmentOptions(k=3, model="kmeans"), **QUIET,
                       callback=cancel_during_fit)
    assert len(seen) == 40 and {stage for _, stage in seen} == {"fit"}
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and 0 < fractions[-1] < 0.1
    assert not (tmp_path / "o.tif").exists() and not list(tmp_path.glob(".o.tif*"))


def test_read_errors_name_the_window(tmp_path):
    good = _tiled(tmp_path / "good.tif")
    bad = tmp_path / "bad.tif"
    bad.write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    from mapseg.raster import open_reader

    with open_reader(bad) as reader:
        reader.read(0, 64, 0, 64)
        with pytest.raises(RasterError, match=r"cannot read .*bad.tif at rows 320-384, columns 0-64"):
            reader.read(320, 384, 0, 64)
