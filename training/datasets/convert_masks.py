"""Colour-coded masks -> single-band class-index masks, via a colour map JSON; or single-band value masks ->
grouped class-index masks, via a class map JSON.

    python -m training.datasets.convert_masks --masks DIR --colors training/datasets/colors/dubai_dev.json --out DIR
    python -m training.datasets.convert_masks --masks DIR --classes training/datasets/classes/geonrw_5.json --out DIR

The colour map names every class colour and its value, plus colours that mean
"ignore" (written as ``ignore_value``). Palette PNGs are converted to RGB first.
A colour that is in neither list is an error naming the file and the colour
(``--unknown ignore`` writes ``ignore_value`` instead and counts them), never a
silent guess. With a class map (``--classes``, see ``load_value_classes``) the masks hold class values
already and are regrouped (GeoNRW's 10 land-use classes into 5 appearance groups); a value the map does
not name is an error. Output: ``<out>/<stem>.png`` (uint8), written atomically.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".gif")


def load_colors(path: str | Path) -> dict:
    data = json.loads(Path(path).read_text())
    try:
        classes = {name: (tuple(int(c) for c in spec["rgb"]), int(spec["value"]))
                   for name, spec in data["classes"].items()}
        ignore_value = int(data.get("ignore_value", 0))
        ignore = [tuple(int(c) for c in rgb) for rgb in data.get("ignore_colors", [])]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: expected {{'classes': {{name: {{'rgb': [r,g,b], 'value': v}}}}, "
                         f"'ignore_value': v, 'ignore_colors': [[r,g,b], ...]}} ({exc})") from None
    values = [v for _, v in classes.values()]
    if len(set(values)) != len(values) or ignore_value in values:
        raise ValueError(f"{path}: class values must be distinct and differ from ignore_value")
    return {"classes": classes, "ignore_value": ignore_value, "ignore": ignore}


def read_rgb(path: Path) -> np.ndarray:
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def read_values(path: Path) -> np.ndarray:
    """A single-band mask's values (H, W); a multi-band file is an error (colour masks go through --colors)."""
    import rasterio
    from rasterio.errors import RasterioIOError
    try:
        with rasterio.open(path) as src:
            if src.count != 1:
                raise ValueError(f"{path}: {src.count} bands; a value mask has one band of class values "
                                 "(colour-coded masks: --colors)")
            return src.read(1)
    except RasterioIOError as exc:
        raise ValueError(f"{path}: cannot read ({exc})") from None


def convert(rgb: np.ndarray, colors: dict, unknown: str = "error", name: str = "mask") -> tuple[np.ndarray, int]:
    """(H, W) uint8 class values and the number of pixels with an unknown colour."""
    code = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    out = np.full(code.shape, colors["ignore_value"], np.uint8)
    known = np.zeros(code.shape, bool)
    for rgb_c, value in colors["classes"].values():
        m = code == ((rgb_c[0] << 16) | (rgb_c[1] << 8) | rgb_c[2])
        out[m] = value
        known |= m
    for rgb_c in colors["ignore"]:
        known |= code == ((rgb_c[0] << 16) | (rgb_c[1] << 8) | rgb_c[2])
    n_unknown = int((~known).sum())
    if n_unknown and unknown == "error":
        ys, xs = np.nonzero(~known)
        c = tuple(int(v) for v in rgb[ys[0], xs[0]])
        raise ValueError(f"{name}: {n_unknown} pixels have colours not in the colour map, e.g. {c} at "
                         f"(row {ys[0]}, col {xs[0]}); add it to the map or pass --unknown ignore")
    return out, n_unknown


def load_value_classes(path: str | Path) -> dict:
    """A class map of single-band masks: ``{"ignore_value": v, "classes": {name: [raw values]}}``; the n-th class
    becomes value n + 1 (ignore_value 0) or, with a non-zero ignore_value, ignore_value + n + 1. Groups several
    raw classes into one (e.g. GeoNRW's 10 land-use classes into 5 appearance groups)."""
    data = json.loads(Path(path).read_text())
    try:
        ignore_value = int(data.get("ignore_value", 0))
        groups = {str(name): [int(v) for v in values] for name, values in data["classes"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"{path}: expected {{'classes': {{name: [raw values]}}, 'ignore_value': v}} ({exc})") from None
    raw = [v for values in groups.values() for v in values]
    if len(set(raw)) != len(raw) or ignore_value in raw or not raw or min(raw) < 0:
        raise ValueError(f"{path}: each raw value belongs to one class, none is ignore_value, none is negative")
    table = {v: ignore_value + 1 + i for i, values in enumerate(groups.values()) for v in values}
    return {"ignore_value": ignore_value, "table": table,
            "names": {ignore_value + 1 + i: name for i, name in enumerate(groups)}}


def remap_values(raw: np.ndarray, classes: dict, name: str = "mask") -> np.ndarray:
    """(H, W) raw class values -> the class map's values (int64); a value in neither the map nor ignore_value
    is an error naming it."""
    lut_size = max(int(raw.max()), max(classes["table"]), classes["ignore_value"]) + 1
    lut = np.full(lut_size, -1, np.int64)
    lut[classes["ignore_value"]] = classes["ignore_value"]
    for v, out in classes["table"].items():
        lut[v] = out
    if raw.min() < 0:
        raise ValueError(f"{name}: negative class values")
    out = lut[raw.astype(np.int64)]
    if (out < 0).any():
        bad = sorted(set(np.unique(raw[out < 0]).tolist()))
        raise ValueError(f"{name}: values {bad[:8]} are neither a class of the class map nor its ignore_value")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.datasets.convert_masks", description=__doc__.split("\n")[0])
    p.add_argument("--masks", required=True, help="folder of colour-coded masks (searched recursively)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--colors", help="colour map JSON for colour-coded masks (see training/datasets/colors/)")
    how.add_argument("--classes", help="class map JSON for single-band value masks: regroups their values "
                                       "(see training/datasets/classes/)")
    p.add_argument("--out", required=True, help="output folder for single-band masks")
    p.add_argument("--unknown", choices=["error", "ignore"], default="error",
                   help="pixels of unlisted colours (--colors only)")
    args = p.parse_args(argv)
    from PIL import Image
    if args.classes and args.unknown != "error":
        print("error: --unknown applies to colour masks (--colors); a class map names every value", file=sys.stderr)
        return 2
    try:
        colors = load_colors(args.colors) if args.colors else None
        classes = load_value_classes(args.classes) if args.classes else None
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if classes is not None and max(classes["table"].values()) > 255:
        print(f"error: {args.classes}: class values above 255 do not fit a uint8 mask", file=sys.stderr)
        return 2
    files = sorted(f for f in Path(args.masks).rglob("*") if f.suffix.lower() in MASK_SUFFIXES)
    if not files:
        print(f"error: no masks ({', '.join(MASK_SUFFIXES)}) under {args.masks}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stems = [f.stem for f in files]
    if len(set(stems)) != len(stems):
        print("error: several masks share a file stem; convert the folders one by one", file=sys.stderr)
        return 2
    total_unknown = 0
    for f in files:
        try:
            if classes is not None:
                values, n_unknown = remap_values(read_values(f), classes, str(f)).astype(np.uint8), 0
            else:
                values, n_unknown = convert(read_rgb(f), colors, args.unknown, str(f))
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        total_unknown += n_unknown
        tmp = out / f".{f.stem}.png.tmp"
        Image.fromarray(values).save(tmp, format="PNG")
        os.replace(tmp, out / f"{f.stem}.png")
    print(f"{len(files)} masks -> {out}" + (f"; {total_unknown} pixels of unknown colours set to ignore"
                                             if total_unknown else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
