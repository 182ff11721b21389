"""The encoder stage end to end, beside what bounds it: the reader pool and the encoder alone.

    python benchmarks/bench_pipeline.py [--sources tree,lmdb,majortom] [--models csmoe-tiny,csmoe-p16]
                                        [--device cpu|cuda] [--readers N] [--patches 960] [--batch-size B]

Data, in a temporary folder: the bundled sample's S2 patches replicated under new names into a
BigEarthNet-v2 release tree (`tree`) and a rico-hdl LMDB made from it (`lmdb`), and generated
Major TOM Core-S2L2A shards of 1068 px cells (`majortom`, deflate-compressed band cells as the
release has them; 100 windows of 120 px per cell). For each source and model, in one run:

  reader pool  = every chunk read by a pool of processes, one per core (`--readers`), nothing else;
  encoder      = the model alone on the same raw pixels, already in memory (`embed_raw`);
  end to end   = `rsretrieve.indexer.pipeline.encode` on the local cluster of `--readers` reader
                 processes and one encoder worker (per GPU), started and warmed up beforehand,
                 writing the Zarr store.

The ratios end-to-end / reader pool and end-to-end / encoder say how close the stage comes to its
limit: the smaller of the two bounds (reading for small models, the encoder for large ones).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rsretrieve.datasets import sample_root
from rsretrieve.datasets.benv2 import product_of
from rsretrieve.indexer.cluster import cluster
from rsretrieve.indexer.jobs import is_small_model
from rsretrieve.indexer.pipeline import DatasetSpec, EncoderSpec, encode
from rsretrieve.models.checkpoint import load_model
from rsretrieve.models.inference import embed_raw
from rsretrieve.pixels import RawPixels

S2_ALL = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")


# -- data ----------------------------------------------------------------------------------------


def replicate_tree(dest: Path, patches: int) -> Path:
    """A release tree holding about `patches` S2 patches (and their S1 pairs): the sample's 24 pairs,
    copied under new row/col names so that every id is unique."""
    src = sample_root()
    rows = pq.read_table(src / "metadata.parquet").to_pylist() + pq.read_table(
        src / "metadata_for_patches_with_snow_cloud_or_shadow.parquet").to_pylist()
    out = []
    for copy in range(-(-patches // len(rows))):
        for row in rows:
            new_s2, new_s1 = _rename(row["patch_id"], copy), _rename(row["s1_name"], copy)
            for name, new, modality in ((row["patch_id"], new_s2, "s2"), (row["s1_name"], new_s1, "s1")):
                folder = "BigEarthNet-S2" if modality == "s2" else "BigEarthNet-S1"
                old_dir = src / folder / product_of(name, modality) / name
                new_dir = dest / folder / product_of(new, modality) / new
                new_dir.mkdir(parents=True, exist_ok=True)
                for tif in old_dir.glob("*.tif"):
                    shutil.copyfile(tif, new_dir / tif.name.replace(name, new))
            out.append({**row, "patch_id": new_s2, "s1_name": new_s1, "contains_seasonal_snow": False, "contains_cloud_or_shadow": False})
    table = pa.Table.from_pylist(out)
    pq.write_table(table, dest / "metadata.parquet")
    pq.write_table(table.slice(0, 0), dest / "metadata_for_patches_with_snow_cloud_or_shadow.parquet")
    return dest


def _rename(name: str, copy: int) -> str:
    head, row, col = name.rsplit("_", 2)
    return f"{head}_{int(row) + 100 * (copy + 1)}_{col}"


def make_lmdb(tree: Path, dest: Path) -> Path:
    """A rico-hdl LMDB (safetensors values) of the tree's S2 patches, with its metadata beside it."""
    import lmdb
    import rasterio
    from safetensors.numpy import save

    dest.mkdir()
    for f in ("metadata.parquet", "metadata_for_patches_with_snow_cloud_or_shadow.parquet"):
        shutil.copy(tree / f, dest / f)
    env = lmdb.open(str(dest / "LMDB"), map_size=1 << 32)
    with env.begin(write=True) as txn:
        for name in pq.read_table(tree / "metadata.parquet", columns=["patch_id"]).column(0).to_pylist():
            folder = tree / "BigEarthNet-S2" / product_of(name, "s2") / name
            bands = {}
            for band in S2_ALL:
                with rasterio.open(folder / f"{name}_{band}.tif") as ds:
                    bands[band] = ds.read(1)
            txn.put(name.encode(), save(bands))
    env.close()
    return dest


def make_majortom(dest: Path, cells: int) -> Path:
    """Core-S2L2A shards of `cells` generated 1068 px cells: smooth fields plus noise, uint16, each
    band a deflate-compressed GeoTIFF at its native resolution (10/20/60 m)."""
    from rasterio.io import MemoryFile
    from rasterio.transform import from_origin

    rng = np.random.default_rng(0)
    folder = dest / "Core-S2L2A" / "images"
    folder.mkdir(parents=True)
    res = {"B01": 60, "B09": 60, "B02": 10, "B03": 10, "B04": 10, "B08": 10}
    rows = []
    for cell in range(cells):
        row = {"product_id": f"S2B_MSIL2A_2020{cell:04d}", "grid_cell": f"{454 + cell}U_120R", "product_datetime": "20200601T101031"}
        for band in S2_ALL:
            r = res.get(band, 20)
            n = 10680 // r
            yy, xx = np.mgrid[0:n, 0:n] / n
            field = 1500 + 800 * np.sin(6 * xx + cell) * np.cos(4 * yy) + 120 * rng.standard_normal((n, n))
            with MemoryFile() as mf:
                with mf.open(driver="GTiff", height=n, width=n, count=1, dtype="uint16", crs="EPSG:32633",
                             transform=from_origin(400000, 4520000, r, r), compress="deflate", predictor=2) as ds:
                    ds.write(np.clip(field, 1, 60000).astype(np.uint16), 1)
                row[band] = bytes(mf.read())
        rows.append(row)
    pq.write_table(pa.Table.from_pylist(rows), folder / "part_00001.parquet", row_group_size=1)
    return dest


# -- measurements --------------------------------------------------------------------------------


def _read(args) -> int:
    spec, chunk = args
    return len(spec.open().read_chunk(chunk))


def reader_pool(spec: DatasetSpec, processes: int) -> tuple[float, int]:
    chunks = spec.open().chunks("s2")
    with ProcessPoolExecutor(processes) as pool:
        list(pool.map(_read, [(spec, chunks[0])]))  # start the workers
        start = time.perf_counter()
        n = sum(pool.map(_read, [(spec, c) for c in chunks]))
    return time.perf_counter() - start, n


def encoder_alone(spec: DatasetSpec, model_name: str, device: str, batch_size: int) -> tuple[float, int]:
    dataset = spec.open()
    raw = RawPixels.concat([dataset.read_chunk(c).pixels for c in dataset.chunks("s2")])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(model_name, device=device)
    embed_raw(model, raw.take(slice(0, batch_size)), "s2", device, batch_size)  # warm-up
    start = time.perf_counter()
    embed_raw(model, raw, "s2", device, batch_size)
    return time.perf_counter() - start, len(raw)


def end_to_end(spec: DatasetSpec, model_name: str, device: str, batch_size: int, readers: int, workdir: Path) -> tuple[float, int]:
    encoder = EncoderSpec(model_name, device, batch_size)
    warm = DatasetSpec("sample", options=(("include_snow_cloud", True),))
    with cluster(device=device, readers=readers, small_model=is_small_model(model_name)) as workers:
        encode(warm, "s2", workdir / f"warm-{model_name}.zarr", encoder, client=workers)  # start, load the model
        start = time.perf_counter()
        summary = encode(spec, "s2", workdir / f"{model_name}-{time.monotonic_ns()}.zarr", encoder, client=workers)
    return time.perf_counter() - start, summary.patches_encoded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", default="tree,lmdb,majortom")
    parser.add_argument("--models", default="csmoe-tiny,csmoe-p16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--readers", type=int, default=os.cpu_count())
    parser.add_argument("--patches", type=int, default=960, help="S2 patches per source (tree/lmdb); Major TOM: cells x 100")
    parser.add_argument("--p16-patches", type=int, default=240, help="patches for models other than csmoe-tiny (slow on a CPU)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--chunk-size", type=int, default=128, help="BigEarthNet patches per chunk (the reader's default is 256)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for model in args.models.split(","):
            n = args.patches if model == "csmoe-tiny" else args.p16_patches
            tree = replicate_tree(tmp / f"tree-{model}", n)
            specs = {"tree": DatasetSpec("benv2", str(tree), options=(("chunk_size", args.chunk_size),)),
                     "lmdb": DatasetSpec("benv2", str(make_lmdb(tree, tmp / f"lmdb-{model}")), options=(("chunk_size", args.chunk_size),)),
                     "majortom": DatasetSpec("majortom", str(make_majortom(tmp / f"mt-{model}", max(1, n // 100))))}
            batch = args.batch_size or EncoderSpec(device=args.device).resolved_batch_size()
            for source in args.sources.split(","):
                pool_s, pool_n = reader_pool(specs[source], args.readers)
                enc_s, enc_n = encoder_alone(specs[source], model, args.device, batch)
                e2e_s, e2e_n = end_to_end(specs[source], model, args.device, batch, args.readers, tmp)
                rows.append((source, model, e2e_n, pool_n / pool_s, enc_n / enc_s, e2e_n / e2e_s))
    print(f"\nmachine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, device {args.device}; "
          f"{time.strftime('%Y-%m-%d')}; {args.readers} readers; S2 patches/s")
    header = f"{'source':<9} {'model':<11} {'patches':>7} {'reader pool':>12} {'encoder':>9} {'end to end':>11} {'e2e/pool':>9} {'e2e/enc':>8}"
    print(header)
    print("-" * len(header))
    for source, model, n, pool, enc, e2e in rows:
        print(f"{source:<9} {model:<11} {n:>7} {pool:>12.1f} {enc:>9.1f} {e2e:>11.1f} {e2e / pool:>8.2f}x {e2e / enc:>7.2f}x")


if __name__ == "__main__":
    main()
