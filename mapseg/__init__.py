"""mapseg: segment whole rasters with an exported student (numpy runtime).

The runtime needs numpy and a raster reader (rasterio) only; onnxruntime and
torch are optional, faster backends picked at run time. Importing ``mapseg``
(or ``mapseg.artifact``, ``mapseg.network``, ``mapseg.cluster``,
``mapseg.segment``) loads none of torch, onnxruntime or rasterio: each is
imported where it is first needed. mapseg never imports ``training``.

    mapseg segment IN.tif OUT.tif -k 6          # CLI (see docs/runtime.md)

    from mapseg.segment import segment_raster   # library
"""
from __future__ import annotations

from .artifact import ARTIFACT_FORMAT_VERSION

__version__ = "0.1.0"

__all__ = ["__version__", "ARTIFACT_FORMAT_VERSION"]
