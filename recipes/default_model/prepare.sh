#!/usr/bin/env bash
# Prepare the default model's training data: dubai_dev -> data/dubai_dev -> processed/dubai (shards + SLIC).
#   bash recipes/default_model/prepare.sh          (from anywhere; DUBAI_DEV=... to point elsewhere)
set -euo pipefail
cd "$(dirname "$0")/../.."
SRC=$(realpath "${DUBAI_DEV:-../shared/datasets/dubai_dev}")
PY=${PYTHON:-.venv/bin/python}
DST=data/dubai_dev
[ -d "$SRC/tile_1/images" ] || { echo "error: $SRC does not hold dubai_dev (tile_N/images, tile_N/masks)" >&2; exit 2; }
rm -rf "$DST"
mkdir -p "$DST/images" "$DST/colour_masks"
for tile in "$SRC"/tile_*; do
  t=$(basename "$tile" | sed 's/tile_/t/')
  for f in "$tile"/images/*.jpg; do ln -s "$f" "$DST/images/${t}_$(basename "$f")"; done
  for f in "$tile"/masks/*.png; do ln -s "$f" "$DST/colour_masks/${t}_$(basename "$f")"; done
done
"$PY" -m training.datasets.convert_masks --masks "$DST/colour_masks" --colors training/datasets/colors/dubai_dev.json \
  --out "$DST/masks"
"$PY" -m training.datasets.build_shards --header recipes/default_model/dubai_dev.yaml --processed-root processed \
  --threads "${THREADS:-2}" --overwrite
