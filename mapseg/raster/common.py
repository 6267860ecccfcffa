"""What both raster backends share: the output's nodata and colours, band / nodata / dtype checks, the base classes.

A reader (``ReaderBase``) gives ``info`` (``RasterInfo``), ``read(row0, row1, col0, col1)`` ->
``(data (h, w, 3) in the raster's dtype, valid (h, w))`` and ``read_decimated``; a label writer
(``LabelWriterBase``) writes uint8 windows under a temporary name and ``commit``s by renaming.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import RasterError, first_line
from ..fileio import check_parent, remove_if_present, replace_output, temp_sibling

OUTPUT_NODATA = 255
BLOCK = 256
GDAL_CACHE_MB = 64  # one window row of 256-pixel blocks of a 20000-pixel-wide raster fits
# Distinct colours for labels 0..15 (label 255 = nodata is transparent).
PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
           (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195))


# Creation options of the label GeoTIFF (tiled; DEFLATE level 1: ~10x faster than the default 6 on label rasters,
# files ~10 % larger) and of a COG (--cog: the tiled file converted at the end; also a COG rebuilt by
# mapseg.legend with a new colour table), one definition for both backends and the legend.
GTIFF_OPTIONS = {"TILED": "YES", "BLOCKXSIZE": str(BLOCK), "BLOCKYSIZE": str(BLOCK), "COMPRESS": "DEFLATE",
                 "ZLEVEL": "1", "BIGTIFF": "IF_SAFER"}
COG_OPTIONS = {"COMPRESS": "DEFLATE", "LEVEL": "1", "BLOCKSIZE": "512", "OVERVIEW_RESAMPLING": "NEAREST",
               "BIGTIFF": "IF_SAFER"}


def option_list(options: dict) -> list[str]:
    """``{"COMPRESS": "DEFLATE"}`` -> ``["COMPRESS=DEFLATE"]`` (GDAL's creation options)."""
    return [f"{k}={v}" for k, v in options.items()]


def palette_colour(value: int) -> tuple[int, int, int, int]:
    """mapseg's default colour of a label: the palette's, repeating after 16; opaque."""
    return PALETTE[int(value) % len(PALETTE)] + (255,)


def colormap(k) -> dict:
    """The colour map of a label raster: ``k`` an int (labels 0..k-1 in the palette's colours) or a dict
    value -> (r, g, b[, a]) (a legend's colours); nodata (255) transparent either way."""
    if isinstance(k, dict):
        cmap = {int(v): tuple(int(c) for c in rgba) + ((255,) if len(rgba) == 3 else ()) for v, rgba in k.items()}
    else:
        cmap = {i: palette_colour(i) for i in range(k)}
    cmap[OUTPUT_NODATA] = (0, 0, 0, 0)
    return cmap


def gdal_colour_table(gdal, cmap: dict):
    """A ``gdal.ColorTable`` of a colour map (value -> (r, g, b, a))."""
    table = gdal.ColorTable()
    for v, rgba in cmap.items():
        table.SetColorEntry(int(v), tuple(int(c) for c in rgba))
    return table


def set_gdal_colours(gdal, band, cmap: dict) -> None:
    """Give an osgeo band the colour table of ``cmap``, interpreted as palette indices (as rasterio's
    ``write_colormap`` does)."""
    band.SetRasterColorTable(gdal_colour_table(gdal, cmap))
    band.SetRasterColorInterpretation(gdal.GCI_PaletteIndex)


def same_colours(table: dict | None, cmap: dict) -> bool:
    """Whether a raster's colour table (value -> (r, g, b, a), as read back; None: none) already shows ``cmap``:
    the same red, green and blue for every value of either (GeoTIFF palettes store no alpha; a value
    missing from one is black)."""
    if not table:
        return False
    for v in set(table) | set(cmap):
        if tuple(table.get(v, (0, 0, 0))[:3]) != tuple(cmap.get(v, (0, 0, 0))[:3]):
            return False
    return True


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
    # What the file says of its range (mapseg.scaling.input_range): TIFF NBITS of the bands, and the largest
    # STATISTICS_MAXIMUM among them; None where the file does not say.
    nbits: int | None = None
    statistics_max: float | None = None
    # Every file the dataset reads (the raster, a VRT's sources, sidecars): none may be an output.
    files: tuple = ()

    @property
    def has_nodata(self) -> bool:
        return self.nodata is not None or self.has_mask


def check_input_exists(path: str) -> None:
    """A local input must exist (URLs and GDAL's /vsi paths are left to the library)."""
    if not Path(path).exists() and "://" not in path and not path.startswith("/vsi"):
        raise RasterError(f"input raster {path} does not exist")


def choose_bands(path: str, count: int, bands, interp) -> tuple[int, ...]:
    """The three bands to read (``bands``, or 1,2,3 for a 3-band raster); ``interp()`` describes the bands
    for the error a raster with another band count gets."""
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


def range_hint(nbits, maxima) -> tuple[int | None, float | None]:
    """(NBITS, largest STATISTICS_MAXIMUM) of the selected bands from their metadata strings (None where
    absent or unreadable; the maximum only when every band has one); bands that disagree on NBITS give the largest."""
    def numbers(values, kind):
        out = []
        for v in values:
            try:
                out.append(kind(v))
            except (TypeError, ValueError):  # absent (None) or not a number
                continue
        return [x for x in out if x == x]  # no NaN

    maxima = list(maxima)
    bits, tops = numbers(nbits, int), numbers(maxima, float)
    return (max(bits) if bits else None), (max(tops) if tops and len(tops) == len(maxima) else None)


def read_failed(path: str, row0: int, row1: int, col0: int, col1: int, exc: BaseException) -> RasterError:
    """The error of a window that could not be read (a truncated or corrupt file, a vanished source)."""
    detail = first_line(exc.__cause__ or exc)  # rasterio: "Read failed. See previous exception": the cause says why
    return RasterError(f"cannot read {path} at rows {row0}-{row1}, columns {col0}-{col1} ({detail}): the file is "
                       "truncated or corrupt; copy or export it again")


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


class ReaderBase:
    """What every reader shares: size from ``info``, a context manager around ``close``, and reads whose
    failures (``read_errors``: a truncated or corrupt file) become a RasterError naming the file and window."""
    read_errors: tuple = (OSError,)
    # False: a file handle serves one read at a time, so the pipeline reads one window at a time; True: the
    # reader guards its file reads itself (mapseg.raster.view.RasterView when it resamples)
    locks_its_reads: bool = False

    def read(self, row0: int, row1: int, col0: int, col1: int) -> tuple[np.ndarray, np.ndarray]:
        """(data (h, w, 3) in the raster's dtype, valid (h, w) bool) for rows [row0, row1), cols [col0, col1)."""
        try:
            return self._read(row0, row1, col0, col1)
        except self.read_errors as exc:
            raise read_failed(self.path, row0, row1, col0, col1, exc) from exc

    def read_decimated(self, out_h: int, out_w: int, box=None) -> tuple[np.ndarray, np.ndarray]:
        """The whole raster (or ``box`` = (row0, row1, col0, col1) of it) resampled (nearest) to (out_h, out_w):
        (data (h, w, 3), valid (h, w))."""
        row0, row1, col0, col1 = box or (0, self.height, 0, self.width)
        try:
            return self._read_decimated(out_h, out_w, box)
        except self.read_errors as exc:
            raise read_failed(self.path, row0, row1, col0, col1, exc) from exc

    def inside(self, row0: int, row1: int, col0: int, col1: int) -> np.ndarray | None:
        """(h, w) bool: the pixels of the area of interest (``--mask``), or None where every pixel is.

        Pixels outside it are nodata for the output and the sample, but the network still sees their
        values (they are real imagery), so the labels inside are those of a run without the mask."""
        return None

    @property
    def width(self) -> int:
        return self.info.width

    @property
    def height(self) -> int:
        return self.info.height

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LabelWriterBase:
    """What both label writers share: the output checks, the temporary names beside the output (a
    ``.OUT.part-<pid>-<host>-<id>`` file, so an interrupted run leaves no half-written OUT), the final rename,
    and writes whose failures (``write_errors``: a full disk, a vanished folder) become a RasterError."""
    write_errors: tuple = (OSError,)

    def write(self, labels: np.ndarray, row0: int, col0: int) -> None:
        """Write uint8 ``labels`` with their top-left pixel at (row0, col0)."""
        try:
            self._write(labels, row0, col0)
        except self.write_errors as exc:
            raise self._failed(exc) from exc

    def commit(self) -> Path:
        """Finish the file and move it to its final name (COG: converted first)."""
        try:
            return self._commit()
        except self.write_errors as exc:
            self.abort()
            raise self._failed(exc) from exc

    @contextmanager
    def _creating(self):
        """Around a writer's set-up: on any failure the temporary file goes, and a write error becomes a
        RasterError naming the output."""
        try:
            yield
        except BaseException as exc:
            self.abort()
            if isinstance(exc, self.write_errors):
                raise self._failed(exc) from exc
            raise

    def _failed(self, exc: BaseException) -> RasterError:
        return RasterError(f"writing {self.path} failed ({first_line(exc.__cause__ or exc)}): "
                           f"is the disk full or {self.path.parent} read-only? Nothing was written there")

    def _prepare(self, path, cog: bool) -> None:
        self.path = Path(path)
        check_parent(self.path, "output")
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
        replace_output(src, self.path)
        return self.path

    def _remove_temporaries(self) -> None:
        remove_if_present(self.tmp, self.tmp_cog)
