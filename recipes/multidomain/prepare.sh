#!/usr/bin/env bash
# Prepare the multi-domain model's training data: every aerial set in ../shared/datasets -> data/multidomain
# (links, plus geonrw_dev's masks regrouped into its 5 appearance groups and its town split) -> processed/
# (shards + SLIC). dubai_dev comes from recipes/default_model/prepare.sh (processed/dubai), run first if missing.
#   bash recipes/multidomain/prepare.sh        (from anywhere; DATASETS=... to point elsewhere; THREADS=2)
set -euo pipefail
cd "$(dirname "$0")/../.."
SRC=$(realpath "${DATASETS:-../shared/datasets}")
PY=${PYTHON:-.venv/bin/python}
DST=data/multidomain
HERE=recipes/multidomain
for d in geonrw_dev/images geonrw_dev/masks swissimage/big_img swissimage/lidar naip_rgbn ngi_aerial neon; do
  [ -d "$SRC/$d" ] || { echo "error: $SRC/$d not found (DATASETS=... points at the shared datasets folder)" >&2; exit 2; }
done
[ -f processed/dubai/summary.json ] || bash recipes/default_model/prepare.sh
rm -rf "$DST"
mkdir -p "$DST"/{geonrw,swissimage,naip,ngi,neon}/images "$DST"/geonrw_val_towns/{images,masks}

# geonrw_dev: 53 tiles, 1000x1000 at 1 m. Masks 0..10 -> 5 groups (0 ignore); val = the towns in
# geonrw_val_towns.txt, train = every other town (manifests of item stems).
for f in "$SRC"/geonrw_dev/images/*.tif; do ln -s "$f" "$DST/geonrw/images/"; done
"$PY" -m training.datasets.convert_masks --masks "$SRC/geonrw_dev/masks" \
  --classes training/datasets/classes/geonrw_5.json --out "$DST/geonrw/masks5"
towns=$(grep -v '^#' "$HERE/geonrw_val_towns.txt" | grep -v '^$')
: > "$DST/geonrw/val.txt"; : > "$DST/geonrw/train.txt"
for f in "$SRC"/geonrw_dev/images/*.tif; do
  stem=$(basename "$f" .tif); town=${stem%%_*}
  if grep -qx "$town" <<<"$towns"; then
    echo "$stem" >> "$DST/geonrw/val.txt"
    # the held-out towns alone, with their original 10-class masks, for python -m training.eval
    ln -s "$f" "$DST/geonrw_val_towns/images/"; ln -s "$SRC/geonrw_dev/masks/$stem.tif" "$DST/geonrw_val_towns/masks/"
  else
    echo "$stem" >> "$DST/geonrw/train.txt"
  fi
done
# SWISSIMAGE 0.5 m: the whole 875x600 area (img/ holds the same pixels cut in 25) and the second tile.
ln -s "$SRC/swissimage/big_img/1091-322_00.tif" "$SRC/swissimage/lidar/ref-img.tif" "$DST/swissimage/images/"
# NAIP 5 m, 3 dates of one site, R,G,B,NIR (the header reads bands 1,2,3).
for f in "$SRC"/naip_rgbn/*.tif; do ln -s "$f" "$DST/naip/images/"; done
# NGI 5 m, 4 overlapping rasters, nodata 0.
for f in "$SRC"/ngi_aerial/*.tif; do ln -s "$f" "$DST/ngi/images/"; done
# NEON 0.1 m: the two GeoTIFFs (the PNG is left out: no georeference, so no known scale).
for f in "$SRC"/neon/*.tif; do ln -s "$f" "$DST/neon/images/"; done

for h in geonrw swissimage naip ngi neon; do
  "$PY" -m training.datasets.build_shards --header "$HERE/$h.yaml" --processed-root processed \
    --threads "${THREADS:-2}" --overwrite --no-progress
done
