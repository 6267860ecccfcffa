"""Named classes: a legend file, and the files beside a label raster that carry its names and colours.

A legend file (``legend.json``)::

    {"classes": [{"value": 0, "name": "water", "color": "#1f78b4"},
                 {"value": 1, "name": "trees", "color": "#33a02c"}]}

``value``: the label (0..254; 255 is nodata); ``name``: a non-empty text, one per class; ``color``
(optional): ``#rrggbb`` or ``#rrggbbaa`` (default: mapseg's palette colour of the value). Any other key,
a repeated value or name, or a value the run does not have is an error that names the file and the class.

Beside a label raster ``OUT.tif`` (``write_class_files``; ``mapseg.segment.segment_raster`` writes them after
every run, with the run's legend, ``run_legend``):

* ``OUT.qml``: a QGIS style (paletted renderer: each value's colour, its name as the label); QGIS applies
  a same-named ``.qml`` when it opens the raster.
* ``OUT.tif.aux.xml``: GDAL's PAM sidecar with a raster attribute table (``<GDALRasterAttributeTable>``:
  Value, Count, Name, Red, Green, Blue, Alpha, each with its usage), which GDAL, QGIS and ArcGIS read.
* the GeoTIFF's colour table set to the legend's colours (the file copied to a temporary sibling, the
  table written there, renamed into place).

Without a legend the names are ``segment 0`` .. ``segment K-1`` and the colours mapseg's palette
(``mapseg.raster.common.PALETTE``). ``mapseg fit --legend`` keeps a legend in the centres file
(``Centers.legend``), which ``segment --centers`` then uses; ``mapseg legend`` renames, recolours and
merges classes of a label raster after a run (``merge_labels``).

Everything here runs with numpy and the standard library; the colour table and the merge go through
rasterio or GDAL's ``osgeo`` (``mapseg.raster``), whichever the run uses.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import SegmentError
from .fileio import remove_if_present, replace_output, temp_sibling, write_text_atomic
from .raster.common import (COG_OPTIONS, GTIFF_OPTIONS, OUTPUT_NODATA, colormap, option_list, palette_colour,
                            same_colours, set_gdal_colours)

MAX_VALUE = OUTPUT_NODATA - 1
_HEX = re.compile(r"^#([0-9a-fA-F]{6})([0-9a-fA-F]{2})?$")
CLASS_KEYS = ("value", "name", "color")
# GDAL's raster attribute table: field types and usages (gdal.h GDALRATFieldType, GDALRATFieldUsage)
GFT_INTEGER, GFT_STRING = 0, 2
GFU_GENERIC, GFU_PIXELCOUNT, GFU_NAME, GFU_MINMAX, GFU_RED, GFU_GREEN, GFU_BLUE, GFU_ALPHA = 0, 1, 2, 5, 6, 7, 8, 9
RAT_TAG = "GDALRasterAttributeTable"


def default_name(value: int) -> str:
    return f"segment {value}"


def default_colour(value: int) -> tuple[int, int, int, int]:
    return palette_colour(value)


def parse_colour(text, where: str) -> tuple[int, int, int, int]:
    """``#rrggbb`` or ``#rrggbbaa`` -> (r, g, b, a); anything else a SegmentError naming ``where``."""
    m = _HEX.match(text) if isinstance(text, str) else None
    if m is None:
        raise SegmentError(f"{where}: colour {text!r} is not #rrggbb or #rrggbbaa (e.g. \"#1f78b4\")")
    h = m.group(1) + (m.group(2) or "ff")
    return tuple(int(h[i:i + 2], 16) for i in range(0, 8, 2))


def colour_text(rgba) -> str:
    r, g, b, a = rgba
    return f"#{r:02x}{g:02x}{b:02x}" + ("" if a == 255 else f"{a:02x}")


@dataclass(frozen=True)
class Legend:
    """Names and colours of label values (in value order)."""
    names: dict = field(default_factory=dict)      # value -> name
    colours: dict = field(default_factory=dict)    # value -> (r, g, b, a)

    @property
    def values(self) -> list[int]:
        return sorted(self.names)

    @classmethod
    def default(cls, values) -> "Legend":
        """``segment V`` and the palette colour for each of ``values`` (an int K: 0..K-1)."""
        values = range(values) if isinstance(values, int) else values
        return cls({int(v): default_name(int(v)) for v in values}, {int(v): default_colour(int(v)) for v in values})

    @classmethod
    def from_json(cls, data, where: str = "legend") -> "Legend":
        """A legend from its JSON (``{"classes": [...]}``); every problem a SegmentError naming ``where``."""
        if not isinstance(data, dict) or not isinstance(data.get("classes"), list):
            raise SegmentError(f"{where}: a legend is an object with a list \"classes\" of "
                               "{\"value\", \"name\", \"color\"} objects")
        extra = sorted(set(data) - {"classes"})
        if extra:
            raise SegmentError(f"{where}: unknown key(s) {', '.join(map(repr, extra))} (a legend has \"classes\")")
        if not data["classes"]:
            raise SegmentError(f"{where}: \"classes\" is empty; name at least one class")
        names, colours, seen = {}, {}, {}
        for i, entry in enumerate(data["classes"]):
            at = f"{where}: class {i + 1}"
            if not isinstance(entry, dict):
                raise SegmentError(f"{at} must be an object with \"value\" and \"name\", not {json.dumps(entry)[:40]}")
            extra = sorted(set(entry) - set(CLASS_KEYS))
            if extra:
                raise SegmentError(f"{at}: unknown key(s) {', '.join(map(repr, extra))} (allowed: value, name, color)")
            value, name = entry.get("value"), entry.get("name")
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_VALUE:
                raise SegmentError(f"{at}: \"value\" must be an integer label 0..{MAX_VALUE} "
                                   f"({OUTPUT_NODATA} is nodata), got {value!r}")
            if not isinstance(name, str) or not name.strip():
                raise SegmentError(f"{at} (value {value}): \"name\" must be a non-empty text, got {name!r}")
            name = name.strip()
            if value in names:
                raise SegmentError(f"{at}: value {value} is named twice ({names[value]!r} and {name!r})")
            if name in seen:
                raise SegmentError(f"{at}: the name {name!r} is given to values {seen[name]} and {value}; to make them "
                                   f"one class merge them (mapseg legend LABELS --merge {value}={seen[name]})")
            names[value], seen[name] = name, value
            colours[value] = (parse_colour(entry["color"], f"{at} (value {value})") if "color" in entry
                              else default_colour(value))
        return cls(names, colours)

    @classmethod
    def load(cls, path) -> "Legend":
        path = Path(path)
        if not path.is_file():
            raise SegmentError(f"legend file {path} not found")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise SegmentError(f"legend file {path} cannot be read ({exc})") from exc
        except ValueError as exc:
            raise SegmentError(f"legend file {path}: not valid JSON ({exc})") from exc
        return cls.from_json(data, f"legend file {path}")

    def to_json(self) -> dict:
        return {"classes": [{"value": v, "name": self.names[v], "color": colour_text(self.colours[v])}
                            for v in self.values]}

    def check_k(self, k: int, where: str = "the legend") -> "Legend":
        """Every value names a label of a K-cluster run (0..K-1); else a SegmentError."""
        over = [v for v in self.values if v >= k]
        if over:
            raise SegmentError(f"{where} names value(s) {', '.join(map(str, over))} but the run has K={k} "
                               f"(labels 0..{k - 1})")
        return self

    def completed(self, values) -> "Legend":
        """This legend plus the default name and colour for each of ``values`` it does not name."""
        names, colours = dict(self.names), dict(self.colours)
        for v in values:
            v = int(v)
            if v not in names:
                names[v], colours[v] = default_name(v), default_colour(v)
        return Legend(names, colours)

    def only(self, values) -> "Legend":
        keep = set(int(v) for v in values)
        return Legend({v: n for v, n in self.names.items() if v in keep},
                      {v: c for v, c in self.colours.items() if v in keep})

    def colormap(self) -> dict:
        """value -> (r, g, b, a), nodata transparent: the colour table of a label raster with these classes."""
        return colormap({v: self.colours[v] for v in self.values})


def load_legend(legend) -> Legend | None:
    """A Legend from a path, a JSON dict or a Legend; None stays None."""
    if legend is None or isinstance(legend, Legend):
        return legend
    if isinstance(legend, dict):
        return Legend.from_json(legend)
    return Legend.load(legend)


# --------------------------------------------------------------------------- the files beside a label raster

def style_path(labels_path) -> Path:
    """``OUT.qml``: the style QGIS applies to ``OUT.tif`` when it opens it."""
    return Path(labels_path).with_suffix(".qml")


def pam_path(labels_path) -> Path:
    """``OUT.tif.aux.xml``: GDAL's PAM sidecar of ``OUT.tif``."""
    p = Path(labels_path)
    return p.with_name(p.name + ".aux.xml")


def sidecar_paths(labels_path) -> dict:
    """The files ``write_class_files`` writes beside ``labels_path`` (checked as outputs before a run)."""
    return {"style (.qml)": str(style_path(labels_path)), "attribute table (.aux.xml)": str(pam_path(labels_path))}


def qml_text(legend: Legend) -> str:
    """A QGIS style: paletted renderer of band 1, one entry per value (name as label), nodata left out."""
    root = ET.Element("qgis", {"version": "3.22.0", "styleCategories": "Symbology"})
    pipe = ET.SubElement(root, "pipe")
    renderer = ET.SubElement(pipe, "rasterrenderer", {"type": "paletted", "band": "1", "opacity": "1",
                                                        "alphaBand": "-1", "nodataColor": ""})
    ET.SubElement(renderer, "rasterTransparency")
    palette = ET.SubElement(renderer, "colorPalette")
    for v in legend.values:
        r, g, b, a = legend.colours[v]
        ET.SubElement(palette, "paletteEntry", {"value": str(v), "color": f"#{r:02x}{g:02x}{b:02x}",
                                                "alpha": str(a), "label": legend.names[v]})
    ET.SubElement(pipe, "brightnesscontrast", {"brightness": "0", "contrast": "0", "gamma": "1"})
    ET.SubElement(pipe, "huesaturation", {"saturation": "0", "grayscaleMode": "0", "colorizeOn": "0",
                                          "invertColors": "0"})
    ET.SubElement(pipe, "rasterresampler", {"maxOversampling": "2"})
    ET.SubElement(root, "blendMode").text = "0"
    ET.indent(root)
    return ("<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
            + ET.tostring(root, encoding="unicode") + "\n")


def rat_element(legend: Legend, counts: dict | None = None) -> ET.Element:
    """``<GDALRasterAttributeTable>``: Value (usage MinMax), Count (PixelCount, where ``counts`` is given),
    Name, Red, Green, Blue, Alpha; one row per value."""
    fields = [("Value", GFT_INTEGER, GFU_MINMAX)]
    if counts is not None:
        fields.append(("Count", GFT_INTEGER, GFU_PIXELCOUNT))
    fields += [("Name", GFT_STRING, GFU_NAME), ("Red", GFT_INTEGER, GFU_RED), ("Green", GFT_INTEGER, GFU_GREEN),
               ("Blue", GFT_INTEGER, GFU_BLUE), ("Alpha", GFT_INTEGER, GFU_ALPHA)]
    rat = ET.Element(RAT_TAG, {"tableType": "thematic"})
    for i, (name, kind, usage) in enumerate(fields):
        fd = ET.SubElement(rat, "FieldDefn", {"index": str(i)})
        ET.SubElement(fd, "Name").text = name
        ET.SubElement(fd, "Type").text = str(kind)
        ET.SubElement(fd, "Usage").text = str(usage)
    for row, v in enumerate(legend.values):
        r = ET.SubElement(rat, "Row", {"index": str(row)})
        cells = [v] + ([int(counts.get(v, 0))] if counts is not None else []) + [legend.names[v],
                                                                                *legend.colours[v]]
        for c in cells:
            ET.SubElement(r, "F").text = str(c)
    return rat


def pam_text(legend: Legend, counts: dict | None = None, existing: str | None = None) -> str:
    """The PAM sidecar with the attribute table of band 1: ``existing`` (the sidecar's text) keeps everything
    else it holds, its band 1 table replaced; None starts afresh."""
    root = None
    if existing:
        try:
            root = ET.fromstring(existing)
        except ET.ParseError:
            root = None                                      # unreadable: GDAL would ignore it too; replaced
        if root is not None and root.tag != "PAMDataset":
            root = None
    if root is None:
        root = ET.Element("PAMDataset")
    band = next((b for b in root.findall("PAMRasterBand") if b.get("band") == "1"), None)
    if band is None:
        band = ET.SubElement(root, "PAMRasterBand", {"band": "1"})
    for old in band.findall(RAT_TAG):
        band.remove(old)
    band.append(rat_element(legend, counts))
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"


def read_legend(labels_path) -> Legend | None:
    """The names and colours in ``OUT.tif.aux.xml``'s attribute table (as ``write_class_files`` writes it, or
    any table with a MinMax (or Value) column and a Name column), or None where there is none."""
    path = pam_path(labels_path)
    if not path.is_file():
        return None
    try:
        root = ET.fromstring(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ET.ParseError):
        return None
    band = next((b for b in root.findall("PAMRasterBand") if b.get("band") == "1"), None)
    rat = None if band is None else band.find(RAT_TAG)
    if rat is None:
        return None
    usage = {}
    for fd in rat.findall("FieldDefn"):
        try:
            usage[int(fd.findtext("Usage", "0"))] = int(fd.get("index"))
            usage.setdefault(fd.findtext("Name", ""), int(fd.get("index")))
        except (TypeError, ValueError):
            return None
    value_at = usage.get(GFU_MINMAX, usage.get("Value"))
    name_at = usage.get(GFU_NAME)
    if value_at is None or name_at is None:
        return None
    names, colours = {}, {}
    for row in rat.findall("Row"):
        cells = [f.text or "" for f in row.findall("F")]
        try:
            v = int(float(cells[value_at]))
            rgba = tuple(int(float(cells[usage[u]])) if u in usage else 255
                         for u in (GFU_RED, GFU_GREEN, GFU_BLUE, GFU_ALPHA))
        except (IndexError, ValueError, KeyError):
            return None
        names[v] = cells[name_at]
        colours[v] = rgba if all(u in usage for u in (GFU_RED, GFU_GREEN, GFU_BLUE)) else default_colour(v)
    return Legend(names, colours) if names else None


def class_counts(labels_path, rows: int = 1024) -> tuple[dict, dict]:
    """(pixels per value, tags) of a one-band label raster, read window by window (nodata not counted)."""
    from .raster import io_env, open_reader

    counts = np.zeros(256, np.int64)
    with io_env():
        with open_reader(labels_path, (1, 1, 1)) as reader:
            if reader.info.dtype != "uint8":
                raise SegmentError(f"{labels_path} is {reader.info.dtype}: a mapseg label raster is uint8")
            for r0 in range(0, reader.height, rows):
                data, valid = reader.read(r0, min(reader.height, r0 + rows), 0, reader.width)
                counts += np.bincount(data[..., 0][valid].ravel(), minlength=256)
    counts[OUTPUT_NODATA] = 0
    tags = _tags(labels_path)
    return {int(v): int(counts[v]) for v in np.flatnonzero(counts)}, tags


def _tags(path) -> dict:
    """The dataset metadata (tags) of a raster, through the run's raster library."""
    from .raster import io_library

    if io_library() == "gdal":
        from osgeo import gdal

        ds = gdal.Open(str(path))
        try:
            return dict(ds.GetMetadata() or {})
        finally:
            ds = None
    import rasterio

    with rasterio.open(path) as ds:
        return dict(ds.tags())


def layout_and_colours(labels_path) -> tuple[bool, dict | None]:
    """(whether the raster is a COG (IMAGE_STRUCTURE LAYOUT=COG), the colour table of band 1 or None), through
    the run's raster library."""
    from .raster import io_library

    if io_library() == "gdal":
        from osgeo import gdal

        gdal.UseExceptions()
        ds = gdal.Open(str(labels_path))
        try:
            cog = (ds.GetMetadata("IMAGE_STRUCTURE") or {}).get("LAYOUT", "").upper() == "COG"
            table = ds.GetRasterBand(1).GetColorTable()
            cmap = None if table is None else {i: tuple(table.GetColorEntry(i)) for i in range(table.GetCount())}
            return cog, cmap
        finally:
            ds = None
    import rasterio

    with rasterio.open(labels_path) as ds:
        cog = ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT", "").upper() == "COG"
        try:
            cmap = ds.colormap(1)
        except ValueError:                                    # no colour table
            cmap = None
    return cog, cmap


def set_colour_table(labels_path, cmap: dict) -> bool:
    """Replace the colour table of band 1 of a GeoTIFF atomically: the file is copied to a temporary sibling,
    the table written there, and the copy renamed over the original (a COG: copied as a GeoTIFF, the table
    set, converted back to a COG). Nothing is done where the file already shows these colours (a run in the
    default palette, or a writer given the legend's colours): returns whether the file was rewritten."""
    from .raster import io_library

    path = Path(labels_path)
    if same_colours(layout_and_colours(path)[1], cmap):
        return False
    stem = temp_sibling(path, "part", "")
    tmp, tmp_cog = stem.with_name(stem.name + ".tif"), stem.with_name(stem.name + ".cog.tif")
    gdal_path = io_library() == "gdal"
    try:
        done = (_colour_table_gdal if gdal_path else _colour_table_rasterio)(path, tmp, tmp_cog, cmap)
        replace_output(done, path)
    except (OSError, RuntimeError, ValueError) as exc:  # rasterio's and osgeo's errors derive from these
        raise SegmentError(f"updating the colour table of {path} failed ({exc}); the file is unchanged") from exc
    finally:
        remove_if_present(*(p.with_name(p.name + ext) for p in (tmp, tmp_cog) for ext in ("", ".aux.xml")))
    return True


def _colour_table_rasterio(path: Path, tmp: Path, tmp_cog: Path, cmap: dict) -> Path:
    import rasterio
    import rasterio.shutil

    cog = layout_and_colours(path)[0]
    if cog:
        rasterio.shutil.copy(str(path), str(tmp), driver="GTiff", **GTIFF_OPTIONS)
    else:
        shutil.copyfile(path, tmp)
    with rasterio.open(tmp, "r+") as ds:
        ds.write_colormap(1, cmap)
    if not cog:
        return tmp
    rasterio.shutil.copy(str(tmp), str(tmp_cog), driver="COG", **COG_OPTIONS)
    return tmp_cog


def _colour_table_gdal(path: Path, tmp: Path, tmp_cog: Path, cmap: dict) -> Path:
    from osgeo import gdal

    gdal.UseExceptions()
    cog = layout_and_colours(path)[0]
    if cog:
        gdal.Translate(str(tmp), str(path), format="GTiff", creationOptions=option_list(GTIFF_OPTIONS))
    else:
        shutil.copyfile(path, tmp)
    ds = gdal.Open(str(tmp), gdal.GA_Update)
    set_gdal_colours(gdal, ds.GetRasterBand(1), cmap)
    ds = None
    if not cog:
        return tmp
    gdal.Translate(str(tmp_cog), str(tmp), format="COG", creationOptions=option_list(COG_OPTIONS))
    return tmp_cog


def write_class_files(labels_path, legend: Legend, counts: dict | None = None, fresh: bool = True,
                      colour_table: bool = True) -> list[str]:
    """Write ``OUT.qml`` and the attribute table in ``OUT.tif.aux.xml`` for ``legend`` (atomically), and set the
    GeoTIFF's colour table to its colours (where it does not show them yet: ``set_colour_table``). ``fresh``:
    the labels were just written, so an older sidecar's content (statistics of another file) is dropped; else
    it is kept and only the table replaced. Returns the files written."""
    labels_path = Path(labels_path)
    if colour_table:
        set_colour_table(labels_path, legend.colormap())
    qml, pam = style_path(labels_path), pam_path(labels_path)
    write_text_atomic(qml, qml_text(legend))
    existing = None
    if not fresh and pam.is_file():
        try:
            existing = pam.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            existing = None
    write_text_atomic(pam, pam_text(legend, counts, existing))
    return [str(qml), str(pam)]


def run_legend(k: int, legend=None, centers_legend: dict | None = None, where: str = "the legend") -> Legend:
    """The legend of a K-cluster run: ``legend`` (a file, dict or Legend) where given, else the one a centres
    file keeps, else the default; completed with default names for unnamed values."""
    chosen = load_legend(legend)
    if chosen is None and centers_legend is not None:
        chosen, where = Legend.from_json(centers_legend, "the centres file's legend"), "the centres file's legend"
    if chosen is None:
        return Legend.default(k)
    return chosen.check_k(k, where).completed(range(k))


# --------------------------------------------------------------------------- mapseg legend: rename, recolour, merge

def parse_merge(text: str | None) -> dict:
    """``"3=1,4=1"`` -> {3: 1, 4: 1} (value 3 becomes 1, ...); a value merged and also a target is refused."""
    if not text:
        return {}
    mapping = {}
    for part in str(text).split(","):
        try:
            a, b = (int(x) for x in part.split("="))
        except ValueError as exc:
            raise SegmentError(f"--merge {text!r}: give FROM=TO pairs of labels, e.g. 3=1,4=1") from exc
        for v in (a, b):
            if not 0 <= v <= MAX_VALUE:
                raise SegmentError(f"--merge {text!r}: {v} is not a label 0..{MAX_VALUE}")
        if a == b or a in mapping:
            raise SegmentError(f"--merge {text!r}: {a} is merged {'into itself' if a == b else 'twice'}")
        mapping[a] = b
    chained = sorted(set(mapping) & set(mapping.values()))
    if chained:
        raise SegmentError(f"--merge {text!r}: {chained[0]} is merged away and also a target; merge into the "
                           "final label directly (e.g. 3=1,1=0 -> 3=0,1=0)")
    return mapping


def relabel(labels_path, legend=None, merge: dict | None = None, out_path=None, rows: int = 1024, log=None) -> dict:
    """Rename and recolour the classes of a label raster, merging some (``merge``: value -> value) on the way.

    Merging rewrites the labels window by window into ``out_path`` (or a temporary sibling renamed over
    ``labels_path``); renaming and recolouring rewrite the sidecars and the colour table (of ``out_path``,
    a copy, where given). The legend: ``legend`` where given, else the names the raster's attribute table
    holds, else the defaults; values merged away leave it. Returns {"output", "counts", "legend"}."""
    from .fileio import check_outputs
    from .raster import io_env, open_reader, open_writer

    log = log or (lambda msg: None)
    merge = dict(merge or {})
    src = Path(labels_path)
    if not src.is_file():
        raise SegmentError(f"labels raster {src} does not exist")
    out = Path(out_path) if out_path else src
    in_place = out == src or (out.exists() and os.path.samefile(out, src))
    if not in_place:
        check_outputs([("output", out), *sidecar_paths(out).items()], [("the labels raster", src)])
    counts, tags = class_counts(src, rows)
    missing = sorted(v for v in merge if v not in counts)
    if missing:
        raise SegmentError(f"--merge: label(s) {', '.join(map(str, missing))} do not occur in {src} "
                           f"(it holds {', '.join(map(str, sorted(counts))) or 'no labels'})")
    given = load_legend(legend)
    k = tags.get("MAPSEG_K", "")
    if k.isdigit():
        over = sorted({b for b in merge.values() if b >= int(k)})
        if over:   # a label beyond the run's could never be named afterwards (a legend is checked against K)
            raise SegmentError(f"--merge: target(s) {', '.join(map(str, over))} are not labels of {src.name} "
                               f"(written with MAPSEG_K={k}: labels 0..{int(k) - 1}); merge into one of those")
        if given is not None:
            given.check_k(int(k), f"the legend (for {src.name}, written with MAPSEG_K={k})")
    chosen = given or read_legend(src) or Legend.default(sorted(counts))
    merged_counts = {}
    for v, n in counts.items():
        t = merge.get(v, v)
        merged_counts[t] = merged_counts.get(t, 0) + n
    keep = sorted(set(merged_counts) | (set(chosen.values) - set(merge)))
    final = chosen.only(keep).completed(keep)
    if merge:
        lut = np.arange(256, dtype=np.uint8)
        for a, b in merge.items():
            lut[a] = b
        tags = {**tags, "MAPSEG_MERGED": ",".join(f"{a}={b}" for a, b in merge.items())}
        cog = layout_and_colours(src)[0]                      # a COG stays a COG
        with io_env():
            reader, writer = open_reader(src, (1, 1, 1)), None
            try:
                writer = open_writer(out, reader.info, int(max(keep, default=0)) + 1,
                                     OUTPUT_NODATA if reader.info.has_nodata else None, cog, tags,
                                     final.colormap())       # the colours at creation: no second rewrite
                for r0 in range(0, reader.height, rows):
                    data, valid = reader.read(r0, min(reader.height, r0 + rows), 0, reader.width)
                    writer.write(np.where(valid, lut[data[..., 0]], OUTPUT_NODATA).astype(np.uint8), r0, 0)
                reader.close()                                # before the rename over it (in place)
                writer.commit()
            except BaseException:
                reader.close()
                if writer is not None:
                    writer.abort()
                raise
        log(f"merged {', '.join(f'{a} into {b}' for a, b in merge.items())}: wrote {out}")
    elif not in_place:
        tmp = temp_sibling(out, "part", ".tif")
        try:
            shutil.copyfile(src, tmp)
            replace_output(tmp, out)
        finally:
            remove_if_present(tmp)
    write_class_files(out, final, merged_counts, fresh=bool(merge) or not in_place)
    return {"output": str(out), "counts": merged_counts, "legend": final.to_json()}
