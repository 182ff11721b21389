#!/usr/bin/env bash
# `make gpu-check`: set up what a lent GPU machine lacks from the project's own files, then run
# tools/gpu_check.py (the `cuda` tests and the measurements; a dry run where there is no CUDA).
# ../shared/GPU.md: the machine has torch but not zarr, dask, rasterio, lmdb, faiss; carry their
# wheels in .whl/ (ignored by git) and they are installed into /tmp/site here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${GPU_PY:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
# not installed (no network for pip install -e): the import names of indexer/ and cli/, by links
if ! "$PY" -c "import rsretrieve.indexer.pipeline" >/dev/null 2>&1; then
  shim=$(mktemp -d /tmp/rsretrieve-src.XXXX)
  mkdir "$shim/rsretrieve"
  for entry in rsretrieve/*; do ln -s "$PWD/$entry" "$shim/rsretrieve/"; done
  ln -s "$PWD/indexer" "$shim/rsretrieve/indexer"
  ln -s "$PWD/cli" "$shim/rsretrieve/cli"
  export PYTHONPATH="$shim:${PYTHONPATH:-}"
fi
exec "$PY" tools/gpu_check.py "$@"
