"""Remote rasters: a Cloud Optimized GeoTIFF over HTTP (`http(s)://...`, `/vsicurl/...`) is segmented like the
local file, and a windowed read fetches byte ranges, not the file. The server is a small HTTP/1.1 handler on
127.0.0.1 that answers Range requests, as object stores and web servers do; Python's http.server does not."""
from __future__ import annotations

import dataclasses
import http.client
import re
import socket
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


class _Server(ThreadingHTTPServer):
    # non-daemon handler threads, which server_close() joins: none outlives the server
    daemon_threads = False
    block_on_close = True


class RangeServer:
    """Serves files by name over HTTP with Range support; records (method, Range header, body bytes) per request.

    The socket is bound on entering and everything is released on exit: GDAL keeps HTTP/1.1 connections open
    for reuse, and each open one holds a handler thread in a blocking read that shutdown() / server_close() do not
    end; so every connection is tracked and shut down on exit, and server_close() joins their threads."""

    def __init__(self, files: dict[str, Path]):
        self.files, self.log, self.lock = files, [], threading.Lock()
        self.connections: set[socket.socket] = set()
        self.closing = False
        self.httpd = self.thread = self.url = None
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                with server.lock:
                    server.connections.add(self.connection)
                    if server.closing:  # accepted as the server stopped: end it at once
                        _hang_up(self.connection)

            def finish(self):
                try:
                    super().finish()
                finally:
                    with server.lock:
                        server.connections.discard(self.connection)

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

        self.handler = Handler

    def __enter__(self):
        self.httpd = _Server(("127.0.0.1", 0), self.handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="RangeServer", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()  # no new connections
        self.thread.join()
        with self.lock:
            self.closing = True
            open_ones = list(self.connections)
        for conn in open_ones:  # the kept-alive ones: their handlers' reads return, and the handlers end
            _hang_up(conn)
        self.httpd.server_close()  # the listening socket; joins the handler threads

    def served(self) -> tuple[int, int, int]:
        """(requests, Range requests, body bytes) so far."""
        with self.lock:
            log = list(self.log)
        return len(log), sum(1 for _, r, _ in log if r), sum(n for _, _, n in log)


def _hang_up(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:  # closed already by its handler or the client
        pass


def handler_threads() -> list[threading.Thread]:
    """The live threads socketserver starts per connection."""
    return [t for t in threading.enumerate() if "process_request_thread" in t.name]


@pytest.fixture(autouse=True)
def no_leaked_handlers():
    """Every test here leaves no server handler thread behind (each holds a connection and a file's bytes)."""
    before = set(handler_threads())
    yield
    left = [t.name for t in handler_threads() if t not in before]
    assert not left, f"handler threads left running: {left}"


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



def test_server_releases_kept_alive_connections_and_threads(tmp_path):
    """A client that keeps its HTTP/1.1 connection open (as GDAL does) does not keep a handler thread alive after
    the server exits; a server never entered binds nothing."""
    idle = RangeServer({})
    assert idle.httpd is None and idle.url is None  # no socket, no thread until entered
    del idle
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(range(256)) * 4)
    with RangeServer({"f.bin": path}) as server:
        port = server.httpd.server_address[1]
        clients = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for _ in range(3)]
        for client in clients:
            client.request("GET", "/f.bin", headers={"Range": "bytes=10-19"})
            response = client.getresponse()
            assert response.status == 206 and response.read() == bytes(range(10, 20))
            assert not response.will_close  # the connection stays open for the next request
        assert len(handler_threads()) >= len(clients)
    assert handler_threads() == []
    for client in clients:  # the server hung up on them
        with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
            client.request("GET", "/f.bin")
            client.getresponse()
        client.close()
    with pytest.raises(OSError):  # and no longer listens
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
