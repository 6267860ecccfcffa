"""All raster I/O of the runtime: windowed reads with band selection and nodata, label writing.

Two implementations of the same contract: rasterio (``RasterReader`` /
``LabelWriter`` here) and GDAL's own bindings (``mapseg.raster_gdal``, for
QGIS, whose Python has ``osgeo`` but not rasterio). ``open_reader``,
``open_writer`` and ``io_env`` pick one per ``MAPSEG_IO`` (``auto``: rasterio
when importable, else osgeo; ``rasterio`` or ``gdal`` to insist, an error if
it is missing); ``io_library()`` says which, and the run report records it.
Neither is imported when this module is imported.

Reads return channels-last ``(h, w, 3)`` arrays in the raster's dtype plus a
``valid`` mask: a pixel is nodata when all selected bands equal the nodata
value (``--nodata`` or the raster's own), or when the raster's per-dataset
mask or alpha band marks it.

Outputs are uint8 GeoTIFFs (tiled 256 x 256, DEFLATE; or a COG) with the
input's CRS and transform, a colour table, and nodata 255 where the input
had nodata. They are written under a temporary name in the target folder
and renamed into place only when complete.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import RasterError
from .fileio import remove_if_present, temp_sibling, write_bytes_atomic

OUTPUT_NODATA = 255
BLOCK = 256
GDAL_CACHE_MB = 64  # one window row of 256-pixel blocks of a 20000-pixel-wide raster fits
# Distinct colours for labels 0..15 (label 255 = nodata is transparent).
PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
           (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195))


def _rasterio():
    try:
        import rasterio
    except ImportError as exc:
        raise RasterError("mapseg reads and writes rasters with rasterio: pip install rasterio") from exc
    return rasterio


IO_LIBRARIES = ("rasterio", "gdal")


def io_library() -> str:
    """The raster library this process uses: MAPSEG_IO (auto|rasterio|gdal), auto = rasterio, else GDAL."""
    import importlib.util

    want = os.environ.get("MAPSEG_IO", "auto").strip().lower() or "auto"
    if want not in ("auto",) + IO_LIBRARIES:
        raise RasterError(f"MAPSEG_IO={want!r}: choose auto, rasterio or gdal")
    has = {"rasterio": importlib.util.find_spec("rasterio") is not None,
           "gdal": importlib.util.find_spec("osgeo") is not None}
    if want != "auto":
        if not has[want]:
            raise RasterError(f"MAPSEG_IO={want} but {'rasterio' if want == 'rasterio' else 'osgeo (GDAL)'} "
                              "is not importable")
        return want
    for lib in IO_LIBRARIES:
        if has[lib]:
            return lib
    raise RasterError("mapseg reads and writes rasters with rasterio or GDAL's Python bindings (osgeo); "
                      "neither is installed: pip install rasterio")


def open_reader(path, bands=None, nodata=None):
    if io_library() == "gdal":
        from .raster_gdal import GdalRasterReader
        return GdalRasterReader(path, bands, nodata)
    return RasterReader(path, bands, nodata)


def open_writer(path, like, k: int, nodata, cog: bool = False, tags: dict | None = None):
    if io_library() == "gdal":
        from .raster_gdal import GdalLabelWriter
        return GdalLabelWriter(path, like, k, nodata, cog, tags)
    return LabelWriter(path, like, k, nodata, cog, tags)


def io_env():
    """The chosen library's settings for a run (bounded block cache, threaded decoding)."""
    if io_library() == "gdal":
        from .raster_gdal import gdal_env as env
        return env()
    return gdal_env()


def gdal_env():
    """GDAL settings for a run: a bounded block cache (it counts in the process's memory), and
    multi-threaded decoding of compressed inputs."""
    return _rasterio().Env(GDAL_CACHEMAX=GDAL_CACHE_MB, GDAL_NUM_THREADS="ALL_CPUS")


def parse_bands(text: str | None) -> tuple[int, ...] | None:
    if text is None or text == "":
        return None
    try:
        bands = tuple(int(v) for v in str(text).split(","))
    except ValueError as exc:
        raise RasterError(f"--bands {text!r}: expected three 1-based band numbers such as 1,2,3") from exc
    if len(bands) != 3:
        raise RasterError(f"--bands {text!r}: give exactly three bands (R,G,B); for a single-band raster "
                          "use --bands 1,1,1")
    return bands


@dataclass(frozen=True)
class RasterInfo:
    path: str
    width: int
    height: int
    count: int
    dtype: str
    bands: tuple[int, ...]
    nodata: float | None
    has_mask: bool
    crs: object
    transform: object
    georeferenced: bool
    # Ground control points, for rasters georeferenced by GCPs alone (no geotransform): ((row, col, x, y, z),
    # ...) and their CRS as WKT; copied to the labels, which share the input's pixel grid.
    gcps: tuple = ()
    gcp_crs: str | None = None

    @property
    def has_nodata(self) -> bool:
        return self.nodata is not None or self.has_mask


def choose_bands(path: str, count: int, bands, interp) -> tuple[int, ...]:
    """The three bands to read (``bands``, or 1,2,3 for a 3-band raster); ``interp()`` describes the bands
    for the error a raster with another band count gets. Shared by the rasterio and GDAL readers."""
    if bands is None:
        if count != 3:
            hint = "--bands 1,1,1 to use it as grey" if count == 1 else "e.g. --bands 1,2,3"
            raise RasterError(f"{path} has {count} band(s) ({interp()}); mapseg segments three bands "
                              f"as RGB: choose them with --bands ({hint})")
        bands = (1, 2, 3)
    if any(not 1 <= b <= count for b in bands):
        raise RasterError(f"--bands {','.join(map(str, bands))}: {path} has bands 1..{count}")
    return tuple(int(b) for b in bands)


def common_nodata(path: str, values) -> float | None:
    """The one nodata value of the selected bands (``None`` entries: no nodata); differing values are an error."""
    found = {"nan" if v != v else v for v in values if v is not None}  # NaN != NaN: compare by name
    found = {float("nan") if v == "nan" else v for v in found}
    if len(found) > 1:
        raise RasterError(f"{path}: the selected bands have different nodata values {sorted(found)}; "
                          "pass --nodata V")
    return float(found.pop()) if found else None


def common_dtype(path: str, dtypes) -> str:
    dtypes = set(dtypes)
    if len(dtypes) > 1:
        raise RasterError(f"{path}: the selected bands have different data types {sorted(dtypes)}")
    return dtypes.pop()


def nodata_valid(data: np.ndarray, nodata: float | None) -> np.ndarray:
    """(h, w) True where not every band equals ``nodata`` (NaN-aware); all True without a nodata value."""
    if nodata is None:
        return np.ones(data.shape[:2], bool)
    same = np.isnan(data) if np.isnan(nodata) else data == np.asarray(nodata).astype(data.dtype)
    return ~same.all(axis=-1)


class _Reader:
    """What both readers share: size from ``info``, a context manager around ``close``."""

    @property
    def width(self) -> int:
        return self.info.width

    @property
    def height(self) -> int:
        return self.info.height

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Output:
    """What both label writers share: the output checks, the temporary names beside the output (a
    ``.OUT.part-<pid>-<id>`` file, so an interrupted run leaves no half-written OUT), the final rename."""

    def _prepare(self, path, cog: bool) -> None:
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise RasterError(f"output folder {self.path.parent} does not exist")
        if self.path.suffix.lower() not in (".tif", ".tiff"):
            raise RasterError(f"output {self.path}: mapseg writes GeoTIFF, use a .tif name")
        self.cog = cog
        stem = temp_sibling(self.path, "part", "")
        self.tmp = stem.with_name(stem.name + ".tif")
        self.tmp_cog = stem.with_name(stem.name + ".cog.tif")

    def _move_into_place(self, src: Path) -> Path:
        """``src`` (the temporary file or its COG copy) becomes the output; the other temporary goes."""
        if src != self.tmp:
            self.tmp.unlink()
        os.replace(src, self.path)
        return self.path

    def _remove_temporaries(self) -> None:
        remove_if_present(self.tmp, self.tmp_cog)


class RasterReader(_Reader):
    """Windowed reads of three bands of one raster (any GDAL-readable format), through rasterio."""
    library = "rasterio"

    def __init__(self, path: str | os.PathLike, bands: tuple[int, ...] | None = None, nodata: float | None = None):
        rasterio = _rasterio()
        from rasterio.enums import MaskFlags

        self.path = str(path)
        if not Path(self.path).exists() and "://" not in self.path and not self.path.startswith("/vsi"):
            raise RasterError(f"input raster {self.path} does not exist")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                self.ds = rasterio.open(self.path)
        except rasterio.errors.RasterioIOError as exc:
            raise RasterError(f"cannot read {self.path} as a raster ({exc})") from exc
        ds = self.ds
        if ds.width == 0 or ds.height == 0 or ds.count == 0:
            self.close()
            raise RasterError(f"{self.path} is empty ({ds.width} x {ds.height} pixels, {ds.count} bands)")
        try:
            self.bands = choose_bands(self.path, ds.count, bands,
                                      lambda: ", ".join(f"{i + 1}={c.name}" for i, c in enumerate(ds.colorinterp)))
            self.nodata = (common_nodata(self.path, (ds.nodatavals[b - 1] for b in self.bands)) if nodata is None
                           else float(nodata))
            dtype = common_dtype(self.path, (ds.dtypes[b - 1] for b in self.bands))
        except RasterError:
            self.close()
            raise
        flags = ds.mask_flag_enums[self.bands[0] - 1]
        self.has_mask = MaskFlags.per_dataset in flags or MaskFlags.alpha in flags
        points, gcp_crs = ds.gcps
        gcps = tuple((g.row, g.col, g.x, g.y, g.z or 0.0) for g in points)
        georef = ds.crs is not None or not ds.transform.is_identity or bool(gcps)
        self.info = RasterInfo(self.path, ds.width, ds.height, ds.count, dtype, self.bands,
                               self.nodata, self.has_mask, ds.crs, ds.transform, georef, gcps,
                               gcp_crs.to_wkt() if gcps and gcp_crs else None)

    def read(self, row0: int, row1: int, col0: int, col1: int) -> tuple[np.ndarray, np.ndarray]:
        """(data (h, w, 3) in the raster's dtype, valid (h, w) bool) for rows [row0, row1), cols [col0, col1)."""
        from rasterio.windows import Window

        win = Window(col0, row0, col1 - col0, row1 - row0)
        unique = sorted(set(self.bands))
        planes = self.ds.read(unique, window=win)
        data = np.stack([planes[unique.index(b)] for b in self.bands], axis=-1)
        valid = nodata_valid(data, self.nodata)
        if self.has_mask:
            valid &= self.ds.read_masks(self.bands[0], window=win) != 0
        return data, valid

    def read_decimated(self, out_h: int, out_w: int) -> tuple[np.ndarray, np.ndarray]:
        """The whole raster resampled (nearest) to (out_h, out_w): (data (h, w, 3), valid (h, w))."""
        from rasterio.enums import Resampling

        unique = sorted(set(self.bands))
        planes = self.ds.read(unique, out_shape=(len(unique), out_h, out_w), resampling=Resampling.nearest)
        data = np.stack([planes[unique.index(b)] for b in self.bands], axis=-1)
        valid = nodata_valid(data, self.nodata)
        if self.has_mask:
            valid &= self.ds.read_masks(self.bands[0], out_shape=(out_h, out_w)) != 0
        return data, valid

    def close(self) -> None:
        if getattr(self, "ds", None) is not None:
            self.ds.close()
            self.ds = None


def colormap(k: int) -> dict:
    cmap = {i: PALETTE[i % len(PALETTE)] + (255,) for i in range(k)}
    cmap[OUTPUT_NODATA] = (0, 0, 0, 0)
    return cmap


def _stretch_u8(rgb: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(h, w, 3) any dtype -> uint8 for viewing: uint8 as is, others a 2-98 % percentile stretch."""
    if rgb.dtype == np.uint8:
        return rgb
    vals = rgb[valid].astype(np.float64) if valid.any() else rgb.reshape(-1, 3).astype(np.float64)
    lo, hi = np.percentile(vals, 2, axis=0), np.percentile(vals, 98, axis=0)
    return np.clip((rgb - lo) / np.maximum(hi - lo, 1e-9) * 255, 0, 255).astype(np.uint8)


def write_preview(input_path, labels_path, png_path, bands=None, nodata=None, max_width: int = 1600) -> Path:
    """A PNG for eyes: the input (left) and its colour-coded segments (right), decimated to at most
    ``max_width`` wide and ``max_width`` tall."""
    png_path = Path(png_path)
    if png_path.suffix.lower() != ".png":
        raise RasterError(f"--preview {png_path}: give a .png name")
    with io_env():
        with open_reader(input_path, bands, nodata) as reader:
            w, h = reader.width, reader.height
            scale = min(1.0, (max_width // 2) / w, max_width / h)  # bounded both ways: never a whole-raster read
            ow, oh = max(1, round(w * scale)), max(1, round(h * scale))
            rgb, valid = reader.read_decimated(oh, ow)
        with open_reader(labels_path, (1, 1, 1)) as lab_reader:
            labels = lab_reader.read_decimated(oh, ow)[0][..., 0]
    rgb = _stretch_u8(rgb, valid)
    lut = np.zeros((256, 3), np.uint8)
    for i, c in colormap(16).items():
        lut[i] = c[:3]
    lut[OUTPUT_NODATA] = (255, 255, 255)
    seg = lut[labels]
    gap = np.full((oh, 8, 3), 255, np.uint8)
    image = np.concatenate([rgb, gap, seg], axis=1)
    _write_png(image, png_path)
    return png_path


def _write_png(image: np.ndarray, path: Path) -> None:
    """An 8-bit RGB PNG with the standard library (zlib) alone."""
    import struct
    import zlib

    h, w, _ = image.shape
    raw = b"".join(b"\x00" + image[r].tobytes() for r in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    write_bytes_atomic(path, png)


class LabelWriter(_Output):
    """A uint8 label raster written window by window under a temporary name, renamed by ``commit`` (rasterio)."""
    library = "rasterio"

    def __init__(self, path: str | os.PathLike, like: RasterInfo, k: int, nodata: int | None, cog: bool = False,
                 tags: dict | None = None):
        rasterio = _rasterio()
        self._prepare(path, cog)
        profile = {"driver": "GTiff", "width": like.width, "height": like.height, "count": 1, "dtype": "uint8",
                   "tiled": True, "blockxsize": BLOCK, "blockysize": BLOCK, "compress": "deflate",
                   # level 1: ~10x faster than the default 6 on label rasters, files ~10 % larger
                   "zlevel": 1, "BIGTIFF": "IF_SAFER", "nodata": nodata}
        if like.georeferenced and not like.gcps:
            profile.update(crs=like.crs, transform=like.transform)
        self.ds = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                self.ds = rasterio.open(self.tmp, "w", **profile)
            if like.gcps:  # GCP georeference: the points, which also carry the CRS
                from rasterio.control import GroundControlPoint
                from rasterio.crs import CRS

                self.ds.gcps = ([GroundControlPoint(row=r, col=c, x=x, y=y, z=z) for r, c, x, y, z in like.gcps],
                                CRS.from_wkt(like.gcp_crs) if like.gcp_crs else None)
            self.ds.write_colormap(1, colormap(k))
            if tags:
                self.ds.update_tags(**{str(a): str(b) for a, b in tags.items()})
        except BaseException:
            self.abort()
            raise

    def write(self, labels: np.ndarray, row0: int, col0: int) -> None:
        from rasterio.windows import Window

        h, w = labels.shape
        self.ds.write(labels, 1, window=Window(col0, row0, w, h))

    def commit(self) -> Path:
        """Finish the file and move it to its final name (COG: converted first)."""
        self.ds.close()
        self.ds = None
        src = self.tmp
        if self.cog:
            import rasterio.shutil

            try:
                rasterio.shutil.copy(str(self.tmp), str(self.tmp_cog), driver="COG", COMPRESS="DEFLATE", LEVEL=1,
                                     BLOCKSIZE=512, OVERVIEW_RESAMPLING="NEAREST", BIGTIFF="IF_SAFER")
            except Exception as exc:  # noqa: BLE001 - GDAL errors come in several types
                self.abort()
                raise RasterError(f"writing a COG failed ({exc}); GDAL >= 3.1 has the COG driver") from exc
            src = self.tmp_cog
        return self._move_into_place(src)

    def abort(self) -> None:
        if self.ds is not None:
            try:
                self.ds.close()
            finally:
                self.ds = None
        self._remove_temporaries()
