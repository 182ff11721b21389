#!/usr/bin/env bash
# The main job on the bundled real BigEarthNet-v2 sample, as a new user would run it:
# encode + index both modalities, a cross-modal query with a mosaic, and the paper's F1 evaluation.
# Uses the default csmoe-p16 config (about two minutes on 2 CPU cores); the weights are random
# (no pretrained CSMoE weights can be downloaded here), which every command says loudly.
set -euo pipefail
cd "$(dirname "$0")/.."
export RSRETRIEVE_WORKSPACE="${RSRETRIEVE_WORKSPACE:-$PWD/rsretrieve-workspace}"
RS=".venv/bin/rsretrieve"
MODEL="${RSRETRIEVE_DEMO_MODEL:-csmoe-p16}"
SAMPLE="$(.venv/bin/python -c 'import rsretrieve; print(rsretrieve.sample_root())')"
S1_BANDS=("$SAMPLE"/BigEarthNet-S1/*/*/*_VV.tif)  # a glob, not `ls | head`: no SIGPIPE under pipefail
QUERY_TILE="${S1_BANDS[0]}"
QUERY_TILE_STACK="$RSRETRIEVE_WORKSPACE/demo-query-s1.tif"

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

step rsretrieve --version;                          $RS --version
step rsretrieve models;                             $RS models
step rsretrieve index --modality s1 --model "$MODEL"; $RS index --modality s1 --model "$MODEL"
step rsretrieve index --modality s2;                $RS index --modality s2
# A user's query is one multi-band GeoTIFF: stack the sample patch's VV and VH files into one.
.venv/bin/python tools/stack_bands.py "$(dirname "$QUERY_TILE")" "$QUERY_TILE_STACK"
step rsretrieve query "$QUERY_TILE_STACK" --target s2 -k 3 --mosaic "$RSRETRIEVE_WORKSPACE/mosaic.png"
$RS query "$QUERY_TILE_STACK" --target s2 -k 3 --mosaic "$RSRETRIEVE_WORKSPACE/mosaic.png"
step rsretrieve eval sample -o "$RSRETRIEVE_WORKSPACE/eval-sample.json"
$RS eval sample -o "$RSRETRIEVE_WORKSPACE/eval-sample.json"
step rsretrieve info;                               $RS info
printf '\nDemo done: mosaic at %s, evaluation at %s\n' "$RSRETRIEVE_WORKSPACE/mosaic.png" "$RSRETRIEVE_WORKSPACE/eval-sample.json"
