"""Remote rasters: a Cloud Optimized GeoTIFF over HTTP (`http(s)://...`, `/vsicurl/...`) is segmented like the
local file, and a windowed read fetches byte ranges, not the file. The server is a small HTTP/1.1 handler on
127.0.0.1 that answers Range requests, as object stores and web servers do; Python's http.server does not."""
from __future__ import annotations

import dataclasses
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
rasterio_shutil = pytest.importorskip("rasterio.shutil")

from mapseg.cli import main  # noqa: E402
from mapseg.raster import io_env, open_reader  # noqa: E402
from mapseg.segment import SegmentOptions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAIP = ROOT / "examples" / "naip_nd_2020_rgb.tif"
GEONRW = ROOT.parent / "shared" / "datasets" / "geonrw_dev" / "images" / "aachen_296_5625.tif"


class RangeServer:
    """Serves files by name over HTTP with Range support; records (method, Range header, body bytes) per request."""

    def __init__(self, files: dict[str, Path]):
        self.files, self.log, self.lock = files, [], threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _file(self):
                path = server.files.get(self.path.lstrip("/").split("?")[0])
                if path is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                return path

            def _record(self, sent: int):
                with server.lock:
                    server.log.append((self.command, self.headers.get("Range"), sent))

            def do_HEAD(self):
                path = self._file()
                if path is None:
                    return self._record(0)
                self.send_response(200)
                self.send_header("Content-Length", str(path.stat().st_size))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                self._record(0)

            def do_GET(self):
                path = self._file()
                if path is None:
                    return self._record(0)
                data = path.read_bytes()
                size = len(data)
                header = self.headers.get("Range")
                ranges = re.fullmatch(r"bytes=(\d*)-(\d*)", (header or "").strip())
                if ranges is None or ranges.groups() == ("", ""):
                    # no Range, or several (GDAL sends one per request): the whole file, which a server may
                    # send for any Range request (RFC 9110)
                    self.send_response(200)
                    self.send_header("Content-Length", str(size))
                    self.send_header("Accept-Ranges", "bytes")
                    self.end_headers()
                    self._record(size)  # before the body: the client may go on as soon as it has it
                    self.wfile.write(data)
                    return
                start, end = ranges.groups()
                if start == "":  # a suffix range: the last N bytes
                    start, end = max(0, size - int(end)), size - 1
                start, end = int(start), min(int(end) if end else size - 1, size - 1)
                if start >= size:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return self._record(0)
                body = data[start:end + 1]
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                self.send_header("Content-Type", "image/tiff")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                self._record(len(body))
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def served(self) -> tuple[int, int, int]:
        """(requests, Range requests, body bytes) so far."""
        with self.lock:
            log = list(self.log)
        return len(log), sum(1 for _, r, _ in log if r), sum(n for _, _, n in log)


def make_cog(src: Path, dst: Path) -> Path:
    """A Cloud Optimized GeoTIFF (256-pixel blocks, DEFLATE, overviews) of a real raster."""
    rasterio_shutil.copy(str(src), str(dst), driver="COG", BLOCKSIZE=256, COMPRESS="DEFLATE")
    return dst


@pytest.fixture
def gdal_http(monkeypatch):
    """The settings docs/remote.md recommends, and no proxy for 127.0.0.1."""
    monkeypatch.setenv("GDAL_DISABLE_READDIR_ON_OPEN", "EMPTY_DIR")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")


def labels(path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read(1)


def sources():
    return [pytest.param(NAIP, id="naip-example"),
            pytest.param(GEONRW, id="geonrw", marks=[pytest.mark.data, pytest.mark.skipif(
                not GEONRW.is_file(), reason=f"{GEONRW} not found")])]


@pytest.mark.parametrize("source", sources())
def test_remote_cog_gives_the_local_labels_and_reads_ranges(source, tmp_path, gdal_http):
    cog = make_cog(source, tmp_path / "scene.tif")
    size = cog.stat().st_size
    centres = tmp_path / "c.json"
    assert main(["fit", str(cog), "-k", "5", "-o", str(centres), "--no-progress"]) == 0
    local = tmp_path / "local.tif"
    assert main(["segment", str(cog), str(local), "--centers", str(centres), "--no-progress"]) == 0
    with RangeServer({"window.tif": cog, "scene.tif": cog, "vsi.tif": cog}) as server:
        # one window through mapseg's reader: byte ranges of the blocks it needs, far less than the file
        with io_env(), open_reader(f"{server.url}/window.tif") as reader:
            data, valid = reader.read(0, 256, 0, 256)
        requests, ranged, sent = server.served()
        with rasterio.open(cog) as ds:
            np.testing.assert_array_equal(data, ds.read([1, 2, 3], window=((0, 256), (0, 256))).transpose(1, 2, 0))
        assert valid.all()
        print(f"{source.name}: one 256 x 256 window: {requests} requests ({ranged} with Range), "
              f"{sent:,} of {size:,} bytes ({100 * sent / size:.1f} %)")
        assert ranged >= 1 and sent < size / 2
        # the whole raster by URL and by /vsicurl/: the local file's labels, bit for bit
        for name, url in (("remote.tif", f"{server.url}/scene.tif"), ("vsi.tif", f"/vsicurl/{server.url}/vsi.tif")):
            out = tmp_path / name
            assert main(["segment", url, str(out), "--centers", str(centres), "--no-progress"]) == 0
            np.testing.assert_array_equal(labels(out), labels(local))
            with rasterio.open(out) as a, rasterio.open(local) as b:
                assert a.crs == b.crs and a.transform == b.transform
        _, ranged_after, _ = server.served()
        assert ranged_after > ranged


@pytest.mark.skipif("extent" not in {f.name for f in dataclasses.fields(SegmentOptions)},
                    reason="mapseg segment has no --extent in this version")
def test_remote_extent_reads_a_part(tmp_path, gdal_http):
    cog = make_cog(NAIP, tmp_path / "scene.tif")
    with rasterio.open(cog) as ds:
        b = ds.bounds
        res = ds.res[0]
    # a 200 x 200 pixel area near the top left corner
    extent = f"{b.left + 40 * res},{b.top - 240 * res},{b.left + 240 * res},{b.top - 40 * res}"
    local = tmp_path / "local.tif"
    assert main(["segment", str(cog), str(local), "-k", "4", "--model", "kmeans", "--no-progress",
                 "--extent", extent]) == 0
    with RangeServer({"scene.tif": cog}) as server:
        out = tmp_path / "remote.tif"
        assert main(["segment", f"{server.url}/scene.tif", str(out), "-k", "4", "--model", "kmeans",
                     "--no-progress", "--extent", extent]) == 0
        _, ranged, sent = server.served()
    np.testing.assert_array_equal(labels(out), labels(local))
    assert ranged >= 1 and sent < cog.stat().st_size / 2


def test_missing_remote_raster_is_a_clear_error(tmp_path, gdal_http, capsys):
    with RangeServer({}) as server:
        code = main(["segment", f"{server.url}/absent.tif", str(tmp_path / "o.tif"), "-k", "3", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "absent.tif" in err
    assert not any(tmp_path.iterdir())

