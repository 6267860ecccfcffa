"""Named classes (mapseg.legend; `--legend` on fit and segment, `mapseg legend`): the legend file checked with
clear errors, kept in the centres file, written beside the labels as a QGIS style, a GDAL attribute table that
GDAL reads, and the colour table; classes merged and renamed after a run."""
from __future__ import annotations

import json
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")

from affine import Affine  # noqa: E402

from mapseg.cli import main  # noqa: E402
from mapseg.cluster import Centers  # noqa: E402
from mapseg.errors import ClusterError, SegmentError  # noqa: E402
from mapseg.legend import Legend, parse_merge, read_legend, relabel, write_class_files  # noqa: E402
from mapseg.raster.common import PALETTE  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

LEGEND = {"classes": [{"value": 0, "name": "water", "color": "#1f78b4"},
                      {"value": 1, "name": "trees & grass", "color": "#33a02c"},
                      {"value": 2, "name": "roofs <red>", "color": "#e31a1c80"}]}


def rgb_raster(path, seed=0):
    rng = np.random.default_rng(seed)
    img = np.repeat(np.repeat(rng.integers(0, 255, (3, 12, 16)), 8, 1), 8, 2).astype(np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=128, height=96, count=3, dtype="uint8", crs="EPSG:32632",
                       transform=Affine(1, 0, 500000, 0, -1, 5600000)) as ds:
        ds.write(img)
    return path


def label_raster(path, labels, nodata=255):
    with rasterio.open(path, "w", driver="GTiff", width=labels.shape[1], height=labels.shape[0], count=1,
                       dtype="uint8", crs="EPSG:32632", transform=Affine(2, 0, 500000, 0, -2, 5600000),
                       nodata=nodata) as ds:
        ds.write(labels.astype(np.uint8), 1)
        ds.update_tags(MAPSEG_K="5")
    return path


def gdal_rat(path) -> list[list]:
    """The attribute table rows as GDAL reads them (gdalinfo -json, else osgeo); skip when neither is here."""
    if shutil.which("gdalinfo"):
        info = json.loads(subprocess.run(["gdalinfo", "-json", str(path)], capture_output=True, text=True,
                                         check=True).stdout)
        rat = info.get("rat") or info["bands"][0].get("rat")
        names = [f["name"] for f in rat["fieldDefn"]]
        return names, [row["f"] for row in rat["row"]]
    osgeo = pytest.importorskip("osgeo.gdal", reason="neither gdalinfo nor osgeo to read the attribute table")
    ds = osgeo.Open(str(path))
    rat = ds.GetRasterBand(1).GetDefaultRAT()
    names = [rat.GetNameOfCol(i) for i in range(rat.GetColumnCount())]
    return names, [[rat.GetValueAsString(r, c) for c in range(rat.GetColumnCount())] for r in range(rat.GetRowCount())]


def test_legend_round_trip_fit_centres_segment(tmp_path):
    src = rgb_raster(tmp_path / "a.tif")
    legend = tmp_path / "legend.json"
    legend.write_text(json.dumps(LEGEND))
    centres = tmp_path / "c.json"
    assert main(["fit", str(src), "-k", "4", "-o", str(centres), "--model", "kmeans", "--no-progress",
                 "--legend", str(legend)]) == 0
    kept = Centers.load(centres).legend
    assert [c["name"] for c in kept["classes"]] == ["water", "trees & grass", "roofs <red>", "segment 3"]
    out = tmp_path / "labels.tif"
    assert main(["segment", str(src), str(out), "--centers", str(centres), "--model", "kmeans", "--no-progress"]) == 0
    # the names reached the attribute table GDAL reads, and the colours the GeoTIFF's colour table
    fields, rows = gdal_rat(out)
    assert fields == ["Value", "Count", "Name", "Red", "Green", "Blue", "Alpha"]
    assert [str(r[2]) for r in rows] == ["water", "trees & grass", "roofs <red>", "segment 3"]
    with rasterio.open(out) as ds:
        labels, cmap = ds.read(1), ds.colormap(1)
    assert [int(r[1]) for r in rows] == [int((labels == v).sum()) for v in range(4)]
    assert cmap[0] == (0x1F, 0x78, 0xB4, 255) and cmap[2][:3] == (0xE3, 0x1A, 0x1C)   # (TIFF palettes: no alpha)
    assert [int(x) for x in rows[2][3:7]] == [0xE3, 0x1A, 0x1C, 0x80]                   # the table keeps it
    assert cmap[3] == PALETTE[3] + (255,)
    assert read_legend(out).names == {0: "water", 1: "trees & grass", 2: "roofs <red>", 3: "segment 3"}
    # --legend on segment overrides the centres file's
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"classes": [{"value": 3, "name": "bright"}]}))
    out2 = tmp_path / "labels2.tif"
    assert main(["segment", str(src), str(out2), "--centers", str(centres), "--model", "kmeans", "--no-progress",
                 "--legend", str(other)]) == 0
    assert read_legend(out2).names == {0: "segment 0", 1: "segment 1", 2: "segment 2", 3: "bright"}


def test_qml_is_a_paletted_style_with_names_and_colours(tmp_path):
    labels = np.array([[0, 1, 2, 255]] * 4, np.uint8)
    out = label_raster(tmp_path / "l.tif", labels)
    write_class_files(out, Legend.from_json(LEGEND))
    root = ET.parse(tmp_path / "l.qml").getroot()                          # parses as XML
    assert root.tag == "qgis"
    renderer = root.find("pipe/rasterrenderer")
    assert renderer.get("type") == "paletted" and renderer.get("band") == "1"
    entries = [(e.get("value"), e.get("label"), e.get("color"), e.get("alpha"))
               for e in renderer.findall("colorPalette/paletteEntry")]
    assert entries == [("0", "water", "#1f78b4", "255"), ("1", "trees & grass", "#33a02c", "255"),
                       ("2", "roofs <red>", "#e31a1c", "128")]
    assert "255" not in [e[0] for e in entries]                            # nodata stays transparent


def test_without_a_legend_names_are_segments_and_colours_the_palette(tmp_path):
    src = rgb_raster(tmp_path / "a.tif")
    out = tmp_path / "labels.tif"
    assert main(["segment", str(src), str(out), "-k", "3", "--model", "kmeans", "--no-progress"]) == 0
    _, rows = gdal_rat(out)
    assert [str(r[2]) for r in rows] == ["segment 0", "segment 1", "segment 2"]
    assert [tuple(int(x) for x in r[3:6]) for r in rows] == list(PALETTE[:3])
    labels = [e.get("label") for e in ET.parse(tmp_path / "labels.qml").getroot().iter("paletteEntry")]
    assert labels == ["segment 0", "segment 1", "segment 2"]


def test_merge_rewrites_the_labels_and_their_classes(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, (70, 90)).astype(np.uint8)
    labels[:5, :5] = 255
    src = label_raster(tmp_path / "l.tif", labels)
    before = {v: int((labels == v).sum()) for v in range(5)}
    legend = tmp_path / "legend.json"
    legend.write_text(json.dumps({"classes": [{"value": 0, "name": "water"}, {"value": 1, "name": "vegetation"}]}))
    new = tmp_path / "merged.tif"
    assert main(["legend", str(src), "--legend", str(legend), "--merge", "3=1,4=1", "-o", str(new)]) == 0
    with rasterio.open(new) as ds:
        merged, crs, transform, nodata, tags = ds.read(1), ds.crs, ds.transform, ds.nodata, ds.tags()
    counts = {int(v): int(n) for v, n in zip(*np.unique(merged[merged != 255], return_counts=True))}
    assert counts == {0: before[0], 1: before[1] + before[3] + before[4], 2: before[2]}
    assert (merged == 255).sum() == 25 and nodata == 255                  # nodata kept
    assert crs.to_epsg() == 32632 and transform == Affine(2, 0, 500000, 0, -2, 5600000)
    assert tags["MAPSEG_MERGED"] == "3=1,4=1" and tags["MAPSEG_K"] == "5"
    _, rows = gdal_rat(new)
    assert [(int(r[0]), int(r[1]), str(r[2])) for r in rows] == [
        (0, before[0], "water"), (1, counts[1], "vegetation"), (2, before[2], "segment 2")]
    assert np.array_equal(rasterio.open(src).read(1), labels)             # -o: the original untouched
    # in place: the same file replaced, no temporaries left; renaming alone keeps the labels
    relabel(src, {"classes": [{"value": 2, "name": "roofs", "color": "#ff0000"}]}, {4: 3})
    with rasterio.open(src) as ds:
        again, cmap = ds.read(1), ds.colormap(1)
    assert (again == 4).sum() == 0 and (again == 3).sum() == before[3] + before[4]
    assert cmap[2] == (255, 0, 0, 255)
    assert read_legend(src).names == {0: "segment 0", 1: "segment 1", 2: "roofs", 3: "segment 3"}
    relabel(src, {"classes": [{"value": 3, "name": "fields"}]})
    assert np.array_equal(rasterio.open(src).read(1), again)
    assert read_legend(src).names[3] == "fields"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("content,message", [
    ("{", "not valid JSON"),
    ('[{"value": 0}]', "a legend is an object"),
    ('{"classes": []}', "empty"),
    ('{"classes": [{"value": 0, "name": "a"}], "colours": {}}', "unknown key"),
    ('{"classes": [{"value": 0, "name": "a", "colour": "#000000"}]}', "unknown key"),
    ('{"classes": [{"value": -1, "name": "a"}]}', "integer label 0..254"),
    ('{"classes": [{"value": 255, "name": "a"}]}', "255 is nodata"),
    ('{"classes": [{"value": 1.5, "name": "a"}]}', "integer label"),
    ('{"classes": [{"value": 0, "name": ""}]}', "non-empty"),
    ('{"classes": [{"value": 0, "name": "a", "color": "red"}]}', "#rrggbb"),
    ('{"classes": [{"value": 0, "name": "a"}, {"value": 0, "name": "b"}]}', "named twice"),
    ('{"classes": [{"value": 0, "name": "a"}, {"value": 1, "name": "a"}]}', "merge them"),
])
def test_bad_legend_files_give_clear_errors(tmp_path, content, message):
    path = tmp_path / "legend.json"
    path.write_text(content)
    with pytest.raises(SegmentError, match=message) as info:
        Legend.load(path)
    assert str(path) in str(info.value)                                    # names the file
    src = rgb_raster(tmp_path / "a.tif")
    assert main(["segment", str(src), str(tmp_path / "o.tif"), "-k", "3", "--model", "kmeans", "--no-progress",
                 "--legend", str(path)]) == 2                             # refused before the run
    assert not (tmp_path / "o.tif").exists()


def test_legend_values_beyond_k_and_bad_merges_are_refused(tmp_path):
    src = rgb_raster(tmp_path / "a.tif")
    legend = tmp_path / "legend.json"
    legend.write_text(json.dumps({"classes": [{"value": 5, "name": "x"}]}))
    assert main(["fit", str(src), "-k", "3", "-o", str(tmp_path / "c.json"), "--model", "kmeans", "--no-progress",
                 "--legend", str(legend)]) == 2
    with pytest.raises(SegmentError, match="K=3"):
        Legend.load(legend).check_k(3)
    for bad, message in (("3", "FROM=TO"), ("3=3", "into itself"), ("3=1,3=2", "twice"), ("3=1,1=0", "also a target"),
                         ("300=1", "not a label")):
        with pytest.raises(SegmentError, match=message):
            parse_merge(bad)
    labels = label_raster(tmp_path / "l.tif", np.zeros((8, 8), np.uint8))
    with pytest.raises(SegmentError, match="do not occur"):
        relabel(labels, None, {3: 0})
    assert main(["legend", str(labels)]) == 2                              # nothing asked
    with pytest.raises(SegmentError, match="MAPSEG_K=5"):                  # label_raster's tag: K=5
        relabel(labels, {"classes": [{"value": 6, "name": "x"}]})


def test_centres_files_without_a_legend_still_load_and_a_bad_one_is_refused(tmp_path):
    centres = Centers(np.eye(3, dtype=np.float32), "euclidean", "colour", {"kind": "kmeans"})
    data = centres.to_json()
    assert "legend" not in data                                            # older readers see the file they know
    assert Centers.from_json(data).legend is None
    data["legend"] = {"classes": [{"value": 7, "name": "x"}]}
    with pytest.raises(ClusterError, match="K=3"):
        Centers.from_json(data, "c.json")
    data["legend"] = LEGEND
    assert Centers.from_json(data).legend["classes"][1]["name"] == "trees & grass"


def test_named_classes_through_gdal_alone_as_in_qgis(tmp_path):
    """QGIS's Python has numpy and osgeo, no rasterio: the sidecars, the colour table and a merge go through GDAL."""
    system = shutil.which("python3", path="/usr/bin")
    if not system or subprocess.run([system, "-c", "from osgeo import gdal; import numpy"],
                                    capture_output=True).returncode:
        pytest.skip("no system Python with osgeo (GDAL bindings) and numpy: apt-get install python3-gdal")
    src = rgb_raster(tmp_path / "a.tif")
    legend = tmp_path / "legend.json"
    legend.write_text(json.dumps(LEGEND))
    code = f"""
import sys, json
from mapseg.cli import main
out, new = {str(tmp_path / 'l.tif')!r}, {str(tmp_path / 'm.tif')!r}
assert main(['segment', {str(src)!r}, out, '-k', '3', '--model', 'kmeans', '--no-progress', '--legend',
             {str(legend)!r}]) == 0
assert main(['legend', out, '--merge', '2=0', '-o', new]) == 0
from osgeo import gdal
result = {{}}
for name, path in (('segment', out), ('merge', new)):
    ds = gdal.Open(path)
    band = ds.GetRasterBand(1)  # (ds held: a band outliving its dataset crashes the bindings)
    rat = band.GetDefaultRAT()
    result[name] = [[rat.GetValueAsString(r, 2) for r in range(rat.GetRowCount())],
                    list(band.GetColorTable().GetColorEntry(1))]
print(json.dumps({{'rasterio': 'rasterio' in sys.modules, **result}}))
"""
    res = subprocess.run([system, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "MAPSEG_IO": "gdal"})
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["rasterio"] is False
    assert got["segment"] == [["water", "trees & grass", "roofs <red>"], [0x33, 0xA0, 0x2C, 255]]
    assert got["merge"] == [["water", "trees & grass"], [0x33, 0xA0, 0x2C, 255]]


def test_a_cog_keeps_its_layout_with_the_new_colours(tmp_path):
    src = rgb_raster(tmp_path / "a.tif")
    legend = tmp_path / "legend.json"
    legend.write_text(json.dumps(LEGEND))
    out = tmp_path / "labels.tif"
    assert main(["segment", str(src), str(out), "-k", "3", "--model", "kmeans", "--no-progress", "--cog",
                 "--legend", str(legend)]) == 0
    with rasterio.open(out) as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"        # rebuilt, not updated in place
        assert ds.colormap(1)[1] == (0x33, 0xA0, 0x2C, 255)
        assert ds.crs.to_epsg() == 32632 and ds.tags()["MAPSEG_K"] == "3"


def test_a_legend_beyond_k_is_refused_before_segmenting(tmp_path):
    src = rgb_raster(tmp_path / "a.tif")
    legend = tmp_path / "legend.json"
    legend.write_text(json.dumps({"classes": [{"value": 4, "name": "x"}]}))
    assert main(["segment", str(src), str(tmp_path / "o.tif"), "-k", "3", "--model", "kmeans", "--no-progress",
                 "--legend", str(legend)]) == 2
    assert not (tmp_path / "o.tif").exists()


def test_merge_keeps_a_cogs_layout_and_writes_the_colours_once(tmp_path):
    labels = np.repeat(np.arange(5, dtype=np.uint8), 20)[None, :].repeat(64, 0)      # 64 x 100, labels 0..4
    src = tmp_path / "cog.tif"
    with rasterio.open(src, "w", driver="COG", width=100, height=64, count=1, dtype="uint8", crs="EPSG:32632",
                       transform=Affine(2, 0, 500000, 0, -2, 5600000), nodata=255) as ds:
        ds.write(labels, 1)
        ds.update_tags(MAPSEG_K="5")
    new = tmp_path / "merged.tif"
    legend = {"classes": [{"value": 1, "name": "vegetation", "color": "#33a02c"}]}
    relabel(src, legend, {3: 1, 4: 1}, new)
    with rasterio.open(new) as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"               # not a plain GeoTIFF
        assert ds.colormap(1)[1] == (0x33, 0xA0, 0x2C, 255)
        assert np.array_equal(np.unique(ds.read(1)), [0, 1, 2])
    relabel(src, None, {2: 0})                                                 # in place: still a COG
    with rasterio.open(src) as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert np.array_equal(np.unique(ds.read(1)), [0, 1, 3, 4])


def test_merge_targets_beyond_k_are_refused(tmp_path):
    src = label_raster(tmp_path / "l.tif", np.arange(5, dtype=np.uint8)[None, :].repeat(4, 0))  # MAPSEG_K=5
    with pytest.raises(SegmentError, match="MAPSEG_K=5"):
        relabel(src, None, {3: 7, 4: 7})
    assert main(["legend", str(src), "--merge", "3=7,4=7"]) == 2
    assert np.array_equal(rasterio.open(src).read(1), np.arange(5)[None, :].repeat(4, 0))   # untouched
    relabel(src, None, {3: 4})                                                 # within K: fine


def test_the_colour_table_is_rewritten_only_where_it_changes(tmp_path):
    from mapseg.legend import set_colour_table
    from mapseg.raster import RasterReader, open_writer
    from mapseg.raster.common import colormap

    src = label_raster(tmp_path / "l.tif", np.arange(5, dtype=np.uint8)[None, :].repeat(4, 0))
    assert set_colour_table(src, colormap(5)) is True                          # rasterio's default table: none
    inode = src.stat().st_ino
    assert set_colour_table(src, colormap(5)) is False                         # the default palette: kept as is
    write_class_files(src, Legend.default(5))
    assert src.stat().st_ino == inode                                          # not copied again
    legend = Legend.from_json(LEGEND)
    assert set_colour_table(src, legend.colormap()) is True and src.stat().st_ino != inode
    # a writer given the legend's colours makes the table at creation: nothing left to rewrite
    with RasterReader(src, (1, 1, 1)) as reader:
        writer = open_writer(tmp_path / "w.tif", reader.info, 5, 255, cmap=legend.completed(range(5)).colormap())
        writer.write(np.zeros((4, 5), np.uint8), 0, 0)
        out = writer.commit()
    assert set_colour_table(out, legend.completed(range(5)).colormap()) is False
    with rasterio.open(out) as ds:
        assert ds.colormap(1)[2][:3] == (0xE3, 0x1A, 0x1C) and ds.colormap(1)[3] == PALETTE[3] + (255,)


def test_renaming_keeps_the_statistics_in_the_sidecar(tmp_path):
    src = label_raster(tmp_path / "l.tif", np.arange(5, dtype=np.uint8)[None, :].repeat(4, 0))
    write_class_files(src, Legend.default(5), {v: 4 for v in range(5)})
    pam = tmp_path / "l.tif.aux.xml"
    root = ET.parse(pam).getroot()
    band = root.find("PAMRasterBand")
    meta = ET.SubElement(band, "Metadata")
    for key, value in (("STATISTICS_MINIMUM", "0"), ("STATISTICS_MAXIMUM", "4"), ("STATISTICS_MEAN", "2")):
        ET.SubElement(meta, "MDI", {"key": key}).text = value
    pam.write_text(ET.tostring(root, encoding="unicode"))
    with rasterio.open(src) as ds:
        assert ds.tags(1)["STATISTICS_MAXIMUM"] == "4"                         # GDAL reads them from the sidecar
    relabel(src, {"classes": [{"value": 2, "name": "roofs", "color": "#ff0000"}]})   # rename and recolour
    assert read_legend(src).names[2] == "roofs"
    with rasterio.open(src) as ds:
        tags = ds.tags(1)
        assert ds.colormap(1)[2] == (255, 0, 0, 255)
    assert (tags["STATISTICS_MINIMUM"], tags["STATISTICS_MAXIMUM"], tags["STATISTICS_MEAN"]) == ("0", "4", "2")


def test_segment_raster_writes_the_legend_for_api_callers_and_keeps_the_labels(tmp_path):
    """The Python API gets what mapseg segment --legend gives: the colour table, OUT.qml, OUT.tif.aux.xml and the
    class names in the report; the labels are those of a run without a legend, bit for bit."""
    from mapseg.api import segment_raster

    src = rgb_raster(tmp_path / "a.tif")
    quiet = {"progress": False, "log": lambda m: None}
    plain = segment_raster(src, tmp_path / "plain.tif", k=3, model="kmeans", tile=32, **quiet)
    assert plain["classes"] == [{"value": v, "name": f"segment {v}"} for v in range(3)]
    assert plain["precision"] is None  # colour k-means: no network
    assert read_legend(tmp_path / "plain.tif").names == {0: "segment 0", 1: "segment 1", 2: "segment 2"}
    named = segment_raster(src, tmp_path / "named.tif", k=3, model="kmeans", tile=64,
                           legend=Legend.from_json(LEGEND), **quiet)
    assert [c["name"] for c in named["classes"]] == ["water", "trees & grass", "roofs <red>"]
    assert sorted(Path(f).name for f in named["class_files"]) == ["named.qml", "named.tif.aux.xml"]
    with rasterio.open(tmp_path / "plain.tif") as a, rasterio.open(tmp_path / "named.tif") as b:
        assert np.array_equal(a.read(1), b.read(1))
        assert b.colormap(1)[0] == (0x1F, 0x78, 0xB4, 255) and a.colormap(1)[0] == PALETTE[0] + (255,)
    fields, rows = gdal_rat(tmp_path / "named.tif")
    assert [str(r[2]) for r in rows] == ["water", "trees & grass", "roofs <red>"]


def test_a_legend_beyond_the_centres_k_is_refused_before_any_output(tmp_path):
    from mapseg.segment import SegmentOptions, fit_raster_centers, segment_raster

    src = rgb_raster(tmp_path / "a.tif")
    fit_raster_centers([src], SegmentOptions(k=2, model="kmeans")).save(tmp_path / "c.json")
    legend = tmp_path / "legend.json"
    legend.write_text(json.dumps(LEGEND))  # names value 2: K=2 has 0 and 1
    with pytest.raises(SegmentError, match="K=2"):
        segment_raster(src, tmp_path / "o.tif", SegmentOptions(centers=str(tmp_path / "c.json"), model="kmeans",
                                                               legend=legend), progress=False, log=lambda m: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif", "c.json", "legend.json"]


def test_the_legend_file_and_the_sidecars_are_checked_as_outputs(tmp_path):
    from mapseg.errors import OutputError
    from mapseg.segment import SegmentOptions, segment_raster

    src = rgb_raster(tmp_path / "a.tif")
    legend = tmp_path / "o.qml"   # OUT.qml would overwrite the legend file
    legend.write_text(json.dumps(LEGEND))
    with pytest.raises(OutputError, match="legend file"):
        segment_raster(src, tmp_path / "o.tif", SegmentOptions(k=3, model="kmeans", legend=legend),
                       progress=False, log=lambda m: None)
    assert not (tmp_path / "o.tif").exists() and json.loads(legend.read_text()) == LEGEND


def test_attribute_table_counts_the_pixels_written_over_many_windows_and_nodata(tmp_path):
    """The counts are taken while the windows are written (the output is not read back): they must equal the
    pixels of each value in the output, with several windows and nodata pixels (which count for no class)."""
    src = rgb_raster(tmp_path / "a.tif")
    with rasterio.open(src) as ds:
        img, profile = ds.read(), ds.profile
    img[:, 10:40, 20:70] = 0   # a nodata block across window edges
    profile.update(nodata=0)
    with rasterio.open(tmp_path / "nd.tif", "w", **profile) as ds:
        ds.write(img)
    out = tmp_path / "labels.tif"
    assert main(["segment", str(tmp_path / "nd.tif"), str(out), "-k", "4", "--model", "kmeans", "--tile", "32",
                 "--no-progress"]) == 0
    with rasterio.open(out) as ds:
        labels, nodata = ds.read(1), ds.nodata
    assert nodata == 255 and (labels == 255).sum() == 30 * 50
    _, rows = gdal_rat(out)
    assert [int(r[1]) for r in rows] == [int((labels == v).sum()) for v in range(4)]
