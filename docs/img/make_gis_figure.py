"""Draw docs/img/gis_workflow.png from the outputs of examples/gis_workflow.sh.

    bash examples/gis_workflow.sh /tmp/mapseg_gis
    python docs/img/make_gis_figure.py /tmp/mapseg_gis [-o docs/img/gis_workflow.png]

Left: the input over the area of interest's bounds, read on the labels' grid (2.5 m), dimmed outside the
polygon of examples/naip_aoi.geojson. Middle: the same with the simplified polygons of segments.gpkg filled
half-transparently in their class's colour, with thin outlines. Right: the legend (names and colours read from
labels.tif's sidecars, as mapseg wrote them) and how many polygons of each class. Needs numpy, PIL, rasterio,
shapely and pyogrio (no matplotlib).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyogrio.raw
import rasterio
import shapely
from PIL import Image, ImageDraw, ImageFont
from rasterio.features import rasterize
from rasterio.transform import Affine
from rasterio.warp import Resampling, reproject, transform_geom

from mapseg.legend import read_legend

ROOT = Path(__file__).resolve().parents[2]
RASTER = ROOT / "examples" / "naip_nd_2020_rgb.tif"
AOI = ROOT / "examples" / "naip_aoi.geojson"
PANEL_H = 620           # panel height in the figure, pixels
SUPER = 2               # polygons are drawn at this multiple and scaled down (smooth edges)
FILL_ALPHA = 0.45       # opacity of the class colours over the image
DIM = 0.35              # brightness kept outside the area of interest
MARGIN, GAP, LEGEND_W, TITLE_H = 16, 16, 300, 34


def font(size: int, bold: bool = False):
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    for folder in ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/dejavu", "/Library/Fonts"):
        if (Path(folder) / name).exists():
            return ImageFont.truetype(str(Path(folder) / name), size)
    return ImageFont.load_default()


def quantized(fig: Image.Image, exact) -> Image.Image:
    """256 colours, dithered (a third of the RGB PNG's size): 240 fitted to the figure (octree) plus the
    legend's colours, black, white and greys exactly, so swatches and text keep their colours."""
    fitted = fig.quantize(colors=240, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    pal = fitted.getpalette()[: 3 * 240]
    extra = [tuple(c) for c in exact] + [(0, 0, 0), (255, 255, 255), (20, 20, 20), (60, 60, 60)]
    extra += [(g, g, g) for g in range(40, 256, 20)]
    for c in extra[:16]:
        pal += list(c)
    pal += [0] * (768 - len(pal))
    palette = Image.new("P", (1, 1))
    palette.putpalette(pal)
    return fig.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG)


def read_aoi(crs):
    doc = json.loads(AOI.read_text(encoding="utf-8"))
    src_crs = (doc.get("crs") or {}).get("properties", {}).get("name", "EPSG:4326")
    return [transform_geom(src_crs, crs, f["geometry"]) for f in doc["features"]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", help="the folder examples/gis_workflow.sh wrote (labels.tif, segments.gpkg)")
    ap.add_argument("-o", "--output", default=str(ROOT / "docs" / "img" / "gis_workflow.png"))
    args = ap.parse_args(argv)
    folder = Path(args.folder)

    with rasterio.open(folder / "labels.tif") as lab:
        crs, grid, (h, w) = lab.crs, lab.transform, lab.shape
    legend = read_legend(folder / "labels.tif")
    scale = PANEL_H / h
    pw, ph = round(w * scale), PANEL_H
    shown = grid * Affine.scale(w / pw, h / ph)                      # the labels' area at panel size
    big = grid * Affine.scale(w / (pw * SUPER), h / (ph * SUPER))    # ... at SUPER times that

    # the input on the panel's grid (area average of the 5 m pixels), dimmed outside the area of interest
    rgb = np.zeros((3, ph, pw), np.uint8)
    with rasterio.open(RASTER) as src:
        reproject(src.read(), rgb, src_transform=src.transform, src_crs=src.crs, dst_transform=shown,
                  dst_crs=crs, resampling=Resampling.bilinear)
    aoi = read_aoi(crs)
    inside = rasterize(aoi, out_shape=(ph, pw), transform=shown, fill=0, default_value=1).astype(bool)
    img = np.moveaxis(rgb, 0, -1).astype(np.float32)
    img[~inside] *= DIM
    base = Image.fromarray(img.round().astype(np.uint8))

    # polygons: fill by class (holes kept by rasterize), outlines as lines, at SUPER x, then scaled down
    meta, _, wkb, fields = pyogrio.raw.read(folder / "segments.gpkg")
    names = dict(zip(meta["fields"], fields))
    geoms = shapely.from_wkb(wkb)
    labels = names["label"].astype(int)
    H, W = ph * SUPER, pw * SUPER
    cls = rasterize(((shapely.geometry.mapping(g), int(v)) for g, v in zip(geoms, labels)),
                    out_shape=(H, W), transform=big, fill=255, dtype="uint8")
    colours = np.zeros((256, 4), np.uint8)
    for v, c in legend.colours.items():
        colours[v] = (*c[:3], round(255 * FILL_ALPHA))
    over = Image.fromarray(colours[cls], "RGBA")
    draw = ImageDraw.Draw(over)
    inv = ~big
    for g in geoms:
        for part in shapely.get_parts(g):
            for ring in [part.exterior, *part.interiors]:
                xy = [inv * (x, y) for x, y in ring.coords]
                draw.line(xy, fill=(20, 20, 20, 230), width=SUPER)
    for g in aoi:                                                      # the area of interest itself
        for ring in g["coordinates"]:
            draw.line([inv * tuple(p[:2]) for p in ring], fill=(255, 255, 255, 255), width=2 * SUPER)
    over = over.resize((pw, ph), Image.LANCZOS)
    overlay = Image.alpha_composite(base.convert("RGBA"), over).convert("RGB")

    left = base.copy()
    d = ImageDraw.Draw(left)
    for g in aoi:
        for ring in g["coordinates"]:
            d.line([~shown * tuple(p[:2]) for p in ring], fill=(255, 255, 255), width=2)
    # scale bar, 500 m
    bar = 500 / abs(shown.a)
    x0, y0 = 14, ph - 22
    d.rectangle([x0 - 6, y0 - 22, x0 + bar + 8, y0 + 10], fill=(255, 255, 255))
    d.rectangle([x0, y0, x0 + bar, y0 + 4], fill=(0, 0, 0))
    d.text((x0, y0 - 19), "500 m", fill=(0, 0, 0), font=font(14))

    fw = MARGIN + pw + GAP + pw + GAP + LEGEND_W + MARGIN
    fh = TITLE_H + ph + MARGIN
    fig = Image.new("RGB", (fw, fh), "white")
    d = ImageDraw.Draw(fig)
    t = font(17, bold=True)
    xs = (MARGIN, MARGIN + pw + GAP, MARGIN + 2 * (pw + GAP))
    d.text((xs[0], 8), "input: NAIP 2020, area of interest, 2.5 m", fill=(0, 0, 0), font=t)
    d.text((xs[1], 8), "segments.gpkg: named, simplified polygons", fill=(0, 0, 0), font=t)
    fig.paste(left, (xs[0], TITLE_H))
    fig.paste(overlay, (xs[1], TITLE_H))

    d.text((xs[2], TITLE_H), "class (polygons)", fill=(0, 0, 0), font=t)
    counts = {v: int((labels == v).sum()) for v in legend.values}
    f, y = font(16), TITLE_H + 34
    for v in legend.values:
        c = legend.colours[v][:3]
        d.rectangle([xs[2], y, xs[2] + 36, y + 22], fill=c, outline=(20, 20, 20))
        d.text((xs[2] + 46, y + 2), f"{legend.names[v]} ({counts[v]})", fill=(0, 0, 0), font=f)
        y += 34
    small = font(13)
    vertices = int(sum(shapely.get_num_coordinates(geoms)))
    notes = [f"{len(geoms)} polygons, {vertices:,} vertices", "",
             "mapseg segment --mask naip_aoi.geojson", "  --resolution 2.5 --centers",
             "  naip_centers.json (K = 5, names", "  from naip_legend.json)", "  --min-area 1000 --simplify 7.5",
             "", "white line: the area of interest;", "outside it: nodata (dimmed)", "",
             "unsupervised clusters, named by", "what each mostly covers here;",
             "they mix: crops fall in the first", "two, parts of lakes in the first", "and the fourth"]
    y += 12
    for line in notes:
        d.text((xs[2], y), line, fill=(60, 60, 60), font=small)
        y += 18
    fig = quantized(fig, [legend.colours[v][:3] for v in legend.values])
    fig.save(args.output, optimize=True)
    print(f"wrote {args.output}: {fw} x {fh}, {len(geoms)} polygons, {vertices} vertices")
    return 0


if __name__ == "__main__":
    sys.exit(main())
