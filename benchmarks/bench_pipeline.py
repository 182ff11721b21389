"""Encoder-stage overhead: end-to-end patches/s of the Dask pipeline vs the encoder alone.

    python benchmarks/bench_pipeline.py [--replicas 10] [--models csmoe-tiny,csmoe-p16] [--device cpu]

The bundled sample (24 real pairs) is replicated under new patch names into a BigEarthNet-v2 release
tree in a temporary folder, so there is enough work to time. For each model, in one run:
  encoder alone  = all pixels already in memory, `embed_raw` over the same batches of 32;
  pipeline       = `indexer.pipeline.encode` (read GeoTIFFs, normalise, encode, write Zarr) on a
                   LocalCluster sized to the machine, started beforehand (steady state), and
                   the same including the cluster's start and model load (what a CLI user waits).
Overhead ratio = pipeline time / encoder-alone time (1.0 = no overhead).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rsretrieve.indexer.pipeline import DatasetSpec, EncoderSpec, encode, local_cluster_kwargs
from rsretrieve.datasets.benv2 import product_of
from rsretrieve.models.checkpoint import load_model
from rsretrieve.datasets import open_dataset, sample_root
from rsretrieve.models.inference import embed_raw


def replicate_sample(dest: Path, replicas: int) -> Path:
    """A release tree with `replicas` copies of each sample pair, renamed row/col so ids are unique."""
    src = sample_root()
    meta = pq.read_table(src / "metadata.parquet").to_pylist()
    snow = pq.read_table(src / "metadata_for_patches_with_snow_cloud_or_shadow.parquet").to_pylist()
    rows = []
    for copy in range(replicas):
        for row in meta + snow:
            s2, s1 = row["patch_id"], row["s1_name"]
            new_s2, new_s1 = _rename(s2, copy), _rename(s1, copy)
            for name, new, sensor in ((s2, new_s2, "S2"), (s1, new_s1, "S1")):
                old_dir = src / f"BigEarthNet-{sensor}" / product_of(name, "s1" if sensor == "S1" else "s2") / name
                new_dir = dest / f"BigEarthNet-{sensor}" / product_of(new, "s1" if sensor == "S1" else "s2") / new
                new_dir.mkdir(parents=True, exist_ok=True)
                for tif in old_dir.glob("*.tif"):
                    shutil.copyfile(tif, new_dir / tif.name.replace(name, new))
            rows.append({**row, "patch_id": new_s2, "s1_name": new_s1, "contains_seasonal_snow": False, "contains_cloud_or_shadow": False})
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, dest / "metadata.parquet")
    pq.write_table(table.slice(0, 0), dest / "metadata_for_patches_with_snow_cloud_or_shadow.parquet")
    return dest


def _rename(name: str, copy: int) -> str:
    head, row, col = name.rsplit("_", 2)
    return f"{head}_{int(row) + 100 * (copy + 1)}_{col}"


def bench_model(root: Path, model_name: str, device: str, workdir: Path) -> dict:
    from distributed import Client, LocalCluster

    spec = DatasetSpec("benv2", str(root), None, (("chunk_size", 64),))
    dataset = spec.open()
    chunks = dataset.chunks("s2")
    batches = [dataset.read_chunk(c).pixels for c in chunks]
    n = sum(len(b) for b in batches)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(model_name, device=device)
    embed_raw(model, batches[0][:4], "s2", device)  # warm-up
    start = time.perf_counter()
    for pixels in batches:
        embed_raw(model, pixels, "s2", device, batch_size=32)
    encoder_s = time.perf_counter() - start
    del model

    encoder = EncoderSpec(model_name, device, 32)
    cold_start = time.perf_counter()
    encode(spec, "s2", workdir / f"{model_name}-cold.zarr", encoder)  # starts and stops its own cluster
    cold_s = time.perf_counter() - cold_start

    with LocalCluster(**local_cluster_kwargs(device)) as cluster, Client(cluster) as client:
        encode(spec, "s1", workdir / f"{model_name}-warmup.zarr", encoder, client=client)  # loads the model in the worker
        warm_start = time.perf_counter()
        encode(spec, "s2", workdir / f"{model_name}-warm.zarr", encoder, client=client)
        warm_s = time.perf_counter() - warm_start
    return {"model": model_name, "patches": n, "encoder_s": encoder_s, "warm_s": warm_s, "cold_s": cold_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=10)
    parser.add_argument("--models", default="csmoe-tiny,csmoe-p16")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = replicate_sample(Path(tmp) / "benv2", args.replicas)
        results = [bench_model(root, m, args.device, Path(tmp)) for m in args.models.split(",")]
    print(f"\nmachine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, device {args.device}; "
          f"{time.strftime('%Y-%m-%d')}; S2 patches read from a GeoTIFF release tree, 64 per chunk, batch 32")
    header = f"{'model':<12} {'patches':>7} {'encoder alone':>14} {'pipeline (warm)':>16} {'overhead':>9} {'CLI incl. start':>16} {'overhead':>9}"
    print(header)
    print("-" * len(header))
    for r in results:
        rate = lambda s: f"{r['patches'] / s:8.1f} p/s"  # noqa: E731
        print(f"{r['model']:<12} {r['patches']:>7} {rate(r['encoder_s']):>14} {rate(r['warm_s']):>16} {r['warm_s'] / r['encoder_s']:>8.2f}x "
              f"{rate(r['cold_s']):>16} {r['cold_s'] / r['encoder_s']:>8.2f}x")


if __name__ == "__main__":
    main()
