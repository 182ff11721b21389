#!/usr/bin/env python
"""Reader throughput (patches/s) on the bundled real sample: BigEarthNet-v2 GeoTIFF tree vs rico-hdl
LMDB vs Major TOM shard, S2 and S1, on one core and on all cores (process pool).

The sample is small (24 pairs), so each chunk list is read `--repeat` times. The LMDB is the
configilm wheel's when present (--lmdb), else one encoded from the tree into a temp folder.

    .venv/bin/python benchmarks/bench_readers.py [--repeat 20] [--workers N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rsretrieve.datasets import open_dataset, sample_root  # noqa: E402

S2_ALL = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")


def make_lmdb(tmp: Path, wheel_lmdb: Path | None) -> Path:
    root = tmp / "benv2_lmdb"
    root.mkdir()
    for f in ("metadata.parquet", "metadata_for_patches_with_snow_cloud_or_shadow.parquet"):
        shutil.copy(sample_root() / f, root / f)
    if wheel_lmdb and (wheel_lmdb / "data.mdb").exists():
        shutil.copytree(wheel_lmdb, root / "LMDB")
        return root
    import lmdb
    import rasterio
    from safetensors.numpy import save

    from rsretrieve.datasets.benv2 import band_path

    tree = open_dataset("sample", include_snow_cloud=True)
    env = lmdb.open(str(root / "LMDB"), map_size=1 << 27)
    with env.begin(write=True) as txn:
        for mod, bands in (("s2", S2_ALL), ("s1", ("VV", "VH"))):
            for n in tree.names(mod):
                arrs = {}
                for b in bands:
                    with rasterio.open(band_path(sample_root(), n, mod, b)) as f:
                        arrs[b] = f.read(1)
                txn.put(n.encode(), save(arrs))
    env.close()
    return root


def _read(args):
    ds, chunk = args
    return len(ds.read_chunk(chunk))


def run(ds, modality, repeat, workers):
    chunks = ds.chunks(modality) * repeat
    ds.read_chunk(chunks[0])  # warm-up (imports, caches)
    t0 = time.perf_counter()
    if workers == 1:
        n = sum(len(ds.read_chunk(c)) for c in chunks)
    else:
        with ProcessPoolExecutor(workers) as ex:
            list(ex.map(_read, [(ds, chunks[0])] * workers))  # start workers before timing
            t0 = time.perf_counter()
            n = sum(ex.map(_read, [(ds, c) for c in chunks], chunksize=1))
    return n / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--chunk-size", type=int, default=4, help="BENv2 patches per chunk (small: the sample has 24)")
    ap.add_argument("--lmdb", default="/tmp/wheels/cfg/configilm/extra/mock_data/BENv2/BigEarthNet-V2-LMDB")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        lroot = make_lmdb(Path(tmp), Path(a.lmdb) if a.lmdb else None)
        sources = {
            "BENv2 GeoTIFF tree": open_dataset("sample", include_snow_cloud=True, chunk_size=a.chunk_size),
            "BENv2 LMDB": open_dataset("benv2", lroot, include_snow_cloud=True, chunk_size=a.chunk_size),
            "Major TOM shard (120 px tiles)": open_dataset("majortom", sample_root() / "majortom"),
        }
        print(f"patches/s, 24 pairs x {a.repeat} repeats, {a.workers} cores max (os.cpu_count()={os.cpu_count()})")
        head = f"| source | modality | 1 core | {a.workers} cores (process pool) |"
        print(head)
        print("|---|---|---:|---:|")
        for label, ds in sources.items():
            for mod in ("s2", "s1"):
                one = run(ds, mod, a.repeat, 1)
                many = run(ds, mod, a.repeat, a.workers) if a.workers > 1 else one
                print(f"| {label} | {mod} | {one:,.0f} | {many:,.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
