#!/usr/bin/env bash
# The GIS workflow on the shipped NAIP example, from the repository root:
#   area of interest (examples/naip_aoi.geojson), resolution (2.5 m), named classes
#   (examples/naip_legend.json, kept in examples/naip_centers.json), simplified polygons.
# Usage: bash examples/gis_workflow.sh [OUT_DIR]    (default /tmp/mapseg_gis)
#   MAPSEG=path/to/mapseg   the CLI to run (default: mapseg on PATH, else .venv/bin/mapseg)
#   REFIT=1                 fit the centres again into OUT_DIR/centers.json instead of using the committed ones
# docs/img/make_gis_figure.py OUT_DIR draws docs/img/gis_workflow.png from what this writes.
set -euo pipefail

out="${1:-/tmp/mapseg_gis}"
mapseg="${MAPSEG:-$(command -v mapseg || echo .venv/bin/mapseg)}"
raster=examples/naip_nd_2020_rgb.tif   # NAIP 2020, North Dakota: 5 m pixels, EPSG:26914
aoi=examples/naip_aoi.geojson          # one polygon in lon/lat (CRS84), reprojected by mapseg
mkdir -p "$out"

# 1. Centres with names: K=5 clusters of the shipped model, fitted on the area read at 2.5 m; the legend
#    names them and is kept in the centres file. examples/naip_centers.json was written by this command.
centers=examples/naip_centers.json
if [ "${REFIT:-0}" = 1 ]; then
    centers="$out/centers.json"
    "$mapseg" fit "$raster" -k 5 --mask "$aoi" --resolution 2.5 --seed 0 \
        --legend examples/naip_legend.json -o "$centers" --no-progress
fi

# 2. Segment the area (pixels outside the polygon are nodata) at 2.5 m with those centres, and write its
#    segments as polygons: regions under 1000 m² merged into a neighbour, boundaries simplified by 7.5 m.
"$mapseg" segment "$raster" "$out/labels.tif" --centers "$centers" --mask "$aoi" --resolution 2.5 \
    --polygons "$out/segments.gpkg" --min-area 1000 --simplify 7.5 --connectivity 4 --seed 0 --no-progress

# labels.tif (+ .qml style and .tif.aux.xml attribute table with the names), segments.gpkg (label, class, area_m2)
ls -l "$out/labels.tif" "$out/labels.qml" "$out/labels.tif.aux.xml" "$out/segments.gpkg"
