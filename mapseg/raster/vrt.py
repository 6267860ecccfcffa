"""GDAL VRTs of label rasters: one over a raster's block tiles, and mosaics over many outputs (``mapseg batch``).

``write_vrt`` builds the XML of one uint8 label band (colour table, nodata 255, optionally the legend's raster
attribute table) over sources placed in the VRT's pixels; ``write_mosaics`` groups outputs by CRS and writes one
VRT per CRS at the finest pixel size; ``write_vrt_classes`` adds a Legend's colours, names and ``.qml``. Plain
text: no GDAL needed to write them.
"""
from __future__ import annotations

import re
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from ..fileio import write_text_atomic
from ..legend import Legend, qml_text, rat_element, style_path
from .common import OUTPUT_NODATA, colormap

MOSAIC_NAME = "mosaic"
MOSAIC_FILE = re.compile(r"mosaic(_EPSG-\d+|_\d+)?\.vrt")  # the names write_mosaics gives


def write_vrt(path, width: int, height: int, sources: list[dict], k: int | dict, *, crs: str | None = None,
              geotransform=None, gcps=None, gcp_crs: str | None = None, legend: Legend | None = None) -> Path:
    """A GDAL VRT of one uint8 label band over ``sources`` (dicts: ``file`` relative to the VRT, ``width``,
    ``height``, ``dst``: (x offset, y offset, x size, y size) in the VRT's pixels), later sources painted over
    earlier ones except where they hold nodata (255), with the labels' colour table (``k``: K for mapseg's palette,
    or a colour map value -> (r, g, b, a), ``Legend.colormap``), and ``legend``'s names as the band's raster
    attribute table. Written atomically."""
    path = Path(path)
    out = [f'<VRTDataset rasterXSize="{int(width)}" rasterYSize="{int(height)}">']
    if crs:
        # no dataAxisToSRSAxisMapping: GDAL then reads x, y in the traditional GIS order (easting/longitude
        # first) whatever the CRS's own axis order ("1,2" swapped x and y for EPSG:4326 or northing-first CRSs)
        out.append(f"  <SRS>{escape(crs)}</SRS>")
    if geotransform is not None:
        out.append("  <GeoTransform>" + ", ".join(repr(float(v)) for v in geotransform) + "</GeoTransform>")
    if gcps:
        out.append(f"  <GCPList Projection={quoteattr(gcp_crs or '')}>")
        for i, (row, col, x, y, z) in enumerate(gcps):
            out.append(f'    <GCP Id="{i + 1}" Pixel="{col!r}" Line="{row!r}" X="{x!r}" Y="{y!r}" Z="{z!r}"/>')
        out.append("  </GCPList>")
    out += ['  <VRTRasterBand dataType="Byte" band="1">', f"    <NoDataValue>{OUTPUT_NODATA}</NoDataValue>",
            "    <ColorInterp>Palette</ColorInterp>", "    <ColorTable>"]
    cmap = colormap(k)
    for i in range(256):
        r, g, b, a = cmap.get(i, (0, 0, 0, 0))
        out.append(f'      <Entry c1="{r}" c2="{g}" c3="{b}" c4="{a}"/>')
    out.append("    </ColorTable>")
    if legend is not None:
        import xml.etree.ElementTree as ET

        rat = rat_element(legend)
        ET.indent(rat, "  ", level=2)
        out.append("    " + ET.tostring(rat, encoding="unicode").rstrip())
    for src in sources:
        x, y, w, h = src["dst"]
        out += ["    <ComplexSource>",
                f'      <SourceFilename relativeToVRT="1">{escape(src["file"])}</SourceFilename>',
                "      <SourceBand>1</SourceBand>",
                f'      <SourceProperties RasterXSize="{src["width"]}" RasterYSize="{src["height"]}" DataType="Byte"/>',
                f'      <SrcRect xOff="0" yOff="0" xSize="{src["width"]}" ySize="{src["height"]}"/>',
                f'      <DstRect xOff="{x!r}" yOff="{y!r}" xSize="{w!r}" ySize="{h!r}"/>',
                f"      <NODATA>{OUTPUT_NODATA}</NODATA>",
                "    </ComplexSource>"]
    out += ["  </VRTRasterBand>", "</VRTDataset>", ""]
    write_text_atomic(path, "\n".join(out))
    return path


def _north_up(gt) -> bool:
    return gt is not None and gt[2] == 0 and gt[4] == 0 and gt[1] > 0 and gt[5] < 0


def _epsg(wkt: str) -> str | None:
    m = re.search(r'(?:AUTHORITY\["EPSG","(\d+)"\]|ID\["EPSG",(\d+)\])\]\s*$', wkt)
    return (m.group(1) or m.group(2)) if m else None


def write_mosaics(out_dir: Path, pieces: list[dict], k: int | Legend) -> tuple[list[dict], list[str]]:
    """VRT mosaics of ``pieces`` (dicts: ``file`` relative to ``out_dir``, ``geometry``, optionally ``raster``: the
    output it is part of, named in what is left out): ``mosaic.vrt`` where all
    share one CRS, else one ``mosaic_EPSG-<code>.vrt`` (or ``mosaic_<n>.vrt``) per CRS, at the finest pixel size
    of its pieces. Pieces without a CRS and a north-up transform (plain images, GCPs, rotated grids) are left out.
    ``k``: K (mapseg's palette), or the run's Legend: its colours and names, and a ``.qml`` beside each VRT.
    Returns ([{"file", "crs", "rasters"}], [files left out, with why])."""
    groups, left_out = {}, []
    for p in pieces:
        g = p["geometry"]
        if g.get("crs") and _north_up(g.get("geotransform")):
            groups.setdefault(g["crs"], []).append(p)
        else:
            why = "no CRS" if g.get("geotransform") and _north_up(g["geotransform"]) else (
                "georeferenced by GCPs" if g.get("gcps") else "not a north-up georeferenced grid")
            left_out.append(f"{p.get('raster', p['file'])} ({why})")
    left_out = list(dict.fromkeys(left_out))  # a raster cut into blocks is said once
    mosaics = []
    for n, (crs, members) in enumerate(sorted(groups.items(), key=lambda kv: kv[1][0]["file"])):
        if len(groups) == 1:
            name = f"{MOSAIC_NAME}.vrt"
        else:
            code = _epsg(crs)
            name = f"{MOSAIC_NAME}_EPSG-{code}.vrt" if code else f"{MOSAIC_NAME}_{n + 1}.vrt"
        rx = min(m["geometry"]["geotransform"][1] for m in members)
        ry = min(-m["geometry"]["geotransform"][5] for m in members)
        x0 = min(m["geometry"]["geotransform"][0] for m in members)
        y0 = max(m["geometry"]["geotransform"][3] for m in members)
        x1 = max(m["geometry"]["geotransform"][0] + m["geometry"]["width"] * m["geometry"]["geotransform"][1]
                 for m in members)
        y1 = min(m["geometry"]["geotransform"][3] + m["geometry"]["height"] * m["geometry"]["geotransform"][5]
                 for m in members)
        width, height = max(1, round((x1 - x0) / rx)), max(1, round((y0 - y1) / ry))
        sources = []
        for m in members:
            g = m["geometry"]
            gt = g["geotransform"]
            sources.append({"file": m["file"], "width": g["width"], "height": g["height"],
                            "dst": (_tidy((gt[0] - x0) / rx), _tidy((y0 - gt[3]) / ry),
                                    _tidy(g["width"] * gt[1] / rx), _tidy(g["height"] * -gt[5] / ry))})
        write_vrt_classes(out_dir / name, width, height, sources, k, crs=crs,
                           geotransform=(x0, rx, 0.0, y0, 0.0, -ry))
        mosaics.append({"file": name, "crs": crs, "epsg": _epsg(crs), "rasters": len(members)})
    return mosaics, left_out


def write_vrt_classes(path: Path, width: int, height: int, sources: list[dict], k: int | Legend, **kw) -> None:
    """``write_vrt`` with a Legend's colours and names (the attribute table in the VRT), and its QGIS style
    ``NAME.qml`` beside."""
    if not isinstance(k, Legend):
        write_vrt(path, width, height, sources, k, **kw)
        return
    write_vrt(path, width, height, sources, k.colormap(), legend=k, **kw)
    write_text_atomic(style_path(path), qml_text(k))


def _tidy(v: float):
    """An offset or size in pixels: the integer where it is one to within 1e-6 (the usual case), else as is."""
    r = round(v)
    return int(r) if abs(v - r) < 1e-6 else v
