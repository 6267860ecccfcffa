"""The preview PNG: an input beside its colour-coded labels, written with the standard library (zlib) alone."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from ..fileio import write_bytes_atomic
from .common import OUTPUT_NODATA, colormap

GAP = 8  # white pixels between the input and its labels


def stretch_u8(rgb: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(h, w, 3) any dtype -> uint8 for viewing: uint8 as is, others a 2-98 % percentile stretch."""
    if rgb.dtype == np.uint8:
        return rgb
    vals = rgb[valid].astype(np.float64) if valid.any() else rgb.reshape(-1, 3).astype(np.float64)
    lo, hi = np.percentile(vals, 2, axis=0), np.percentile(vals, 98, axis=0)
    return np.clip((rgb - lo) / np.maximum(hi - lo, 1e-9) * 255, 0, 255).astype(np.uint8)


def side_by_side(rgb: np.ndarray, valid: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(h, 2w + GAP, 3) uint8: the input (stretched for viewing) | its labels in the palette, nodata white."""
    lut = np.zeros((256, 3), np.uint8)
    for i, c in colormap(16).items():
        lut[i] = c[:3]
    lut[OUTPUT_NODATA] = (255, 255, 255)
    gap = np.full((labels.shape[0], GAP, 3), 255, np.uint8)
    return np.concatenate([stretch_u8(rgb, valid), gap, lut[labels]], axis=1)


def write_png(image: np.ndarray, path: str | Path) -> None:
    """An 8-bit RGB PNG of (h, w, 3) uint8 ``image``, written atomically."""
    h, w, _ = image.shape
    raw = b"".join(b"\x00" + image[r].tobytes() for r in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    write_bytes_atomic(path, png)
