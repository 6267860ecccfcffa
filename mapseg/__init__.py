"""mapseg: segment whole rasters with an exported student (numpy runtime).

The runtime needs numpy and a raster reader (rasterio, or GDAL's osgeo) only;
onnxruntime and torch are optional, faster backends picked at run time.
Importing ``mapseg`` or any of its modules loads none of torch, onnxruntime,
rasterio or osgeo: each is imported where it is first needed. mapseg never
imports ``training``.

    mapseg segment IN.tif OUT.tif -k 6          # CLI (see docs/runtime.md)

    from mapseg import SegmentOptions, segment_raster   # library
    segment_raster("in.tif", "out.tif", SegmentOptions(k=6))
"""
from __future__ import annotations

from .artifact import ARTIFACT_FORMAT_VERSION, load_artifact
from .features import FeatureModel, load_features
from .segment import SegmentOptions, fit_raster_centers, label_reader, segment_raster

__version__ = "0.1.0"

__all__ = ["__version__", "ARTIFACT_FORMAT_VERSION", "FeatureModel", "SegmentOptions", "fit_raster_centers",
           "label_reader", "load_artifact", "load_features", "segment_raster"]
