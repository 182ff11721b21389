#!/usr/bin/env python
"""Batch retrieval: 100 query tiles as 100 `rsretrieve query TILE` processes vs one `rsretrieve query FOLDER`.

Makes 100 query tiles: the bundled sample's 24 S2 patch folders stacked into 120 px, 10-band
GeoTIFFs (`tools/stack_bands.py`), repeated with a small per-copy perturbation (±1 % gain, ±20 DN
noise) up to 100 files. Builds an archive of the sample per model (random weights: no checkpoint
can be downloaded here, so scores mean nothing; this measures time only), then times in one run:

  (a) N separate processes `rsretrieve query TILE` (N = 100, or fewer for a large model on a small
      machine: per-tile seconds are compared, and the table says N);
  (b) one process `rsretrieve query FOLDER` over all 100 tiles (one model load, one faiss search).

Both write JSON Lines with k = 10; the rankings of (a) and (b) are compared tile by tile.

    .venv/bin/python benchmarks/bench_batch_query.py [--models csmoe-tiny csmoe-p16] [--separate 100 20] [--tiles 100]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from machine import machine_line  # noqa: E402  (benchmarks/machine.py)
from rsretrieve.datasets import sample_root  # noqa: E402

K = 10


def make_tiles(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """n 120 px S2 GeoTIFFs: the 24 sample patches stacked, then perturbed copies of them."""
    import rasterio
    from stack_bands import stack

    patches = sorted(p for p in (sample_root() / "BigEarthNet-S2").glob("*/*") if p.is_dir())
    bases = [stack(p, folder / "base" / f"{p.name}.tif") for p in patches]
    rng = np.random.default_rng(seed)
    tiles = []
    for i in range(n):
        base = bases[i % len(bases)]
        with rasterio.open(base) as src:
            data, profile, descriptions = src.read().astype(np.float32), src.profile, src.descriptions
        if i >= len(bases):  # a copy: another gain and noise, so no two tiles are the same
            data = data * rng.uniform(0.99, 1.01) + rng.normal(0, 20, data.shape)
        out = folder / "tiles" / f"q{i:03d}_{base.stem}.tif"
        out.parent.mkdir(parents=True, exist_ok=True)
        with rasterio.open(out, "w", **profile) as dst:
            dst.write(np.clip(data, 1, 65535).astype(np.uint16))
            for b, name in enumerate(descriptions, start=1):
                dst.set_band_description(b, name)
        tiles.append(out)
    shutil.rmtree(folder / "base")
    return tiles


def rsretrieve(workspace: Path, *args: str) -> tuple[float, str, str]:
    """(seconds, stdout, stderr) of one `rsretrieve` command in its own process."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "COLUMNS": "200"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "rsretrieve", "--workspace", str(workspace), *args], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"rsretrieve {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout, proc.stderr


def rankings(jsonl: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for row in sorted(map(json.loads, jsonl.splitlines()), key=lambda r: (r["query"], r["rank"])):
        found.setdefault(Path(row["query"]).name, []).append(row["patch_id"])
    return found


def bench(model: str, tiles: list[Path], separate: int, workspace: Path) -> dict:
    seconds, _, _ = rsretrieve(workspace, "index", "--model", model)
    print(f"{model}: indexed the bundled sample (S1 + S2, 48 patches) in {seconds:.0f} s", flush=True)
    query = ("--target", "s2", "-k", str(K), "--format", "jsonl")
    t0, alone = time.perf_counter(), {}
    for tile in tiles[:separate]:
        alone.update(rankings(rsretrieve(workspace, "query", str(tile), *query)[1]))
    separate_s = time.perf_counter() - t0
    batch_s, out, err = rsretrieve(workspace, "query", str(tiles[0].parent), *query)
    together = rankings(out)
    assert len(together) == len(tiles) and sum(map(len, together.values())) == K * len(tiles), "a batch result is missing"
    same = sum(alone[name] == together[name] for name in alone)
    summary = next((line for line in err.splitlines() if line.startswith(f"{len(tiles)} queries")), "")
    return {"model": model, "separate": separate, "separate_s": separate_s, "tiles": len(tiles), "batch_s": batch_s,
            "same": same, "summary": summary}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["csmoe-tiny", "csmoe-p16"])
    ap.add_argument("--separate", type=int, nargs="+", default=[100, 20], help="separate processes per model, in --models order")
    ap.add_argument("--tiles", type=int, default=100, help="query tiles in the folder of (b)")
    ap.add_argument("--keep", type=Path, help="keep the tiles and workspaces in this folder")
    args = ap.parse_args()
    if len(args.separate) != len(args.models):
        ap.error("give one --separate count per model")

    scratch = args.keep or Path(tempfile.mkdtemp(prefix="bench_batch_query_"))
    tiles = make_tiles(scratch, args.tiles)
    print(f"made {len(tiles)} query tiles (120 px, 10-band S2 GeoTIFFs) in {tiles[0].parent}", flush=True)
    rows = [bench(model, tiles, min(n, len(tiles)), scratch / f"ws-{model}") for model, n in zip(args.models, args.separate)]

    print(f"\n{machine_line()}")
    print("RANDOM-INIT weights (no checkpoint can be downloaded here): the scores are not results; this measures time only.\n")
    print("| model | (a) separate processes | (a) total s | (a) s/tile | (b) tiles in one process | (b) total s | (b) s/tile | speed-up (s/tile) | same top-10 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        per_a, per_b = r["separate_s"] / r["separate"], r["batch_s"] / r["tiles"]
        print(f"| {r['model']} | {r['separate']} | {r['separate_s']:.1f} | {per_a:.2f} | {r['tiles']} | {r['batch_s']:.1f} | {per_b:.3f} | "
              f"{per_a / per_b:.1f}x | {r['same']}/{r['separate']} |")
    print()
    for r in rows:
        print(f"{r['model']} (b): {r['summary']}")
    if args.keep is None:
        shutil.rmtree(scratch)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
