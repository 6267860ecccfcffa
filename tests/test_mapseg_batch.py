"""mapseg batch: many rasters, one set of centres, on a Dask cluster (mapseg/batch.py, docs/cluster.md).

The cluster tests run a LocalCluster of 2 worker processes on real imagery (skipped when ../shared/datasets
is absent) and hold the batch to what single-process runs give: the centres of ``mapseg fit`` on the same
inputs, bit for bit, and the labels of ``mapseg segment --centers`` on each raster, pixel for pixel.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from conftest import run_python

from mapseg.batch_inputs import expand_inputs, output_stems
from mapseg.cluster import fit_centers, kmeans_rows
from mapseg.raster.vrt import write_mosaics, write_vrt

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets"
QUIET = {"progress": False, "log": lambda msg: None}
K = 4
TILE = 128
BLOCK = 512  # the 1421 x 805 NGI rasters are cut into 3 x 2 block tasks each

# two SWISSIMAGE tiles (EPSG:2056), a NEON raster cut into blocks (EPSG:32617), another NEON raster (EPSG:32611),
# two overlapping NGI tiles with nodata edges (a transverse Mercator without an EPSG code): 4 CRSs, more than the
# 30,000 sampled cells k-means sees (so the rows drawn on the client are exercised)
INPUTS = ["swissimage/img/1091-322_00.tif", "swissimage/img/1091-322_01.tif", "neon/OSBS_029.tif",
          "neon/2018_SJER_3_252000_4107000_image_477.tif", "ngi_aerial/ngi_rgb_byte_1.tif",
          "ngi_aerial/ngi_rgb_byte_2.tif"]
have_data = pytest.mark.skipif(not all((DATA / p).is_file() for p in INPUTS),
                               reason=f"real imagery not found at {DATA}")


# --------------------------------------------------------------------------- without a cluster

def test_inputs_from_globs_lists_and_urls(tmp_path, monkeypatch):
    for name in ("b.tif", "a.tif", "c.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.tif").write_bytes(b"")
    listing = tmp_path / "sub" / "list.txt"
    listing.write_text("# rasters\nd.tif\n\nhttps://example.org/x/e.tif?sig=1\ns3://bucket/f.tif\n")
    monkeypatch.chdir(tmp_path)
    got = expand_inputs(["*.tif", f"@{listing}", "a.tif"])
    assert got == [str(tmp_path / "a.tif"), str(tmp_path / "b.tif"), str(tmp_path / "sub" / "d.tif"),
                   "/vsicurl/https://example.org/x/e.tif?sig=1", "/vsis3/bucket/f.tif"]  # a.tif once
    assert expand_inputs([str(listing)]) == got[2:]  # a .txt file is a list too
    from mapseg.errors import SegmentError
    with pytest.raises(SegmentError, match="no file matches"):
        expand_inputs(["nothing/*.tif"])


def test_output_names_are_unique_and_stable():
    stems = output_stems(["/a/x.tif", "/b/x.tif", "/c/X.TIF", "/d/mosaic.tif", "/vsicurl/https://h/p/y.tif?s=1"])
    assert stems[0] == "x" and stems[1].startswith("x-") and stems[2].startswith("X-") and stems[1] != stems[2]
    assert stems[3].startswith("mosaic-") and stems[4] == "y"
    # every name a mosaic can take is reserved (mosaic_EPSG-<n>.vrt, mosaic_<n>.vrt), and the run's other files
    for name in ("mosaic_EPSG-2056", "Mosaic_1", "mosaic_x", "centers", "batch_report"):
        assert output_stems([f"/d/{name}.tif"])[0].startswith(f"{name}-")
    assert output_stems(["/d/mosaics.tif", "/d/mosaic-1.tif"]) == ["mosaics", "mosaic-1"]
    # appending inputs renames no output; an input inserted before one of the same name takes the plain name
    assert output_stems(["/a/x.tif", "/b/x.tif", "/e/x.tif"])[:2] == stems[:2]
    assert output_stems(["/0/x.tif", "/a/x.tif"])[1] != "x"


def test_rows_drawn_for_kmeans_are_those_fit_centers_draws():
    """The client fits on the rows mapseg.cluster.fit_centers would draw from the whole sample: same centres."""
    rng = np.random.default_rng(3)
    feats = rng.normal(size=(30_500, 8)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    cols = rng.random((30_500, 3)).astype(np.float32)
    whole = fit_centers(feats, cols, 3, "cosine", "embedding", {"kind": "artifact"}, seed=5)
    rows = kmeans_rows(30_500, 8, seed=5)
    assert rows is not None and len(rows) == 30_000 and (np.diff(rows) > 0).all()
    drawn = fit_centers(feats[rows], cols[rows], 3, "cosine", "embedding", {"kind": "artifact"}, seed=5)
    assert drawn.centers.tobytes() == whole.centers.tobytes()
    assert kmeans_rows(30_000, 8, seed=5) is None and kmeans_rows(10_001, 3, seed=5) is not None


def test_vrt_places_rasters_by_their_transforms(tmp_path):
    rasterio = pytest.importorskip("rasterio")
    from affine import Affine

    pieces = []
    for name, x0, y0, value in (("a.tif", 1000.0, 2000.0, 1), ("b.tif", 1020.0, 1990.0, 2)):
        with rasterio.open(tmp_path / name, "w", driver="GTiff", width=10, height=10, count=1, dtype="uint8",
                           crs="EPSG:32633", transform=Affine(2, 0, x0, 0, -2, y0)) as ds:
            ds.write(np.full((1, 10, 10), value, np.uint8))
        with rasterio.open(tmp_path / name) as ds:
            geometry = {"width": 10, "height": 10, "geotransform": ds.transform.to_gdal(), "crs": ds.crs.to_wkt(),
                        "gcps": None, "gcp_crs": None}
        pieces.append({"file": name, "geometry": geometry})
    pieces.append({"file": "plain.tif", "geometry": {"width": 5, "height": 5, "geotransform": None, "crs": None,
                                                     "gcps": None, "gcp_crs": None}})
    mosaics, left_out = write_mosaics(tmp_path, pieces, k=3)
    assert [m["file"] for m in mosaics] == ["mosaic.vrt"]
    assert left_out == ["plain.tif (not a north-up georeferenced grid)"]
    with rasterio.open(tmp_path / "mosaic.vrt") as ds:
        assert (ds.width, ds.height, ds.crs.to_epsg(), ds.transform) == (20, 15, 32633, Affine(2, 0, 1000, 0, -2, 2000))
        a = ds.read(1)
        assert ds.colormap(1)[2][:3] != ds.colormap(1)[1][:3] and ds.nodata == 255
    assert (a[:10, :10] == 1).all() and (a[5:, 10:] == 2).all()
    assert (a[:5, 10:] == 255).all() and (a[10:, :10] == 255).all()  # nothing there: nodata
    write_vrt(tmp_path / "one.vrt", 10, 10, [{"file": "a.tif", "width": 10, "height": 10, "dst": (0, 0, 10, 10)}], 3,
              geotransform=(1000.0, 2.0, 0.0, 2000.0, 0.0, -2.0))
    with rasterio.open(tmp_path / "one.vrt") as ds:
        assert (ds.read(1) == 1).all()


def test_vrt_over_a_geographic_raster_keeps_longitude_as_x(tmp_path):
    """EPSG:4326 declares latitude first; the VRT's x is still the longitude (GDAL's traditional GIS order), so
    its bounds, and where GDAL puts it on the globe, are the tile's."""
    rasterio = pytest.importorskip("rasterio")
    from affine import Affine

    with rasterio.open(tmp_path / "t.tif", "w", driver="GTiff", width=10, height=10, count=1, dtype="uint8",
                       crs="EPSG:4326", transform=Affine(0.01, 0, 10.0, 0, -0.01, 50.0)) as ds:
        ds.write(np.ones((1, 10, 10), np.uint8))
    with rasterio.open(tmp_path / "t.tif") as ds:
        geometry = {"width": 10, "height": 10, "geotransform": ds.transform.to_gdal(), "crs": ds.crs.to_wkt(),
                    "gcps": None, "gcp_crs": None}
        bounds = ds.bounds
    mosaics, _ = write_mosaics(tmp_path, [{"file": "t.tif", "geometry": geometry}], k=3)
    with rasterio.open(tmp_path / mosaics[0]["file"]) as ds:
        assert ds.bounds == bounds and ds.crs.to_epsg() == 4326 and (ds.read(1) == 1).all()
    if shutil.which("gdalinfo") is None:
        pytest.skip("gdalinfo not found: the placement on the globe is not checked")

    def extent(path):
        out = subprocess.run(["gdalinfo", "-json", str(path)], capture_output=True, text=True, check=True).stdout
        return json.loads(out)["wgs84Extent"]["coordinates"]

    got = np.array(extent(tmp_path / mosaics[0]["file"]))
    assert np.allclose(got, extent(tmp_path / "t.tif")) and np.allclose(got[0][0], [10.0, 50.0])  # lon 10, lat 50


def test_worker_reloads_a_model_reexported_at_its_path(monkeypatch):
    """A long-lived worker loaded the model of an earlier run; the model re-exported at the same path (another
    digest) is loaded again, not refused; a model still other than the client's is refused."""
    from mapseg import batch
    from mapseg.errors import SegmentError
    from mapseg.segment import SegmentOptions

    on_disk, loads = {"digest": "a" * 64}, []

    class Loaded:
        def __init__(self, digest):
            self.model_id = {"kind": "artifact", "weights_sha256": digest}

    def load(model, backend, threads, workers):
        loads.append(on_disk["digest"])
        return Loaded(on_disk["digest"])

    monkeypatch.setattr(batch, "load_features", load)
    monkeypatch.setattr(batch, "_FEATURES", {})
    s = batch.TaskSettings("/models/m", "numpy", "a" * 64, SegmentOptions(threads=1, workers=1), "", "/out")
    assert batch._worker_features(s) is batch._worker_features(s) and loads == ["a" * 64]  # loaded once
    on_disk["digest"] = "b" * 64  # re-exported
    again = batch._worker_features(dataclasses.replace(s, model_digest="b" * 64))
    assert again.model_id["weights_sha256"] == "b" * 64 and loads == ["a" * 64, "b" * 64]
    with pytest.raises(SegmentError, match="not the client's"):
        batch._worker_features(dataclasses.replace(s, model_digest="c" * 64))


def test_without_dask_mapseg_imports_and_batch_says_what_to_install(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        import mapseg.batch, mapseg.cli
        heavy = [m for m in ('dask', 'distributed', 'rasterio', 'onnxruntime', 'torch') if m in sys.modules]
        assert not heavy, heavy
        from mapseg.cli import main
        sys.exit(main(['batch', {str(tmp_path / 'x.tif')!r}, {str(tmp_path / 'out')!r}, '-k', '3']))
        """)
    res = run_python(code, tmp_path, ["dask", "distributed"])
    assert res.returncode == 2, res.stderr
    assert 'pip install "map-segmenter[dask]"' in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()  # nothing made before the check


# --------------------------------------------------------------------------- on a cluster

PRELOAD = '''
"""Worker preload for the tests: a worker writing the output named in kill.txt dies (os._exit) after its first
window, once (marker file), leaving its temporary file behind as a killed worker does."""
import os
from pathlib import Path

HERE = Path(FOLDER)  # (Dask imports a copy of this file from its scratch space: __file__ is not here)


def dask_setup(worker):
    from mapseg.raster import rasterio_io

    original = rasterio_io.LabelWriter._write

    def _write(self, labels, row0, col0):
        original(self, labels, row0, col0)
        victim = HERE / "kill.txt"
        marker = HERE / "killed.marker"
        if victim.exists() and self.path.name == victim.read_text().strip() and not marker.exists():
            marker.write_text(str(os.getpid()))
            os._exit(1)

    rasterio_io.LabelWriter._write = _write
'''


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A LocalCluster of 2 worker processes, one thread each, with the kill hook preloaded (inactive until
    kill.txt names an output)."""
    distributed = pytest.importorskip("distributed")
    folder = tmp_path_factory.mktemp("preload")
    (folder / "batch_kill_hook.py").write_text(PRELOAD.replace("FOLDER", repr(str(folder))))
    lc = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  preload=[str(folder / "batch_kill_hook.py")])
    client = distributed.Client(lc)
    yield {"address": lc.scheduler_address, "hook": folder, "client": client}
    client.close()
    lc.close()


@pytest.fixture(scope="module")
def first_run(cluster, tmp_path_factory):
    """One batch over INPUTS with fitted centres, and the single-process references: mapseg fit's centres on
    the same inputs and mapseg segment --centers' labels of each raster."""
    from mapseg.batch import segment_batch
    from mapseg.segment import SegmentOptions, fit_raster_centers, segment_raster

    paths = [str(DATA / p) for p in INPUTS]
    tmp = tmp_path_factory.mktemp("batch")
    lines = []
    report = segment_batch(paths, tmp / "out", SegmentOptions(k=K, tile=TILE), scheduler=cluster["address"],
                           block=BLOCK, log=lines.append)
    backend = report["model"]["backend"]
    fitted = fit_raster_centers(paths, SegmentOptions(k=K, backend=backend))
    fitted.save(tmp / "fit.json")
    refs = {}
    for p in paths:
        out = tmp / "ref" / (Path(p).stem + ".tif")
        out.parent.mkdir(exist_ok=True)
        segment_raster(p, out, SegmentOptions(centers=str(tmp / "fit.json"), backend=backend), **QUIET)
        refs[Path(p).stem] = _read(out)
    return {"report": report, "out": tmp / "out", "fit": fitted, "refs": refs, "paths": paths, "lines": lines,
            "tmp": tmp}


def _read(path):
    import rasterio

    with rasterio.open(path) as ds:
        return ds.read(1), ds.crs, ds.transform


def _outputs(out: Path, stem: str) -> Path:
    return out / f"{stem}.vrt" if (out / f"{stem}.vrt").exists() else out / f"{stem}.tif"


def _assert_outputs_equal_references(out: Path, refs: dict) -> None:
    for stem, (labels, crs, transform) in refs.items():
        got, got_crs, got_transform = _read(_outputs(out, stem))
        assert got.shape == labels.shape and np.array_equal(got, labels), stem
        assert got_crs == crs and got_transform == transform, stem


def _no_temporaries(out: Path) -> list:
    return [p.name for p in out.rglob(".*") if ".part-" in p.name or p.name.endswith(".tmp")]


@pytest.mark.data
@have_data
def test_centres_and_labels_equal_single_process_runs(first_run):
    report, out, fitted = first_run["report"], first_run["out"], first_run["fit"]
    assert report["failed"] == 0 and report["done"] == len(INPUTS)
    batch = json.loads((out / "centers.json").read_text())
    assert batch == fitted.to_json()  # mapseg fit's centres file, every field
    assert np.asarray(batch["centers"], np.float32).tobytes() == fitted.centers.tobytes()
    assert sum(r["cells"] for r in batch["sample"]["rasters"]) > 30_000  # k-means saw rows drawn on the client
    _assert_outputs_equal_references(out, first_run["refs"])
    ngi = next(r for r in report["rasters"] if "ngi_rgb_byte_1" in r["input"])
    assert ngi["output"] == "ngi_rgb_byte_1.vrt" and len(ngi["tiles"]) == 6  # cut into blocks
    assert next(r for r in report["rasters"] if "OSBS_029" in r["input"])["output"] == "OSBS_029.tif"
    assert sorted(m["epsg"] or "none" for m in report["mosaics"]) == ["2056", "32611", "32617", "none"]
    assert all(r["status"] == "done" and r["seconds"] > 0 for r in report["rasters"])
    assert _no_temporaries(out) == []


@pytest.mark.data
@have_data
def test_mosaic_holds_every_raster_of_its_crs(first_run):
    import rasterio

    report, out = first_run["report"], first_run["out"]
    swiss = next(m for m in report["mosaics"] if m["epsg"] == "2056")
    with rasterio.open(out / swiss["file"]) as ds:
        mosaic, transform = ds.read(1), ds.transform
    for stem in ("1091-322_00", "1091-322_01"):
        labels, _, t = first_run["refs"][stem]
        col, row = ~transform @ (t.c, t.f)
        r, c = round(row), round(col)
        assert np.array_equal(mosaic[r:r + labels.shape[0], c:c + labels.shape[1]], labels)


@pytest.mark.data
@have_data
def test_rerun_skips_and_other_centres_redo(first_run, cluster):
    from mapseg.batch import segment_batch
    from mapseg.segment import SegmentOptions

    out = first_run["out"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.tif")}
    again = segment_batch(first_run["paths"], out, SegmentOptions(k=K, tile=TILE), scheduler=cluster["address"],
                          block=BLOCK, log=lambda m: None)
    assert again["skipped"] == len(INPUTS) and again["done"] == again["failed"] == 0
    assert again["centers"]["from"] == "reused"
    assert again["centers"]["digest"] == first_run["report"]["centers"]["digest"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.tif")} == before  # nothing rewritten
    # other centres (another seed): every output is redone, and labelled with them
    other = first_run["tmp"] / "other.json"
    from mapseg.segment import fit_raster_centers
    backend = first_run["report"]["model"]["backend"]
    fit_raster_centers(first_run["paths"][:2], SegmentOptions(k=K, seed=1, backend=backend)).save(other)
    redo = segment_batch(first_run["paths"][:2], out, SegmentOptions(centers=str(other), tile=TILE),
                         scheduler=cluster["address"], block=BLOCK, log=lambda m: None)
    assert redo["done"] == 2 and redo["centers"]["from"] == "given"
    assert redo["centers"]["digest"] != first_run["report"]["centers"]["digest"]
    for p in first_run["paths"][:2]:
        tif = out / (Path(p).stem + ".tif")
        assert tif.stat().st_mtime_ns != before[tif]


@pytest.mark.data
@have_data
def test_killed_worker_is_retried_and_outputs_are_complete(first_run, cluster, tmp_path):
    from mapseg.batch import segment_batch
    from mapseg.segment import SegmentOptions

    victim = "OSBS_029.tif"  # 16 windows at --tile 128: the worker dies after writing the first
    (cluster["hook"] / "kill.txt").write_text(victim)
    try:
        report = segment_batch(first_run["paths"], tmp_path / "out",
                               SegmentOptions(centers=str(first_run["out"] / "centers.json"), tile=TILE),
                               scheduler=cluster["address"], block=BLOCK, log=lambda m: None)
    finally:
        (cluster["hook"] / "kill.txt").unlink()
    assert (cluster["hook"] / "killed.marker").exists()  # a worker did die
    assert report["failed"] == 0 and report["done"] == len(INPUTS)
    _assert_outputs_equal_references(tmp_path / "out", first_run["refs"])
    assert _no_temporaries(tmp_path / "out") == []


@pytest.mark.data
@have_data
def test_corrupt_and_missing_inputs_are_reported_and_the_rest_finish(cluster, tmp_path, capsys):
    from mapseg.cli import main

    good = DATA / INPUTS[0]
    bad = tmp_path / "truncated.tif"
    bad.write_bytes((DATA / INPUTS[1]).read_bytes()[:3000])  # the header, half the data
    (tmp_path / "list.txt").write_text(f"{good}\ntruncated.tif\nmissing.tif\n")
    rc = main(["batch", f"@{tmp_path / 'list.txt'}", str(tmp_path / "out"), "-k", str(K), "--tile", str(TILE),
               "--scheduler", cluster["address"]])
    assert rc == 1
    report = json.loads((tmp_path / "out" / "batch_report.json").read_text())
    status = {Path(r["input"]).name: r for r in report["rasters"]}
    assert status[good.name]["status"] == "done" and (tmp_path / "out" / good.name).is_file()
    assert status["truncated.tif"]["status"] == "failed" and "truncated.tif" in status["truncated.tif"]["error"]
    assert status["missing.tif"]["status"] == "failed" and "does not exist" in status["missing.tif"]["error"]
    assert report["failed"] == 2 and report["done"] == 1
    assert [Path(r["path"]).name for r in json.loads((tmp_path / "out" / "centers.json").read_text())
            ["sample"]["rasters"]] == [good.name]  # fitted on what could be read
    assert not (tmp_path / "out" / "truncated.tif").exists() and _no_temporaries(tmp_path / "out") == []
    assert "failed" in capsys.readouterr().err
    # with centres given there is no sampling: the label task says the same of the missing file
    rc = main(["batch", str(good), str(tmp_path / "missing.tif"), str(tmp_path / "out2"), "--centers",
               str(tmp_path / "out" / "centers.json"), "--scheduler", cluster["address"]])
    report = json.loads((tmp_path / "out2" / "batch_report.json").read_text())
    assert rc == 1 and [r["status"] for r in report["rasters"]] == ["done", "failed"]
    assert "missing.tif does not exist" in report["rasters"][1]["error"]


@pytest.mark.slow
@pytest.mark.data
@have_data
def test_centres_are_the_same_with_one_worker(first_run, tmp_path):
    from mapseg.batch import segment_batch
    from mapseg.segment import SegmentOptions

    report = segment_batch(first_run["paths"], tmp_path / "out", SegmentOptions(k=K, tile=TILE), n_workers=1,
                           block=BLOCK, log=lambda m: None)
    assert report["centers"]["digest"] == first_run["report"]["centers"]["digest"]
    assert (tmp_path / "out" / "centers.json").read_bytes() == (first_run["out"] / "centers.json").read_bytes()
    _assert_outputs_equal_references(tmp_path / "out", first_run["refs"])



def _range_server(root: Path) -> ThreadingHTTPServer:
    """An HTTP server of the files under ``root`` that answers byte ranges, as object stores do (GDAL's /vsicurl/
    reads a COG by ranges and refuses a server without them)."""
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _head(self):
            path = root / self.path.split("?")[0].lstrip("/")
            if not path.is_file():
                self.send_error(404)
                return None
            data = path.read_bytes()
            wanted = self.headers.get("Range")
            if wanted:
                first, last = wanted.split("=")[1].split("-")
                first, last = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {first}-{last}/{len(data)}")
                data = data[first:last + 1]
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            return data

        def do_HEAD(self):
            self._head()

        def do_GET(self):
            data = self._head()
            if data is not None:
                self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.data
@have_data
def test_remote_inputs_are_read_by_the_workers(first_run, cluster, tmp_path):
    from mapseg.batch import segment_batch
    from mapseg.segment import SegmentOptions

    server = _range_server(DATA / "neon")
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/OSBS_029.tif?token=x"
        report = segment_batch([url], tmp_path / "out", SegmentOptions(centers=str(first_run["out"] / "centers.json"),
                                                                       tile=TILE),
                               scheduler=cluster["address"], log=lambda m: None)
    finally:
        server.shutdown()
    assert report["done"] == 1 and report["rasters"][0]["input"] == "/vsicurl/" + url
    _assert_outputs_equal_references(tmp_path / "out", {"OSBS_029": first_run["refs"]["OSBS_029"]})


# --------------------------------------------------------------------------- on a cluster, synthetic rasters

def _synthetic(path: Path, seed: int, size: int = 192, crs: str = "EPSG:32633", x0: float = 500_000.0,
               driver: str = "GTiff") -> Path:
    """A small 3-band uint8 raster of coloured squares (colour k-means finds them), georeferenced."""
    rasterio = pytest.importorskip("rasterio")
    from affine import Affine

    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (6, 3))
    cells = rng.integers(0, 6, (size // 16, size // 16))
    image = colours[np.kron(cells, np.ones((16, 16), int))].astype(np.uint8)
    with rasterio.open(path, "w", driver=driver, width=size, height=size, count=3, dtype="uint8", crs=crs,
                       transform=Affine(1.0, 0, x0, 0, -1.0, 5_000_000.0)) as ds:
        ds.write(image.transpose(2, 0, 1))
    return path


def _vrt_of(path: Path, source: Path, size: int) -> Path:
    """A 3-band VRT over ``source`` (relative to the VRT), with the source's CRS and transform."""
    import rasterio

    with rasterio.open(source) as ds:
        wkt, gt = ds.crs.to_wkt(), ds.transform.to_gdal()
    bands = "".join(f'''<VRTRasterBand dataType="Byte" band="{b}"><SimpleSource>
<SourceFilename relativeToVRT="1">{source.name}</SourceFilename><SourceBand>{b}</SourceBand>
<SrcRect xOff="0" yOff="0" xSize="{size}" ySize="{size}"/><DstRect xOff="0" yOff="0" xSize="{size}" ySize="{size}"/>
</SimpleSource></VRTRasterBand>''' for b in (1, 2, 3))
    from xml.sax.saxutils import escape

    path.write_text(f'''<VRTDataset rasterXSize="{size}" rasterYSize="{size}"><SRS>{escape(wkt)}</SRS>
<GeoTransform>{", ".join(repr(float(v)) for v in gt)}</GeoTransform>{bands}</VRTDataset>''')
    return path


def test_a_replaced_vrt_source_or_another_mapseg_version_is_redone(cluster, tmp_path, monkeypatch):
    """Resumption looks at every file an input reads: a VRT whose source tile was replaced (the VRT itself
    untouched) is redone, and the centres refitted; so is everything under another mapseg version."""
    from mapseg import batch
    from mapseg.segment import SegmentOptions

    (tmp_path / "src").mkdir()
    source = _synthetic(tmp_path / "src" / "tile.tif", seed=1)
    vrt = _vrt_of(tmp_path / "src" / "scene.vrt", source, 192)
    opts = SegmentOptions(k=3, model="kmeans", tile=64)

    lines = []

    def run():
        return batch.segment_batch([str(vrt)], tmp_path / "out", opts, scheduler=cluster["client"],
                                   log=lines.append)

    first = run()
    assert first["done"] == 1 and first["centers"]["from"] == "fitted"
    assert any(f"ground resolution of {vrt}: 1 m/px" in line for line in lines)  # as mapseg fit logs it
    assert run()["skipped"] == 1  # nothing changed
    vrt_stat = vrt.stat()
    _synthetic(source, seed=2)  # the same size, other pixels
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
    assert vrt.stat().st_mtime_ns == vrt_stat.st_mtime_ns and vrt.stat().st_size == vrt_stat.st_size
    second = run()
    assert second["done"] == 1 and second["skipped"] == 0 and second["centers"]["from"] == "fitted"
    assert second["centers"]["digest"] != first["centers"]["digest"]
    monkeypatch.setattr(batch, "__version__", "0.0.0-other")
    third = run()
    assert third["done"] == 1 and third["centers"]["from"] == "fitted" and third["mapseg"] == "0.0.0-other"


def test_block_changes_and_reruns_leave_no_stale_outputs(cluster, tmp_path):
    """A raster cut into blocks and then whole (another --block) leaves only its .tif; cut again (once redone)
    only its .vrt and tiles; a mosaic of an earlier run that this run does not write is removed; a rerun on
    another backend says so."""
    from mapseg.batch import segment_batch
    from mapseg.segment import SegmentOptions

    tif = _synthetic(tmp_path / "scene.tif", seed=3)
    out = tmp_path / "out"
    lines = []

    def run(block):
        lines.clear()
        return segment_batch([str(tif)], out, SegmentOptions(k=3, model="kmeans", tile=64), block=block,
                             scheduler=cluster["client"], log=lines.append)

    split = run(128)
    assert split["rasters"][0]["output"] == "scene.vrt" and len(split["rasters"][0]["tiles"]) == 4
    names = lambda: sorted(str(p.relative_to(out)) for p in out.rglob("*"))  # noqa: E731
    assert "scene.tiles/scene_r001_c001.tif" in names() and "scene.tif" not in names()
    out.joinpath("mosaic_EPSG-4326.vrt").write_text("<VRTDataset/>")  # an earlier run's, of another CRS
    report = json.loads((out / "batch_report.json").read_text())
    report["model"]["backend"] = "torch"
    (out / "batch_report.json").write_text(json.dumps(report))
    whole = run(4096)
    assert whole["rasters"][0]["output"] == "scene.tif" and whole["done"] == 1
    assert names() == ["batch_report.json", "centers.json", "mosaic.qml", "mosaic.vrt", "scene.qml", "scene.tif",
                       "scene.tif.aux.xml", "scene.tif.mapseg.json"]
    assert any(line.startswith("warning: the earlier run") and "torch" in line for line in lines)
    kept = run(128)  # a finished whole output holds the labels the blocks would: kept
    assert kept["rasters"][0]["output"] == "scene.tif" and kept["skipped"] == 1
    _synthetic(tif, seed=4)  # the input changed: redone, and now cut into blocks
    again = run(128)
    assert again["rasters"][0]["output"] == "scene.vrt" and again["done"] == 1
    assert "scene.tif" not in names() and "scene.tif.mapseg.json" not in names() and "scene.vrt" in names()
    assert "scene.tif.aux.xml" not in names() and "scene.qml" in names()  # the whole output's sidecars went
    # another block grid: the tiles of the old one go
    run(64)
    tiles = [n for n in names() if n.startswith("scene.tiles/") and n.endswith(".tif")]
    assert len(tiles) == 9 and "scene.tiles/scene_r002_c002.tif" in tiles
    import rasterio

    with rasterio.open(out / "scene.vrt") as ds, rasterio.open(out / "mosaic.vrt") as mosaic:
        assert ds.read(1).shape == (192, 192) and np.array_equal(mosaic.read(1), ds.read(1))


def test_an_interrupted_run_cancels_its_tasks_on_the_callers_cluster(cluster, tmp_path):
    """Ctrl-C (here: the log raising KeyboardInterrupt once a raster is done) leaves none of the run's tasks or
    data on a cluster the caller passed in."""
    from mapseg.batch import segment_batch
    from mapseg.segment import SegmentOptions

    client = cluster["client"]
    rasters = [str(_synthetic(tmp_path / f"t{i}.tif", seed=10 + i, x0=500_000.0 + 192 * i)) for i in range(6)]

    def log(line):
        if line.startswith("[1/"):
            raise KeyboardInterrupt

    def ours(dask_scheduler):
        return [str(k) for k in dask_scheduler.tasks
                if str(k).startswith(("sample-", "summary-", "rows-", "centers-", "segment-", "block-"))]

    with pytest.raises(KeyboardInterrupt) as stopped:
        segment_batch(rasters, tmp_path / "out", SegmentOptions(k=3, model="kmeans", tile=64), block=128,
                      scheduler=client, log=log)
    import time

    deadline = time.monotonic() + 20
    while client.run_on_scheduler(ours) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.run_on_scheduler(ours) == [] and stopped is not None  # the traceback (futures) still held


def test_the_centres_legend_reaches_every_output_and_a_new_legend_redoes_them(cluster, tmp_path):
    """With --centers from mapseg fit --legend, every output (a whole raster, a raster cut into blocks, the
    mosaic) carries the names and colours; the labels are those without a legend; another legend redoes them."""
    import rasterio

    from mapseg.batch import segment_batch
    from mapseg.legend import Legend, read_legend
    from mapseg.segment import SegmentOptions, fit_raster_centers

    small = _synthetic(tmp_path / "small.tif", seed=5, size=96)  # whole; big (192 px) is cut into 4 blocks
    big = _synthetic(tmp_path / "big.tif", seed=6, x0=500_192.0)
    centres = fit_raster_centers([small, big], SegmentOptions(k=3, model="kmeans"))
    plain_file = tmp_path / "plain.json"
    centres.save(plain_file)
    centres.legend = {"classes": [{"value": 0, "name": "water", "color": "#1f78b4"},
                                  {"value": 2, "name": "roofs", "color": "#e31a1c"}]}
    named_file = tmp_path / "named.json"
    centres.save(named_file)

    def run(out, centers, legend=None):
        return segment_batch([str(small), str(big)], out, SegmentOptions(centers=str(centers), model="kmeans",
                                                                         tile=64, legend=legend),
                             block=128, scheduler=cluster["client"], log=lambda m: None)

    run(tmp_path / "plain", plain_file)
    named = run(tmp_path / "named", named_file)
    assert named["options"]["legend"]["classes"][1]["name"] == "segment 1"
    out = tmp_path / "named"
    want = {0: "water", 1: "segment 1", 2: "roofs"}
    for stem in ("small", "big"):
        path = out / (stem + (".tif" if stem == "small" else ".vrt"))
        assert (out / f"{stem}.qml").is_file()
        with rasterio.open(path) as ds, rasterio.open(_outputs(tmp_path / "plain", stem)) as ref:
            assert np.array_equal(ds.read(1), ref.read(1)), stem
            assert ds.colormap(1)[0][:3] == (0x1F, 0x78, 0xB4), stem
        if stem == "small":
            assert read_legend(path).names == want
    assert "roofs" in (out / "big.vrt").read_text() and "roofs" in (out / "mosaic.qml").read_text()
    with rasterio.open(out / "big.tiles" / "big_r000_c000.tif") as tile:
        assert tile.colormap(1)[2][:3] == (0xE3, 0x1A, 0x1C)
    assert run(out, named_file)["skipped"] == 2
    again = run(out, named_file, Legend.from_json({"classes": [{"value": 1, "name": "trees"}]}))
    assert again["done"] == 2 and read_legend(out / "small.tif").names == {0: "segment 0", 1: "trees",
                                                                                   2: "segment 2"}


@pytest.mark.data
@have_data
def test_mask_and_resolution_apply_to_every_input_and_a_missed_raster_fails(cluster, tmp_path):
    """batch --mask --resolution: each output is mapseg segment --centers' with the same flags (grid and labels),
    the block tasks included; a raster the mask misses is reported failed with the view's error, the rest finish."""
    from mapseg.cli import main

    ngi = [DATA / "ngi_aerial/ngi_rgb_byte_1.tif", DATA / "ngi_aerial/ngi_rgb_byte_2.tif"]
    import rasterio
    from rasterio.warp import transform as warp

    swiss = DATA / INPUTS[0]  # in Switzerland: the polygon (in South Africa) misses it
    with rasterio.open(ngi[0]) as ds:  # a quadrilateral over both NGI tiles, in lon/lat (GeoJSON's CRS)
        lon, lat = warp(ds.crs, "EPSG:4326", [-58500.0, -54000.0, -54300.0, -58200.0, -58500.0],
                        [-3729000.0, -3729400.0, -3725000.0, -3725300.0, -3729000.0])
    ring = [[x, y] for x, y in zip(lon, lat)]
    mask = tmp_path / "aoi.geojson"
    mask.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [ring]}}]}))
    out = tmp_path / "out"
    args = ["--mask", str(mask), "--resolution", "10"]
    batch = ["batch", *map(str, ngi), str(swiss), str(out), "-k", str(K), "--tile", str(TILE), "--block", "256",
             "--scheduler", cluster["address"], *args]
    assert main(batch) == 1
    report = json.loads((out / "batch_report.json").read_text())
    status = {Path(r["input"]).name: r for r in report["rasters"]}
    assert status[swiss.name]["status"] == "failed" and "misses" in status[swiss.name]["error"]
    assert report["done"] == 2 and report["failed"] == 1
    assert report["options"]["region"]["resolution"] == 10.0 and report["options"]["region"]["mask_files"]
    for path in ngi:
        ref = tmp_path / "ref" / f"{path.stem}.tif"
        ref.parent.mkdir(exist_ok=True)
        assert main(["segment", str(path), str(ref), "--centers", str(out / "centers.json"), "--tile", str(TILE),
                     "--backend", report["model"]["backend"], "--no-progress", *args]) == 0
        labels, crs, transform = _read(ref)
        got, got_crs, got_transform = _read(_outputs(out, path.stem))
        assert transform.a == 10.0 and labels.shape[1] < 500  # the 10 m grid of the mask's part of the raster
        assert got_crs == crs and got_transform == transform and np.array_equal(got, labels), path.stem
        assert (labels == 255).any() and (labels != 255).any()  # outside the polygon: nodata
    assert _outputs(out, ngi[0].stem).suffix == ".vrt"  # cut into block tasks, read through the area too
    # a rerun skips; the mask file touched (its size and mtime are in the digest) redoes
    assert main(batch) == 1 and json.loads((out / "batch_report.json").read_text())["skipped"] == 2
    mask.write_text(mask.read_text() + "\n")
    assert main(batch) == 1 and json.loads((out / "batch_report.json").read_text())["done"] == 2
