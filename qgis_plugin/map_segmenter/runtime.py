"""Which ``mapseg`` and which default model the plugin uses.

The plugin zip bundles ``mapseg`` (pure Python + numpy) and the default model inside this folder;
a development checkout (the repository's ``qgis_plugin/map_segmenter``) uses the repository's
``mapseg`` and ``model/best`` instead. Raster I/O goes through GDAL (``MAPSEG_IO=gdal``): QGIS's
Python has GDAL's bindings, not rasterio. torch is never imported: the backend is onnxruntime
when it is importable, else numpy. The plugin's private packages folder (deps.py: onnxruntime and
threadpoolctl installed with QGIS's own pip) is appended to ``sys.path`` when this module is first
imported, i.e. when the plugin loads, before the Processing provider builds its algorithm.
"""
import importlib
import importlib.util
import os
import sys

from . import deps

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
DEPS_ACTIVE = deps.activate()


def mapseg_module():
    """The bundled ``map_segmenter.mapseg`` if present, else the repository's ``mapseg`` (development)."""
    os.environ.setdefault("MAPSEG_IO", "gdal")
    if os.path.isdir(os.path.join(HERE, "mapseg")):
        return importlib.import_module(__package__ + ".mapseg")
    if os.path.isdir(os.path.join(REPO, "mapseg")) and REPO not in sys.path:
        sys.path.insert(0, REPO)
    return importlib.import_module("mapseg")


def submodule(name):
    return importlib.import_module(mapseg_module().__name__ + "." + name)


def default_model():
    for path in (os.path.join(HERE, "model"), os.path.join(REPO, "model", "best")):
        if os.path.isfile(os.path.join(path, "meta.json")):
            return path
    return None


def backend_choice(requested="auto"):
    """'onnx' when onnxruntime is importable (or asked for), else 'numpy'; never torch."""
    if requested in ("numpy", "onnx"):
        return requested
    return "onnx" if importlib.util.find_spec("onnxruntime") is not None else "numpy"
