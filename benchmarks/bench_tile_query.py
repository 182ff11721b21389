#!/usr/bin/env python
"""Peak memory and time of `rsretrieve query TILE` on a full-size Sentinel-2 tile.

Generates (once; kept with --keep) a 10,980 x 10,980 px, 10-band uint16 GeoTIFF (512 px blocks,
deflate, smooth content so it compresses) and a 2,400 px one, builds an archive of the bundled sample with the small
random-init model `csmoe-tiny` (its scores mean nothing; this measures memory and time only), then
runs each query in its own process and reads that process's peak RSS (os.wait4). A one-patch query
(a sample patch folder) gives the fixed cost: Python, torch, faiss and the model; the 2,400 px tile
shows what a tile's height does not add (a strip is as wide as the tile, so width does).

    .venv/bin/python benchmarks/bench_tile_query.py [--sizes 2400 10980] [--dir D --keep] [--workspace W]
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

from machine import machine_line  # noqa: E402  (benchmarks/machine.py)
from rsretrieve.datasets import sample_root  # noqa: E402

BANDS = 10
BLOCK = 512  # GeoTIFF tile size; rows are written one block row at a time


def make_tile(path: Path, size: int) -> None:
    """A smooth 10-band uint16 S2 tile, written one 512-row window at a time (never whole in memory)."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    profile = dict(driver="GTiff", height=size, width=size, count=BANDS, dtype="uint16", crs="EPSG:32633",
                   transform=from_origin(399_960, 5_300_040, 10, 10), tiled=True, blockxsize=BLOCK, blockysize=BLOCK,
                   compress="deflate", predictor=2, nodata=0, BIGTIFF="IF_SAFER")
    cols = np.arange(size)
    tmp = path.with_suffix(".partial.tif")
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(tmp, "w", **profile) as ds:
        for row in range(0, size, BLOCK):
            h = min(BLOCK, size - row)
            rows = np.arange(row, row + h)
            block = np.empty((BANDS, h, size), np.uint16)
            for b in range(BANDS):  # separable waves: field-like structure, cheap to compute, compressible
                wave = np.sin(cols / (150 + 20 * b))[None, :] * np.cos(rows / (170 + 15 * b))[:, None]
                block[b] = (600 + 150 * b + 400 * wave).astype(np.uint16)
            ds.write(block, window=Window(0, row, size, h))
    tmp.replace(path)


def rsretrieve(workspace: Path, *args: str) -> tuple[float, float, str]:
    """(seconds, peak RSS in GB, stdout) of one `rsretrieve` command in its own process."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "rsretrieve", "--workspace", str(workspace), *args],
                                stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not every child's maximum
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if proc.returncode:
            raise SystemExit(f"rsretrieve {' '.join(args)} exited {proc.returncode}:\n{err.read()[-3000:]}")
        return seconds, usage.ru_maxrss * 1024 / 1e9, out.read()  # ru_maxrss is in KiB on Linux


def query(workspace: Path, tile: Path) -> tuple[float, float, str]:
    seconds, rss, out = rsretrieve(workspace, "query", str(tile), "--target", "s2", "-k", "10", "--format", "json")
    return seconds, rss, json.loads(out)["query_label"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2_400, 10_980], help="tile sides in px (a Sentinel-2 tile: 10980)")
    ap.add_argument("--dir", type=Path, help="folder of the tiles s2_<size>.tif (generated there if missing)")
    ap.add_argument("--workspace", type=Path, help="workspace of the sample archive (built there if missing)")
    ap.add_argument("--keep", action="store_true", help="keep the generated tile and workspace for the next run")
    args = ap.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="bench_tile_query_"))
    tiles = {size: (args.dir or scratch) / f"s2_{size}.tif" for size in args.sizes}
    workspace = args.workspace or scratch / "workspace"
    for size, tile in tiles.items():
        if not tile.exists():
            t0 = time.perf_counter()
            make_tile(tile, size)
            print(f"generated {tile} ({tile.stat().st_size / 1e9:.2f} GB on disk) in {time.perf_counter() - t0:.0f} s")
    if not any(workspace.glob("indexes/*/s2")):
        seconds, _, _ = rsretrieve(workspace, "index", "--model", "csmoe-tiny")
        print(f"indexed the bundled sample with csmoe-tiny in {seconds:.0f} s")

    patch = sorted(p for p in (sample_root() / "BigEarthNet-S2").glob("*/*") if p.is_dir())[0]
    rows = []
    for name, path, size in [("one sample patch (fixed cost)", patch, 120)] + [("generated S2 tile", t, s) for s, t in tiles.items()]:
        seconds, rss, label = query(workspace, path)
        raw = BANDS * size * size * 2 / 1e9
        fixed = rows[0][4] if rows else rss
        ratio = f"{rss / raw:.2f}" if size > 120 else "-"
        rows.append((name, f"{size:,} x {size:,}", f"{(size // 120) ** 2:,}", f"{seconds:.1f}", rss, f"{rss - fixed:.2f}", f"{raw:.3f}", ratio, label))

    print(f"\n{machine_line()}")
    print("csmoe-tiny is RANDOM-INIT: its scores are not results; this measures memory and time only.\n")
    print("| query | tile px | patches | seconds | peak RSS GB | above fixed cost GB | raw tile GB | RSS / raw |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print("| " + " | ".join(f"{x:.2f}" if isinstance(x, float) else x for x in row[:8]) + " |")
    print("\nquery labels: " + "; ".join(row[8] for row in rows))
    if args.keep:
        print(f"kept: --dir {next(iter(tiles.values())).parent} --workspace {workspace}")
    if not args.keep or not any(scratch.iterdir()):
        shutil.rmtree(scratch)  # only what this run made: a given --dir or --workspace lies elsewhere
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
