"""``ArrayReader``: the reader interface over an image in memory, the pipeline without a raster file."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from ..errors import SegmentError
from ..scaling import DTYPE_MAX
from .common import ReaderBase


class ArrayReader(ReaderBase):
    """The reader interface (``height``, ``width``, ``info.dtype``, ``read``) over an in-memory (H, W, 3)
    uint8, uint16 or float image, with an optional (H, W) validity mask: the pipeline without a raster file.
    A float image has no full brightness of its own: the caller gives the scaling its input maximum
    (``mapseg.api.segment_array`` takes floats as [0, 1])."""

    def __init__(self, image: np.ndarray, valid: np.ndarray | None = None, name: str = "<array>"):
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or (image.dtype.name not in DTYPE_MAX and image.dtype.kind != "f"):
            raise SegmentError(f"{name}: expected an (H, W, 3) uint8, uint16 or float image, got {image.shape} "
                               f"{image.dtype}")
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise SegmentError(f"{name} is empty")
        self.image, self.valid, self.path = image, valid, name
        self.info = SimpleNamespace(dtype=image.dtype.name, width=image.shape[1], height=image.shape[0],
                                    has_nodata=valid is not None)

    def read(self, row0: int, row1: int, col0: int, col1: int) -> tuple[np.ndarray, np.ndarray]:
        data = self.image[row0:row1, col0:col1]
        ok = (np.ones(data.shape[:2], bool) if self.valid is None else self.valid[row0:row1, col0:col1])
        return data, ok
