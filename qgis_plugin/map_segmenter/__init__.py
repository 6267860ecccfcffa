"""QGIS plugin entry point (QGIS calls ``classFactory``)."""


def classFactory(iface):  # noqa: N802 - QGIS's name
    from .plugin import MapSegmenterPlugin
    return MapSegmenterPlugin(iface)
