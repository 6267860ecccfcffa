"""mapseg: segment whole rasters with an exported student (numpy runtime).

The runtime needs numpy and a raster reader (rasterio, or GDAL's osgeo) only;
onnxruntime and torch are optional, faster backends picked at run time.
Importing ``mapseg`` or any of its modules loads none of torch, onnxruntime,
rasterio or osgeo: each is imported where it is first needed. mapseg never
imports ``training``.

    mapseg segment IN.tif OUT.tif -k 6          # CLI (see docs/runtime.md)

    from mapseg import segment_raster, segment_array, fit_centers, load_model   # library (docs/api.md)
    segment_raster("in.tif", "out.tif", k=6)
    labels = segment_array(image, k=6)          # (H, W, 3) array in, (H, W) uint8 labels out
"""
from __future__ import annotations

from .api import fit_centers, load_model, segment_array, segment_raster
from .artifact import ARTIFACT_FORMAT_VERSION, load_artifact
from .cluster import Centers
from .features import FeatureModel, load_features
from .segment import SegmentOptions, fit_raster_centers, label_reader

__version__ = "0.1.0"

__all__ = ["__version__", "ARTIFACT_FORMAT_VERSION", "Centers", "FeatureModel", "SegmentOptions", "fit_centers",
           "fit_raster_centers", "label_reader", "load_artifact", "load_features", "load_model", "segment_array",
           "segment_raster"]
